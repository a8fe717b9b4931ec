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
    assert again.returncode == 2 and "holds an earlier hf import output; pass --overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


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


# ---- writers never touch somebody's files and never leave half a folder (issue 22) ----------------


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_export_refuses_a_folder_of_somebody_elses_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "model.safetensors").write_bytes(b"my weights")
    before = _snapshot(out)
    model, _, tok = run_load.load_model(fixture("llama3"), param_dtype="float32")
    for overwrite in (False, True):  # --overwrite replaces an earlier export only, never other files
        with pytest.raises(ValueError, match="already holds files that hf export did not write"):
            export.export_model(model, tok, str(out), overwrite=overwrite)
    assert _snapshot(out) == before


def test_export_over_an_earlier_sharded_export_replaces_it_whole(tmp_path):
    out = str(tmp_path / "out")
    model, _, tok = run_load.load_model(fixture("llama3"), param_dtype="float32")
    first = export.export_model(model, tok, out, source_dir=fixture("llama3"), max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in first
    other, _, other_tok = run_load.load_model(fixture("llama2"), param_dtype="float32")
    with pytest.raises(ValueError, match="holds an earlier hf export output; pass --overwrite"):
        export.export_model(other, other_tok, out, source_dir=fixture("llama2"))
    second = export.export_model(other, other_tok, out, source_dir=fixture("llama2"), overwrite=True)
    assert sorted(os.listdir(out)) == sorted([*second, "tokenizer.model", "tokenizer_config.json",
                                              "gf_jax_written.json"] + [f for f in ("tokenizer.json",)
                                                                        if os.path.exists(os.path.join(out, f))])
    assert not any(f.startswith("model-") for f in os.listdir(out))  # no shard of the first export is left
    reloaded, _, reloaded_tok = run_load.load_model(out, param_dtype="float32")
    a, b = params(other), params(reloaded)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert reloaded_tok.encode(["Speak, speak."]) == other_tok.encode(["Speak, speak."])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left


def test_export_into_its_own_run_directory_is_refused_before_anything_is_written(tmp_path):
    run = hf_import.import_to_run(fixture("llama2"), str(tmp_path / "run"))
    before = _snapshot(run)
    for target in (run, os.path.join(run, "export")):
        with pytest.raises(ValueError, match="inside"):
            export_run(run, target)
    assert _snapshot(run) == before and not os.path.exists(os.path.join(run, "export"))
    with pytest.raises(ValueError, match="writes to a local folder"):
        export_run(run, "gs://bucket/export")


def test_an_export_that_fails_midway_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    parent_before = sorted(os.listdir(tmp_path))
    stale = tmp_path / ".out.partial-999999999-x"  # left by a SIGKILLed export (no such process)
    stale.mkdir()
    (stale / "model.safetensors.tmp").write_bytes(b"\0" * 4096)
    model, _, tok = run_load.load_model(fixture("llama3"), param_dtype="float32")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_tokenizer", disk_full)
    with pytest.raises(OSError, match="the disk is full; .* was left as it was"):
        export.export_model(model, tok, str(out), source_dir=fixture("llama3"))
    assert sorted(os.listdir(tmp_path)) == parent_before  # no half export, and the stale one is gone
    monkeypatch.undo()
    export.export_model(model, tok, str(out), source_dir=fixture("llama3"))
    assert os.path.isfile(out / "tokenizer.json") and os.path.getsize(out / "tokenizer.json") > 0


def test_import_refuses_somebody_elses_folder_and_an_earlier_import_without_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: settings\n")
    with pytest.raises(ValueError, match="already holds files that hf import did not write"):
        hf_import.import_to_run(fixture("llama2"), str(run))
    assert _snapshot(run) == {"config.yaml": b"my: settings\n"}
    fresh = str(tmp_path / "fresh")
    hf_import.import_to_run(fixture("llama2"), fresh)
    with pytest.raises(ValueError, match="pass --overwrite"):
        hf_import.import_to_run(fixture("llama3"), fresh)
    hf_import.import_to_run(fixture("llama3"), fresh, overwrite=True)  # replaced whole
    assert os.path.isfile(os.path.join(fresh, "hf", "tokenizer.json"))
    assert not os.path.exists(os.path.join(fresh, "hf", "tokenizer.model"))  # llama2's is gone
    os.makedirs(os.path.join(fresh, "checkpoints", "5"))  # trained since: never replaced
    with pytest.raises(ValueError, match="trained since it was imported"):
        hf_import.import_to_run(fixture("llama3"), fresh, overwrite=True)


def test_a_failed_import_writes_nothing_and_can_be_retried(tmp_path, monkeypatch):
    run = str(tmp_path / "run")

    def bad_weights(*args, **kwargs):
        raise ValueError("model.safetensors is truncated")

    monkeypatch.setattr(load, "load_model", bad_weights)
    with pytest.raises(ValueError, match="truncated"):
        hf_import.import_to_run(fixture("llama3"), run)
    assert os.listdir(tmp_path) == []  # no RUN/hf a later run could adopt
    monkeypatch.undo()
    assert hf_import.import_to_run(fixture("llama3"), run) == run
