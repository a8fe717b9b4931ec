"""A gs:// run directory: the trainer's own files go through gf_jax.rundir (Orbax handles the
checkpoint arrays itself). A fake GCS filesystem registered with fsspec stands in for the bucket."""

import json

from gf_jax import rundir


def test_rundir_ops_on_a_bucket(bucket, tmp_path):
    run = "gs://bkt/runs/a"
    assert rundir.is_url(run) and not rundir.is_url(str(tmp_path))
    assert rundir.absolute(run) == run  # os.path.abspath would turn it into a local path
    assert rundir.join(run, "checkpoints") == "gs://bkt/runs/a/checkpoints"
    rundir.makedirs(run)
    rundir.write_text(rundir.join(run, "config.yaml"), "a: 1\n")
    rundir.append_text(rundir.join(run, "metrics.jsonl"), '{"step": 1}\n')
    rundir.append_text(rundir.join(run, "metrics.jsonl"), '{"step": 2}\n')
    assert (bucket / "bkt/runs/a/config.yaml").read_text() == "a: 1\n"
    assert (bucket / "bkt/runs/a/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    local = tmp_path / "x.bin"
    local.write_bytes(b"\x00\x01tok")
    rundir.copy_file(str(local), rundir.join(run, "tokenizer.model"))
    fetched = rundir.localize(rundir.join(run, "tokenizer.model"), str(tmp_path / "cache"))
    assert not rundir.is_url(fetched) and open(fetched, "rb").read() == b"\x00\x01tok"
    assert rundir.exists(rundir.join(run, "tokenizer.model")) and not rundir.exists(rundir.join(run, "nope"))


def test_trainer_files_and_tokenizer_live_in_a_bucket(bucket, tmp_path):
    from gf_jax import checkpoint, trainer
    from gf_jax.config import load_config
    from gf_jax.tokenizer import Tokenizer, train_from_texts
    from gf_jax.tracker import JsonlWriter

    texts = [f"speech number {i}: to be or not to be, that is the question {i % 7}" for i in range(200)]
    tok_path = train_from_texts(texts, 290, str(tmp_path / "tok"))
    run = "gs://bkt/runs/b"
    config = load_config("configs/tiny.yaml", [f"train.run_dir={run}", f"data.tokenizer={tok_path}"])
    tokenizer, recorded = trainer.resolve_tokenizer(config, run)
    assert recorded == f"{run}/tokenizer.model"
    assert not rundir.exists(recorded)  # the trainer copies it once every check has passed
    rundir.makedirs(run)
    rundir.copy_file(tokenizer.path, recorded)
    assert (bucket / "bkt/runs/b/tokenizer.model").read_bytes() == open(tok_path, "rb").read()
    # Evaluation finds and loads the tokenizer from the bucket.
    found = checkpoint.find_tokenizer(run, config)
    assert Tokenizer.load(found).encode(["to be or not"]) == tokenizer.encode(["to be or not"])
    writer = JsonlWriter(run, resume_step=None)
    writer.write({"step": 10, "loss": 3.0})
    writer.write({"step": 20, "loss": 2.5})
    resumed = JsonlWriter(run, resume_step=10)  # drops records after 10
    resumed.write({"step": 20, "loss": 2.4})
    lines = (bucket / "bkt/runs/b/metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.4}]
    from gf_jax.config import save_config

    save_config(config, rundir.join(run, "config.yaml"))
    assert "run_dir: gs://bkt/runs/b" in (bucket / "bkt/runs/b/config.yaml").read_text()
    assert checkpoint.checkpoint_dir(run) == "gs://bkt/runs/b/checkpoints"
