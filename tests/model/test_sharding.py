"""Mesh construction, the logical-name table, and sharded == unsharded on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gf_jax.model import ModelConfig
from gf_jax.model.sharding import (
    MeshConfig,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    mesh_shape,
    model_shardings,
)
from gf_jax.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


def test_mesh_shape_resolves_minus_one_and_rejects_misfits():
    assert mesh_shape(MeshConfig(), 8) == (1, 8, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=1, tensor=1), 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="does not divide"):
        mesh_shape(MeshConfig(tensor=3), 8)
    with pytest.raises(ValueError, match="set one axis to -1"):
        mesh_shape(MeshConfig(data=1, fsdp=2, tensor=2), 8)
    mesh = make_mesh(MeshConfig(data=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert make_mesh(MeshConfig(), devices=jax.devices()[:1]).size == 1


def test_logical_rules_replicate_what_does_not_divide():
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    assert logical_to_spec(("embed", "heads", "head_dim"), mesh, (32, 4, 8)) == P("fsdp", "tensor", None)
    # One key/value head cannot be split over tensor=2: replicated instead of an error.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, (32, 1, 8)) == P("fsdp", None, None)
    # d_model 30 is not divisible by fsdp=4.
    assert logical_to_spec(("embed", "mlp"), mesh, (30, 48)) == P(None, "tensor")
    assert logical_to_spec(("batch", "length", "act_embed"), mesh, (8, 16, 32)) == P(("data", "fsdp"), None, None)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))


def _init_sharded(cfg, mesh):
    """Initialise the model state directly into its shards, as the trainer does."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    shardings = model_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))), out_shardings=shardings)()
    return graphdef, state


@pytest.fixture(scope="module")
def fsdp4_tensor2():
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    return (mesh, *_init_sharded(CFG, mesh))


def test_model_shardings_place_params_by_the_rules(fsdp4_tensor2):
    _, graphdef, state = fsdp4_tensor2
    model = nnx.merge(graphdef, state)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    expected = {
        "embedding": (model.embedding, P("tensor", "fsdp")),
        "lm_head": (model.lm_head, P("fsdp", "tensor")),
        "wq": (attn.wq, P("fsdp", "tensor", None)),
        "wk": (attn.wk, P("fsdp", "tensor", None)),
        "wo": (attn.wo, P("tensor", None, "fsdp")),
        "w_gate": (mlp.w_gate, P("fsdp", "tensor")),
        "w_down": (mlp.w_down, P("tensor", "fsdp")),
    }
    for name, (param, spec) in expected.items():
        arr = param[...]
        assert arr.sharding.spec == spec, name
        # Each of the 8 devices holds exactly its 1/8 block (the split dims divided by 4 and 2).
        assert len(arr.addressable_shards) == 8
        shard_shape = arr.addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 8 == arr.size, name
    norm = model.blocks[0].attn_norm.scale[...]
    assert norm.sharding.is_fully_replicated
    # Same values as an ordinary single-device initialisation.
    plain = Transformer(CFG, rngs=nnx.Rngs(0))
    # (jit and eager differ in the last float bit of the normal sampler, hence the tolerance)
    np.testing.assert_allclose(np.asarray(attn.wq[...]), np.asarray(plain.blocks[0].attn.wq[...]), atol=1e-7)


def test_sharded_forward_equals_unsharded(fsdp4_tensor2):
    mesh, graphdef, state = fsdp4_tensor2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, size=(8, 16)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
    batch = jax.device_put((tokens, positions, segments), batch_sharding(mesh))

    @jax.jit
    def forward(state, tokens, positions, segments):
        return nnx.merge(graphdef, state)(tokens, positions_BxT=positions, segment_ids_BxT=segments)

    with jax.set_mesh(mesh):  # activates the model's activation sharding hints
        sharded = forward(state, *batch)
    # Logits stay split over the batch (and may be split over the vocabulary by tensor).
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    assert {s.data.shape[0] for s in sharded.addressable_shards} == {8 // batch_ways}
    plain = Transformer(CFG, rngs=nnx.Rngs(0))(
        jnp.asarray(tokens), positions_BxT=jnp.asarray(positions), segment_ids_BxT=jnp.asarray(segments)
    )
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-5, rtol=1e-5)
