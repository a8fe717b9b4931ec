"""Every attention implementation against the XLA einsum path (forward and gradients; packed
segments, causal, grouped K/V heads), the Pallas kernels in interpret mode on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gf_jax.model import ModelConfig
from gf_jax.model import attention as attn
from gf_jax.model.sharding import MeshConfig, make_mesh
from gf_jax.model.transformer import Transformer

B, T, N, K, H = 2, 256, 4, 2, 32


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    return q, k, v


def _segments():
    # Document boundaries inside 128-blocks, a row of one document and a padded tail (id 0).
    seg = np.ones((B, T), np.int32)
    seg[0, 100:] = 2
    seg[0, 190:] = 3
    seg[1, 230:] = 0
    return jnp.asarray(seg)


def _reference(q, k, v, segment_ids_BxT):
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(q.shape[:2], jnp.int32)
    return attn.attention_xla(q, k, v, attn.causal_segment_mask(segment_ids_BxT))


def _value_and_grads(fn, q, k, v, segment_ids_BxT, mesh=None):
    cotangent = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    def objective(q, k, v):
        out = fn(q, k, v, segment_ids_BxT)
        return jnp.sum(out * cotangent), out

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
    if mesh is None:
        (_, out), grads = step(q, k, v)
    else:
        with jax.set_mesh(mesh):
            (_, out), grads = step(q, k, v)
    return out, grads


def _assert_matches_reference(fn, segment_ids_BxT, mesh=None, atol=2e-5):
    q, k, v = _qkv()
    want_out, want_grads = _value_and_grads(_reference, q, k, v, segment_ids_BxT)
    out, grads = _value_and_grads(fn, q, k, v, segment_ids_BxT, mesh)
    np.testing.assert_allclose(out, want_out, atol=atol)
    for name, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, w, atol=atol, err_msg=f"d{name}")


splash = functools.partial(attn.attention_splash, block_q=128, block_kv=128, interpret=True)


@pytest.mark.parametrize("packed", [True, False])
def test_splash_matches_xla(packed):
    _assert_matches_reference(splash, _segments() if packed else None)


def test_pallas_gpu_matches_xla():
    _assert_matches_reference(functools.partial(attn.attention_pallas_gpu, interpret=True), _segments())


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_splash_under_shard_map_matches_xla(shape):
    """On 8 CPU devices: rows over data x fsdp, heads over tensor (2 divides N and K) or replicated
    (4 does not divide K=2)."""
    _assert_matches_reference(splash, _segments(), mesh=make_mesh(MeshConfig(*shape)))


def test_splash_rejects_lengths_off_the_lane_width():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of 128"):
        splash(q[:, :100], k[:, :100], v[:, :100], None)


def test_fused_attention_call_matches_xla_path():
    """The exact call the cuDNN path makes (mask layout, GQA head mapping, causal flag), run with
    jax's XLA implementation, equals the einsum path."""
    q, k, v = (x[:, :8, :, :16] for x in _qkv(6))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    np.testing.assert_allclose(attn.attention_fused(q, k, v, seg, implementation="xla"),
                               _reference(q, k, v, seg), atol=1e-5)
    np.testing.assert_allclose(attn.attention_fused(q, k, v, None, implementation="xla"),
                               _reference(q, k, v, None), atol=1e-5)


def test_auto_picks_by_platform():
    cfg = ModelConfig(dtype="bfloat16")
    assert attn.resolve(cfg, jnp.bfloat16, 2048, True, "tpu") == "splash"
    assert attn.resolve(cfg, jnp.bfloat16, 100, True, "tpu") == "xla"  # not a multiple of 128
    assert attn.resolve(cfg, jnp.bfloat16, 2048, True, "gpu") == "cudnn"
    assert attn.resolve(cfg, jnp.float32, 2048, True, "gpu") == "xla"
    assert attn.resolve(cfg, jnp.bfloat16, 2048, True, "cpu") == "xla"
    assert attn.resolve(ModelConfig(attention="pallas_gpu"), jnp.float32, 8, True, "cpu") == "pallas_gpu"
    assert attn.target_platform() == "cpu"
    with pytest.raises(ValueError, match="multiple of 128"):
        ModelConfig(attention_block_q=100)


def test_model_with_splash_and_minimal_remat_matches_xla():
    """The whole model: splash (interpret) + ``minimal`` remat gives the logits and parameter
    gradients of the XLA path without remat."""
    tiny = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
                attention_block_q=128, attention_block_kv=128)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 128)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], 2, axis=0), jnp.int32)

    @nnx.jit
    def loss_and_grads(model):
        def loss(m):
            return jnp.mean(m(tokens, segment_ids_BxT=seg) ** 2)

        return nnx.value_and_grad(loss)(model)

    results = [
        loss_and_grads(Transformer(ModelConfig(**tiny, attention=a, remat=r), rngs=nnx.Rngs(0)))
        for a, r in (("xla", "none"), ("splash", "minimal"))
    ]
    (want_loss, want_grads), (loss, grads) = results
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4)
