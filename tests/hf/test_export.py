"""Export and import: HF dir -> run dir (step 0) -> HF dir is bit-exact, keeps the original's
architecture and tokenizer; load_model, load_pretrained and evaluate accept an HF directory;
the sharded load on 8 CPU devices equals the single-device one."""

import json
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest

from gf_jax.hf import export, load
from gf_jax.hf.safetensors_io import SafetensorsReader, write_sharded
from gf_jax.model.sharding import MeshConfig, make_mesh, shardings_on
from gf_jax.model.transformer import abstract_model
from gf_jax.run import hf_import, source
from gf_jax.run import load as run_load
from gf_jax.run.export import export_run

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.hf.cli",
    "gf_jax.run.export",
    "gf_jax.run.hf_import",
)

FIXTURES = helpers.HF_FIXTURES
ROOT = helpers.REPO


def fixture(name):
    return os.path.join(FIXTURES, name)


def params(model):
    return load.numpy_state(model)


@pytest.mark.parametrize("name", ["llama3", "llama2", "mistral", "qwen2", "qwen3"])
def test_import_then_export_is_bit_exact_with_the_original_architecture(tmp_path, name):
    model, config, tok = run_load.load_model(fixture(name), param_dtype="float32")
    run = hf_import.import_to_run(fixture(name), str(tmp_path / "run"))
    model_run, config_run, tok_run = run_load.load_model(run)
    assert config_run.model == config.model and type(tok_run) is type(tok)
    out = str(tmp_path / "out")
    export_run(run, out, dtype="float32")
    model_out, _, tok_out = run_load.load_model(out, param_dtype="float32")
    a, b, c = params(model), params(model_run), params(model_out)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
    with open(os.path.join(fixture(name), "config.json")) as f, open(os.path.join(out, "config.json")) as g:
        original, exported = json.load(f), json.load(g)
    assert exported["architectures"] == original["architectures"]
    assert tok_out.encode(["Speak, speak."]) == tok.encode(["Speak, speak."])
    for f in ("tokenizer.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(fixture(name), f)) == os.path.exists(os.path.join(out, f))


def test_export_in_the_stored_dtype_reproduces_the_original_bytes(tmp_path):
    model, _, tok = run_load.load_model(fixture("mistral"))  # bfloat16, as stored
    export.export_model(model, tok, str(tmp_path), source_dir=fixture("mistral"), dtype="bfloat16")
    original, exported = SafetensorsReader(fixture("mistral")), SafetensorsReader(str(tmp_path))
    assert original.names() == exported.names()
    for n in original.names():
        assert np.array_equal(original.view(n), exported.view(n)), n


def test_cli_import_and_export(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    for args in (["import", fixture("qwen3"), run], ["export", run, out, "--dtype", "bfloat16", "--step", "0"]):
        subprocess.run([sys.executable, "-m", "gf_jax.hf", *args], check=True, env=env, cwd=ROOT,
                       capture_output=True)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    again = subprocess.run([sys.executable, "-m", "gf_jax.hf", "import", fixture("qwen3"), run], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints; choose a new run directory" in again.stderr


def test_writer_output_reads_with_the_safetensors_library_and_shards(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((7, 5 + i)).astype(np.float32) for i in range(4)}
    specs = [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]
    files = write_sharded(str(tmp_path), specs, max_shard_bytes=400)
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    loaded = {}
    for f in files[:-1]:
        loaded.update(load_file(str(tmp_path / f)))
    assert all(np.array_equal(loaded[n], a) for n, a in arrays.items())
    reader = SafetensorsReader(str(tmp_path))
    assert all(np.array_equal(reader.view(n), a) for n, a in arrays.items())


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])
def test_sharded_load_on_8_devices_equals_single_device(name):
    single, _, _ = run_load.load_model(fixture(name), param_dtype="float32")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded, _, _ = run_load.load_model(fixture(name), mesh=mesh, param_dtype="float32")
    wq = sharded.blocks[0].attn.wq.get_value()
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    shard_shapes = {s.data.shape for s in wq.addressable_shards}
    assert shard_shapes == {(wq.shape[0] // 4, wq.shape[1] // 2, wq.shape[2])}
    a, b = params(single), params(sharded)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_load_pretrained_params_onto_given_shardings():
    config = source.architecture(fixture("qwen2"))
    config = type(config)(**{**config.__dict__, "param_dtype": "float32"})
    graphdef, abstract = abstract_model(config)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    state = source.load_params(fixture("qwen2"), abstract, shardings_on(abstract, mesh), config)
    emb = state["embedding"].get_value()
    assert emb.dtype == np.float32 and emb.sharding.spec[1] == "fsdp" and len(emb.sharding.device_set) == 8


def test_run_dir_at_step_is_accepted(tmp_path):
    run = hf_import.import_to_run(fixture("llama2"), str(tmp_path / "run"))
    model, config, tok = run_load.load_pretrained(f"{run}@0")
    assert config == source.architecture(f"{run}@0") and tok.bos_id == 1
    with pytest.raises(FileNotFoundError, match="has no checkpoint of step 5"):
        source.load_params(f"{run}@5", None, None, config)


def test_evaluate_accepts_a_hugging_face_directory(tmp_path):
    from gf_jax.evaluate import cli as evaluate_cli

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["First Citizen: Before we proceed any further, hear me speak. " * 3,
                             "All: Speak, speak. You are all resolved rather to die than to famish? " * 2]))
    results = evaluate_cli.run(["--run", fixture("llama3"), "--docs", str(docs), "--suffix-len", "8",
                             "--batch-size", "2", "--out", str(tmp_path / "eval")])
    assert list(results) == ["llama3"] and results["llama3"]["memorization"]["aggregate"]
