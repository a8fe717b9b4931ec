"""Checkpoints: save/restore across shardings, async saves are safe with donated buffers,
keep-last-K, incompatible model configs refused, load_model for evaluation."""

import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gf_jax.config import RunConfig, TrainConfig, save_config, to_dict
from gf_jax.model import ModelConfig
from gf_jax.model.sharding import MeshConfig, abstract_with_shardings, make_mesh, model_shardings
from gf_jax.model.transformer import Transformer
from gf_jax.run.checkpoint import Checkpointer, check_compatible
from gf_jax.run.load import load_model
from gf_jax.tokenizer import train_from_texts

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.run.rundir",
)

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=32)


@pytest.fixture(scope="module")
def initial():
    """One model initialised into its shards on an (fsdp=4, tensor=2) mesh, and a host copy."""
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    abstract = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(3)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = model_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(Transformer(CFG, rngs=nnx.Rngs(3))), out_shardings=shardings)()
    return graphdef, abstract_state, shardings, jax.device_get(state)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_async_save_restores_onto_another_mesh_and_survives_donation(tmp_path, initial):
    _, abstract_state, shardings8, host_state = initial
    state = jax.device_put(host_state, shardings8)
    expected = _leaves(host_state)
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
    ckpt.save(5, model_state=state, opt_state={"count": jnp.zeros((), jnp.int32)},
              loop_state={"data": {"step": 5}, "supervised_tokens": 7}, config_dict={"model": {"d_model": 32}})
    # The trainer donates the state to the next step right after save() returns: overwrite the
    # buffers in place while the write may still be in flight.
    clobber = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 123.0, s), donate_argnums=0,
                      out_shardings=shardings8)
    jax.block_until_ready(clobber(state))
    ckpt.wait()

    # Restore onto one device: the checkpoint does not depend on the mesh it was written from.
    mesh1 = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    shardings1 = model_shardings(abstract_state, mesh1)
    restored = ckpt.restore(5, abstract_model=abstract_with_shardings(abstract_state, shardings1))
    for a, b in zip(_leaves(restored["model"]), expected):
        np.testing.assert_array_equal(a, b)
    assert restored["loop"] == {"data": {"step": 5}, "supervised_tokens": 7}
    assert restored["config"] == {"model": {"d_model": 32}}
    leaf = jax.tree.leaves(restored["model"])[0]
    assert len(leaf.sharding.device_set) == 1
    ckpt.close()


def test_keeps_the_last_k_checkpoints(tmp_path, initial):
    state = initial[3]
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step in (10, 20, 30):
        ckpt.save(step, model_state=state, opt_state=None, loop_state={"step": step}, config_dict={})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
    ckpt.close()
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["20", "30"]


def test_incompatible_model_is_refused_with_the_field_named():
    saved = {k: getattr(CFG, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                          "head_dim", "d_ff", "tie_embeddings", "rope_theta", "norm_eps")}
    check_compatible(saved, CFG, "runs/x")  # same architecture
    check_compatible(saved, ModelConfig(**{**CFG.__dict__, "remat": "full", "dtype": "bfloat16"}), "runs/x")
    with pytest.raises(ValueError, match=r"runs/x holds checkpoints of a different model \(model\.n_layers is 1 there, 2 now\)"):
        check_compatible(saved, ModelConfig(**{**CFG.__dict__, "n_layers": 2}), "runs/x")


def test_load_model_restores_parameters_config_and_tokenizer(tmp_path, initial):
    with open(os.path.join(helpers.REPO, "data", "tinyshakespeare.txt")) as f:
        text = f.read()[:20_000]
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    tok_path = train_from_texts([text], 384, run_dir)  # run_dir/tokenizer.model, as the trainer leaves it
    config = RunConfig(model=CFG, train=TrainConfig(seq_len=32))
    graphdef, _, shardings, host_state = initial
    state = jax.device_put(host_state, shardings)
    ckpt = Checkpointer(run_dir, keep=2)
    ckpt.save(4, model_state=state, opt_state=None, loop_state={}, config_dict=to_dict(config))
    ckpt.close()
    save_config(config, os.path.join(run_dir, "config.yaml"))

    model, loaded_config, tokenizer = load_model(run_dir)
    assert isinstance(model, Transformer)
    assert loaded_config.model == CFG
    assert tokenizer.path == tok_path and tokenizer.vocab_size == 384
    for a, b in zip(_leaves(nnx.state(model)), _leaves(host_state)):
        np.testing.assert_array_equal(a, b)
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.asarray([[5, 6, 7]], jnp.int32)))
    np.testing.assert_allclose(logits(nnx.state(model)), logits(state), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        load_model(run_dir, step=3)
    with pytest.raises(FileNotFoundError, match="has no checkpoints"):
        load_model(str(tmp_path / "empty"))
