"""The drop-in walkthroughs in examples/ run on the 8-device CPU mesh and keep their promise:
``strategy="none"`` reproduces the codebase's own step, goldfish drops targets."""

import importlib.util
import pathlib
import sys

import helpers
import jax
import numpy as np
from jax.sharding import AxisType

import gf_jax

EXAMPLES = pathlib.Path(helpers.REPO) / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Linen modules are dataclasses: they look their module up
    spec.loader.exec_module(module)
    return module


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_linen_lm1b_step():
    ex = _load("lm1b_linen_step")
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    plain_step, goldfish_step, data = ex.sharded_steps(mesh)
    batch = ex.packed_batch()
    # lm1b's inputs_position is gf_jax's positions_BxT (and follows from the segment ids).
    real = batch["inputs"] > 0
    derived = np.asarray(gf_jax.positions_from_segment_ids(batch["inputs_segmentation"]))
    assert np.array_equal(derived[real], batch["inputs_position"][real])
    batch = jax.device_put(batch, data)

    state = ex.create_state()
    plain_state, plain_loss, _ = plain_step(state, batch)
    none_state, none_loss, aux = goldfish_step(state, batch, gf_jax.GoldfishConfig(strategy="none"))
    np.testing.assert_allclose(none_loss, plain_loss, rtol=1e-6)
    _assert_trees_close(none_state.params, plain_state.params)
    assert int(aux["n_valid"]) == int(real.sum())  # padding by id 0 is out of the loss

    goldfish = gf_jax.GoldfishConfig(k=4, h=13)
    losses = []
    for _ in range(3):
        state, loss, aux = goldfish_step(state, batch, goldfish)
        losses.append(float(loss))
    assert 0.15 < float(aux["drop_fraction"]) < 0.35
    assert int(aux["n_kept"]) + int(aux["n_dropped"]) == int(real.sum())
    assert losses[-1] < losses[0]


def test_nnx_explicit_mesh_step_with_sharded_vocabulary():
    ex = _load("nnx_explicit_mesh_step")
    mesh = ex.make_mesh()
    assert mesh.axis_types == (AxisType.Explicit, AxisType.Explicit) and mesh.shape["tensor"] == 4
    goldfish = gf_jax.GoldfishConfig(k=4, h=13)
    with jax.set_mesh(mesh):
        batch = ex.make_batch()
        plain_model, plain_opt = ex.create()
        plain_loss, _ = ex.plain_train_step(plain_model, plain_opt, batch)
        assert plain_model(batch["inputs"]).sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")

        none_model, none_opt = ex.create()
        none_loss, _ = ex.goldfish_train_step(none_model, none_opt, batch, gf_jax.GoldfishConfig(strategy="none"))
        np.testing.assert_allclose(none_loss, plain_loss, rtol=1e-6)
        _assert_trees_close(jax.tree.map(lambda p: p[...], none_model.head_DxV), jax.tree.map(lambda p: p[...], plain_model.head_DxV))

        model, opt = ex.create()
        chunked_model, chunked_opt = ex.create()
        for _ in range(2):
            loss, aux = ex.goldfish_train_step(model, opt, batch, goldfish)
            chunked_loss, chunked_aux = ex.chunked_goldfish_train_step(chunked_model, chunked_opt, batch, goldfish)
            np.testing.assert_allclose(chunked_loss, loss, rtol=1e-5)
            assert int(chunked_aux["n_kept"]) == int(aux["n_kept"])
        assert 0.15 < float(aux["drop_fraction"]) < 0.35
        assert int(aux["n_valid"]) == int(np.asarray(batch["mask"]).sum())
        _assert_trees_close(chunked_model.head_DxV[...], model.head_DxV[...], rtol=1e-4, atol=1e-5)
