"""Batched greedy decoding and beam search with a KV cache, the whole loop inside one ``jit``.

Prompts of different lengths share a batch by right-padding: one prefill call writes every
prompt's K/V into cache slots ``[0, P)``; then row b continues at its own length ``lengths_B[b]``,
one token per step, writing slot ``lengths_B[b] - 1 + t``. ``Transformer.decode`` lets a query
see only slots at or below its own, so the padding slots of a short prompt are overwritten before
they ever become visible (see ``gf_jax.model.Transformer.decode``). Decoding never stops early: every prompt gets
exactly ``max_new_tokens`` tokens (an EOS is just another token), which is what suffix
extraction compares against.

Shape letters follow docs/conventions.md: B prompts, P padded prompt length, A new (generated)
tokens, W beams, R = B*W decode rows, V vocabulary, S = P + A cache slots.

Entry points:

* ``generate(model, prompts, max_new_tokens, ...)``: host-side batching (sorted by length, fixed
  batch and bucketed prompt shapes so few programs are compiled), optional mesh, progress bar.
* ``decode_batch(model, tokens_BxP, lengths_B, ...)``: one padded batch, cached, greedy or beam.
* ``decode_batch_recompute(...)``: greedy by full recomputation of the sequence at every step,
  the reference the cache must equal token for token (and the benchmark's baseline).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gf_jax.model.sharding import batch_sharding, place_on_mesh, replicate_outputs, rows_for_mesh
from gf_jax.util.progress import progress_bar


@dataclasses.dataclass
class Generation:
    """Output of ``generate``: ``tokens`` (n_prompts x A int32) and ``logprob`` (n_prompts float32,
    the sum of the generated tokens' log-probabilities under the model, in nats)."""

    tokens: np.ndarray
    logprob: np.ndarray


def _identity(x):
    return x


def _batch_constraint(mesh, axis: int = 0):
    """Pins the batch dim (``axis``) of decode-time arrays to the mesh's data axes, like training.
    The KV cache's batch axis is ``model.cache_batch_axis`` (1 for a stacked ``L x B x ...`` cache)."""
    if mesh is None:
        return _identity
    rows = batch_sharding(mesh).spec[0]
    sharding = NamedSharding(mesh, PartitionSpec(*([None] * axis), rows))
    return lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def _prefill(model, tokens_BxP, starts_B, n_slots, constrain):
    """Empty cache of ``n_slots`` slots with the prompts' K/V written at slots [0, P)
    (``constrain`` places the cache's rows, see :func:`_batch_constraint`).

    The prefill logits are not used (the last prompt token is fed again by the first decode
    step), so XLA drops the B x P x V output projection entirely.
    """
    b, p = tokens_BxP.shape
    cache = constrain(model.init_cache(b, n_slots))
    positions_BxP = starts_B[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
    _, cache = model.decode(tokens_BxP, positions_BxP, cache, cache_index=0)
    return constrain(cache)


def _last_prompt_token(tokens_BxP, lengths_B):
    return jnp.take_along_axis(tokens_BxP, (lengths_B - 1)[:, None], axis=1)[:, 0]


def _greedy(model, tokens_BxP, lengths_B, starts_B, n_new: int, constrain):
    b, p = tokens_BxP.shape
    cache = _prefill(model, tokens_BxP, starts_B, p + n_new, constrain)

    def step(t, carry):
        cache, token_B, out_BxA, logprob_B = carry
        slot_B = lengths_B - 1 + t  # the slot of the token being fed: last prompt token at t = 0
        logits_Bx1xV, cache = model.decode(
            token_B[:, None], (starts_B + slot_B)[:, None], cache, cache_index=slot_B
        )
        logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32), axis=-1)
        next_B = jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
        logprob_B = logprob_B + jnp.take_along_axis(logp_BxV, next_B[:, None], axis=1)[:, 0]
        out_BxA = jax.lax.dynamic_update_slice_in_dim(out_BxA, next_B[:, None], t, axis=1)
        return constrain(cache), next_B, out_BxA, logprob_B

    init = (
        cache,
        _last_prompt_token(tokens_BxP, lengths_B),
        jnp.zeros((b, n_new), jnp.int32),
        jnp.zeros((b,), jnp.float32),
    )
    _, _, out_BxA, logprob_B = jax.lax.fori_loop(0, n_new, step, init)
    return out_BxA, logprob_B


def _beam(model, tokens_BxP, lengths_B, starts_B, n_new: int, width: int, constrain):
    """Beam search without length normalisation (all hypotheses have A tokens, so it would not
    change the ranking). Beams of prompt b live in cache rows ``b*W .. b*W + W-1``."""
    b, p = tokens_BxP.shape
    cache = _prefill(model, tokens_BxP, starts_B, p + n_new, constrain)
    # Prefill once per prompt, then give every beam its own copy of the prompt's cache.
    rows_axis = model.cache_batch_axis
    cache = constrain(jax.tree.map(lambda c: jnp.repeat(c, width, axis=rows_axis), cache))
    lengths_R = jnp.repeat(lengths_B, width)
    starts_R = jnp.repeat(starts_B, width)
    # Only beam 0 is live at the start, so the first step picks W distinct tokens. (If W exceeds
    # the number of distinct continuations so far, the surplus beams keep score -inf and lose.)
    scores_BxW = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)[None].repeat(b, axis=0)
    row_base_Bx1 = (jnp.arange(b, dtype=jnp.int32) * width)[:, None]

    def step(t, carry):
        cache, token_R, out_BxWxA, scores_BxW = carry
        slot_R = lengths_R - 1 + t
        logits_Rx1xV, cache = model.decode(
            token_R[:, None], (starts_R + slot_R)[:, None], cache, cache_index=slot_R
        )
        v = logits_Rx1xV.shape[-1]
        logp_BxWxV = jax.nn.log_softmax(logits_Rx1xV[:, 0].astype(jnp.float32), axis=-1).reshape(b, width, v)
        candidates_BxWV = (scores_BxW[:, :, None] + logp_BxWxV).reshape(b, width * v)
        scores_BxW, flat_BxW = jax.lax.top_k(candidates_BxWV, width)
        parent_BxW, token_BxW = flat_BxW // v, (flat_BxW % v).astype(jnp.int32)
        # Each surviving hypothesis takes over its parent's cache rows and token history.
        rows_R = (row_base_Bx1 + parent_BxW).reshape(-1)
        cache = constrain(jax.tree.map(lambda c: jnp.take(c, rows_R, axis=rows_axis), cache))
        out_BxWxA = jnp.take_along_axis(out_BxWxA, parent_BxW[:, :, None], axis=1)
        out_BxWxA = jax.lax.dynamic_update_slice_in_dim(out_BxWxA, token_BxW[:, :, None], t, axis=2)
        return cache, token_BxW.reshape(-1), out_BxWxA, scores_BxW

    init = (
        cache,
        jnp.repeat(_last_prompt_token(tokens_BxP, lengths_B), width),
        jnp.zeros((b, width, n_new), jnp.int32),
        scores_BxW,
    )
    _, _, out_BxWxA, scores_BxW = jax.lax.fori_loop(0, n_new, step, init)
    return out_BxWxA[:, 0], scores_BxW[:, 0]  # top_k sorts: beam 0 is the best


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "beam_width", "mesh"))
def _decode_jit(graphdef, state, tokens_BxP, lengths_B, starts_B, *, n_new, beam_width, mesh):
    model = nnx.merge(graphdef, state)
    tokens_BxP, lengths_B, starts_B = _batch_constraint(mesh)((tokens_BxP, lengths_B, starts_B))
    constrain_cache = _batch_constraint(mesh, model.cache_batch_axis)
    if beam_width == 1:
        out = _greedy(model, tokens_BxP, lengths_B, starts_B, n_new, constrain_cache)
    else:
        out = _beam(model, tokens_BxP, lengths_B, starts_B, n_new, beam_width, constrain_cache)
    return replicate_outputs(out, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new"))
def _recompute_jit(graphdef, state, tokens_BxP, lengths_B, starts_B, *, n_new):
    model = nnx.merge(graphdef, state)
    b, p = tokens_BxP.shape
    s = p + n_new
    buffer_BxS = jnp.pad(tokens_BxP, ((0, 0), (0, n_new)))
    positions_BxS = starts_B[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    rows_B = jnp.arange(b)

    def step(t, carry):
        buffer_BxS, out_BxA, logprob_B = carry
        # The whole sequence again; causal attention makes the padding after a row's end harmless.
        logits_BxSxV = model(buffer_BxS, positions_BxT=positions_BxS)
        logits_BxV = logits_BxSxV[rows_B, lengths_B - 1 + t].astype(jnp.float32)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
        next_B = jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
        logprob_B = logprob_B + jnp.take_along_axis(logp_BxV, next_B[:, None], axis=1)[:, 0]
        buffer_BxS = buffer_BxS.at[rows_B, lengths_B + t].set(next_B)
        out_BxA = jax.lax.dynamic_update_slice_in_dim(out_BxA, next_B[:, None], t, axis=1)
        return buffer_BxS, out_BxA, logprob_B

    init = (buffer_BxS, jnp.zeros((b, n_new), jnp.int32), jnp.zeros((b,), jnp.float32))
    _, out_BxA, logprob_B = jax.lax.fori_loop(0, n_new, step, init)
    return out_BxA, logprob_B


def _check_batch(tokens_BxP, lengths_B, starts_B, max_new_tokens):
    tokens_BxP = jnp.asarray(tokens_BxP, jnp.int32)
    if tokens_BxP.ndim != 2 or tokens_BxP.shape[1] == 0:
        raise ValueError(f"tokens_BxP must be a non-empty (batch, length) array, got {tokens_BxP.shape}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    b, p = tokens_BxP.shape
    lengths_B = jnp.full((b,), p, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    starts_B = jnp.zeros((b,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
    return tokens_BxP, lengths_B, starts_B


def decode_batch(
    model,
    tokens_BxP,
    lengths_B=None,
    *,
    max_new_tokens: int,
    starts_B=None,
    beam_width: int = 1,
    mesh=None,
):
    """Greedy (``beam_width=1``) or beam-search continuation of one right-padded batch, cached.

    Args:
      model: a ``gf_jax.model.Transformer`` (anything with ``init_cache`` / ``decode``).
      tokens_BxP: int32 prompts, right-padded (pad values are never attended to).
      lengths_B: real length of each prompt, 1 <= lengths_B[b] <= P (default: all P).
      max_new_tokens: A, the number of tokens generated per prompt.
      starts_B: RoPE position of each prompt's first token (default 0; a prompt cut from the
        middle of a document keeps its true positions, as in training).
      beam_width: W; 1 is greedy.
      mesh: optional ``jax.sharding.Mesh``: the batch is sharded over its data axes (B must
        divide evenly) and the parameters must already live on it.

    Returns:
      ``(tokens_BxA, logprob_B)`` as jax arrays: the generated ids and their summed
      log-probabilities (the best beam's score for beam search).
    """
    tokens_BxP, lengths_B, starts_B = _check_batch(tokens_BxP, lengths_B, starts_B, max_new_tokens)
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be a positive integer (1 = greedy), got {beam_width!r}.")
    graphdef, state = nnx.split(model)
    return _decode_jit(
        graphdef, state, tokens_BxP, lengths_B, starts_B,
        n_new=max_new_tokens, beam_width=beam_width, mesh=mesh,
    )


def decode_batch_recompute(model, tokens_BxP, lengths_B=None, *, max_new_tokens: int, starts_B=None):
    """Greedy continuation without a cache: the full sequence is run again for every new token.

    Same arguments and outputs as ``decode_batch`` (greedy); needs P + A <= model.max_seq_len.
    """
    tokens_BxP, lengths_B, starts_B = _check_batch(tokens_BxP, lengths_B, starts_B, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _recompute_jit(graphdef, state, tokens_BxP, lengths_B, starts_B, n_new=max_new_tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Right-pads token lists into ``(tokens_BxP int32, lengths_B int32)`` numpy arrays of width ``length``."""
    tokens_BxP = np.full((len(prompts), length), pad_id, np.int32)
    lengths_B = np.zeros((len(prompts),), np.int32)
    for i, prompt in enumerate(prompts):
        tokens_BxP[i, : len(prompt)] = prompt
        lengths_B[i] = len(prompt)
    return tokens_BxP, lengths_B


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    start_positions: Sequence[int] | None = None,
    beam_width: int = 1,
    batch_size: int = 16,
    mesh=None,
    length_bucket: int = 64,
    pad_id: int = 0,
    progress: bool | str = False,
) -> Generation:
    """Continues every prompt by ``max_new_tokens`` tokens (greedy, or beam search if W > 1).

    Prompts are sorted by length and decoded ``batch_size`` at a time; the batch is padded to a
    fixed number of rows and the prompt width to a multiple of ``length_bucket`` so that only a
    few programs are compiled. With a mesh the batch size is rounded up to a multiple of the
    mesh's data-parallel size. Results come back in the order of ``prompts``.

    Args:
      prompts: token-id lists (at least one token each; BOS included if the model was trained
        with one).
      start_positions: RoPE position of each prompt's first token (default 0).
      progress: show a tqdm bar over prompts (a string is used as its description).
    """
    n = len(prompts)
    if n == 0:
        return Generation(np.zeros((0, max_new_tokens), np.int32), np.zeros((0,), np.float32))
    lengths_U, starts_U = _checked_prompts(prompts, start_positions, batch_size)
    sharding = None
    if mesh is not None:
        batch_size = rows_for_mesh(batch_size, mesh)  # every data-parallel shard gets whole rows
        sharding = batch_sharding(mesh)
        model = place_on_mesh(model, mesh)
    else:
        batch_size = min(batch_size, n)

    order_U = np.argsort(-lengths_U, kind="stable")  # longest first: similar lengths share a batch
    tokens_UxA = np.zeros((n, max_new_tokens), np.int32)
    logprob_U = np.zeros((n,), np.float32)
    bar = progress_bar(progress, n, "decoding")
    for begin in range(0, n, batch_size):
        idx = order_U[begin : begin + batch_size]
        # Pad the last batch with copies of its first prompt so every batch has the same shape.
        rows = np.concatenate([idx, np.full(batch_size - idx.size, idx[0])])
        width = _round_up(int(lengths_U[idx].max()), length_bucket)
        tokens_BxP, lengths_B = pad_prompts([prompts[i] for i in rows], width, pad_id)
        out_BxA, logprob_B = _decode_on_mesh(model, tokens_BxP, lengths_B, starts_U[rows], max_new_tokens,
                                             beam_width, mesh, sharding)
        tokens_UxA[idx] = np.asarray(out_BxA)[: idx.size]
        logprob_U[idx] = np.asarray(logprob_B)[: idx.size]
        if bar is not None:
            bar.update(idx.size)
    if bar is not None:
        bar.close()
    return Generation(tokens_UxA, logprob_U)


def _checked_prompts(prompts, start_positions, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths_U, starts_U) of the prompts, refusing an empty prompt or mismatched arguments."""
    n = len(prompts)
    lengths_U = np.array([len(p) for p in prompts])
    if lengths_U.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(lengths_U))} is empty; every prompt needs at least one token.")
    starts_U = np.zeros(n, np.int32) if start_positions is None else np.asarray(start_positions, np.int32)
    if starts_U.shape != (n,):
        raise ValueError(f"start_positions needs one entry per prompt ({n}), got shape {starts_U.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return lengths_U, starts_U


def _decode_on_mesh(model, tokens_BxP, lengths_B, starts_B, max_new_tokens: int, beam_width: int, mesh, sharding):
    """``decode_batch`` on host arrays: placed on the mesh (batch-sharded) when there is one."""
    if mesh is None:
        return decode_batch(model, tokens_BxP, lengths_B, max_new_tokens=max_new_tokens, starts_B=starts_B,
                            beam_width=beam_width)
    tokens_BxP, lengths_B, starts_B = jax.device_put((tokens_BxP, lengths_B, starts_B), sharding)
    with jax.set_mesh(mesh):  # the model's activation sharding hints are on, as in training
        return decode_batch(model, tokens_BxP, lengths_B, max_new_tokens=max_new_tokens, starts_B=starts_B,
                            beam_width=beam_width, mesh=mesh)

