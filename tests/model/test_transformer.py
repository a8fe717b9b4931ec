"""The LLaMA model against an independent plain-numpy forward, and its decoding cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gf_jax.model import ModelConfig, flops_per_token, param_count
from gf_jax.model.transformer import Transformer

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.model.config",
    "gf_jax.model.counting",
    "gf_jax.model.numerics",
)

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


@nnx.jit
def forward(model, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    # One compiled program per config is much cheaper on CPU than op-by-op eager dispatch.
    return model(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)


# ---- independent numpy reference (HF LLaMA formulation: rotate_half, repeat_kv) --------------


def _np(p):
    return np.asarray(p[...], dtype=np.float64)


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rope(x_TxNxH, pos_T, theta):
    h = x_TxNxH.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    freqs = np.outer(pos_T, inv)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    return x_TxNxH * np.cos(emb) + _rotate_half(x_TxNxH) * np.sin(emb)


def _silu(x):
    return x / (1 + np.exp(-x))


def reference_logits(model, cfg, tokens, positions, segments):
    """One row at a time, loops over heads, repeat_kv for GQA, explicit -inf masking."""
    out = []
    h_dim, n, k = cfg.resolved_head_dim, cfg.n_heads, cfg.n_kv_heads
    emb = _np(model.embedding)
    for b in range(tokens.shape[0]):
        t = tokens.shape[1]
        x = emb[tokens[b]]
        for blk in model.blocks:
            a = _rmsnorm(x, _np(blk.attn_norm.scale), cfg.norm_eps)
            q = np.einsum("td,dnh->tnh", a, _np(blk.attn.wq))
            kk = np.einsum("td,dnh->tnh", a, _np(blk.attn.wk))
            v = np.einsum("td,dnh->tnh", a, _np(blk.attn.wv))
            q, kk = _rope(q, positions[b], cfg.rope_theta), _rope(kk, positions[b], cfg.rope_theta)
            kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)
            o = np.zeros((t, n, h_dim))
            for head in range(n):
                s = q[:, head] @ kk[:, head].T / np.sqrt(h_dim)
                for i in range(t):
                    for j in range(t):
                        if j > i or segments[b, i] != segments[b, j]:
                            s[i, j] = -np.inf
                p = np.exp(s - s.max(-1, keepdims=True))
                o[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head]
            x = x + np.einsum("tnh,nhd->td", o, _np(blk.attn.wo))
            m = _rmsnorm(x, _np(blk.mlp_norm.scale), cfg.norm_eps)
            x = x + (_silu(m @ _np(blk.mlp.w_gate)) * (m @ _np(blk.mlp.w_up))) @ _np(blk.mlp.w_down)
        x = _rmsnorm(x, _np(model.final_norm.scale), cfg.norm_eps)
        head_w = emb.T if cfg.tie_embeddings else _np(model.lm_head)
        out.append(x @ head_w)
    return np.stack(out)


def _packed_batch(rng, vocab, b=2, t=12):
    """Two documents per row at different split points; positions restart at each document."""
    tokens = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    for row, cut in enumerate([5, 8][:b]):
        segments[row, cut:] = 2
        positions[row] = np.concatenate([np.arange(cut), np.arange(t - cut)])
    return tokens, positions, segments


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy_reference(tie):
    cfg = ModelConfig(**TINY, tie_embeddings=tie, init_std=0.2, rope_theta=500.0)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens, positions, segments = _packed_batch(np.random.default_rng(0), cfg.vocab_size)
    got = forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    want = reference_logits(model, cfg, tokens, positions, segments)
    assert got.shape == (2, 12, cfg.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    # hidden() @ output_weights() is what the chunked loss uses: it must be the same logits.
    h_logits = nnx.jit(lambda m, t, p, s: m.hidden(t, positions_BxT=p, segment_ids_BxT=s) @ m.output_weights())(
        model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)
    )
    np.testing.assert_allclose(np.asarray(h_logits), want, atol=1e-4, rtol=1e-4)


def test_default_positions_and_segments_are_plain_causal():
    cfg = ModelConfig(**TINY, init_std=0.2)
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 10)).astype(np.int32)
    ones = np.ones_like(tokens)
    want = reference_logits(model, cfg, tokens, np.tile(np.arange(10), (2, 1)), ones)
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens))), want, atol=1e-4, rtol=1e-4)


def test_segments_are_isolated():
    cfg = ModelConfig(**TINY, init_std=0.2)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    tokens, positions, segments = _packed_batch(np.random.default_rng(2), cfg.vocab_size, b=1)
    changed = tokens.copy()
    changed[0, :5] = (changed[0, :5] + 7) % cfg.vocab_size  # rewrite document 1 only
    pos, seg = jnp.asarray(positions), jnp.asarray(segments)
    a = np.asarray(forward(model, jnp.asarray(tokens), pos, seg))
    b = np.asarray(forward(model, jnp.asarray(changed), pos, seg))
    np.testing.assert_array_equal(a[0, 5:], b[0, 5:])  # document 2 cannot see document 1
    assert np.abs(a[0, :5] - b[0, :5]).max() > 1e-3  # ...while document 1 did change
    # Without segment ids the same change leaks into the second half.
    a_all = np.asarray(forward(model, jnp.asarray(tokens), pos))
    b_all = np.asarray(forward(model, jnp.asarray(changed), pos))
    assert np.abs(a_all[0, 5:] - b_all[0, 5:]).max() > 1e-3


def test_param_count_and_logical_names():
    for tie in (False, True):
        cfg = ModelConfig(**TINY, tie_embeddings=tie)
        abstract = nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)))
        params = nnx.state(abstract, nnx.Param)
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        assert sum(int(np.prod(v.shape)) for v in leaves) == param_count(cfg)
        for v in leaves:  # every parameter names every one of its axes
            names = v.get_metadata()["out_sharding"]
            assert len(names) == len(v.shape)
    # Closed form for a known architecture: TinyLlama-1.1B has 1,100,048,384 parameters.
    tinyllama = ModelConfig(
        vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048
    )
    assert param_count(tinyllama) == 1_100_048_384


def test_flops_per_token_formula():
    cfg = ModelConfig(**TINY)
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    matmul_params = param_count(cfg) - v * d - (2 * n_layers + 1) * d  # minus embedding lookup and norms
    assert flops_per_token(cfg, 16) == 6 * matmul_params + 12 * n_layers * cfg.n_heads * cfg.resolved_head_dim * 16


def test_remat_keeps_loss_and_grads():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(2, 8)), jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    one_layer = {**TINY, "n_layers": 1}  # remat wraps each block alike; one keeps compiles short
    base = Transformer(ModelConfig(**one_layer), rngs=nnx.Rngs(4))
    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(base)
    for remat in ("full", "save_dots"):
        other = Transformer(ModelConfig(**one_layer, remat=remat), rngs=nnx.Rngs(4))
        l1, g1 = nnx.jit(nnx.value_and_grad(loss))(other)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(2, 8)), jnp.int32)
    f32 = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(5))
    bf16 = Transformer(ModelConfig(**TINY, dtype="bfloat16"), rngs=nnx.Rngs(5))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    out = forward(bf16, tokens)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(forward(f32, tokens)), atol=3e-2)


def test_decode_with_cache_matches_full_forward():
    """Right-padded prompts of lengths 5 and 8: prefill, then 4 greedy-style steps per row."""
    cfg = ModelConfig(**TINY, init_std=0.2)
    model = Transformer(cfg, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(5)
    lengths, steps = np.array([5, 8]), 4
    seqs = [rng.integers(1, cfg.vocab_size, size=n + steps).astype(np.int32) for n in lengths]
    full = np.zeros((2, 12), np.int32)
    for b, s in enumerate(seqs):
        full[b, : len(s)] = s
    want = np.asarray(forward(model, jnp.asarray(full)))  # causal: the zero padding after a row is invisible

    decode = nnx.jit(lambda m, t, p, c, i: m.decode(t, p, c, cache_index=i))
    prompt = np.where(np.arange(8)[None] < lengths[:, None], full[:, :8], 0)
    cache = model.init_cache(2, 16)
    assert cache[0]["k"].shape == (2, 16, cfg.n_kv_heads, cfg.resolved_head_dim)
    logits, cache = decode(model, jnp.asarray(prompt), jnp.tile(jnp.arange(8), (2, 1)), cache, jnp.int32(0))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), want[b, :n], atol=1e-5, rtol=1e-5)
    index = jnp.asarray(lengths, jnp.int32)
    for step in range(steps):
        pos = index[:, None]
        tok = jnp.asarray([seqs[b][lengths[b] + step] for b in range(2)], jnp.int32)[:, None]
        logits, cache = decode(model, tok, pos, cache, index)
        for b in range(2):
            np.testing.assert_allclose(
                np.asarray(logits[b, 0]), want[b, lengths[b] + step], atol=1e-5, rtol=1e-5
            )
        index = index + 1


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="sometimes")
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 33), jnp.int32))
