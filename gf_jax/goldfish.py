"""Goldfish mask: a deterministic, context-hashed ~1/k of targets is left out of the loss.

This module decides *which* targets are dropped (``GoldfishConfig``, ``goldfish_mask``) and
derives document positions when a pipeline has none (``positions_from_segment_ids``,
``positions_from_bos``); the loss itself lives in ``gf_jax.loss`` (``loss_fn``, ``chunked_loss_fn``,
``goldfish_sums``, ...). Pure JAX,
traceable under ``jit``/``vmap``/``pmap``/``shard_map``, with static shapes. In a training step::

    import gf_jax
    loss, aux = gf_jax.loss_fn(logits_BxTxV, targets_BxT, gf_jax.GoldfishConfig(k=4, h=13))

Array names carry their shapes: B batch rows, T targets per row, V vocabulary, D model width,
C row-context width, M loss chunks, E targets per chunk.

Strategies (``GoldfishConfig.strategy``):

* ``hash`` (default, recommended): target t is dropped iff a salted, order-sensitive 32-bit
  murmur-style hash of the up-to-h targets *preceding* it in its own document falls in a 1/k
  bucket. Given ``positions_BxT`` (index of each target within its document) the mask of a
  passage does not depend on how it was packed or chunked; targets whose context reaches before
  the row (a row that starts mid-document) are dropped, so no token the full-context hash drops
  is ever supervised. A document's first target has an empty window, so its fate depends on
  ``seed`` and ``k`` alone: every document's first target is dropped or none is (none with
  ``seed=0``, for every k >= 2).
  With ``key_window`` W > 0 the hash also mixes in a *passage key*: the smallest salted token hash
  among the up-to-W targets before the target. A near-duplicate copy (a few words edited) keeps
  most keys, so a small ``h`` (2-3) plus a key keeps its holes aligned with the original's while
  one phrase still gets different holes in different passages (see docs/goldfish.md).
* ``hash-table``: the reference implementation's rule, bit for bit (see ``_hash_table_drop``).
* ``static``: every k-th target of each document, from ``start``.
* ``random``: Bernoulli(1/k) per target from ``rng`` (repetition fills the holes; a baseline).
* ``none``: nothing dropped (standard loss).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

STRATEGIES = ("none", "static", "hash", "hash-table", "random")

# The reference implementation's table: 1,000,003 uniform floats, generator seed 2971215073.
TABLE_SIZE = 1_000_003
TABLE_SEED = 2971215073

_U32 = jnp.uint32

# Position given to the targets of a row's leading, continued document (one that began before the
# row): any value >= h means "full window", so ``hash`` drops the first h of them unless
# ``context_BxC`` supplies their predecessors. 2**20 leaves room for rows of ~10**9 columns; it is
# also the largest hash window (a longer one could not tell such targets from a document's own).
CONTINUED = 2**20


@dataclasses.dataclass(frozen=True)
class GoldfishConfig:
    """Which targets goldfish loss leaves out.

    A static pytree node with no leaves (``jax.tree_util.register_static``): it can be passed as an
    ordinary argument to ``jax.jit``, ``nnx.jit``, ``pmap`` or ``scan`` and is part of the cache key,
    never traced. It is hashable and compares by value.

    Attributes:
      strategy: one of ``none | static | hash | hash-table | random``.
      k: drop rate is 1/k (k >= 2). "4-GL" is k=4.
      h: context width of the hash, 1 <= h <= 2**20; the paper's default is 13 (Apertus used 50).
        Compile time does not depend on h; the mask's run time grows with min(h, T + C).
      seed: salt of the ``hash`` strategy, 0 <= seed < 2**32; different seeds give independent
        masks, the same seed the same mask in every run.
      start: offset of the ``static`` strategy (0 <= start < k).
      never_drop_ids: token ids that are never dropped (e.g. EOS, BOS, PAD).
      key_window: ``hash`` only: 0 (off) or W in [1, 2**20], the passage key's reach (the smallest
        salted token hash among the W targets before each target is mixed into its hash). The
        near-duplicate defence: use it with a small h, e.g. h=2, key_window=64.
    """

    strategy: str = "hash"
    k: int = 4
    h: int = 13
    seed: int = 0
    start: int = 0
    never_drop_ids: tuple[int, ...] = ()
    key_window: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"goldfish strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}."
            )
        for name in ("k", "h", "seed", "start", "key_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"goldfish {name} must be an integer, got {value!r}.")
        if self.k < 2:
            raise ValueError(f"goldfish k must be >= 2 (drop rate 1/k), got k={self.k}.")
        if not 1 <= self.h <= CONTINUED:
            raise ValueError(f"goldfish h (context width) must be in [1, {CONTINUED}], got h={self.h}.")
        if not 0 <= self.key_window <= CONTINUED:
            raise ValueError(f"goldfish key_window must be in [0, {CONTINUED}] (0: no passage key), "
                             f"got key_window={self.key_window}.")
        if self.key_window and self.strategy != "hash":
            raise ValueError(f"goldfish key_window is a setting of the hash strategy; set goldfish.key_window=0 "
                             f"or goldfish.strategy=hash (got {self.strategy!r}).")
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

    @property
    def reach(self) -> int:
        """How many preceding targets the ``hash`` decision reads: max(h, key_window). A row needs
        that much row context to get its document's mask from its first column."""
        return max(self.h, self.key_window)


jax.tree_util.register_static(GoldfishConfig)


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


def context_hash(targets_BxT, positions_BxT, h: int, seed: int, context_BxC=None, key_window: int = 0):
    """Salted 32-bit hash of the up-to-h targets preceding each target in its own document.

    Returns (hash_BxT uint32, complete_BxT bool). The window of the target at document position p
    is its min(p, h) predecessors, nearest first, and the hash also mixes in that length, so a
    document's first targets are hashed consistently wherever the document sits. ``complete`` is
    False where the window reaches before column 0 and ``context_BxC`` (the C targets before
    column 0, see ``goldfish_mask``) does not cover it; such a target's hash is not the full
    window's (it is dropped whatever its hash).

    With ``key_window`` W > 0 the hash is then mixed with the passage key: the smallest
    ``_key_token_hash`` among the min(p, W) predecessors (all ones for p = 0), and completeness
    needs both windows.

    The window offsets run in a ``lax.scan`` that shifts the row by one column per step, so the
    compiled program does not grow with h or W; it stops after ``min(max(h, W), T - 1 + C)``
    steps, the longest window a complete target can have.
    """
    T = targets_BxT.shape[-1]
    C = 0 if context_BxC is None else context_BxC.shape[-1]
    tokens_BxT = targets_BxT.astype(jnp.int32).astype(_U32)
    window_BxT = jnp.minimum(positions_BxT.astype(jnp.int32), h)
    key_window_BxT = jnp.minimum(positions_BxT.astype(jnp.int32), key_window)
    columns_BxT = _columns_like(targets_BxT)
    complete_BxT = jnp.maximum(window_BxT, key_window_BxT) <= columns_BxT + C
    if context_BxC is not None:
        context_BxC = jnp.asarray(context_BxC).astype(jnp.int32).astype(_U32)
    acc_BxT = jnp.zeros_like(tokens_BxT) + _fmix32(_U32(seed) ^ _U32(0x9E3779B9))
    key_BxT = jnp.full_like(tokens_BxT, _U32(0xFFFFFFFF))

    def mix_offset(carry, j):
        """Offset j of every window: the row shifted right by j, its first j columns taken from the
        context (``from_context_BxT`` holds them: context[C - j + t] at column t < j, else 0)."""
        acc_BxT, key_BxT, shifted_BxT, from_context_BxT = carry
        shifted_BxT = _shift_right(shifted_BxT, 1, _U32(0))
        if context_BxC is not None:
            from_context_BxT = _shift_right(from_context_BxT, 1, _U32(0))
            entering_B = jax.lax.dynamic_index_in_dim(context_BxC, jnp.maximum(C - j, 0), axis=-1, keepdims=False)
            entering_B = jnp.where(j <= C, entering_B, _U32(0))
            from_context_BxT = jnp.where(columns_BxT == 0, entering_B[..., None], from_context_BxT)
        # The shifted row is 0 where column t < j and the context part is 0 where t >= j: their sum
        # is the word at offset j.
        word_BxT = shifted_BxT + from_context_BxT
        acc_BxT = jnp.where(j <= window_BxT, _murmur_round(acc_BxT, word_BxT), acc_BxT)
        if key_window:
            key_BxT = jnp.where(j <= key_window_BxT, jnp.minimum(key_BxT, _key_token_hash(word_BxT, seed)), key_BxT)
        return (acc_BxT, key_BxT, shifted_BxT, from_context_BxT), None

    steps = min(max(h, key_window), T - 1 + C)
    carry = (acc_BxT, key_BxT, tokens_BxT, jnp.zeros_like(tokens_BxT))
    (acc_BxT, key_BxT, _, _), _ = jax.lax.scan(mix_offset, carry, jnp.arange(1, steps + 1, dtype=jnp.int32))
    hash_BxT = _fmix32(acc_BxT ^ window_BxT.astype(_U32))
    if key_window:
        hash_BxT = _fmix32(_murmur_round(hash_BxT, key_BxT))
    return hash_BxT, complete_BxT


def _key_token_hash(word, seed: int):
    """The salted hash of one token that the passage key takes the minimum of: a min-hash, so a
    window keeps its key unless an edit brings in a token with a smaller one or removes its own."""
    return _fmix32(word ^ _fmix32(_U32(seed) ^ _U32(0x85EBCA77)))


def _hash_drop(targets_BxT, positions_BxT, config: GoldfishConfig, context_BxC=None):
    hash_BxT, complete_BxT = context_hash(targets_BxT, positions_BxT, config.h, config.seed, context_BxC,
                                          config.key_window)
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

    def multiply_offset(carry, _):
        """Offset j of the window: the row shifted right by j, multiplied in (1 before the row)."""
        prod_hi, prod_lo, shifted_hi, shifted_lo = carry
        shifted_hi, shifted_lo = _shift_right(shifted_hi, 1, _U32(0)), _shift_right(shifted_lo, 1, _U32(1))
        prod_hi, prod_lo = _mul64_wrap(prod_hi, prod_lo, shifted_hi, shifted_lo)
        return (prod_hi, prod_lo, shifted_hi, shifted_lo), None

    # A scan (one compiled step for any h); past T - 1 offsets only the factor 1 is multiplied in.
    steps = min(config.h - 1, targets_BxT.shape[-1] - 1)
    (prod_hi, prod_lo, _, _), _ = jax.lax.scan(multiply_offset, (hi_BxT, lo_BxT, hi_BxT, lo_BxT), None, length=steps)
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
        target): lm1b's and Gemma's ``inputs_position``; *not* segment ids (derive positions from
        those with ``positions_from_segment_ids``). Without it, every row starts a document. Used
        by ``hash`` and ``static``.
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
        raise ValueError(f"targets_BxT must be integer token ids, got dtype {targets_BxT.dtype}.")
    if positions_BxT is None:
        positions_BxT = _default_positions(targets_BxT)
    else:
        positions_BxT = check_like(positions_BxT, targets_BxT, "positions_BxT")
        if not jnp.issubdtype(positions_BxT.dtype, jnp.integer):
            raise ValueError(
                f"positions_BxT must be integer positions within each document, got dtype {positions_BxT.dtype}."
            )
    if context_BxC is not None:
        context_BxC = jnp.asarray(context_BxC)
        if context_BxC.shape[:-1] != targets_BxT.shape[:-1]:
            raise ValueError(
                f"context_BxC shape {context_BxC.shape} must be the targets' batch shape "
                f"{targets_BxT.shape[:-1]} + (C,)."
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


def check_like(x, targets_BxT, name: str):
    """``x`` as an array of the targets' shape, or a ValueError naming the argument."""
    x = jnp.asarray(x)
    if x.shape != targets_BxT.shape:
        hint = " (drop the trailing axis of size 1)" if x.shape == (*targets_BxT.shape, 1) else ""
        raise ValueError(f"{name} shape {x.shape} must equal targets_BxT shape {targets_BxT.shape}{hint}.")
    return x


# ---------------------------------------------------------------------------------------------
# Positions for pipelines that have none.



def _positions_from_starts(starts_BxT, row_starts_document: bool):
    columns_BxT = _columns_like(starts_BxT)
    if row_starts_document:
        starts_BxT = starts_BxT | (columns_BxT == 0)
    start_BxT = jax.lax.cummax(jnp.where(starts_BxT, columns_BxT, -1), axis=starts_BxT.ndim - 1)
    return jnp.where(start_BxT < 0, columns_BxT + CONTINUED, columns_BxT - start_BxT)


def positions_from_segment_ids(segment_ids_BxT, *, row_starts_document: bool = True):
    """``positions_BxT`` of packed rows from their segment ids: 0 where the id changes, +1 after.

    A new document starts wherever a row's segment id differs from the column before (padding is
    its own segment; weights or ``pad_id`` keep it out of the loss). ``row_starts_document=False``
    says the row's first segment began before the row (a pipeline that cuts documents across rows):
    its targets get positions from ``CONTINUED`` on, so ``hash`` drops its first h targets unless
    ``context_BxC`` is given (see ``goldfish_mask``). Segment ids are per *input* column, like
    lm1b's ``inputs_segmentation``; the positions are those of the targets predicted there.
    """
    segment_ids_BxT = jnp.asarray(segment_ids_BxT)
    previous_BxT = _shift_right(segment_ids_BxT, 1, jnp.asarray(0, segment_ids_BxT.dtype))
    starts_BxT = (segment_ids_BxT != previous_BxT) & (_columns_like(segment_ids_BxT) > 0)
    return _positions_from_starts(starts_BxT, row_starts_document)


def positions_from_bos(inputs_BxT, bos_id: int, *, row_starts_document: bool = False):
    """``positions_BxT`` from BOS tokens in the model's inputs: 0 at each BOS, +1 after.

    Target t is predicted at input column t, so a document's first target (the token after BOS)
    gets position 0. Tokens before a row's first BOS belong to a document that began in an earlier
    row (nanodo-style rows cut from one long token stream): unless ``row_starts_document=True``
    they get positions from ``CONTINUED`` on, and ``hash`` drops their first h targets (their
    context lies before the row) unless ``context_BxC`` supplies it. No supervised target is then
    one that the full-document mask drops.
    """
    inputs_BxT = jnp.asarray(inputs_BxT)
    return _positions_from_starts(inputs_BxT == bos_id, row_starts_document)
