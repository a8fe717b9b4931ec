"""LLaMA-style decoder in Flax NNX: RMSNorm pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Shapes: B batch, T query length, S key length (= T in training, cache slots when decoding),
D d_model, N query heads, K key/value heads, G = N // K query heads per K/V head, H head_dim,
F d_ff, V vocab.

Every parameter carries logical axis names (``"vocab"``, ``"embed"``, ``"heads"``, ``"kv_heads"``,
``"head_dim"``, ``"mlp"``, ``"norm"``) in its ``out_sharding`` metadata; ``gf_jax.sharding`` maps them
to mesh axes, so the model itself never mentions a mesh. Parameters are created without eager
sharding, so the model can be built anywhere (plain CPU, ``nnx.eval_shape``, or under ``jax.jit``
with ``out_shardings`` from ``gf_jax.sharding.model_shardings``).

Attention. Training attention is causal and restricted to equal segment ids (packed documents);
``gf_jax.attention`` holds the implementations (``model.attention``: XLA einsum, cuDNN, Pallas
splash on TPU, Pallas on GPU) and picks one for ``auto``. KV-cache decoding always uses the XLA path.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gf_jax import lora as lora_lib
from gf_jax.attention import ATTENTION_OUT, IMPLEMENTATIONS, attend, attention_xla
from gf_jax.lora import LoRAConfig
from gf_jax.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "save_dots", "minimal")
# Name of the saved MLP input for the ``minimal`` remat policy.
_MLP_IN = "mlp_in"
_ROPE_SCALING = ("none", "linear", "llama3")
# Logical name of the stacked layer axis (``model.scan_layers``); never sharded.
LAYERS = "layers"
# Logical axes of the residual stream: batch-sharded, replicated along length and d_model. Without
# this hint, propagation may follow the fsdp-sharded weights and split activations along d_model.
_RESIDUAL = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, dtypes and memory policy of the decoder.

    ``param_dtype`` is the storage dtype of the weights (and of the optimizer's view of them);
    ``dtype`` is the compute dtype of matmuls and activations (``"auto"``: bfloat16 on GPU/TPU,
    float32 on CPU). Norms, RoPE and the attention softmax always run in float32.
    ``remat``: ``"none"`` keeps all activations, ``"full"`` recomputes each block in the backward
    pass, ``"save_dots"`` keeps only the weight matmul outputs
    (``jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims``), ``"minimal"`` only each
    block's attention output and MLP input. ``scan_layers`` runs the blocks as one ``lax.scan``
    over stacked weights (the policy then applies per layer inside the scan body).
    """

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    # Stack the blocks into one module with a leading layer axis and run them with a scan: one
    # block is compiled instead of n_layers (compile time flat in depth); the state layout differs
    # (``layers`` instead of ``blocks``; gf_jax.layers converts checkpoints between the two).
    scan_layers: bool = False
    attention: str = "auto"
    attention_block_q: int = 512    # splash attention tiles (multiples of 128; cut to divide T)
    attention_block_kv: int = 512
    init_std: float = 0.02
    # Pretrained-architecture features (gf_jax.hf imports them); the defaults are plain LLaMA.
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of each query/key head, before RoPE
    rope_scaling: str = "none"  # "none" | "linear" | "llama3" (HF rope_scaling / rope_parameters)
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
    sliding_window: int | None = None  # Mistral: recorded so max_seq_len can never exceed it
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # adapters (gf_jax.lora); rank 0: none

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}); change one of them."
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) is not divisible by model.n_heads ({self.n_heads}); "
                "change them or set model.head_dim explicitly."
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.resolved_head_dim}.")
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"model.param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}.")
        if self.dtype not in (*_DTYPES, "auto"):
            raise ValueError(f"model.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if self.remat not in _REMAT:
            raise ValueError(f"model.remat must be one of {_REMAT}, got {self.remat!r}.")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}.")
        for name in ("attention_block_q", "attention_block_kv"):
            if getattr(self, name) <= 0 or getattr(self, name) % 128:
                raise ValueError(f"model.{name} must be a positive multiple of 128, got {getattr(self, name)!r}.")
        if self.rope_scaling not in _ROPE_SCALING:
            raise ValueError(f"model.rope_scaling must be one of {_ROPE_SCALING}, got {self.rope_scaling!r}.")
        # Sliding-window attention is not implemented; it equals full attention while every
        # sequence fits in the window, so the window caps the sequence length instead.
        if self.sliding_window is not None and self.max_seq_len > self.sliding_window:
            raise ValueError(
                f"model.max_seq_len ({self.max_seq_len}) exceeds model.sliding_window ({self.sliding_window}), "
                "and gf_jax has no sliding-window attention; set model.max_seq_len <= the window."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        """The jnp dtype of activations; ``"auto"`` resolves against the default backend."""
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]


# --------------------------------------------------------------------------------------------
# Pure numerics
# --------------------------------------------------------------------------------------------


def rms_norm(x_BxTxD, scale_D, eps: float, dtype):
    """RMSNorm in float32 (LLaMA): ``x / sqrt(mean(x^2) + eps) * scale``, returned in ``dtype``."""
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(jnp.float32)).astype(dtype)


def rope_inv_freq(config: ModelConfig):
    """Scaled inverse frequencies ``inv_freq_Hh`` (float32 numpy) of ``config.rope_scaling``,
    or None for plain RoPE (then :func:`apply_rope` computes them as it always has).

    ``linear`` divides every frequency by the factor (positions / factor). ``llama3``
    (LLaMA-3.1/3.2, HF ``modeling_rope_utils``) divides only the long wavelengths
    (> original_len / low_freq_factor) by the factor, keeps the short ones
    (< original_len / high_freq_factor) and interpolates smoothly in between.
    """
    if config.rope_scaling == "none":
        return None
    import numpy as np

    h = config.resolved_head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    low, high, old_len = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, theta: float, inv_freq_Hh=None):
    """Rotary embedding, rotate-half convention (HF LLaMA): pairs are (i, i + H/2).

    Angle of pair i at position p is ``p * theta ** (-2i / H)``, or ``p * inv_freq_Hh[i]`` when
    scaled frequencies are given (:func:`rope_inv_freq`). Computed in float32.
    """
    h = x_BxTxNxH.shape[-1]
    if inv_freq_Hh is None:
        inv_freq_Hh = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BxTxHh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Hh
    cos = jnp.cos(angle_BxTxHh)[:, :, None, :]
    sin = jnp.sin(angle_BxTxHh)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    # eager_sharding=False: the logical names are metadata only; placement happens in
    # gf_jax.sharding (jit out_shardings), so no mesh is needed to build a model.
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig):
        init = nnx.with_partitioning(nnx.initializers.ones, ("norm",), eager_sharding=False)
        self.scale = nnx.Param(init(jax.random.key(0), (dim,), config.weight_dtype))
        self.eps = config.norm_eps

    def __call__(self, x_BxTxD, dtype):
        return rms_norm(x_BxTxD, self.scale[...], self.eps, dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.config = config
        self.wq = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), wd)
        self.wk = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), wd)
        self.wv = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), wd)
        self.wo = _param(rngs, init, (n, h, d), ("heads", "head_dim", "embed"), wd)
        if config.qkv_bias:
            zeros = nnx.initializers.zeros
            self.bq = _param(rngs, zeros, (n, h), ("heads", "head_dim"), wd)
            self.bk = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), wd)
            self.bv = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), wd)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config)
            self.k_norm = RMSNorm(h, config)
        adapters = lora_lib.make_adapters(config, {
            "q": (d, n * h, "embed", "heads"), "k": (d, k * h, "embed", "kv_heads"),
            "v": (d, k * h, "embed", "kv_heads"), "o": (n * h, d, "heads", "embed")}, rngs)
        if adapters is not None:
            self.lora = adapters

    def _qkv(self, x_BxTxD, positions_BxT, dtype):
        c = self.config
        q = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.wq[...].astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.wv[...].astype(dtype))
        q = lora_lib.add_update(self, "q", q, x_BxTxD, c)
        k = lora_lib.add_update(self, "k", k, x_BxTxD, c)
        v = lora_lib.add_update(self, "v", v, x_BxTxD, c)
        if c.qkv_bias:
            q, k, v = q + self.bq[...].astype(dtype), k + self.bk[...].astype(dtype), v + self.bv[...].astype(dtype)
        if c.qk_norm:
            q, k = self.q_norm(q, dtype), self.k_norm(k, dtype)
        inv_freq_Hh = rope_inv_freq(c)
        return (apply_rope(q, positions_BxT, c.rope_theta, inv_freq_Hh),
                apply_rope(k, positions_BxT, c.rope_theta, inv_freq_Hh), v)

    def _out(self, o_BxTxNxH, dtype):
        out_BxTxD = jnp.einsum("btnh,nhd->btd", o_BxTxNxH, self.wo[...].astype(dtype))
        return lora_lib.add_update(self, "o", out_BxTxD, o_BxTxNxH, self.config)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, dtype):
        q, k, v = self._qkv(x_BxTxD, positions_BxT, dtype)
        return self._out(attend(self.config, q, k, v, segment_ids_BxT, dtype), dtype)

    def decode(self, x_BxTxD, positions_BxT, layer_cache, cache_index_B, dtype):
        """Write this call's K/V at slots [cache_index, cache_index + T) and attend to the cache."""
        q, k, v = self._qkv(x_BxTxD, positions_BxT, dtype)
        cache_k, cache_v = layer_cache["k"], layer_cache["v"]
        write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
        cache_k = write(cache_k, k.astype(cache_k.dtype), cache_index_B)
        cache_v = write(cache_v, v.astype(cache_v.dtype), cache_index_B)
        t, s = x_BxTxD.shape[1], cache_k.shape[1]
        # A query in slot i sees slots <= i; slots above it are unwritten (or stale) and masked.
        slot_BxT = cache_index_B[:, None] + jnp.arange(t)[None, :]
        mask_BxTxS = jnp.arange(s)[None, None, :] <= slot_BxT[:, :, None]
        o = attention_xla(q, cache_k.astype(dtype), cache_v.astype(dtype), mask_BxTxS)
        return self._out(o, dtype), {"k": cache_k, "v": cache_v}


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.w_gate = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
        self.w_up = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
        self.w_down = _param(rngs, init, (f, d), ("mlp", "embed"), wd)
        self.config = config
        adapters = lora_lib.make_adapters(config, {
            "gate": (d, f, "embed", "mlp"), "up": (d, f, "embed", "mlp"), "down": (f, d, "mlp", "embed")}, rngs)
        if adapters is not None:
            self.lora = adapters

    def __call__(self, x_BxTxD, dtype):
        c = self.config
        gate_BxTxF = lora_lib.add_update(self, "gate", x_BxTxD @ self.w_gate[...].astype(dtype), x_BxTxD, c)
        up_BxTxF = lora_lib.add_update(self, "up", x_BxTxD @ self.w_up[...].astype(dtype), x_BxTxD, c)
        hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
        return lora_lib.add_update(self, "down", hidden_BxTxF @ self.w_down[...].astype(dtype), hidden_BxTxF, c)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h_BxTxD, positions_BxT, segment_ids_BxT):
        dtype = h_BxTxD.dtype
        h_BxTxD = h_BxTxD + self.attn(self.attn_norm(h_BxTxD, dtype), positions_BxT, segment_ids_BxT, dtype)
        return h_BxTxD + self.mlp(checkpoint_name(self.mlp_norm(h_BxTxD, dtype), _MLP_IN), dtype)

    def decode(self, h_BxTxD, positions_BxT, layer_cache, cache_index_B):
        dtype = h_BxTxD.dtype
        a, layer_cache = self.attn.decode(
            self.attn_norm(h_BxTxD, dtype), positions_BxT, layer_cache, cache_index_B, dtype
        )
        h_BxTxD = h_BxTxD + a
        return h_BxTxD + self.mlp(self.mlp_norm(h_BxTxD, dtype), dtype), layer_cache


def _remat_policy(name: str):
    return {
        "full": None,
        "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        # MaxText's "minimal": keep the attention output (and splash's softmax statistics) and the
        # MLP input; the backward pass recomputes only norms and the weight matmuls around them.
        "minimal": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, _MLP_IN),
    }[name]


def _remat_layer(fn, name: str):
    """``fn`` (one layer of the scan body) under the remat policy ``name`` (``none``: as is).

    Under a scan the forward and the backward pass are separate loops, so XLA cannot fold the
    recomputation back into the forward pass; ``prevent_cse``'s barriers would only cost (as the
    ``jax.checkpoint`` docs say for scans).
    """
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=_remat_policy(name), prevent_cse=False)


def stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """``config.n_layers`` Blocks as one Block whose every variable has a leading ``L`` axis.

    The layer axis carries the logical name ``"layers"`` (added as ``nnx.vmap`` would), which
    gf_jax.sharding maps to no mesh axis: a layer's slice is sharded like an unrolled block's
    weight, so the scan all-gathers one layer at a time under fsdp. The values are the unrolled
    blocks' own draws from ``rngs``, stacked, so a seed gives the same model in both layouts.
    """
    blocks = [Block(config, rngs=rngs) for _ in range(config.n_layers)]
    graphdef, first = nnx.split(blocks[0])
    state_L = jax.tree.map(lambda *layers: jnp.stack(layers), first, *(nnx.state(b) for b in blocks[1:]))
    return nnx.merge(graphdef, nnx.spmd.add_axis(state_L, 0, {nnx.PARTITION_NAME: LAYERS}))


class Transformer(nnx.Module):
    """Decoder-only LLaMA. ``__call__`` returns logits in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.embedding = _param(rngs, init, (config.vocab_size, config.d_model), ("vocab", "embed"), wd)
        if config.scan_layers:
            self.layers = stacked_blocks(config, rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, init, (config.d_model, config.vocab_size), ("embed", "vocab"), wd)

    # ---- training / scoring ---------------------------------------------------------------

    def _check_tokens(self, tokens_BxT):
        if tokens_BxT.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens_BxT.shape}.")
        if tokens_BxT.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BxT.shape[1]} exceeds model.max_seq_len="
                f"{self.config.max_seq_len}; raise model.max_seq_len or shorten train.seq_len."
            )

    def embed(self, tokens_BxT):
        """Token embeddings ``h_BxTxD`` in the compute dtype."""
        # Gather from a table whole along d_model (fsdp all-gathers it, like every other weight):
        # a gather from a d_model-sharded table into a batch-sharded output has no efficient
        # SPMD partitioning and would be fully rematerialised.
        table_VxD = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.config.compute_dtype)

    def hidden(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None):
        """Final-normed hidden states ``h_BxTxD`` (compute dtype), the input of the output head.

        ``positions_BxT`` (RoPE positions) defaults to ``arange(T)`` per row; ``segment_ids_BxT``
        (None: one segment per row) restricts attention to tokens of the same packed document.
        """
        self._check_tokens(tokens_BxT)
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h_BxTxD = constrain(self.embed(tokens_BxT), _RESIDUAL)
        run = self._scanned_blocks if self.config.scan_layers else self._unrolled_blocks
        h_BxTxD = run(h_BxTxD, positions_BxT, segment_ids_BxT)
        return self.final_norm(h_BxTxD, self.config.compute_dtype)

    def _unrolled_blocks(self, h_BxTxD, positions_BxT, segment_ids_BxT):
        def run_block(block, h, positions, segments):
            return block(h, positions, segments)

        if self.config.remat != "none":
            run_block = nnx.remat(run_block, policy=_remat_policy(self.config.remat))
        for block in self.blocks:
            h_BxTxD = constrain(run_block(block, h_BxTxD, positions_BxT, segment_ids_BxT), _RESIDUAL)
        return h_BxTxD

    def _scanned_blocks(self, h_BxTxD, positions_BxT, segment_ids_BxT):
        """The stacked blocks as one ``lax.scan``: the residual stream is the carry, layer l's
        variables the l-th slice of the stacked state; the remat policy applies per layer."""
        graphdef, state_L = nnx.split(self.layers)

        def layer(h, layer_state, positions, segments):
            block = nnx.merge(graphdef, layer_state)
            return constrain(block(h, positions, segments), _RESIDUAL)

        layer = _remat_layer(layer, self.config.remat)
        h_BxTxD, _ = jax.lax.scan(
            lambda h, layer_state: (layer(h, layer_state, positions_BxT, segment_ids_BxT), None), h_BxTxD, state_L
        )
        return h_BxTxD

    def output_weights(self):
        """``w_DxV`` of the output head in the compute dtype (the embedding transposed if tied)."""
        w = self.embedding[...].T if self.config.tie_embeddings else self.lm_head[...]
        return w.astype(self.config.compute_dtype)

    def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None):
        """Next-token logits ``logits_BxTxV`` in the compute dtype."""
        h_BxTxD = self.hidden(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)
        return h_BxTxD @ self.output_weights()

    # ---- KV-cache decoding ----------------------------------------------------------------

    @property
    def cache_batch_axis(self) -> int:
        """The batch axis of every array of :meth:`init_cache`'s cache (1 under ``scan_layers``)."""
        return 1 if self.config.scan_layers else 0

    def init_cache(self, batch_size: int, max_len: int):
        """Empty cache in the compute dtype: one ``{"k", "v"}`` dict per layer, each
        ``B x S x K x H``; under ``scan_layers`` one dict of stacked ``L x B x S x K x H`` arrays
        (the scan's per-layer slices)."""
        c = self.config
        shape = (batch_size, max_len, c.n_kv_heads, c.resolved_head_dim)
        if c.scan_layers:
            stacked = (c.n_layers, *shape)
            return {"k": jnp.zeros(stacked, c.compute_dtype), "v": jnp.zeros(stacked, c.compute_dtype)}
        return [
            {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
            for _ in range(c.n_layers)
        ]

    def decode(self, tokens_BxT, positions_BxT, cache, *, cache_index):
        """Run T new tokens against the cache; returns ``(logits_BxTxV, new_cache)``.

        The new tokens' K/V go to slots ``[cache_index, cache_index + T)`` (``cache_index``: int
        scalar or per-row ``B`` vector) and each attends to the slots at or below its own. Slots
        above a row's cache_index are never visible, so rows of different prompt lengths are
        handled by right-padding the prompts, prefilling, and continuing each row at its own
        length (the padded slots are overwritten before they become visible). The caller keeps
        ``cache_index + T <= max_len`` (``dynamic_update_slice`` would clamp, not fail).
        """
        b, t = tokens_BxT.shape
        cache_index_B = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))
        h_BxTxD = self.embed(tokens_BxT)
        if self.config.scan_layers:
            h_BxTxD, new_cache = self._decode_scanned(h_BxTxD, positions_BxT, cache, cache_index_B)
        else:
            new_cache = []
            for block, layer_cache in zip(self.blocks, cache):
                h_BxTxD, layer_cache = block.decode(h_BxTxD, positions_BxT, layer_cache, cache_index_B)
                new_cache.append(layer_cache)
        h_BxTxD = self.final_norm(h_BxTxD, self.config.compute_dtype)
        return h_BxTxD @ self.output_weights(), new_cache

    def _decode_scanned(self, h_BxTxD, positions_BxT, cache, cache_index_B):
        """Stacked blocks scanned with the stacked cache in the carry: layer l reads its
        ``B x S x K x H`` slices and writes them back in place (as scan outputs, the whole cache
        would be copied at every decoding step)."""
        graphdef, state_L = nnx.split(self.layers)

        def layer(carry, xs):
            h, cache = carry
            index, layer_state = xs
            layer_cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, index, keepdims=False), cache)
            h, layer_cache = nnx.merge(graphdef, layer_state).decode(h, positions_BxT, layer_cache, cache_index_B)
            cache = jax.tree.map(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, index, 0), cache, layer_cache)
            return (h, cache), None

        (h_BxTxD, cache), _ = jax.lax.scan(layer, (h_BxTxD, cache), (jnp.arange(self.config.n_layers), state_L))
        return h_BxTxD, cache


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def _block_matmul_params(config: ModelConfig) -> int:
    d, h = config.d_model, config.resolved_head_dim
    attn = d * h * (2 * config.n_heads + 2 * config.n_kv_heads)  # wq, wo, wk, wv
    mlp = 3 * d * config.d_ff
    return attn + mlp


def param_count(config: ModelConfig) -> int:
    """Number of trainable parameters (embedding, blocks, norms, and the head unless tied)."""
    h = config.resolved_head_dim
    per_block = _block_matmul_params(config) + 2 * config.d_model
    per_block += (config.n_heads + 2 * config.n_kv_heads) * h if config.qkv_bias else 0
    per_block += 2 * h if config.qk_norm else 0
    head = 0 if config.tie_embeddings else config.d_model * config.vocab_size
    return config.vocab_size * config.d_model + config.n_layers * per_block + config.d_model + head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: ``6 N + 12 L N_h H T``.

    N counts the parameters that take part in matmuls: every block weight and the output head
    (tied or not; the embedding lookup and the norms cost no matmul). The attention term
    ``12 * n_layers * n_heads * head_dim * seq_len`` counts QK^T and PV over the full T x T square
    (no causal discount), as PaLM and MaxText do, so MFU figures compare with theirs.
    """
    n_matmul = config.n_layers * _block_matmul_params(config) + config.d_model * config.vocab_size
    attention = 12 * config.n_layers * config.n_heads * config.resolved_head_dim * seq_len
    return float(6 * n_matmul + attention)
