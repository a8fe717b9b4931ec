"""``python -m gf_jax.train`` ends every failure in one sentence with its exit status: a full disk
during a checkpoint save (1, naming the run, the step and the newest intact checkpoint; resuming
afterwards works), a NaN before the first checkpoint (1), a second Ctrl-C (130), a junk
``train.init_from`` or a JSON file that is not a tokenizer (2, nothing written). Issue 22."""

import os
import shutil
import signal
import subprocess
import sys

import helpers
import pytest

from gf_jax.config import load_config
from gf_jax.train.hooks import StopSignal
from gf_jax.train.trainer import NonFiniteLossError, Trainer

REPO = helpers.REPO
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "data.max_documents=200", "data.vocab_size=384",
    "train.global_batch=8", "train.seq_len=32", "train.steps=4", "train.log_every=1", "train.ckpt_every=1",
    "train.eval_every=0", "train.progress=false", "train.tensorboard=false",
]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
           PYTHONPATH=REPO)
ENV.pop("GF_JAX_TRACEBACK", None)

# Fills the disk right before checkpoint step 2 is written (step 1 is waited for first, so it is intact).
FILL_DISK_AT_STEP_2 = """
import os, sys
from gf_jax.train import cli, trainer
real_save = trainer.Trainer.save
def save(self, step):
    if step == 2:
        self.checkpointer.wait()
        with open(sys.argv[1], "wb") as f:
            try:
                while True:
                    f.write(b"\\0" * 65536)
                    f.flush()
            except OSError:
                pass
    real_save(self, step)
trainer.Trainer.save = save
cli.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return helpers.corpus_tokenizer_path(load_config(TINY, SMALL), tmp_path_factory)


def train_args(tokenizer_path, run_dir, *extra):
    return ["--config", TINY, *SMALL, f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}", *extra]


def run_cli(args, script=None):
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "gf_jax.train", *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (needs root, as on the CI machine; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_while_saving_is_one_sentence_and_the_run_resumes(tokenizer_path, small_disk):
    run_dir, filler = small_disk / "run", small_disk / "filler"
    result = run_cli([str(filler), *train_args(tokenizer_path, run_dir)], script=FILL_DISK_AT_STEP_2)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and len(result.stderr.strip().splitlines()) == 1
    # The checkpoint's writer or the metrics file meets the full disk first, whichever comes first.
    assert result.stderr.strip().startswith("error: ") and f"of {run_dir} failed (the disk is full); the newest " \
        "intact checkpoint is step 1: free some space, then run the same command again" in result.stderr
    os.remove(filler)
    again = run_cli(train_args(tokenizer_path, run_dir))
    assert again.returncode == 0, again.stderr
    assert "resuming from step 1" in again.stdout
    assert "4" in os.listdir(run_dir / "checkpoints")


def test_a_nan_before_the_first_checkpoint_says_to_run_again_not_to_resume(tokenizer_path, tmp_path):
    config = load_config(TINY, SMALL + [f"data.tokenizer={tokenizer_path}", f"train.run_dir={tmp_path / 'nan'}",
                                        "optimizer.lr=1e30", "optimizer.warmup=0", "train.ckpt_every=4"])
    with pytest.raises(NonFiniteLossError, match=r"before the first checkpoint was saved; .* run the same command "
                                                  r"again \(it starts over\)"):
        Trainer(config).run()


# A second Ctrl-C arriving while step 3 runs (the first one asked for a checkpoint at its end).
SECOND_CTRL_C_AT_STEP_3 = """
import sys
from gf_jax.train import cli, trainer
real_step = trainer.Trainer._train_one_step
def step(self):
    if self.step == 2:
        raise KeyboardInterrupt
    real_step(self)
trainer.Trainer._train_one_step = step
cli.main(sys.argv[1:])
"""


def test_a_second_ctrl_c_is_one_line_and_status_130(tokenizer_path, tmp_path):
    stop = StopSignal()
    stop._on_signal(signal.SIGINT, None)  # the first asks for a checkpoint and a clean stop
    assert stop.requested(1)
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)  # the second stops at once
    result = run_cli(train_args(tokenizer_path, tmp_path / "run"), script=SECOND_CTRL_C_AT_STEP_3)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == ("error: interrupted at step 2 without saving it; run the same command to "
                                     "resume from the newest checkpoint.")


def test_junk_init_from_and_a_json_that_is_no_tokenizer_are_one_sentence_and_write_nothing(tokenizer_path, tmp_path):
    junk = tmp_path / "junk_run"
    (junk / "checkpoints" / "3" / "model").mkdir(parents=True)
    (junk / "checkpoints" / "3" / "model" / "garbage").write_bytes(b"\x00not orbax")
    shutil.copyfile(TINY, junk / "config.yaml")
    run_dir = tmp_path / "run"
    result = run_cli(train_args(tokenizer_path, run_dir, f"train.init_from={junk}"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "checkpoint step 3 of" in result.stderr and not run_dir.exists()
    not_a_tokenizer = tmp_path / "settings.json"
    not_a_tokenizer.write_text('{"learning_rate": 0.1}')
    result = run_cli(train_args(not_a_tokenizer, run_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "settings.json" in result.stderr and not run_dir.exists()
