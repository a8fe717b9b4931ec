"""A gs:// run directory: the trainer's own files go through gf_jax.util.paths (Orbax handles the
checkpoint arrays itself). A fake GCS filesystem registered with fsspec stands in for the bucket."""

import json
import os

import helpers

from gf_jax.util import paths


def test_rundir_ops_on_a_bucket(bucket, tmp_path):
    run = "gs://bkt/runs/a"
    assert paths.is_url(run) and not paths.is_url(str(tmp_path))
    assert paths.absolute(run) == run  # os.path.abspath would turn it into a local path
    assert paths.join(run, "checkpoints") == "gs://bkt/runs/a/checkpoints"
    paths.makedirs(run)
    paths.write_text(paths.join(run, "config.yaml"), "a: 1\n")
    paths.append_text(paths.join(run, "metrics.jsonl"), '{"step": 1}\n')
    paths.append_text(paths.join(run, "metrics.jsonl"), '{"step": 2}\n')
    assert (bucket / "bkt/runs/a/config.yaml").read_text() == "a: 1\n"
    assert (bucket / "bkt/runs/a/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    local = tmp_path / "x.bin"
    local.write_bytes(b"\x00\x01tok")
    paths.copy_file(str(local), paths.join(run, "tokenizer.model"))
    fetched = paths.localize(paths.join(run, "tokenizer.model"), str(tmp_path / "cache"))
    assert not paths.is_url(fetched) and open(fetched, "rb").read() == b"\x00\x01tok"
    assert paths.exists(paths.join(run, "tokenizer.model")) and not paths.exists(paths.join(run, "nope"))


def test_trainer_files_and_tokenizer_live_in_a_bucket(bucket, tmp_path):
    from gf_jax.config import load_config
    from gf_jax.run.rundir import RunDir
    from gf_jax.run.source import run_tokenizer
    from gf_jax.tokenizer import load_tokenizer, train_from_texts
    from gf_jax.train import setup
    from gf_jax.train.tracker import JsonlWriter

    texts = [f"speech number {i}: to be or not to be, that is the question {i % 7}" for i in range(200)]
    tok_path = train_from_texts(texts, 290, str(tmp_path / "tok"))
    run = "gs://bkt/runs/b"
    config = load_config("configs/tiny.yaml", [f"train.run_dir={run}", f"data.tokenizer={tok_path}"])
    tokenizer, recorded = setup.resolve_tokenizer(config, run)
    assert recorded == f"{run}/tokenizer.model"
    assert not paths.exists(recorded)  # the trainer copies it once every check has passed
    paths.makedirs(run)
    paths.copy_file(tokenizer.path, recorded)
    assert (bucket / "bkt/runs/b/tokenizer.model").read_bytes() == open(tok_path, "rb").read()
    # Evaluation finds and loads the tokenizer from the bucket.
    found = run_tokenizer(RunDir(run), config)
    assert load_tokenizer(found).encode(["to be or not"]) == tokenizer.encode(["to be or not"])
    writer = JsonlWriter(run, resume_step=None)
    writer.write({"step": 10, "loss": 3.0})
    writer.write({"step": 20, "loss": 2.5})
    resumed = JsonlWriter(run, resume_step=10)  # drops records after 10
    resumed.write({"step": 20, "loss": 2.4})
    lines = (bucket / "bkt/runs/b/metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.4}]
    from gf_jax.config import save_config

    save_config(config, paths.join(run, "config.yaml"))
    assert "run_dir: gs://bkt/runs/b" in (bucket / "bkt/runs/b/config.yaml").read_text()
    assert RunDir(run).checkpoints == "gs://bkt/runs/b/checkpoints"


def test_evaluate_reads_a_run_in_a_bucket_and_writes_its_report_there(bucket, tmp_path, monkeypatch):
    """``python -m gf_jax.evaluate --run gs://...``: the run's config.yaml, tokenizer and documents are
    read through the bucket, and the report lands in RUN/eval there. Orbax reads checkpoint arrays
    with tensorstore, which the fake bucket cannot serve, so the weights come from a local copy."""
    import shutil

    from gf_jax.evaluate import cli as evaluate_cli
    from gf_jax.evaluate import runs
    from gf_jax.run.load import load_model

    fixture = os.path.join(helpers.FIXTURES, "run_before_layout")
    shutil.copytree(fixture, bucket / "bkt" / "runs" / "old", ignore=shutil.ignore_patterns("checkpoints"))
    local = shutil.copytree(fixture, tmp_path / "local")
    seen = []

    def load_from_local(source, step=None, **kwargs):
        seen.append(str(source))
        return load_model(str(local), step, **kwargs)

    monkeypatch.setattr(runs, "load_model", load_from_local)
    results = evaluate_cli.run(["--run", "gs://bkt/runs/old", "--docs", "train", "--heldout", "validation",
                                "--max-docs", "4", "--suffix-len", "8", "--batch-size", "4"])
    assert seen == ["gs://bkt/runs/old"] and results["old"]["memorization"]["aggregate"]["n_documents"] == 4
    report = bucket / "bkt" / "runs" / "old" / "eval"
    assert (report / "report.md").is_file() and (report / "rougeL_hist.png").stat().st_size > 1000
    assert json.loads((report / "report.json").read_text())["old"]["heldout"]["n_documents"] == 4
