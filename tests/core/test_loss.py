"""loss_fn and chunked_loss_fn on meshes: explicit and auto axes, vocabulary sharded or not.

Reference: the same call on unsharded (single-device) arrays. The vocabulary-sharded loss must
not gather the logits: checked in the compiled HLO.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gf_jax

B, T, D, V = 4, 24, 16, 64
CFG = gf_jax.GoldfishConfig(k=3, h=4)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def _mesh(axis_type):
    assert len(jax.devices()) == 8
    return jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AXIS_TYPES[axis_type],) * 2)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T), dtype=np.int32)
    targets[1, 20:] = 0  # padding by id
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    return hidden, w, targets, positions


KW = dict(pad_id=0, z_loss=1e-3, label_smoothing=0.1)


def _loss(logits, targets, positions):
    return gf_jax.loss_fn(logits, targets, CFG, positions_BxT=positions, **KW)


def _put(x, mesh, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("vocab_axis", ["tensor", None])
def test_loss_fn_on_a_mesh_equals_the_unsharded_loss(axis_type, vocab_axis):
    hidden, w, targets, positions = _data()
    logits = np.einsum("btd,dv->btv", hidden, w)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (ref, ref_aux), ref_grad = grad_fn(logits, targets, positions)

    mesh = _mesh(axis_type)
    args = (_put(logits, mesh, "fsdp", None, vocab_axis), _put(targets, mesh, "fsdp"), _put(positions, mesh, "fsdp"))
    with jax.set_mesh(mesh):
        (loss, aux), grad = jax.jit(grad_fn)(*args)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    for key in ("n_kept", "n_dropped", "n_valid"):
        assert int(aux[key]) == int(ref_aux[key])
    assert int(ref_aux["n_dropped"]) > 0 and int(ref_aux["n_valid"]) < B * T
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)
    if axis_type == "explicit":  # the gradient keeps the logits' layout
        assert grad.sharding.spec == P("fsdp", None, vocab_axis)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_vocabulary_is_never_gathered(axis_type):
    # One-hot selection and logsumexp reduce V where it lies: the compiled step holds only
    # all-reduces of B x T values, no all-gather (or all-to-all) of the B x T x V logits.
    hidden, w, targets, positions = _data()
    logits = np.einsum("btd,dv->btv", hidden, w)
    mesh = _mesh(axis_type)
    args = (_put(logits, mesh, "fsdp", None, "tensor"), _put(targets, mesh, "fsdp"), _put(positions, mesh, "fsdp"))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss, has_aux=True), out_shardings=None)
        hlo = step.lower(*args).compile().as_text()
    assert "all-reduce" in hlo
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo), [
        line for line in hlo.splitlines() if re.search(r"all-gather|all-to-all|collective-permute", line)
    ]


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize(
    "hidden_spec, w_spec",
    [
        (("fsdp", None, "tensor"), ("fsdp", "tensor")),  # model dim sharded differently on h and w
        (("fsdp", None, None), (None, "tensor")),        # vocabulary sharded, model dim replicated
        (("fsdp", None, None), ("fsdp", None)),          # FSDP head, vocabulary replicated
        (("fsdp", "tensor", None), ("fsdp", "tensor")),  # sequence sharded too
    ],
)
def test_chunked_loss_on_a_mesh_equals_the_unsharded_loss(axis_type, hidden_spec, w_spec):
    hidden, w, targets, positions = _data(1)

    def plain(h, w):
        return _loss(jnp.einsum("btd,dv->btv", h, w), targets, positions)

    def chunked(h, w, t, p):
        return gf_jax.chunked_loss_fn(h, w, t, CFG, positions_BxT=p, chunk_size=7, **KW)

    (ref, _), (ref_gh, ref_gw) = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(hidden, w)
    mesh = _mesh(axis_type)
    t_spec = hidden_spec[:2]
    args = (_put(hidden, mesh, *hidden_spec), _put(w, mesh, *w_spec), _put(targets, mesh, *t_spec), _put(positions, mesh, *t_spec))
    with jax.set_mesh(mesh):
        (loss, _), (gh, gw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(*args)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(gh, ref_gh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-6)


def _gemma_like_head(params, hidden_BxExD):
    """Tied, transposed embedding (V x D), an output bias and tanh soft-capping."""
    logits = jnp.einsum("bed,vd->bev", hidden_BxExD, params["embedding_VxD"]) + params["bias_V"]
    return 30.0 * jnp.tanh(logits / 30.0)


@pytest.mark.parametrize("mesh_kind", [None, "explicit"])
def test_chunked_loss_with_head_fn_equals_loss_on_the_heads_logits(mesh_kind):
    hidden, w, targets, positions = _data(2)
    params = {"embedding_VxD": np.ascontiguousarray(w.T) * 4, "bias_V": np.linspace(-1, 1, V, dtype=np.float32)}

    def plain(params, h):
        return _loss(_gemma_like_head(params, h), targets, positions)

    def chunked(params, h, t, p):
        head_fn = lambda hidden_BxExD: _gemma_like_head(params, hidden_BxExD)  # noqa: E731
        return gf_jax.chunked_loss_fn(h, head_fn, t, CFG, positions_BxT=p, chunk_size=5, **KW)

    (ref, _), ref_grads = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(params, hidden)
    args = (params, hidden, targets, positions)
    if mesh_kind:
        mesh = _mesh(mesh_kind)
        args = (
            {"embedding_VxD": _put(params["embedding_VxD"], mesh, "tensor"), "bias_V": _put(params["bias_V"], mesh, "tensor")},
            _put(hidden, mesh, "fsdp"), _put(targets, mesh, "fsdp"), _put(positions, mesh, "fsdp"),
        )
        with jax.set_mesh(mesh):
            (loss, _), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(*args)
    else:
        (loss, _), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(*args)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
