"""Command line: train a LLaMA-style model with goldfish loss (resumes an existing run directory).

    python -m gf_jax.train --config configs/tiny.yaml [section.key=value ...]

Exit status: 0 when done or preempted (SIGTERM or Ctrl-C saves a checkpoint; run the same command
to resume), 1 when the loss became non-finite, a checkpoint could not be saved (a full disk) or a
bucket lock was taken over, 2 for a config or set-up error, including a run directory in use by
another run (before anything is written), 130 for a second Ctrl-C. Every failure is one sentence
on stderr (``GF_JAX_TRACEBACK=1`` shows tracebacks). See docs/failures.md for what survives a
crash. The trainer itself is ``gf_jax.train.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import os
import sys

from gf_jax.config import RunConfig, load_config
from gf_jax.run import distributed
from gf_jax.run.checkpoint import CheckpointSaveError, is_disk_full
from gf_jax.run.lock import RunLockLost
from gf_jax.train.trainer import NonFiniteLossError, Trainer
from gf_jax.util.commands import INTERRUPTED_STATUS, USER_ERRORS, fail, one_line, quiet_background_noise


def train(config: RunConfig, *, devices=None) -> dict:
    """Sets up and runs one training run (see ``Trainer``); returns its summary."""
    return Trainer(config, devices=devices).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gf_jax.train",
        description="Train a LLaMA-style model with goldfish loss (resumes an existing run directory).",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 goldfish.k=3")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        # Before anything touches a device: joins the other processes of a multi-host run.
        distributed.maybe_initialize(config.distributed)
    except USER_ERRORS as e:
        fail(one_line(e))
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was written.", INTERRUPTED_STATUS)
    quiet_background_noise()
    # An error in one process of a multi-host run ends that process at once (after printing it),
    # so the others are stopped instead of waiting for it in a collective.
    distributed.exit_on_error(lambda: _train_main(config))


def _train_main(config: RunConfig) -> None:
    try:
        trainer = Trainer(config)
    except USER_ERRORS as e:
        fail(one_line(e))
    except KeyboardInterrupt:
        fail("interrupted while setting up; nothing of this run was written.", INTERRUPTED_STATUS)
    try:
        trainer.run()
    except (NonFiniteLossError, RunLockLost) as e:
        fail(str(e), 1)
    except (CheckpointSaveError, OSError) as e:  # a full disk under the checkpoint or the metrics
        message = str(e) if isinstance(e, CheckpointSaveError) else _write_failure(e, trainer)
        # Orbax's background writers may still hold a failed save: ending now skips their shutdown noise.
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's checkpoint was not waited for
        fail(f"interrupted at step {trainer.step} without saving it; run the same command to resume from the newest "
             "checkpoint.", INTERRUPTED_STATUS)


def _write_failure(e: OSError, trainer: Trainer) -> str:
    """One sentence for a failed write of the run's own files (metrics, events) during training."""
    why, fix = ("the disk is full", "free some space") if is_disk_full(e) else (one_line(e), "fix that")
    return (f"writing step {trainer.step} of {trainer.run_dir} failed ({why}); "
            f"{trainer.checkpointer.newest_intact_text()}: {fix}, then run the same command again to continue "
            "from there.")
