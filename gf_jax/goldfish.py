"""Goldfish loss: a deterministic, context-hashed ~1/k of targets is left out of the loss.

Everything here is pure JAX (no flax, no numpy at trace time beyond constants), traceable under
`jit`/`vmap`/`shard_map`, with static shapes and no host round trip. Import it into any training
step::

    from gf_jax import GoldfishConfig, loss_fn
    loss, aux = loss_fn(logits_BxTxV, targets_BxT, GoldfishConfig(k=4, h=13))

Array names carry their shapes (legend: docs/conventions.md): B batch rows, T targets per row,
V vocabulary, D model width, C row-context width, M loss chunks, E targets per chunk.

Strategies (``GoldfishConfig.strategy``):

* ``hash`` (default, recommended): target t is dropped iff a salted, order-sensitive 32-bit
  murmur-style hash of the up-to-h targets *preceding* it in its own document falls in a 1/k
  bucket. Given ``positions_BxT`` (index of each target within its document) the mask of a
  passage does not depend on how it was packed or chunked; targets whose context reaches before
  the row (a row that starts mid-document) are dropped, so no token the full-context hash drops
  is ever supervised.
* ``hash-table``: the reference implementation's rule, bit for bit (see ``_hash_table_drop``).
* ``static``: every k-th target of each document, from ``start``.
* ``random``: Bernoulli(1/k) per target from ``rng`` (repetition fills the holes; a baseline).
* ``none``: nothing dropped (standard loss).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

STRATEGIES = ("none", "static", "hash", "hash-table", "random")

# The reference implementation's table: 1,000,003 uniform floats, generator seed 2971215073.
TABLE_SIZE = 1_000_003
TABLE_SEED = 2971215073

_U32 = jnp.uint32


@dataclasses.dataclass(frozen=True)
class GoldfishConfig:
    """Which targets goldfish loss leaves out.

    Attributes:
      strategy: one of ``none | static | hash | hash-table | random``.
      k: drop rate is 1/k (k >= 2). "4-GL" is k=4.
      h: context width of the hash (>= 1); the paper's default is 13.
      seed: salt of the ``hash`` strategy, 0 <= seed < 2**32; different seeds give independent
        masks, the same seed the same mask in every run.
      start: offset of the ``static`` strategy (0 <= start < k).
      never_drop_ids: token ids that are never dropped (e.g. EOS, BOS, PAD).
    """

    strategy: str = "hash"
    k: int = 4
    h: int = 13
    seed: int = 0
    start: int = 0
    never_drop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"goldfish strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}."
            )
        for name in ("k", "h", "seed", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"goldfish {name} must be an integer, got {value!r}.")
        if self.k < 2:
            raise ValueError(f"goldfish k must be >= 2 (drop rate 1/k), got k={self.k}.")
        if self.h < 1:
            raise ValueError(f"goldfish h (context width) must be >= 1, got h={self.h}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"goldfish seed must be in [0, 2**32), got seed={self.seed}.")
        if not 0 <= self.start < self.k:
            raise ValueError(f"goldfish start must be in [0, k) = [0, {self.k}), got start={self.start}.")
        ids = self.never_drop_ids
        if ids is None:
            ids = ()
        if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"goldfish never_drop_ids must be a list of integer token ids, got {ids!r}.")
        object.__setattr__(self, "never_drop_ids", tuple(sorted(set(int(i) for i in ids))))


# ---------------------------------------------------------------------------------------------
# 32-bit hashing in uint32 jnp ops (murmur3 structure).


def _rotl32(x, r: int):
    return (x << _U32(r)) | (x >> _U32(32 - r))


def _fmix32(x):
    """murmur3's finaliser: full avalanche of a uint32."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> _U32(13))
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> _U32(16))


def _murmur_round(acc, word):
    """One murmur3 block step: mixes a uint32 `word` into the running state, order-sensitively."""
    word = word * _U32(0xCC9E2D51)
    word = _rotl32(word, 15)
    word = word * _U32(0x1B873593)
    acc = acc ^ word
    acc = _rotl32(acc, 13)
    return acc * _U32(5) + _U32(0xE6546B64)


def _shift_right(x_BxT, j: int, fill):
    """x shifted j columns to the right along T: out[:, t] = x[:, t - j] (``fill`` for t < j)."""
    if j == 0:
        return x_BxT
    if j >= x_BxT.shape[-1]:
        return jnp.full_like(x_BxT, fill)
    # lax.pad with a negative high edge shifts without slicing, so it also works when T is sharded
    # over an explicit mesh axis (a slice of T - j columns is not divisible by the mesh).
    config = [(0, 0, 0)] * (x_BxT.ndim - 1) + [(j, -j, 0)]
    return jax.lax.pad(x_BxT, jnp.asarray(fill, x_BxT.dtype), config)


def _columns_like(targets_BxT):
    """Column index of every target. Built from ``targets_BxT`` so it inherits its sharding
    (explicit-sharding meshes reject mixing replicated and sharded operands in ``where``)."""
    T = targets_BxT.shape[-1]
    return jnp.zeros_like(targets_BxT, jnp.int32) + jnp.arange(T, dtype=jnp.int32)


_default_positions = _columns_like  # without positions, every row starts a document


def _context_at_offset(context_BxC, j: int, T: int):
    """out[:, t] = context[:, C - j + t] for the first j columns (0 elsewhere or before context)."""
    C = context_BxC.shape[-1]
    head_BxC = context_BxC[..., max(0, C - j):]  # the last min(j, C) context targets
    config = [(0, 0, 0)] * (context_BxC.ndim - 1) + [(max(0, j - C), T - j, 0)]
    return jax.lax.pad(head_BxC, _U32(0), config)


def context_hash(targets_BxT, positions_BxT, h: int, seed: int, context_BxC=None):
    """Salted 32-bit hash of the up-to-h targets preceding each target in its own document.

    Returns (hash_BxT uint32, complete_BxT bool). The window of the target at document position p
    is its min(p, h) predecessors, nearest first, and the hash also mixes in that length, so a
    document's first targets are hashed consistently wherever the document sits. ``complete`` is
    False where the window reaches before column 0 and ``context_BxC`` (the C targets before
    column 0, see ``goldfish_mask``) does not cover it.
    """
    T = targets_BxT.shape[-1]
    tokens_BxT = targets_BxT.astype(jnp.int32).astype(_U32)
    window_BxT = jnp.minimum(positions_BxT.astype(jnp.int32), h)
    columns_BxT = _columns_like(targets_BxT)
    if context_BxC is not None:
        context_BxC = jnp.asarray(context_BxC).astype(jnp.int32).astype(_U32)
        columns_BxT = columns_BxT + context_BxC.shape[-1]
    complete_BxT = window_BxT <= columns_BxT

    acc_BxT = jnp.zeros_like(tokens_BxT) + _fmix32(_U32(seed) ^ _U32(0x9E3779B9))
    for j in range(1, h + 1):  # loop over the h window offsets (static), vectorised over B and T
        word_BxT = _shift_right(tokens_BxT, j, _U32(0))
        if context_BxC is not None:  # the first j columns take their word from the context
            in_context_BxT = columns_BxT - context_BxC.shape[-1] < j
            word_BxT = jnp.where(in_context_BxT, _context_at_offset(context_BxC, j, T), word_BxT)
        acc_BxT = jnp.where(j <= window_BxT, _murmur_round(acc_BxT, word_BxT), acc_BxT)
    hash_BxT = _fmix32(acc_BxT ^ window_BxT.astype(_U32))
    return hash_BxT, complete_BxT


def _hash_drop(targets_BxT, positions_BxT, config: GoldfishConfig, context_BxC=None):
    hash_BxT, complete_BxT = context_hash(targets_BxT, positions_BxT, config.h, config.seed, context_BxC)
    # The lowest floor(2**32 / k) hash values form the drop bucket: rate 1/k to within 2**-32.
    threshold = _U32((2**32) // config.k)
    return (hash_BxT < threshold) | ~complete_BxT


# ---------------------------------------------------------------------------------------------
# The reference rule ("hash-table"), in JAX's default 32-bit mode: int64 arithmetic is emulated
# with (hi, lo) uint32 pairs.


def _mul32_wide(a, b):
    """Full 64-bit product of uint32 a and b as (hi, lo) uint32, without 64-bit types."""
    mask16 = _U32(0xFFFF)
    a0, a1 = a & mask16, a >> _U32(16)
    b0, b1 = b & mask16, b >> _U32(16)
    t = a0 * b0
    w0 = t & mask16
    t = a1 * b0 + (t >> _U32(16))
    w1, w2 = t & mask16, t >> _U32(16)
    t = a0 * b1 + w1
    hi = a1 * b1 + w2 + (t >> _U32(16))
    lo = (t << _U32(16)) + w0
    return hi, lo


def _mul64_wrap(a_hi, a_lo, b_hi, b_lo):
    """(a * b) mod 2**64 for 64-bit values given as (hi, lo) uint32 pairs (= int64 wrapping)."""
    hi, lo = _mul32_wide(a_lo, b_lo)
    return hi + a_lo * b_hi + a_hi * b_lo, lo


def _mulmod(a, b, m: int):
    """(a * b) mod m for uint32 a, b < m < 2**20, without overflowing uint32."""
    b_hi, b_lo = b >> _U32(10), b & _U32(0x3FF)
    return (((a * b_hi) % _U32(m)) * _U32(1024) + a * b_lo) % _U32(m)


def _int64_floormod(hi, lo, m: int):
    """Floor-mod (non-negative) of the two's-complement int64 (hi, lo) by m < 2**20."""
    two32 = _U32((2**32) % m)
    unsigned = (_mulmod(hi % _U32(m), two32, m) + lo % _U32(m)) % _U32(m)
    wrap = _U32((2**64) % m)  # a negative int64 equals its unsigned reading minus 2**64
    negative = hi >= _U32(2**31)
    return jnp.where(negative, (unsigned + _U32(m) - wrap) % _U32(m), unsigned)


@functools.lru_cache(maxsize=1)
def default_table():
    """The default lookup table: TABLE_SIZE uniform float32 in [0, 1), seeded with TABLE_SEED.

    It is not torch's table (that one depends on torch's generator and device); pass the table
    exported from a PyTorch run as ``table=`` to reproduce that run's mask bit for bit.
    """
    import numpy as np  # a host constant, made once

    return np.random.default_rng(TABLE_SEED).random(TABLE_SIZE, dtype=np.float32)


def _hash_table_drop(targets_BxT, config: GoldfishConfig, table):
    """Reference rule: for column p >= h-1, key = wrapping int64 product of targets[p-h+1 .. p]
    (the window includes the target), floor-mod 1,000,003; dropped iff table[key] < 1/k (compared
    in float32, as torch does). Columns p < h-1 are never dropped. Positions are ignored."""
    ids_BxT = targets_BxT.astype(jnp.int32)
    lo_BxT = ids_BxT.astype(_U32)
    hi_BxT = jnp.where(ids_BxT < 0, _U32(0xFFFFFFFF), _U32(0))  # sign extension to int64
    prod_hi, prod_lo = hi_BxT, lo_BxT
    for j in range(1, config.h):
        prod_hi, prod_lo = _mul64_wrap(
            prod_hi, prod_lo, _shift_right(hi_BxT, j, _U32(0)), _shift_right(lo_BxT, j, _U32(1))
        )
    key_BxT = _int64_floormod(prod_hi, prod_lo, TABLE_SIZE).astype(jnp.int32)
    table = default_table() if table is None else table
    table = jnp.asarray(table, jnp.float32)
    if table.ndim != 1 or table.shape[0] < TABLE_SIZE:
        raise ValueError(
            f"hash-table needs a 1-D float table of at least {TABLE_SIZE} entries, got shape {table.shape}."
        )
    # .at[].get with the keys' sharding: a plain gather from a replicated constant has no output
    # sharding under an explicit mesh.
    value_BxT = table.at[key_BxT].get(out_sharding=jax.typeof(key_BxT).sharding)
    return (value_BxT < jnp.float32(1.0 / config.k)) & (_columns_like(targets_BxT) >= config.h - 1)


# ---------------------------------------------------------------------------------------------


def goldfish_mask(targets_BxT, config: GoldfishConfig, *, positions_BxT=None, context_BxC=None, rng=None, table=None):
    """Which targets goldfish loss drops: bool ``drop_BxT`` (True = left out of the loss).

    Args:
      targets_BxT: integer target ids (the next tokens), any leading batch shape.
      config: a GoldfishConfig.
      positions_BxT: index of each target among its document's targets (0 = the document's first
        target). Without it, every row starts a document. Used by ``hash`` and ``static``.
      context_BxC: optional, for ``hash``: the C targets that precede column 0 in the same document,
        oldest first (``context[:, -1]`` is the target just before column 0; entries before the
        document's start are ignored). With C >= h a row that starts mid-document gets exactly
        the full-document mask instead of dropping its first h targets. Needs ``positions_BxT``.
      rng: a jax PRNG key, required by ``random``.
      table: float array of >= 1,000,003 entries for ``hash-table`` (default: ``default_table()``).
    """
    if not isinstance(config, GoldfishConfig):
        raise ValueError(f"goldfish_mask needs a GoldfishConfig, got {type(config).__name__}.")
    targets_BxT = jnp.asarray(targets_BxT)
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets_BxT.dtype}.")
    if positions_BxT is None:
        positions_BxT = _default_positions(targets_BxT)
    else:
        positions_BxT = jnp.asarray(positions_BxT)
        if positions_BxT.shape != targets_BxT.shape:
            raise ValueError(
                f"positions shape {positions_BxT.shape} must equal targets shape {targets_BxT.shape}."
            )
    if context_BxC is not None:
        context_BxC = jnp.asarray(context_BxC)
        if context_BxC.shape[:-1] != targets_BxT.shape[:-1]:
            raise ValueError(
                f"context shape {context_BxC.shape} must be targets' batch shape {targets_BxT.shape[:-1]} + (C,)."
            )

    if config.strategy == "none":
        return jnp.zeros_like(targets_BxT, bool)
    if config.strategy == "hash":
        drop_BxT = _hash_drop(targets_BxT, positions_BxT, config, context_BxC)
    elif config.strategy == "hash-table":
        drop_BxT = _hash_table_drop(targets_BxT, config, table)
    elif config.strategy == "static":
        p_BxT = positions_BxT.astype(jnp.int32)
        drop_BxT = (p_BxT % config.k) == config.start
    else:  # random
        if rng is None:
            raise ValueError("goldfish strategy 'random' needs rng=jax.random.key(...); pass a new key each step.")
        drop_BxT = jax.random.bernoulli(rng, 1.0 / config.k, targets_BxT.shape)

    for token_id in config.never_drop_ids:
        drop_BxT = drop_BxT & (targets_BxT != token_id)
    return drop_BxT


# ---------------------------------------------------------------------------------------------
# Loss.


def token_cross_entropy(logits_BxTxV, targets_BxT):
    """Float32 per-target cross-entropy and log-partition: (xent_BxT, logz_BxT).

    Targets outside [0, V) (e.g. an ignore index of -1) give finite garbage; mask them out.
    """
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    V = logits_BxTxV.shape[-1]
    safe_targets_BxT = jnp.clip(targets_BxT, 0, V - 1).astype(jnp.int32)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, safe_targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_logit_BxT, logz_BxT


class LossSums(NamedTuple):
    """Sums of one batch's goldfish loss that add over micro-batches, steps and hosts.

    The one place where the loss formula and the reported ratios are written: a loss computed from
    sums added over micro-batches divides once, so micro-batches that keep different numbers of
    targets are weighted correctly. A pytree (scans, psums and ``jax.device_get`` take it whole).
    """

    xent_sum: Any           # float32: cross-entropy over kept targets (carries the gradient)
    z_sum: Any              # float32: logsumexp(logits)**2 over kept targets (carries the gradient)
    xent_all_sum: Any       # float32: cross-entropy over all valid targets (no gradient)
    xent_dropped_sum: Any   # float32: cross-entropy over dropped targets (no gradient)
    n_kept: Any             # int32: kept targets
    n_dropped: Any          # int32: dropped targets
    n_valid: Any            # int32: valid targets (kept + dropped)

    @classmethod
    def zeros(cls) -> "LossSums":
        f32, i32 = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        return cls(f32, f32, f32, f32, i32, i32, i32)

    def add(self, other: "LossSums") -> "LossSums":
        return jax.tree.map(lambda a, b: a + b, self, other)

    def objective(self, z_loss: float = 0.0):
        """What training differentiates: the loss before its division by the kept count."""
        return self.xent_sum + z_loss * self.z_sum

    def loss(self, z_loss: float = 0.0):
        """The goldfish loss: one mean over every kept target of the batch, never per sequence."""
        return self.objective(z_loss) / _at_least_one(self.n_kept)

    def ratios(self) -> dict[str, Any]:
        """``loss_kept``, ``loss_all``, ``loss_dropped`` and ``drop_fraction`` (no gradient)."""

        def ratio(num, den):
            return jax.lax.stop_gradient(num) / _at_least_one(den)

        return {
            "loss_kept": ratio(self.xent_sum, self.n_kept),
            "loss_all": ratio(self.xent_all_sum, self.n_valid),
            "loss_dropped": ratio(self.xent_dropped_sum, self.n_dropped),
            "drop_fraction": ratio(jnp.asarray(self.n_dropped, jnp.float32), self.n_valid),
        }

    def summary(self) -> dict[str, Any]:
        """The sums and the ratios in one flat dict (``loss_fn``'s ``aux``)."""
        return {**self._asdict(), **self.ratios()}


def _at_least_one(count):
    return jnp.maximum(1, count).astype(jnp.float32)


def loss_sums(xent_BxT, logz_BxT, drop_BxT, valid_BxT) -> LossSums:
    """The LossSums of per-target cross-entropy and log-partition under a drop and a valid mask.

    Gradients are exactly zero at dropped and invalid targets.
    """
    drop_BxT = drop_BxT & valid_BxT
    kept_BxT = valid_BxT & ~drop_BxT
    zero = jnp.zeros((), jnp.float32)
    xent_stopped_BxT = jax.lax.stop_gradient(xent_BxT)
    return LossSums(
        xent_sum=jnp.sum(jnp.where(kept_BxT, xent_BxT, zero)),
        z_sum=jnp.sum(jnp.where(kept_BxT, jnp.square(logz_BxT), zero)),
        xent_all_sum=jnp.sum(jnp.where(valid_BxT, xent_stopped_BxT, zero)),
        xent_dropped_sum=jnp.sum(jnp.where(drop_BxT, xent_stopped_BxT, zero)),
        n_kept=jnp.sum(kept_BxT, dtype=jnp.int32),
        n_dropped=jnp.sum(drop_BxT, dtype=jnp.int32),
        n_valid=jnp.sum(valid_BxT, dtype=jnp.int32),
    )


def reduce_loss(xent_BxT, logz_BxT, drop_BxT, valid_BxT, z_loss: float = 0.0):
    """One global mean over kept, valid targets, plus the sums training accumulates.

    Returns (loss, aux). ``aux`` holds the sums of ``LossSums`` (``xent_sum``, ``xent_all_sum``,
    ``xent_dropped_sum``, ``z_sum``, ``n_kept``, ``n_dropped``, ``n_valid``) that add over
    micro-batches, and the ratios ``loss_kept``, ``loss_all``, ``loss_dropped``, ``drop_fraction``
    computed from them (see ``summarize``). Gradients are exactly zero at dropped and invalid targets.
    """
    sums = loss_sums(xent_BxT, logz_BxT, drop_BxT, valid_BxT)
    return sums.loss(z_loss), sums.summary()


def summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """Adds the ratios (``loss_kept``, ``loss_all``, ``loss_dropped``, ``drop_fraction``) to sums.

    Works on one batch's sums or on sums added over micro-batches / steps: the division happens
    once, so micro-batches that keep different numbers of targets are weighted correctly.
    """
    return {**sums, **LossSums(**{k: sums[k] for k in LossSums._fields}).ratios()}


def _valid_mask(targets_BxT, weights_BxT):
    valid_BxT = targets_BxT >= 0
    if weights_BxT is not None:
        valid_BxT = valid_BxT & (jnp.asarray(weights_BxT) > 0)
    return valid_BxT


def goldfish_sums(
    logits_BxTxV,
    targets_BxT,
    config: GoldfishConfig,
    *,
    weights_BxT=None,
    positions_BxT=None,
    context_BxC=None,
    rng=None,
    table=None,
) -> LossSums:
    """The ``LossSums`` of a batch under goldfish loss (arguments as in ``loss_fn``)."""
    targets_BxT = jnp.asarray(targets_BxT)
    drop_BxT = goldfish_mask(
        targets_BxT, config, positions_BxT=positions_BxT, context_BxC=context_BxC, rng=rng, table=table
    )
    xent_BxT, logz_BxT = token_cross_entropy(logits_BxTxV, targets_BxT)
    return loss_sums(xent_BxT, logz_BxT, drop_BxT, _valid_mask(targets_BxT, weights_BxT))


def loss_fn(
    logits_BxTxV,
    targets_BxT,
    config: GoldfishConfig,
    *,
    weights_BxT=None,
    positions_BxT=None,
    context_BxC=None,
    z_loss: float = 0.0,
    rng=None,
    table=None,
):
    """Goldfish next-token loss: mean float32 cross-entropy over kept, valid targets.

    Args:
      logits_BxTxV: logits of any float dtype (log-softmax is done in float32).
      targets_BxT: target ids; negative ids are invalid (an ignore index).
      config: GoldfishConfig (``GoldfishConfig(strategy="none")`` is the standard loss).
      weights_BxT: optional, 0 marks padding; invalid targets are neither kept nor dropped.
      positions_BxT: index of each target within its document (see ``goldfish_mask``).
      context_BxC: targets preceding each row in its document (see ``goldfish_mask``).
      z_loss: coefficient of the auxiliary ``logsumexp(logits)**2`` term over kept targets.
      rng, table: passed to ``goldfish_mask`` (``random`` and ``hash-table`` strategies).

    Returns:
      (loss, aux): loss = (sum of kept cross-entropy + z_loss * sum of logz**2) / max(1, n_kept),
      one mean over the whole batch, never per sequence. ``aux`` is described in ``reduce_loss``.
    """
    sums = goldfish_sums(
        logits_BxTxV, targets_BxT, config, weights_BxT=weights_BxT, positions_BxT=positions_BxT,
        context_BxC=context_BxC, rng=rng, table=table,
    )
    return sums.loss(z_loss), sums.summary()


def chunked_goldfish_sums(
    hidden_BxTxD,
    w_DxV,
    targets_BxT,
    config: GoldfishConfig,
    *,
    weights_BxT=None,
    positions_BxT=None,
    context_BxC=None,
    rng=None,
    table=None,
    chunk_size: int = 128,
) -> LossSums:
    """``goldfish_sums(hidden_BxTxD @ w_DxV, ...)`` without ever holding the B x T x V logits.

    The sequence is cut into M chunks of E = ``chunk_size`` targets; each chunk's logits are made,
    reduced to per-target cross-entropy and discarded, under ``jax.checkpoint`` so the backward
    pass recomputes them per chunk instead of storing them. The matmul runs in the dtype of the
    inputs; the log-softmax in float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    targets_BxT = jnp.asarray(targets_BxT)
    B, T, D = hidden_BxTxD.shape
    drop_BxT = goldfish_mask(
        targets_BxT, config, positions_BxT=positions_BxT, context_BxC=context_BxC, rng=rng, table=table
    )
    valid_BxT = _valid_mask(targets_BxT, weights_BxT)

    E = min(chunk_size, T)
    M = -(-T // E)
    pad = M * E - T
    hidden_pad_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_pad_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    hidden_MxBxExD = hidden_pad_BxTxD.reshape(B, M, E, D).swapaxes(0, 1)
    targets_MxBxE = targets_pad_BxT.reshape(B, M, E).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_terms(hidden_BxExD, targets_BxE):
        logits_BxExV = jnp.einsum("bed,dv->bev", hidden_BxExD, w_DxV.astype(hidden_BxExD.dtype))
        return token_cross_entropy(logits_BxExV, targets_BxE)

    def body(carry, xs):
        return carry, chunk_terms(*xs)

    _, (xent_MxBxE, logz_MxBxE) = jax.lax.scan(body, None, (hidden_MxBxExD, targets_MxBxE))
    xent_BxT = xent_MxBxE.swapaxes(0, 1).reshape(B, M * E)[:, :T]
    logz_BxT = logz_MxBxE.swapaxes(0, 1).reshape(B, M * E)[:, :T]
    return loss_sums(xent_BxT, logz_BxT, drop_BxT, valid_BxT)


def chunked_loss_fn(
    hidden_BxTxD,
    w_DxV,
    targets_BxT,
    config: GoldfishConfig,
    *,
    weights_BxT=None,
    positions_BxT=None,
    context_BxC=None,
    z_loss: float = 0.0,
    rng=None,
    table=None,
    chunk_size: int = 128,
):
    """``loss_fn(hidden_BxTxD @ w_DxV, ...)`` without ever holding the B x T x V logits.

    Same value and gradients as ``loss_fn`` to float tolerance; memory per chunk, not per
    sequence (see ``chunked_goldfish_sums``).
    """
    sums = chunked_goldfish_sums(
        hidden_BxTxD, w_DxV, targets_BxT, config, weights_BxT=weights_BxT, positions_BxT=positions_BxT,
        context_BxC=context_BxC, rng=rng, table=table, chunk_size=chunk_size,
    )
    return sums.loss(z_loss), sums.summary()
