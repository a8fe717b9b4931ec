"""Never lose work, never run on the wrong data: the run-directory lock, a corrupt checkpoint
skipped (never deleted), nothing written by a run that fails its checks, and the misuse cases that
must end in one sentence (invalid YAML, unwritable paths, bad evaluate / tokenizer arguments)."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import helpers
import pytest
from helpers import corpus_tokenizer_path

from gf_jax import evaluate
from gf_jax.config import load_config
from gf_jax.evaluate import cli as evaluate_cli
from gf_jax.run import lock as runlock
from gf_jax.run.checkpoint import CorruptCheckpointError
from gf_jax.run.load import load_model
from gf_jax.run.lock import RunDirInUse, RunLock, RunLockLost
from gf_jax.run.rundir import LOCK_FILE
from gf_jax.tokenizer import cli as tokenizer_cli
from gf_jax.train.cli import Trainer, main

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.util.commands",
)

REPO = helpers.REPO
TINY = os.path.join(REPO, "configs", "tiny.yaml")

# The tiny config shrunk as in test_train.py; 4 steps, a checkpoint after each, no evaluation.
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64",
    "data.max_documents=400", "data.validation_fraction=0.1", "data.vocab_size=384", "goldfish.h=3",
    "train.global_batch=8", "train.seq_len=32", "train.steps=4", "optimizer.warmup=2",
    "train.log_every=1", "train.ckpt_every=1", "train.keep_ckpts=10", "train.eval_every=0",
    "train.progress=false", "train.tensorboard=false", "train.async_checkpoint=false",
]


def config_for(tokenizer_path, run_dir, *extra):
    return load_config(TINY, SMALL + [f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}", *extra])


def tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                h.update(os.path.relpath(full, path).encode() + f.read())
    return h.hexdigest()


def steps_in(run_dir):
    return sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return corpus_tokenizer_path(load_config(TINY, SMALL), tmp_path_factory)


@pytest.fixture(scope="module")
def four_steps(tokenizer_path, tmp_path_factory):
    """A finished 4-step run with checkpoints 1..4 (copy it before changing it)."""
    run_dir = str(tmp_path_factory.mktemp("four") / "run")
    assert Trainer(config_for(tokenizer_path, run_dir)).run()["step"] == 4
    assert steps_in(run_dir) == [1, 2, 3, 4]
    return run_dir


def copy_run(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ---- 1. the run-directory lock ----------------------------------------------------------------


def test_second_lock_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    first = RunLock.acquire(run_dir, log=lambda _: None)
    info = json.load(open(os.path.join(run_dir, LOCK_FILE)))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"] <= time.time()
    with pytest.raises(RunDirInUse, match=rf"{run_dir} is in use by pid {os.getpid()} on host "):
        RunLock.acquire(run_dir)
    first.release()
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))
    RunLock.acquire(run_dir).release()  # free again


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(os.path.join(run_dir, LOCK_FILE), "w") as f:  # what kill -9 leaves: the file, no flock
        json.dump({"host": socket.gethostname(), "pid": gone.pid, "started": time.time() - 60}, f)
    lines = []
    lock = RunLock.acquire(run_dir, log=lines.append)
    assert len(lines) == 1 and f"left by pid {gone.pid}" in lines[0] and "that process is gone" in lines[0]
    assert json.load(open(os.path.join(run_dir, LOCK_FILE)))["pid"] == os.getpid()
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock.acquire(str(tmp_path / "run"), heartbeat_s=0.05)
    first = json.load(open(lock.path))["heartbeat"]
    time.sleep(0.3)
    assert json.load(open(lock.path))["heartbeat"] > first
    lock.release()


def test_second_trainer_stops_at_once_and_writes_nothing(tokenizer_path, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    holder = RunLock.acquire(run_dir)
    with pytest.raises(SystemExit) as exit_info:  # the command line: status 2, one sentence
        main(["--config", TINY, *SMALL, f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the run directory {run_dir} is in use by pid {os.getpid()}") and "\n" not in err
    assert os.listdir(run_dir) == [LOCK_FILE]  # no config.yaml, no checkpoints/, no metrics
    holder.release()


def test_a_run_holds_the_lock_while_it_trains_and_releases_it(tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "run")
    seen = []
    trainer = Trainer(config_for(tokenizer_path, run_dir, "train.steps=2"))

    def try_second_launch(step):
        with pytest.raises(RunDirInUse):
            RunLock.acquire(run_dir)
        seen.append(step)

    trainer.add_hook(try_second_launch, every=1)
    trainer.run()
    assert seen == [1, 2]
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))  # released at the end


def test_an_unwritable_run_dir_is_one_sentence(tokenizer_path, tmp_path, monkeypatch, capsys):
    # Tests run as root, which ignores permissions: the refusal is simulated where it happens.
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(runlock.os, "makedirs", refuse)
    run_dir = str(tmp_path / "readonly" / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", TINY, *SMALL, f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot write to the run directory {run_dir} (Permission denied); make it writable "
                   "or choose another train.run_dir.")


def test_bucket_lock_is_an_object_refused_broken_when_stale_and_lost_when_taken(bucket):
    run = "gs://bkt/runs/a"
    lines = []
    lock = RunLock.acquire(run, heartbeat_s=3600, stale_after_s=60, log=lines.append)  # beats by hand
    stored = bucket / "bkt/runs/a" / LOCK_FILE
    assert json.loads(stored.read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirInUse, match=r"gs://bkt/runs/a is in use by pid"):
        RunLock.acquire(run, stale_after_s=60)

    # Another host's lock whose heartbeat stopped 2 minutes ago is stale: broken, with a message;
    # the run that held it notices at its next heartbeat and stops at its next step.
    old = {"host": "other-host", "pid": 1, "started": time.time() - 600, "heartbeat": time.time() - 120,
           "token": "x"}
    stored.write_text(json.dumps(old))
    second = RunLock.acquire(run, heartbeat_s=3600, stale_after_s=60, log=lines.append)
    assert "left by pid 1 on host other-host" in lines[-1] and "heartbeat is 120 s old" in lines[-1]
    lock.check()  # not noticed yet
    lock.beat()
    with pytest.raises(RunLockLost, match=r"taken over by pid \d+ on host"):
        lock.check()
    lock.release()  # does not remove the lock it lost
    assert json.loads(stored.read_text())["token"] == second._token

    # A live lock on another host is not broken.
    second.release()
    fresh = {**old, "heartbeat": time.time()}
    stored.write_text(json.dumps(fresh))
    with pytest.raises(RunDirInUse, match=r"in use by pid 1 on host other-host"):
        RunLock.acquire(run, stale_after_s=60)


# ---- 2 and 9. nothing in the run directory changes until every check has passed -------------


def test_a_refused_resume_leaves_the_run_directory_untouched(four_steps, tokenizer_path, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"another corpus, paragraph {i}, nothing like the first" for i in range(50)))
    before = tree_digest(run_dir)
    with pytest.raises(ValueError):
        Trainer(config_for(tokenizer_path, run_dir, f"data.path={other}", "train.steps=6"))
    assert tree_digest(run_dir) == before  # config.yaml still names the data the checkpoints saw


def test_failed_checks_create_nothing(tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "new")
    with pytest.raises(ValueError, match=r"model\.vocab_size is 300"):
        Trainer(config_for(tokenizer_path, run_dir, "model.vocab_size=300"))
    assert not os.path.exists(run_dir)  # not even an empty checkpoints/
    os.makedirs(run_dir)
    with pytest.raises(ValueError, match=r"model\.vocab_size is 300"):
        Trainer(config_for(tokenizer_path, run_dir, "model.vocab_size=300"))
    assert os.listdir(run_dir) == []  # an existing directory is left as it was


# ---- 3. a corrupt checkpoint is skipped (and kept), never a traceback -------------------------


def _truncate_largest_array_file(step_dir):
    files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "model")) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 3)


def test_resume_skips_a_corrupt_newest_checkpoint_and_keeps_it(four_steps, tokenizer_path, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    _truncate_largest_array_file(os.path.join(run_dir, "checkpoints", "4"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "3", "optimizer"))  # a missing item
    lines = []
    trainer = Trainer(config_for(tokenizer_path, run_dir, "train.steps=5"), log=lines.append)
    assert trainer.resume_step == 2
    skipped = [line for line in lines if "skipping checkpoint" in line]
    assert len(skipped) == 2 and "step 4" in skipped[0] and "step 3" in skipped[1], lines
    assert "optimizer" in skipped[1] and "left on disk" in skipped[1]
    assert trainer.run()["step"] == 5
    assert steps_in(run_dir) == [1, 2, 3, 4, 5]  # 3 and 4 saved again
    kept = sorted(os.listdir(os.path.join(run_dir, "corrupt_checkpoints")))
    assert kept == ["3", "4"]  # the bad ones moved aside, not deleted
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]  # each step logged once


def test_load_model_falls_back_and_a_named_bad_step_is_one_sentence(four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path)
    _truncate_largest_array_file(os.path.join(run_dir, "checkpoints", "4"))
    model, config, _ = load_model(run_dir)
    assert "skipping checkpoint step 4" in capsys.readouterr().err
    assert config.train.steps == 4  # step 3's config
    with pytest.raises(CorruptCheckpointError) as info:
        load_model(run_dir, step=4)
    message = str(info.value)
    assert message.startswith(f"checkpoint step 4 of {run_dir} does not restore (") and "\n" not in message
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "4"))  # evaluation never moves or deletes


def test_no_restorable_checkpoint_is_one_sentence(four_steps, tokenizer_path, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    for step in (1, 2, 3, 4):
        with open(os.path.join(run_dir, "checkpoints", str(step), "loop", "metadata"), "w") as f:
            f.write("{")
    with pytest.raises(CorruptCheckpointError, match=r"no checkpoint of .* restores: step 4 \(JSONDecodeError"):
        Trainer(config_for(tokenizer_path, run_dir, "train.steps=5"), log=lambda _: None)


# ---- 4. an empty validation split, and the end of a run ---------------------------------------


def test_an_empty_validation_split_fails_before_training(tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"data\.validation_fraction=0\.01 leaves no validation documents"):
        Trainer(config_for(tokenizer_path, run_dir, "data.max_documents=10", "data.validation_fraction=0.01",
                           "train.eval_every=2"))
    assert not os.path.exists(run_dir)


def test_the_checkpoint_is_saved_before_an_evaluation_can_fail(tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer = Trainer(config_for(tokenizer_path, run_dir, "train.ckpt_every=2", "train.eval_every=4"))

    def failing_evaluation():
        raise RuntimeError("evaluation failed")

    trainer.evaluate = failing_evaluation
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.run()
    assert steps_in(run_dir) == [2, 4]
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))  # released after the error too


# ---- 5 and 7. evaluate, config and tokenizer misuse: one sentence ----------------------------


def test_evaluate_rejects_max_docs_below_one_and_an_unwritable_out(four_steps, tmp_path):
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match=rf"--max-docs must be >= 1 .*got {bad}\."):
            evaluate_cli.run(["--run", four_steps, "--docs", "train", "--max-docs", bad])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file/report cannot be a report directory: .*file is a file"):
        evaluate_cli.run(["--run", four_steps, "--docs", "train", "--out", str(a_file / "report")])


def test_evaluate_checks_out_before_evaluating(four_steps, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    with pytest.raises(ValueError, match=r"--out .* cannot be written \(.*Permission denied\)"):
        evaluate_cli.run(["--run", four_steps, "--docs", "train", "--out", str(tmp_path / "out")])


def test_invalid_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 10\n  lr: [1, 2\nmodel:\n  d_model: 32\n")
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(f"config file {path} is not valid YAML at line 4, column 6 (expected ',' or ']'")
    assert "\n" not in message


def test_tokenizer_cli_misuse_is_one_sentence(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("some text to train on\n" * 20)
    cases = [
        ([str(tmp_path / "missing.txt")], "7", "does not exist"),
        ([str(empty)], "300", "corpus is empty"),
        ([str(text)], "0", "--vocab-size must be a positive number"),
    ]
    for inputs, vocab, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            tokenizer_cli.main(["train", "--input", *inputs, "--vocab-size", vocab, "--out", str(tmp_path / "tok")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_the_resume(tmp_path):
    from gf_jax.train.tracker import JsonlWriter, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n{"step": 3, "lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}]
    JsonlWriter(str(tmp_path), resume_step=2).write({"step": 3, "loss": 2.8})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_a_resume_removes_half_written_checkpoints_but_evaluation_does_not(four_steps, tokenizer_path, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    half = os.path.join(run_dir, "checkpoints", "5.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(run_dir, "checkpoints", "4"), half)  # what kill -9 during a save leaves
    load_model(run_dir)
    assert os.path.isdir(half)  # a reader never removes it: it may be a save in flight
    Trainer(config_for(tokenizer_path, run_dir, "train.steps=5")).run()
    assert not os.path.exists(half) and steps_in(run_dir) == [1, 2, 3, 4, 5]
