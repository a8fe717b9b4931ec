"""Scanned layers (``model.scan_layers``) against the unrolled blocks: the same logits, loss and
gradients under every remat policy, the same train step on 1 device and on fsdp / tensor meshes,
the same greedy and beam continuations; the layout conversion against stacking by hand, and
checkpoints, resume, ``init_from`` and Hugging Face import/export across the two layouts."""

import dataclasses
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import corpus_tokenizer_path

from gf_jax.batch import Batch
from gf_jax.config import LossConfig, OptimizerConfig, load_config
from gf_jax.goldfish import GoldfishConfig
from gf_jax.model import ModelConfig, generate, layers
from gf_jax.model.sharding import MeshConfig, abstract_with_shardings, make_mesh, model_shardings
from gf_jax.model.transformer import Transformer
from gf_jax.model.transforms import relayout
from gf_jax.run.load import load_model
from gf_jax.train.cli import Trainer
from gf_jax.train.step import StepConfig, make_step_functions

TINY = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32, init_std=0.2)


def _one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _abstract(config, mesh=None):
    """``(graphdef, abstract state with shardings)`` of ``config``'s model (one device by default)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    return graphdef, abstract_with_shardings(state, model_shardings(state, mesh or _one_device()))


def _relayout(model, scan_layers: bool, **fields):
    """``model`` in the other block layout (gf_jax.model.transforms.relayout); ``fields``: other ModelConfig
    fields of the result (e.g. remat)."""
    converted = relayout(model, scan_layers)
    graphdef, _ = _abstract(dataclasses.replace(converted.config, **fields))
    return nnx.merge(graphdef, nnx.state(converted))


def _flat(state) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _stack_by_hand(unrolled: dict) -> dict:
    """Unrolled ``{path: array}`` in the stacked layout, with numpy: the reference for convert."""
    out, groups = {}, {}
    for path, array in unrolled.items():
        i = next((j for j in range(len(path) - 1) if path[j] == "blocks" and isinstance(path[j + 1], int)), None)
        if i is None:
            out[path] = array
        else:
            groups.setdefault((*path[:i], "layers", *path[i + 2:]), {})[path[i + 1]] = array
    for path, by_layer in groups.items():
        out[path] = np.stack([by_layer[layer] for layer in sorted(by_layer)])
    return out


def _assert_same(got: dict, want: dict, **tol):
    assert sorted(got, key=str) == sorted(want, key=str)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], err_msg=str(path), **tol)


def _packed_tokens(b=2, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY["vocab_size"], (b, t + 1)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    segments[0, 6:] = 2  # two documents in row 0: attention and positions restart at column 6
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    positions[0, 6:] -= 6
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(positions), jnp.asarray(segments)


def test_stacked_parameters_have_an_unsharded_layer_axis():
    config = ModelConfig(**TINY, scan_layers=True)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    _, abstract = _abstract(config, mesh)
    flat = dict(nnx.to_flat_state(abstract))
    wq = flat[("layers", "attn", "wq")]
    assert wq.get_value().shape == (3, 32, 4, 8)
    assert wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert tuple(wq.get_value().sharding.spec) == (None, "fsdp", "tensor", None)
    assert tuple(flat[("layers", "mlp_norm", "scale")].get_value().sharding.spec) == (None, None)
    assert not any(path[0] == "blocks" for path in flat)


def test_conversion_stacks_each_layer_and_round_trips_exactly():
    unrolled = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    scanned = _relayout(unrolled, scan_layers=True)
    want = _stack_by_hand(_flat(nnx.state(unrolled)))
    _assert_same(_flat(nnx.state(scanned)), want, rtol=0, atol=0)
    # A seed initialises both layouts alike: the stacked blocks are the unrolled ones' draws.
    fresh = Transformer(ModelConfig(**TINY, scan_layers=True), rngs=nnx.Rngs(0))
    _assert_same(_flat(nnx.state(fresh)), want, rtol=0, atol=0)
    back = _relayout(scanned, scan_layers=False)
    _assert_same(_flat(nnx.state(back)), _flat(nnx.state(unrolled)), rtol=0, atol=0)


@nnx.jit
def _loss_and_grads(model, inputs, targets, positions, segments):
    def loss_fn(m):
        logits = m(inputs, positions_BxT=positions, segment_ids_BxT=segments)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads


@pytest.mark.parametrize("remat", ["none", "full", "minimal", "save_dots"])
def test_scanned_logits_loss_and_gradients_equal_unrolled(remat):
    inputs, targets, positions, segments = _packed_tokens()
    unrolled = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(1))  # the reference: no remat
    want_loss, want_logits, want_grads = _loss_and_grads(unrolled, inputs, targets, positions, segments)
    scanned = _relayout(unrolled, scan_layers=True, remat=remat)
    loss, logits, grads = _loss_and_grads(scanned, inputs, targets, positions, segments)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    _assert_same(_flat(grads), _stack_by_hand(_flat(want_grads)), rtol=1e-4, atol=1e-6)


def test_scanned_minimal_remat_with_splash_equals_unrolled_einsum():
    """Splash (Pallas interpret mode on CPU) names its own residuals for ``minimal``; under the
    scan the gradients still equal the unrolled einsum path's."""
    inputs, targets, positions, segments = _packed_tokens(t=128)
    config = ModelConfig(**{**TINY, "max_seq_len": 128}, attention="xla")
    unrolled = Transformer(config, rngs=nnx.Rngs(5))
    want_loss, _, want_grads = _loss_and_grads(unrolled, inputs, targets, positions, segments)
    scanned = _relayout(unrolled, scan_layers=True, remat="minimal", attention="splash",
                        attention_block_q=128, attention_block_kv=128)
    loss, _, grads = _loss_and_grads(scanned, inputs, targets, positions, segments)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    _assert_same(_flat(grads), _stack_by_hand(_flat(want_grads)), rtol=1e-3, atol=1e-5)


# ---- the jitted train step on meshes -----------------------------------------------------------


def _step_config(scan_layers: bool) -> StepConfig:
    # Weight decay on: a stacked norm scale is 2-D, and must still be left undecayed.
    return StepConfig(model=ModelConfig(**TINY, scan_layers=scan_layers), goldfish=GoldfishConfig(k=3, h=2),
                      optimizer=OptimizerConfig(lr=1e-2, warmup=0, weight_decay=0.1), loss=LossConfig(chunk_size=8),
                      grad_accum=2, total_steps=4)


def _batch(b=16, t=16):
    inputs, targets, positions, segments = _packed_tokens(b, t, seed=3)
    return Batch(inputs, targets, positions, segments, jnp.ones((b, t), jnp.float32))


def _two_steps(sc: StepConfig, mesh, model_state, opt_state):
    fns = make_step_functions(sc, mesh)
    model_state, opt_state = jax.device_put((model_state, opt_state), (fns.model_shardings, fns.opt_shardings))
    metrics = []
    for _ in range(2):
        model_state, opt_state, m = fns.train_step(model_state, opt_state, jax.device_put(_batch(), fns.batch_sharding))
        metrics.append(jax.device_get(m))
    return metrics, model_state


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=1, tensor=1), MeshConfig(data=1, fsdp=8, tensor=1),
                                         MeshConfig(data=2, fsdp=1, tensor=4)], ids=["1dev", "fsdp8", "data2xtensor4"])
def test_scanned_train_step_equals_unrolled(mesh_config):
    """Two optimizer steps (goldfish mask, chunked loss, 2 micro-batches, AdamW with decay)."""
    unrolled_sc, scanned_sc = _step_config(False), _step_config(True)
    one = _one_device()
    model_state, opt_state = jax.device_get(make_step_functions(unrolled_sc, one).init())
    want_metrics, want_state = _two_steps(unrolled_sc, one, model_state, opt_state)

    fns = make_step_functions(scanned_sc, one)
    abstract = [abstract_with_shardings(a, s) for a, s in (
        (fns.abstract_model_state, fns.model_shardings), (fns.abstract_opt_state, fns.opt_shardings))]
    scanned_states = [layers.convert(s, a) for s, a in zip((model_state, opt_state), abstract)]
    mesh = one if mesh_config.fsdp == mesh_config.tensor == 1 else make_mesh(mesh_config)
    metrics, state = _two_steps(scanned_sc, mesh, *scanned_states)
    for key in ("loss", "grad_norm", "n_kept"):
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in want_metrics], rtol=1e-5, err_msg=key)
    # Adam divides by sqrt(nu): summation-order noise in small gradients grows to ~1e-5 here.
    _assert_same(_flat(state), _stack_by_hand(_flat(want_state)), rtol=1e-4, atol=5e-5)


# ---- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_width", [1, 3])
def test_scanned_decoding_equals_unrolled(beam_width):
    unrolled = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(2))
    scanned = _relayout(unrolled, scan_layers=True)
    tokens_BxP = np.random.default_rng(4).integers(1, TINY["vocab_size"], (2, 6)).astype(np.int32)
    lengths_B = np.array([6, 3], np.int32)  # right-padded: row 1 continues from its 3rd token
    want = generate.decode_batch(unrolled, tokens_BxP, lengths_B, max_new_tokens=8, beam_width=beam_width)
    got = generate.decode_batch(scanned, tokens_BxP, lengths_B, max_new_tokens=8, beam_width=beam_width)
    assert np.asarray(got[0]).tolist() == np.asarray(want[0]).tolist()
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5)
    cache = scanned.init_cache(2, 10)
    assert scanned.cache_batch_axis == 1 and cache["k"].shape == (3, 2, 10, 2, 8)


def test_scanned_decoding_on_a_mesh_equals_one_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    scanned = _relayout(Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(2)), scan_layers=True)
    prompts = [list(range(1, 2 + i)) for i in range(8)]
    want = generate.generate(scanned, prompts, 6, batch_size=8)
    got = generate.generate(generate.place_on_mesh(scanned, mesh), prompts, 6, batch_size=8, mesh=mesh)
    assert got.tokens.tolist() == want.tokens.tolist()


# ---- checkpoints across layouts: resume, load_model, init_from -----------------------------------

REPO = helpers.REPO
STEPS = 8
# configs/tiny.yaml shrunk to seconds per compile: 2 layers, a checkpoint every 2 steps.
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "data.max_documents=200", "data.validation_fraction=0.1",
    "data.vocab_size=384", "goldfish.h=3", "train.global_batch=8", "train.seq_len=32", f"train.steps={STEPS}",
    "optimizer.warmup=2", "optimizer.lr=1e-2", "train.log_every=1", "train.ckpt_every=2", "train.eval_every=0",
    "train.progress=false", "train.tensorboard=false", "train.async_checkpoint=false",
]


def _run_config(tokenizer_path, run_dir, *extra):
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                       SMALL + [f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}", *extra])


def _losses(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return corpus_tokenizer_path(_run_config("", "runs/unused"), tmp_path_factory)


@pytest.fixture(scope="module")
def unrolled_run(tokenizer_path, tmp_path_factory):
    """An uninterrupted 8-step run with unrolled blocks (fsdp over the 8 CPU devices)."""
    run_dir = str(tmp_path_factory.mktemp("unrolled") / "run")
    assert Trainer(_run_config(tokenizer_path, run_dir)).run()["step"] == STEPS
    return run_dir


def _run_in_stages(tokenizer_path, run_dir, stages):
    """Runs ``run_dir`` to each ``(stop_at, scan_layers)`` in turn, resuming each time."""
    for stop_at, scan in stages:
        config = _run_config(tokenizer_path, run_dir, f"train.stop_at={stop_at}", f"model.scan_layers={scan}")
        assert Trainer(config).run()["step"] == stop_at


@pytest.mark.parametrize("stages", [
    [(4, "false"), (STEPS, "true")],                # unrolled checkpoint resumed scanned
    [(2, "true"), (4, "true"), (STEPS, "false")],   # scanned resumed scanned, then resumed unrolled
], ids=["unrolled-then-scanned", "scanned-then-unrolled"])
def test_resume_across_layouts_equals_uninterrupted(unrolled_run, tokenizer_path, tmp_path, stages):
    run_dir = str(tmp_path / "run")
    _run_in_stages(tokenizer_path, run_dir, stages)
    np.testing.assert_allclose(_losses(run_dir), _losses(unrolled_run), rtol=1e-5)
    final, config, _ = load_model(run_dir, scan_layers=False)  # converted if saved scanned
    assert config.model.scan_layers is False
    want, _, _ = load_model(unrolled_run)
    _assert_same(_flat(nnx.state(final)), _flat(nnx.state(want)), rtol=1e-4, atol=5e-5)


def test_load_model_and_init_from_convert_an_unrolled_run(unrolled_run, tokenizer_path, tmp_path):
    unrolled, _, _ = load_model(unrolled_run)
    want = _stack_by_hand(_flat(nnx.state(unrolled)))
    scanned, config, _ = load_model(unrolled_run, scan_layers=True)
    assert config.model.scan_layers is True
    _assert_same(_flat(nnx.state(scanned)), want, rtol=0, atol=0)
    trainer = Trainer(_run_config(tokenizer_path, str(tmp_path / "new"), f"train.init_from={unrolled_run}",
                                  "model.scan_layers=true"))
    try:
        _assert_same(_flat(nnx.state(trainer.model)), want, rtol=0, atol=0)
    finally:
        trainer.close()


# ---- Hugging Face import and export ----------------------------------------------------------------

HF_FIXTURES = helpers.HF_FIXTURES


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])  # q/k/v biases; q/k norms
def test_hf_import_into_stacked_layers_and_export_back(tmp_path, name):
    from gf_jax.hf import export
    from gf_jax.hf.safetensors_io import SafetensorsReader

    fixture = os.path.join(HF_FIXTURES, name)
    unrolled, _, tok = load_model(fixture)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))  # shards read straight into the stacked layout
    scanned, config, _ = load_model(fixture, scan_layers=True, mesh=mesh)
    assert config.model.scan_layers
    _assert_same(_flat(nnx.state(scanned)), _stack_by_hand(_flat(nnx.state(unrolled))), rtol=0, atol=0)
    export.export_model(scanned, tok, str(tmp_path), source_dir=fixture)  # in the stored dtype
    original, exported = SafetensorsReader(fixture), SafetensorsReader(str(tmp_path))
    assert original.names() == exported.names()
    for n in original.names():
        assert np.array_equal(original.view(n), exported.view(n)), n
