"""Goldfish mask and loss: behaviour checked against independent references.

References used here: plain numpy statements of the rules (written separately from the JAX code),
closed forms (uniform logits), optax's cross-entropy, and binomial statistics.
"""

import math
import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gf_jax
from gf_jax import GoldfishConfig, chunked_loss_fn, goldfish, goldfish_mask, loss_fn, summarize

REPO = pathlib.Path(helpers.REPO)


def _random_ids(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


def _assert_rate(drop, k, n_eff=None, sigmas=5.0):
    drop = np.asarray(drop)
    n = drop.size if n_eff is None else n_eff
    p = 1.0 / k
    tol = sigmas * math.sqrt(p * (1 - p) / n)
    assert abs(drop.mean() - p) < tol, (drop.mean(), p, tol)


# --------------------------------------------------------------------------------------------
# Drop rate.


@pytest.mark.parametrize("k", [2, 3, 4, 8, 32, 128])
def test_hash_drop_rate_is_one_over_k_for_random_ids(k):
    targets = _random_ids((64, 4096), 32000, seed=k)
    _assert_rate(goldfish_mask(targets, GoldfishConfig(k=k)), k)


@pytest.mark.parametrize("vocab", [3, 50])
@pytest.mark.parametrize("k", [2, 4, 32])
def test_hash_drop_rate_holds_for_tiny_vocabularies(vocab, k):
    targets = _random_ids((64, 4096), vocab, seed=vocab)
    _assert_rate(goldfish_mask(targets, GoldfishConfig(k=k)), k)


def test_reference_product_hash_fails_on_tiny_vocabularies():
    # The documented flaw we fix: with vocab 3 the reference drops ~99% at k=4 (any 0 in the
    # window forces key 0). Also checks our hash-table reproduces the reference's behaviour.
    # With vocab 3 almost every 13-window holds a 0, so almost every key is 0 and the rate is
    # table[0] < 1/k: ~1.0 with torch's CPU table (GOLDFISH.md), ~0.0 when table[0] >= 1/k.
    targets = _random_ids((16, 2048), 3, seed=1)
    cfg = GoldfishConfig(strategy="hash-table", k=4)
    table = goldfish.default_table().copy()
    for table0, expect_high in ((0.1, True), (0.9, False)):
        table[0] = table0
        rate = float(np.asarray(goldfish_mask(targets, cfg, table=table)).mean())
        assert (rate > 0.9) if expect_high else (rate < 0.1), (table0, rate)
    ours = float(np.asarray(goldfish_mask(targets, GoldfishConfig(k=4))).mean())
    assert abs(ours - 0.25) < 0.01


def _shakespeare_bytes(n_rows, T):
    text = (REPO / "data" / "tinyshakespeare.txt").read_bytes()
    ids = np.frombuffer(text[: n_rows * T], dtype=np.uint8).astype(np.int32)
    return ids.reshape(n_rows, T)


@pytest.mark.parametrize("k", [2, 3, 4, 8, 32, 128])
def test_hash_drop_rate_on_real_text(k):
    # Real text repeats contexts ("the king ..."), so count each distinct (window, length) once:
    # the bucket rate over distinct contexts must be binomial, and the per-token rate close to it.
    targets = _shakespeare_bytes(128, 4096)  # 512 KiB of Tiny Shakespeare, byte tokens
    cfg = GoldfishConfig(k=k)
    drop = np.asarray(goldfish_mask(targets, cfg))
    hashes = np.asarray(goldfish.context_hash(jnp.asarray(targets), goldfish._default_positions(jnp.asarray(targets)), cfg.h, cfg.seed)[0])
    unique_hashes = np.unique(hashes)
    unique_drop = unique_hashes < (2**32) // k
    _assert_rate(unique_drop, k)
    assert abs(drop.mean() - 1 / k) < 0.15 / k + 0.01


# --------------------------------------------------------------------------------------------
# Hash properties.


def _mask_of_windows(windows_NxH, cfg):
    """Drop decision of the target that follows each window (last column of a row)."""
    n, h = windows_NxH.shape
    rows = np.concatenate([windows_NxH, np.zeros((n, 1), np.int32)], axis=1)  # target after window
    return np.asarray(goldfish_mask(rows, cfg))[:, -1]


def test_hash_is_order_sensitive():
    cfg = GoldfishConfig(k=2, h=13)
    windows = _random_ids((20000, 13), 32000, seed=3)
    permuted = np.ascontiguousarray(windows[:, ::-1])
    a = _mask_of_windows(windows, cfg)
    b = _mask_of_windows(permuted, cfg)
    # Independent decisions at k=2 disagree half the time; an order-insensitive hash never would.
    assert 0.45 < (a != b).mean() < 0.55
    # The reference product hash is order-insensitive (documented flaw).
    ref = GoldfishConfig(strategy="hash-table", k=2, h=13)
    rows = np.concatenate([windows[:, :12], windows[:, 12:13]], axis=1)
    rows_perm = np.concatenate([windows[:, :12][:, ::-1], windows[:, 12:13]], axis=1)
    assert np.array_equal(np.asarray(goldfish_mask(rows, ref))[:, -1], np.asarray(goldfish_mask(rows_perm, ref))[:, -1])


def test_every_window_token_matters_and_nothing_beyond_it():
    cfg = GoldfishConfig(k=2, h=5)
    rows = _random_ids((20000, 8), 1000, seed=4)  # target at column 7, window columns 2..6
    base = np.asarray(goldfish_mask(rows, cfg))[:, -1]
    for col in range(2, 7):  # inside the window: decision flips with probability ~1/2
        changed = rows.copy()
        changed[:, col] = (changed[:, col] + 1) % 1000
        flips = (np.asarray(goldfish_mask(changed, cfg))[:, -1] != base).mean()
        assert 0.45 < flips < 0.55, (col, flips)
    for col in (0, 1, 7):  # outside the window (and the target itself): no effect
        changed = rows.copy()
        changed[:, col] = (changed[:, col] + 1) % 1000
        assert np.array_equal(np.asarray(goldfish_mask(changed, cfg))[:, -1], base), col


_M32 = 0xFFFFFFFF


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & _M32


def _fmix(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _murmur_block(acc, word):
    word = _rotl((word * 0xCC9E2D51) & _M32, 15)
    acc = _rotl(acc ^ ((word * 0x1B873593) & _M32), 13)
    return (acc * 5 + 0xE6546B64) & _M32


def _murmur_reference(window, seed):
    """The documented hash in plain Python integers: murmur3 blocks over the window (nearest
    predecessor first), salted by the seed, finalised with the window length mixed in."""
    acc = _fmix(seed ^ 0x9E3779B9)
    for word in window:
        acc = _murmur_block(acc, word)
    return _fmix(acc ^ len(window))


@pytest.mark.parametrize("h", [1, 5, 13, 40, 200])
def test_context_hash_equals_a_plain_python_reference(h):
    """Every complete target's hash is the reference hash of its own window, whatever h is (also
    h beyond the row plus its context), with and without row context."""
    rng = np.random.default_rng(h)
    B, T, C = 3, 48, 24
    targets = rng.integers(0, 40000, (B, T)).astype(np.int32)
    context = rng.integers(0, 40000, (B, C)).astype(np.int32)
    starts = np.array([0, 7, 300])  # each row's first target's position in its document
    positions = (np.arange(T)[None] + starts[:, None]).astype(np.int32)
    for ctx in (None, context):
        hashes, complete = goldfish.context_hash(jnp.asarray(targets), jnp.asarray(positions), h, 9,
                                                 None if ctx is None else jnp.asarray(ctx))
        hashes, complete = np.asarray(hashes), np.asarray(complete)
        for b in range(B):
            row = ([] if ctx is None else list(ctx[b])) + list(targets[b])
            offset = 0 if ctx is None else C
            for t in range(T):
                n = min(int(positions[b, t]), h)
                expected_complete = n <= t + offset
                assert complete[b, t] == expected_complete, (b, t)
                if expected_complete:
                    window = [int(row[offset + t - j]) for j in range(1, n + 1)]
                    assert int(hashes[b, t]) == _murmur_reference(window, 9), (b, t, n)


def _key_reference(window, seed):
    """The passage key in plain Python: the smallest salted token hash over the window (murmur3's
    finaliser of token ^ fmix(seed ^ 0x85EBCA77)); all ones for an empty window."""
    salt = _fmix(seed ^ 0x85EBCA77)
    return min((_fmix(w ^ salt) for w in window), default=_M32)


def _keyed_reference(window, key_window, seed):
    """The hash with a passage key: the plain hash, one more murmur block (the key), finalised."""
    return _fmix(_murmur_block(_murmur_reference(window, seed), _key_reference(key_window, seed)))


@pytest.mark.parametrize("h, key_window", [(2, 1), (2, 9), (1, 64), (13, 5), (3, 300)])
def test_passage_key_hash_equals_a_plain_python_reference(h, key_window):
    """With key_window W every complete target's hash is the reference hash of its h-window mixed
    with the min-hash of its W-window; completeness needs both windows (with and without context)."""
    rng = np.random.default_rng(key_window)
    B, T, C = 3, 40, 24
    targets = rng.integers(0, 40000, (B, T)).astype(np.int32)
    context = rng.integers(0, 40000, (B, C)).astype(np.int32)
    positions = (np.arange(T)[None] + np.array([0, 5, 400])[:, None]).astype(np.int32)
    for ctx in (None, context):
        hashes, complete = goldfish.context_hash(jnp.asarray(targets), jnp.asarray(positions), h, 3,
                                                 None if ctx is None else jnp.asarray(ctx), key_window)
        hashes, complete = np.asarray(hashes), np.asarray(complete)
        offset = 0 if ctx is None else C
        for b in range(B):
            row = ([] if ctx is None else list(ctx[b])) + list(targets[b])
            for t in range(T):
                n, w = min(int(positions[b, t]), h), min(int(positions[b, t]), key_window)
                assert complete[b, t] == (max(n, w) <= t + offset), (b, t)
                if complete[b, t]:
                    window = [int(row[offset + t - j]) for j in range(1, n + 1)]
                    key_window_tokens = [int(row[offset + t - j]) for j in range(1, w + 1)]
                    assert int(hashes[b, t]) == _keyed_reference(window, key_window_tokens, 3), (b, t)


def _edited_copy(doc, rng, edits):
    """``doc`` with ``edits`` random token substitutions or insertions, and for each of the
    original's positions its position in the copy (-1 where it was substituted)."""
    copy, where = [], []
    edit_at = set(rng.choice(len(doc), edits, replace=False).tolist())
    for i, token in enumerate(doc):
        if i in edit_at and rng.random() < 0.5:
            where.append(-1)
            copy.append(int(rng.integers(0, 32000)))
            continue
        where.append(len(copy))
        copy.append(int(token))
        if i in edit_at:
            copy.append(int(rng.integers(0, 32000)))
    return np.asarray(copy, np.int32), np.asarray(where)


def test_a_small_window_with_a_passage_key_keeps_near_duplicate_holes_aligned():
    """The near-duplicate defence, as a property: over 16 copies of a 400-token passage with 12
    edits each, h=13 leaves almost none of the original's holes dropped in every copy; h=2 with a
    64-token passage key keeps several times more. And unlike plain h=2 the key gives one 3-gram
    different fates in different passages."""
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 2000, 400).astype(np.int32)
    plain, defended = GoldfishConfig(k=4, h=13), GoldfishConfig(k=4, h=2, key_window=64)

    def protected(cfg):
        original = np.asarray(goldfish_mask(doc[None], cfg))[0]
        alive = original.copy()
        for c in range(16):
            copy, where = _edited_copy(doc, np.random.default_rng([1, c]), 12)
            dropped = np.asarray(goldfish_mask(copy[None], cfg))[0]
            kept_in_copy = (where >= 0) & ~dropped[np.maximum(where, 0)]
            alive &= ~kept_in_copy
        return alive[64:].sum() / original[64:].sum()

    assert protected(plain) < 0.05
    assert protected(defended) > 4 * max(protected(plain), 0.02)
    # The 3-gram (a, b -> c) in 200 passages of random tokens: plain h=2 gives it one fate
    # everywhere; with the key, both fates occur about as often as 1/k says.
    passages = rng.integers(2000, 32000, (200, 100)).astype(np.int32)
    passages[:, 80:83] = [5, 6, 7]
    for cfg, expected in ((GoldfishConfig(k=4, h=2), "one fate"), (defended, "both")):
        fate = np.asarray(goldfish_mask(passages, cfg))[:, 82]
        if expected == "one fate":
            assert fate.all() or not fate.any()
        else:
            assert 20 <= fate.sum() <= 90


def test_the_compiled_mask_does_not_grow_with_the_hash_window():
    """The window is a scan: the traced program of h = 1024 is as large as that of h = 13 (an
    unrolled window made compile time grow with h: 47 s at h = 256 in a training step)."""
    targets = jnp.zeros((2, 64), jnp.int32)
    context = jnp.zeros((2, 32), jnp.int32)

    def size(strategy, h):
        cfg = GoldfishConfig(strategy=strategy, h=h)
        jaxpr = jax.make_jaxpr(lambda t, c: goldfish_mask(t, cfg, positions_BxT=t + 100, context_BxC=c))(targets, context)
        return len(str(jaxpr).splitlines())  # equations, nested ones included (constants may differ)

    for strategy in ("hash", "hash-table"):
        assert size(strategy, 1024) == size(strategy, 13), strategy


def test_seed_salts_the_hash():
    targets = _random_ids((16, 4096), 32000, seed=5)
    a = np.asarray(goldfish_mask(targets, GoldfishConfig(k=4, seed=0)))
    b = np.asarray(goldfish_mask(targets, GoldfishConfig(k=4, seed=1)))
    assert np.array_equal(a, np.asarray(goldfish_mask(targets, GoldfishConfig(k=4, seed=0))))
    # Independent masks overlap on ~1/k^2 of targets.
    _assert_rate(a & b, 16)


# --------------------------------------------------------------------------------------------
# Documents, packing and chunks.


def _doc_positions(lengths, T):
    """positions for documents of these target counts packed back to back into one row."""
    pos = np.concatenate([np.arange(n) for n in lengths])
    assert pos.size == T
    return pos.astype(np.int32)


def test_same_passage_same_mask_wherever_it_is_packed():
    rng = np.random.default_rng(6)
    doc = rng.integers(0, 32000, size=300, dtype=np.int32)
    filler_a = rng.integers(0, 32000, size=37, dtype=np.int32)
    filler_b = rng.integers(0, 32000, size=211, dtype=np.int32)
    T = 548
    row0 = np.concatenate([filler_a, doc, filler_b])
    row1 = np.concatenate([filler_b, filler_a, doc])
    row2 = np.concatenate([doc, filler_a, filler_b])
    targets = np.stack([row0, row1, row2])
    positions = np.stack([
        _doc_positions([37, 300, 211], T),
        _doc_positions([211, 37, 300], T),
        _doc_positions([300, 37, 211], T),
    ])
    cfg = GoldfishConfig(k=4)
    drop = np.asarray(goldfish_mask(targets, cfg, positions_BxT=positions))
    m0, m1, m2 = drop[0, 37:337], drop[1, 248:548], drop[2, :300]
    assert np.array_equal(m0, m1) and np.array_equal(m0, m2)
    assert 0.15 < m0.mean() < 0.35
    # Without positions the passage's first h targets see the filler: masks differ there.
    plain = np.asarray(goldfish_mask(targets, cfg))
    assert np.array_equal(plain[0, 37 + 13 : 337], m0[13:])


def test_mid_document_chunks_never_keep_a_token_the_full_context_drops():
    rng = np.random.default_rng(7)
    for h in (1, 4, 13):
        cfg = GoldfishConfig(k=4, h=h)
        doc = rng.integers(0, 32000, size=1000, dtype=np.int32)
        full = np.asarray(goldfish_mask(doc[None], cfg))[0]
        for start in (0, 5, 100, 333, 800):
            for length in (64, 200):
                chunk = doc[start : start + length]
                pos = np.arange(start, start + chunk.size, dtype=np.int32)
                drop = np.asarray(goldfish_mask(chunk[None], cfg, positions_BxT=pos[None]))[0]
                ref = full[start : start + chunk.size]
                assert not np.any(~drop & ref), (h, start)  # kept set ⊆ full kept set
                # A row that starts mid-document lacks the full window of its first h targets.
                settled = 0 if start == 0 else h
                assert np.array_equal(drop[settled:], ref[settled:])
                assert drop[:settled].all()


def test_row_context_recovers_the_full_document_mask():
    # With the C >= h targets before a mid-document row as context, the row's mask is exactly the
    # full-document mask (no extra drops); with C < h, the first h - C columns stay dropped.
    rng = np.random.default_rng(19)
    cfg = GoldfishConfig(k=4, h=13)
    doc = rng.integers(0, 32000, size=600, dtype=np.int32)
    full = np.asarray(goldfish_mask(doc[None], cfg))[0]
    for C in (13, 32, 5):
        for start in (0, 3, 13, 200):
            chunk = doc[None, start : start + 128]
            pos = np.arange(start, start + 128, dtype=np.int32)[None]
            context = np.full((1, C), 7, np.int32)  # entries before the document are ignored
            n = min(C, start)
            if n:
                context[0, C - n :] = doc[start - n : start]
            drop = np.asarray(jax.jit(lambda t, p, c: goldfish_mask(t, cfg, positions_BxT=p, context_BxC=c))(chunk, pos, context))[0]
            ref = full[start : start + 128]
            assert not np.any(~drop & ref), (C, start)
            settled = 0 if (C >= 13 or start <= C) else 13 - C
            assert np.array_equal(drop[settled:], ref[settled:]), (C, start)
            assert drop[:settled].all()
    # loss_fn passes it through.
    logits = jnp.zeros((1, 128, 32000))
    pos = np.arange(200, 328, dtype=np.int32)[None]
    _, aux = loss_fn(logits, doc[None, 200:328], cfg, positions_BxT=pos, context_BxC=doc[None, 200 - 16 : 200])
    assert int(aux["n_dropped"]) == full[200:328].sum()


def test_reference_hash_table_leaks_chunk_starts():
    # Documented flaw: the reference keeps the first h-1 columns of every row, so a passage cut
    # at different offsets gets those tokens supervised even where the full context drops them.
    rng = np.random.default_rng(8)
    doc = rng.integers(1, 32000, size=4000, dtype=np.int32)
    cfg = GoldfishConfig(strategy="hash-table", k=4)
    full = np.asarray(goldfish_mask(doc[None], cfg))[0]
    leaked = 0
    for start in range(100, 3900, 100):
        drop = np.asarray(goldfish_mask(doc[None, start : start + 100], cfg))[0]
        leaked += int(np.sum(~drop[:12] & full[start : start + 12]))
    assert leaked > 0


def test_never_drop_ids_are_never_dropped():
    targets = _random_ids((8, 2048), 20, seed=9)
    for strategy in ("hash", "hash-table", "static", "random"):
        cfg = GoldfishConfig(strategy=strategy, k=2, never_drop_ids=(0, 7))
        drop = np.asarray(goldfish_mask(targets, cfg, rng=jax.random.key(0)))
        assert not drop[(targets == 0) | (targets == 7)].any(), strategy
        assert drop.any(), strategy


def test_static_drops_every_kth_target_of_each_document():
    positions = np.stack([_doc_positions([10, 22], 32), np.arange(32, dtype=np.int32)])
    targets = _random_ids((2, 32), 100)
    drop = np.asarray(goldfish_mask(targets, GoldfishConfig(strategy="static", k=3, start=1), positions_BxT=positions))
    assert np.array_equal(drop, positions % 3 == 1)


def test_random_strategy_fills_the_holes_over_epochs():
    # Why hashing matters: over 8 "epochs" random dropping supervises almost every token, the
    # hash leaves the same 1/k out every time.
    targets = _random_ids((4, 1024), 32000, seed=10)
    cfg_r = GoldfishConfig(strategy="random", k=4)
    ever_kept_random = np.zeros(targets.shape, bool)
    ever_kept_hash = np.zeros(targets.shape, bool)
    for epoch in range(8):
        ever_kept_random |= ~np.asarray(goldfish_mask(targets, cfg_r, rng=jax.random.key(epoch)))
        ever_kept_hash |= ~np.asarray(goldfish_mask(targets, GoldfishConfig(k=4)))
    assert ever_kept_random.mean() > 0.99
    assert abs(ever_kept_hash.mean() - 0.75) < 0.02
    _assert_rate(goldfish_mask(targets, cfg_r, rng=jax.random.key(0)), 4)


# --------------------------------------------------------------------------------------------
# hash-table == an independent numpy statement of the reference rule.


def _numpy_reference_mask(targets, k, h, table):
    targets = np.asarray(targets, np.int64)
    B, T = targets.shape
    drop = np.zeros((B, T), bool)
    with np.errstate(over="ignore"):
        for p in range(h - 1, T):
            key = np.ones(B, np.int64)
            for q in range(p - h + 1, p + 1):
                key = key * targets[:, q]  # int64, wraps on overflow like torch
            key = np.mod(key, 1_000_003)  # floor-mod: non-negative
            drop[:, p] = table[key] < np.float32(1.0 / k)
    return drop


@pytest.mark.parametrize("h", [1, 3, 13])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_hash_table_matches_numpy_reference_bit_for_bit(k, h):
    targets = _random_ids((4, 96), 32000, seed=k * 100 + h)
    targets[0, 5] = -1  # an ignore index inside a window: negative products
    targets[1, 20:22] = 0
    table = np.random.default_rng(123).random(1_000_003, dtype=np.float32)  # "exported" user table
    ours = np.asarray(goldfish_mask(targets, GoldfishConfig(strategy="hash-table", k=k, h=h), table=table))
    assert np.array_equal(ours, _numpy_reference_mask(targets, k, h, table))
    ours_default = np.asarray(goldfish_mask(targets, GoldfishConfig(strategy="hash-table", k=k, h=h)))
    assert np.array_equal(ours_default, _numpy_reference_mask(targets, k, h, goldfish.default_table()))


def test_hash_table_works_without_x64():
    assert not jax.config.jax_enable_x64
    targets = np.full((1, 16), 2**31 - 1, np.int32)  # products far beyond 64 bits
    drop = jax.jit(lambda t: goldfish_mask(t, GoldfishConfig(strategy="hash-table")))(targets)
    table = goldfish.default_table()
    assert np.array_equal(np.asarray(drop), _numpy_reference_mask(targets, 4, 13, table))


# --------------------------------------------------------------------------------------------
# Transformations: jit, vmap, sharding.


@pytest.mark.parametrize("strategy", ["hash", "hash-table", "static", "random"])
def test_eager_jit_vmap_and_sharded_masks_agree(strategy):
    cfg = GoldfishConfig(strategy=strategy, k=4)
    targets = _random_ids((8, 256), 32000, seed=11)
    positions = np.tile(np.arange(256, dtype=np.int32) + 50, (8, 1))  # rows start mid-document
    key = jax.random.key(1)
    fn = lambda t, p: goldfish_mask(t, cfg, positions_BxT=p, rng=key)  # noqa: E731
    eager = np.asarray(fn(targets, positions))
    jitted = np.asarray(jax.jit(fn)(targets, positions))
    assert np.array_equal(eager, jitted)
    if strategy != "random":  # random draws a different stream per vmapped row shape
        vmapped = np.asarray(jax.vmap(lambda t, p: fn(t[None], p[None])[0])(targets, positions))
        assert np.array_equal(eager, vmapped)
    # Sharded over 8 devices: batch over one axis, and batch x sequence over a 4 x 2 mesh, with
    # explicit (JAX's default) and auto mesh axes.
    assert len(jax.devices()) == 8
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        for mesh_shape, spec in (((8,), P("a")), ((4, 2), P("a", "b"))):
            names = ("a", "b")[: len(mesh_shape)]
            mesh = jax.make_mesh(mesh_shape, names, axis_types=(axis_type,) * len(names))
            sharding = NamedSharding(mesh, spec)
            t = jax.device_put(targets, sharding)
            p = jax.device_put(positions, sharding)
            with jax.set_mesh(mesh):
                out = jax.jit(fn)(t, p)
            assert np.array_equal(np.asarray(out), eager), (axis_type, mesh_shape)
            out_no_context = jax.jit(fn, out_shardings=sharding)(t, p)
            assert np.array_equal(np.asarray(out_no_context), eager), (axis_type, mesh_shape)


# --------------------------------------------------------------------------------------------
# Loss.


def test_uniform_logits_closed_form():
    # Zero logits: every target has cross-entropy log V and log-partition log V, whatever is kept.
    V = 37
    targets = _random_ids((3, 50), V, seed=12)
    logits = jnp.zeros((3, 50, V), jnp.bfloat16)
    weights = np.ones((3, 50), np.float32)
    weights[2, 30:] = 0
    loss, aux = loss_fn(logits, targets, GoldfishConfig(k=3), weights_BxT=weights, z_loss=1e-2)
    assert np.isclose(loss, math.log(V) + 1e-2 * math.log(V) ** 2, rtol=1e-6)
    drop = np.asarray(goldfish_mask(targets, GoldfishConfig(k=3))) & (weights > 0)
    assert int(aux["n_valid"]) == 130
    assert int(aux["n_dropped"]) == drop.sum()
    assert int(aux["n_kept"]) == 130 - drop.sum()
    assert np.isclose(aux["loss_all"], math.log(V)) and np.isclose(aux["loss_dropped"], math.log(V))
    assert np.isclose(aux["drop_fraction"], drop.sum() / 130)


def test_none_strategy_equals_optax_mean_cross_entropy():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(4, 33, 101)).astype(np.float32) * 3
    targets = _random_ids((4, 33), 101, seed=13)
    weights = (rng.random((4, 33)) > 0.2).astype(np.float32)
    loss, aux = loss_fn(logits, targets, GoldfishConfig(strategy="none"), weights_BxT=weights)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = (per_token * weights).sum() / weights.sum()
    assert np.isclose(loss, expected, rtol=1e-6)
    assert int(aux["n_dropped"]) == 0 and np.isclose(aux["loss_all"], expected, rtol=1e-6)


def test_goldfish_loss_is_mean_over_kept_tokens_globally():
    rng = np.random.default_rng(14)
    logits = rng.normal(size=(3, 64, 50)).astype(np.float32)
    targets = _random_ids((3, 64), 50, seed=14)
    targets[1, 10] = -1  # ignore index: invalid
    cfg = GoldfishConfig(k=4, h=3)
    loss, aux = loss_fn(logits, targets, cfg)
    xent = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.maximum(targets, 0)))
    drop = np.asarray(goldfish_mask(targets, cfg))
    kept = ~drop & (targets >= 0)
    assert np.isclose(loss, xent[kept].mean(), rtol=1e-6)  # one mean over the batch, not per row
    dropped = drop & (targets >= 0)
    assert np.isclose(aux["loss_dropped"], xent[dropped].mean(), rtol=1e-6)
    assert int(aux["n_valid"]) == 3 * 64 - 1


def test_gradients_are_exactly_zero_at_dropped_targets():
    rng = np.random.default_rng(15)
    logits = jnp.asarray(rng.normal(size=(2, 128, 40)).astype(np.float32))
    targets = _random_ids((2, 128), 40, seed=15)
    weights = np.ones((2, 128), np.float32)
    weights[1, 100:] = 0
    cfg = GoldfishConfig(k=4, h=4)
    grad = np.asarray(jax.grad(lambda lg: loss_fn(lg, targets, cfg, weights_BxT=weights, z_loss=1e-3)[0])(logits))
    drop = np.asarray(goldfish_mask(targets, cfg))
    silent = drop | (weights == 0)
    assert silent.sum() > 40
    assert np.all(grad[silent] == 0.0)
    assert np.all(np.abs(grad[~silent]).sum(-1) > 0)


def test_bf16_logits_use_float32_softmax():
    rng = np.random.default_rng(16)
    logits = jnp.asarray(rng.normal(size=(2, 16, 30000)) * 8, jnp.bfloat16)
    targets = _random_ids((2, 16), 30000, seed=16)
    cfg = GoldfishConfig(k=4)
    lo, _ = loss_fn(logits, targets, cfg)
    hi, _ = loss_fn(logits.astype(jnp.float32), targets, cfg)
    assert lo.dtype == jnp.float32 and float(lo) == float(hi)


def test_sums_accumulate_over_micro_batches():
    rng = np.random.default_rng(17)
    logits = rng.normal(size=(4, 40, 20)).astype(np.float32)
    targets = _random_ids((4, 40), 20, seed=17)
    cfg = GoldfishConfig(k=3, h=2)
    whole, whole_aux = loss_fn(logits, targets, cfg)
    parts = [loss_fn(logits[i : i + 1], targets[i : i + 1], cfg)[1] for i in range(4)]
    keys = ["xent_sum", "z_sum", "xent_all_sum", "xent_dropped_sum", "n_kept", "n_dropped", "n_valid"]
    total = summarize({key: sum(p[key] for p in parts) for key in keys})
    assert np.isclose(total["loss_kept"], whole, rtol=1e-6)
    for key in ("loss_all", "loss_dropped", "drop_fraction"):
        assert np.isclose(total[key], whole_aux[key], rtol=1e-6)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_loss_equals_plain_value_and_gradient(chunk):
    rng = np.random.default_rng(18)
    B, T, D, V = 2, 45, 16, 300
    h = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32) * 0.3)
    targets = _random_ids((B, T), V, seed=18)
    weights = np.ones((B, T), np.float32)
    weights[0, 40:] = 0
    positions = np.tile(np.arange(T, dtype=np.int32) + 3, (B, 1))
    cfg = GoldfishConfig(k=4, h=5)
    kw = dict(weights_BxT=weights, positions_BxT=positions, z_loss=1e-3)

    def plain(h, w):
        return loss_fn(jnp.einsum("btd,dv->btv", h, w), targets, cfg, **kw)

    def chunked(h, w):
        return chunked_loss_fn(h, w, targets, cfg, chunk_size=chunk, **kw)

    (lp, ap), gp = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, w)
    (lc, ac), gc = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(h, w)
    assert np.isclose(lp, lc, rtol=1e-5)
    for key in ("n_kept", "n_dropped", "n_valid"):
        assert int(ap[key]) == int(ac[key])
    np.testing.assert_allclose(gp[0], gc[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gp[1], gc[1], rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_materialises_full_logits():
    B, T, D, V = 2, 1024, 32, 4096
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    t = jax.ShapeDtypeStruct((B, T), jnp.int32)
    cfg = GoldfishConfig()

    def peak(fn):
        grad = jax.jit(jax.grad(lambda h, w, t: fn(h, w, t)[0], argnums=(0, 1)))
        return grad.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes

    full_logits_bytes = B * T * V * 4
    plain = peak(lambda h, w, t: loss_fn(jnp.einsum("btd,dv->btv", h, w), t, cfg))
    chunked = peak(lambda h, w, t: chunked_loss_fn(h, w, t, cfg, chunk_size=64))  # 1/16 of T
    assert plain >= full_logits_bytes
    assert chunked < full_logits_bytes / 4
    assert plain / chunked >= 4  # the target


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(strategy="hash2"), "none, static, hash, hash-table, random"),
        (dict(k=1), "k must be >= 2"),
        (dict(k=2.5), "k must be an integer"),
        (dict(h=0), "h (context width) must be in [1, 1048576]"),
        (dict(h=2**20 + 1), "h (context width) must be in [1, 1048576]"),
        (dict(seed=-1), "seed must be in [0, 2**32)"),
        (dict(k=4, start=4), "start must be in [0, k)"),
        (dict(never_drop_ids=("eos",)), "never_drop_ids must be a list of integer token ids"),
        (dict(key_window=-1), "key_window must be in [0, 1048576]"),
        (dict(strategy="static", key_window=8), "key_window is a setting of the hash strategy"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        GoldfishConfig(**kwargs)
    assert fragment in str(err.value)


def test_bad_calls_are_rejected():
    targets = _random_ids((2, 8), 10)
    with pytest.raises(ValueError, match="needs rng"):
        goldfish_mask(targets, GoldfishConfig(strategy="random"))
    with pytest.raises(ValueError, match="positions_BxT shape"):
        goldfish_mask(targets, GoldfishConfig(), positions_BxT=np.zeros((2, 7), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        goldfish_mask(targets.astype(np.float32), GoldfishConfig())
    with pytest.raises(ValueError, match="1,000,003|1000003"):
        goldfish_mask(targets, GoldfishConfig(strategy="hash-table"), table=np.zeros(10, np.float32))
    assert GoldfishConfig(never_drop_ids=[3, 1, 3]).never_drop_ids == (1, 3)


# --------------------------------------------------------------------------------------------
# Drop-in use in other codebases (issue 16): padding, weights, shapes, positions, reductions,
# jit arguments, pmap, label smoothing.


def _xent_numpy(logits, targets):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]


def test_pad_id_marks_padding_targets_invalid():
    rng = np.random.default_rng(20)
    logits = rng.normal(size=(3, 40, 30)).astype(np.float32)
    targets = _random_ids((3, 40), 30, seed=20)
    targets[0, 30:] = 0
    cfg = GoldfishConfig(k=4, h=3)
    loss, aux = loss_fn(logits, targets, cfg, pad_id=0)
    valid = targets != 0
    kept = valid & ~np.asarray(goldfish_mask(targets, cfg))
    assert int(aux["n_valid"]) == valid.sum() and int(aux["n_kept"]) == kept.sum()
    assert np.isclose(loss, _xent_numpy(logits, targets)[kept].mean(), rtol=1e-6)
    same, _ = loss_fn(logits, targets, cfg, weights_BxT=valid.astype(np.float32))
    assert float(same) == float(loss)


def test_weights_are_a_mask_not_multipliers():
    # Documented decision: weight > 0 marks a valid target; its value does not scale the loss, and
    # the counts count targets.
    rng = np.random.default_rng(21)
    logits = rng.normal(size=(2, 32, 20)).astype(np.float32)
    targets = _random_ids((2, 32), 20, seed=21)
    weights = np.where(rng.random((2, 32)) < 0.5, 1.0, 3.0).astype(np.float32)
    weights[1, 25:] = 0
    cfg = GoldfishConfig(k=4, h=2)
    loss3, aux3 = loss_fn(logits, targets, cfg, weights_BxT=weights)
    loss1, aux1 = loss_fn(logits, targets, cfg, weights_BxT=(weights > 0).astype(np.float32))
    assert float(loss3) == float(loss1)
    assert int(aux3["n_valid"]) == 2 * 32 - 7
    assert int(aux3["n_kept"]) + int(aux3["n_dropped"]) == int(aux3["n_valid"])
    assert all(int(aux3[k]) == int(aux1[k]) for k in ("n_kept", "n_dropped", "n_valid"))


def test_shape_mistakes_name_the_argument():
    logits = np.zeros((2, 8, 10), np.float32)
    tokens = _random_ids((2, 9), 10)
    cfg = GoldfishConfig()
    with pytest.raises(ValueError, match=r"targets_BxT shape \(2, 9\).*one column too many"):
        loss_fn(logits, tokens, cfg)  # unshifted: T + 1 columns
    targets = tokens[:, 1:]
    with pytest.raises(ValueError, match=r"weights_BxT shape \(2, 8, 1\).*trailing axis"):
        loss_fn(logits, targets, cfg, weights_BxT=np.ones((2, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"positions_BxT shape \(8,\)"):
        loss_fn(logits, targets, cfg, positions_BxT=np.arange(8, dtype=np.int32))
    with pytest.raises(ValueError, match="positions_BxT must be integer positions"):
        loss_fn(logits, targets, cfg, positions_BxT=np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"w_DxV shape \(10, 4\)"):
        chunked_loss_fn(np.zeros((2, 8, 4), np.float32), np.zeros((10, 4), np.float32), targets, cfg)
    with pytest.raises(ValueError, match="reduction must be one of mean, none"):
        loss_fn(logits, targets, cfg, reduction="sum")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        loss_fn(logits, targets, cfg, label_smoothing=1.0)


def _positions_numpy(starts, row_starts_document):
    """Plain loop: 0 at a start, +1 after; before a row's first start, CONTINUED + column."""
    out = np.zeros(starts.shape, np.int64)
    for b in range(starts.shape[0]):
        p = None
        for t in range(starts.shape[1]):
            if starts[b, t] or (t == 0 and row_starts_document):
                p = 0
            elif p is not None:
                p += 1
            out[b, t] = goldfish.CONTINUED + t if p is None else p
    return out


def test_positions_from_segment_ids_and_bos_match_a_plain_loop():
    rng = np.random.default_rng(22)
    segments = np.cumsum(rng.random((4, 50)) < 0.1, axis=1).astype(np.int32)
    segments[0, 40:] = 0  # padding: its own segment
    changes = np.concatenate([np.zeros((4, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    for row_starts_document in (True, False):
        got = np.asarray(gf_jax.positions_from_segment_ids(segments, row_starts_document=row_starts_document))
        assert np.array_equal(got, _positions_numpy(changes, row_starts_document))
    inputs = _random_ids((4, 50), 20, seed=22)
    inputs[1, 0] = 1
    for row_starts_document in (True, False):
        got = np.asarray(jax.jit(lambda x, r=row_starts_document: gf_jax.positions_from_bos(x, 1, row_starts_document=r))(inputs))
        assert np.array_equal(got, _positions_numpy(inputs == 1, row_starts_document))
    # lm1b-style packed row: [BOS a b c BOS d e] -> positions 0 1 2 3 0 1 2.
    assert np.asarray(gf_jax.positions_from_bos(np.array([[1, 5, 6, 7, 1, 8, 9]]), 1)).tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_rows_cut_from_a_token_stream_never_supervise_what_the_full_documents_drop():
    # nanodo-style: documents joined with BOS into one stream and cut into rows that start
    # mid-document. positions_from_bos marks the leading run as continued: its first h targets
    # are dropped; everything else gets exactly the full-stream mask.
    rng = np.random.default_rng(23)
    docs = [np.concatenate([[1], rng.integers(2, 500, size=n)]) for n in rng.integers(5, 120, size=40)]
    stream = np.concatenate(docs).astype(np.int32)
    cfg = GoldfishConfig(k=3, h=6)
    inputs, targets = stream[None, :-1], stream[None, 1:]
    full = np.asarray(goldfish_mask(targets, cfg, positions_BxT=gf_jax.positions_from_bos(inputs, 1)))[0]
    T = 64
    n_rows = inputs.shape[1] // T
    row_inputs = inputs[0, : n_rows * T].reshape(n_rows, T)
    row_targets = targets[0, : n_rows * T].reshape(n_rows, T)
    positions = gf_jax.positions_from_bos(row_inputs, 1)
    drop = np.asarray(goldfish_mask(row_targets, cfg, positions_BxT=positions))
    ref = full[: n_rows * T].reshape(n_rows, T)
    assert not np.any(~drop & ref)  # kept set ⊆ full kept set
    leading = np.asarray(positions) >= goldfish.CONTINUED
    settled = ~(leading & (np.arange(T) < cfg.h))
    assert np.array_equal(drop[settled], ref[settled])
    assert drop[~settled].all() and (~settled).sum() >= cfg.h


def test_reduction_none_gives_per_token_losses_and_masks():
    rng = np.random.default_rng(24)
    logits = rng.normal(size=(3, 30, 25)).astype(np.float32)
    targets = _random_ids((3, 30), 25, seed=24)
    targets[2, 20:] = 0
    cfg = GoldfishConfig(k=3, h=2)
    loss_BxT, aux = loss_fn(logits, targets, cfg, pad_id=0, reduction="none")
    drop = np.asarray(goldfish_mask(targets, cfg))
    kept = (targets != 0) & ~drop
    assert np.array_equal(np.asarray(aux["kept_BxT"]), kept)
    assert np.array_equal(np.asarray(aux["dropped_BxT"]), (targets != 0) & drop)
    np.testing.assert_allclose(loss_BxT, np.where(kept, _xent_numpy(logits, targets), 0.0), rtol=1e-5, atol=1e-6)
    mean, _ = loss_fn(logits, targets, cfg, pad_id=0)
    assert np.isclose(np.asarray(loss_BxT).sum() / kept.sum(), mean, rtol=1e-6)
    per_example = np.asarray(loss_BxT).sum(-1) / np.maximum(1, kept.sum(-1))
    np.testing.assert_allclose(per_example, [_xent_numpy(logits, targets)[b][kept[b]].mean() for b in range(3)], rtol=1e-5)
    # The chunked loss gives the same per-token losses.
    h = rng.normal(size=(3, 30, 8)).astype(np.float32)
    w = rng.normal(size=(8, 25)).astype(np.float32)
    chunked_BxT, _ = chunked_loss_fn(h, w, targets, cfg, pad_id=0, reduction="none", chunk_size=7)
    plain_BxT, _ = loss_fn(np.einsum("btd,dv->btv", h, w), targets, cfg, pad_id=0, reduction="none")
    np.testing.assert_allclose(chunked_BxT, plain_BxT, rtol=1e-5, atol=1e-6)


def test_config_passes_through_jit_and_nnx_jit_as_a_static_argument():
    from flax import nnx

    cfg = GoldfishConfig(k=3, h=2, never_drop_ids=(5,))
    assert jax.tree.leaves(cfg) == [] and hash(cfg) == hash(GoldfishConfig(k=3, h=2, never_drop_ids=[5]))
    rng = np.random.default_rng(25)
    logits = rng.normal(size=(2, 16, 10)).astype(np.float32)
    targets = _random_ids((2, 16), 10, seed=25)
    eager, _ = loss_fn(logits, targets, cfg)

    def step(logits, targets, cfg):
        return loss_fn(logits, targets, cfg)[0]

    assert np.isclose(jax.jit(step)(logits, targets, cfg), eager, rtol=1e-6)
    assert np.isclose(nnx.jit(step)(logits, targets, cfg), eager, rtol=1e-6)
    none = GoldfishConfig(strategy="none")  # another config: retraced, not a stale cache entry
    assert np.isclose(jax.jit(step)(logits, targets, none), loss_fn(logits, targets, none)[0], rtol=1e-6)
    assert not np.isclose(eager, loss_fn(logits, targets, none)[0])


def test_pmap_with_axis_name_equals_the_single_device_global_mean():
    # Devices keep different numbers of targets; the per-device mean would weight them equally.
    n = jax.device_count()
    rng = np.random.default_rng(26)
    x = rng.normal(size=(n * 2, 16, 6)).astype(np.float32)
    w = rng.normal(size=(6, 12)).astype(np.float32)
    targets = _random_ids((n * 2, 16), 12, seed=26)
    targets[: n, 4:] = 0  # half the devices are mostly padding
    cfg = GoldfishConfig(k=3, h=2)
    kw = dict(pad_id=0, z_loss=1e-2, label_smoothing=0.1)

    def single(w):
        return loss_fn(jnp.einsum("btd,dv->btv", x, w), targets, cfg, **kw)

    (ref, ref_aux), ref_grad = jax.value_and_grad(single, has_aux=True)(w)

    def device_step(w, x, t):
        def loss(w):
            return loss_fn(jnp.einsum("btd,dv->btv", x, w), t, cfg, axis_name="batch", **kw)

        (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(w)
        return value, aux, jax.lax.pmean(grad, "batch")  # what pmap steps (lm1b) already do

    split = lambda a: a.reshape(n, -1, *a.shape[1:])  # noqa: E731
    value, aux, grad = jax.pmap(device_step, axis_name="batch", in_axes=(None, 0, 0))(w, split(x), split(targets))
    np.testing.assert_allclose(value, np.full(n, ref), rtol=1e-6)
    assert all(int(v) == int(ref_aux["n_kept"]) for v in aux["n_kept"])
    np.testing.assert_allclose(grad, np.broadcast_to(ref_grad, grad.shape), rtol=1e-5, atol=1e-7)
    # goldfish_sums takes axis_name too: global sums on every device.
    sums = jax.pmap(lambda x, t: gf_jax.goldfish_sums(jnp.einsum("btd,dv->btv", x, w), t, cfg, axis_name="b", **{k: kw[k] for k in ("pad_id", "label_smoothing")}), axis_name="b")(split(x), split(targets))
    np.testing.assert_allclose(sums.loss(), np.full(n, float(ref_aux["loss_kept"])), rtol=1e-6)


def test_label_smoothing_matches_the_lm1b_formula():
    # flax examples/lm1b compute_weighted_cross_entropy, restated in numpy.
    rng = np.random.default_rng(27)
    V, s = 17, 0.1
    logits = rng.normal(size=(2, 20, V)).astype(np.float32) * 2
    targets = _random_ids((2, 20), V, seed=27)
    confidence, low = 1 - s, s / (V - 1)
    normalizing = -(confidence * np.log(confidence) + (V - 1) * low * np.log(low + 1e-20))
    soft = np.where(np.eye(V, dtype=bool)[targets], confidence, low)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64)))
    expected = -(soft * logp).sum(-1) - normalizing
    loss_BxT, _ = loss_fn(logits, targets, GoldfishConfig(strategy="none"), label_smoothing=s, reduction="none")
    np.testing.assert_allclose(loss_BxT, expected, rtol=1e-5, atol=1e-5)


def test_first_target_of_every_document_depends_on_the_seed_alone():
    # Documented: the empty window makes a document's first target all-or-nothing per (seed, k).
    targets = _random_ids((64, 8), 1000, seed=28)
    positions = np.zeros((64, 8), np.int32)  # every target a document's first
    assert not np.asarray(goldfish_mask(targets, GoldfishConfig(k=2, seed=0), positions_BxT=positions)).any()
    assert np.asarray(goldfish_mask(targets, GoldfishConfig(k=2, seed=3), positions_BxT=positions)).all()
