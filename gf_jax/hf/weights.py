"""Which Hugging Face tensor each gf_jax parameter is, and how its layout differs.

HF linear weights are ``out x in`` (``y = x @ W.T``); gf_jax stores ``in x out`` with the head axes
split out (``wq_DxNxH``, ``wo_NxHxD``). Each layout below converts a *block* of the HF tensor
into the matching block of ours, and maps an index of ours to the HF block it needs, so a device
shard can be filled from exactly the bytes it holds (head_dim is never sharded, so a run of whole
heads is a contiguous run of HF rows or columns).
"""

from __future__ import annotations

import numpy as np

from gf_jax.model import ModelConfig

SAME = "same"  # embedding V x D, norm scales: identical layout
LINEAR = "linear"  # ours I x O  <-  HF O x I
IN_HEADS = "in_heads"  # ours D x N x H  <-  HF (N*H) x D   (q/k/v_proj)
HEADS_OUT = "heads_out"  # ours N x H x D  <-  HF D x (N*H)   (o_proj)
HEADS_BIAS = "heads_bias"  # ours N x H  <-  HF (N*H)        (q/k/v_proj bias)

# Buffers some old checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def parameter_names(config: ModelConfig) -> dict[tuple, tuple[str, str]]:
    """gf_jax state path -> (HF tensor name, layout), for every parameter of ``config``'s model."""
    names: dict[tuple, tuple[str, str]] = {
        ("embedding",): ("model.embed_tokens.weight", SAME),
        ("final_norm", "scale"): ("model.norm.weight", SAME),
    }
    if not config.tie_embeddings:
        names[("lm_head",)] = ("lm_head.weight", LINEAR)
    for i in range(config.n_layers):
        p, ours = f"model.layers.{i}.", ("blocks", i)
        names[(*ours, "attn_norm", "scale")] = (p + "input_layernorm.weight", SAME)
        names[(*ours, "mlp_norm", "scale")] = (p + "post_attention_layernorm.weight", SAME)
        for w, proj in (("wq", "q"), ("wk", "k"), ("wv", "v")):
            names[(*ours, "attn", w)] = (p + f"self_attn.{proj}_proj.weight", IN_HEADS)
            if config.qkv_bias:
                names[(*ours, "attn", "b" + proj)] = (p + f"self_attn.{proj}_proj.bias", HEADS_BIAS)
        names[(*ours, "attn", "wo")] = (p + "self_attn.o_proj.weight", HEADS_OUT)
        if config.qk_norm:
            names[(*ours, "attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", SAME)
            names[(*ours, "attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", SAME)
        for w, proj in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            names[(*ours, "mlp", w)] = (p + f"mlp.{proj}_proj.weight", LINEAR)
    return names


def hf_shape(layout: str, shape: tuple) -> tuple:
    """The HF tensor's shape for a parameter of ours of ``shape``."""
    if layout == SAME:
        return tuple(shape)
    if layout == LINEAR:
        return (shape[1], shape[0])
    if layout == IN_HEADS:
        return (shape[1] * shape[2], shape[0])
    if layout == HEADS_OUT:
        return (shape[2], shape[0] * shape[1])
    return (shape[0] * shape[1],)


def _resolve(index: tuple, shape: tuple) -> tuple[slice, ...]:
    """Concrete step-1 slices for every axis (callbacks may pass ``slice(None)`` or fewer axes)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _head_rows(s: slice, h: int) -> slice:
    return slice(s.start * h, s.stop * h)


def read_block(view: np.ndarray, layout: str, shape: tuple, index: tuple) -> np.ndarray:
    """Our block ``param[index]`` (``param`` of ``shape``) read from the HF tensor ``view``.

    Only the HF rows/columns the block needs are touched; the result is a fresh array.
    """
    idx = _resolve(index, shape)
    if layout == SAME:
        return np.array(view[idx])
    if layout == LINEAR:
        return np.array(view[idx[1], idx[0]].T)
    h = shape[-2] if layout == HEADS_OUT else shape[-1]
    if layout == IN_HEADS:  # idx = (d, n, h)
        block = view[_head_rows(idx[1], shape[2]), idx[0]].T
        return np.array(block.reshape(block.shape[0], -1, shape[2])[:, :, idx[2]])
    if layout == HEADS_OUT:  # idx = (n, h, d)
        block = view[idx[2], _head_rows(idx[0], h)].T
        return np.array(block.reshape(-1, h, block.shape[1])[:, idx[1], :])
    block = view[_head_rows(idx[0], shape[1])]  # HEADS_BIAS, idx = (n, h)
    return np.array(block.reshape(-1, shape[1])[:, idx[1]])


def to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    """The HF tensor of a whole parameter of ours (inverse of :func:`read_block`)."""
    if layout == SAME:
        return array
    if layout == LINEAR:
        return array.T
    if layout == IN_HEADS:
        return array.reshape(array.shape[0], -1).T
    if layout == HEADS_OUT:
        return array.reshape(-1, array.shape[-1]).T
    return array.reshape(-1)
