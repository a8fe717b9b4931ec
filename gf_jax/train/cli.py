"""Command line: train a LLaMA-style model with goldfish loss (resumes an existing run directory).

    python -m gf_jax.train --config configs/tiny.yaml [section.key=value ...]

Exit status: 0 when done or preempted (SIGTERM saves a checkpoint; run the same command to
resume), 1 when the loss became non-finite (or a bucket lock was taken over), 2 for a config or
set-up error, including a run directory in use by another run (one sentence on stderr, before
anything is written). See docs/failures.md for what survives a crash. The trainer itself is
``gf_jax.train.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import sys

from gf_jax.config import RunConfig, load_config
from gf_jax.run import distributed
from gf_jax.run.lock import RunLockLost
from gf_jax.train.trainer import NonFiniteLossError, Trainer


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
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # An error in one process of a multi-host run ends that process at once (after printing it),
    # so the others are stopped instead of waiting for it in a collective.
    distributed.exit_on_error(lambda: _train_main(config))


def _train_main(config: RunConfig) -> None:
    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        trainer.run()
    except (NonFiniteLossError, RunLockLost) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
