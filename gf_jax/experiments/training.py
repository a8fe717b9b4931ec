"""Training one arm with the package's trainer, and what its run reports at the end."""

from __future__ import annotations

import time

from gf_jax.train.tracker import read_metrics
from gf_jax.train.trainer import Trainer

# The keys of the last training record an experiment reports (losses renamed ``final_*``).
_FINAL_KEYS = ("loss", "loss_all", "loss_dropped", "drop_fraction", "supervised_tokens", "input_tokens",
               "tokens_per_s")


def train_arm(config, *, devices, fresh: bool = False):
    """Trains one arm (resuming its run directory if it has checkpoints); returns
    (model, mesh, summary) with the trained model in memory on the training mesh.

    ``train.init_from`` in ``config`` starts a new run from another run's parameters. ``fresh``
    retrains an arm whose run directory exists: the trainer takes the run's lock before it removes
    anything, so a run still training there is refused, never deleted.
    """
    run_dir = config.train.run_dir
    started = time.perf_counter()
    trainer = Trainer(config, devices=devices, log=None, fresh=fresh)
    resumed_from = trainer.resume_step
    summary = trainer.run()
    model, mesh = trainer.model, trainer.mesh
    # Dropping the trainer frees its optimizer state (twice the model): evaluation needs only the model.
    del trainer
    summary = dict(summary, seconds=time.perf_counter() - started, resumed_from=resumed_from)
    summary.update(final_metrics(run_dir))
    return model, mesh, summary


def final_metrics(run_dir: str) -> dict:
    """The last training record of a run: loss over all / kept / dropped targets, drop rate, speed."""
    # Evaluation records carry no ``loss_all``; the last record that does is the last training one.
    training = [record for record in read_metrics(run_dir) if "loss_all" in record]
    last = training[-1] if training else {}
    return {f"final_{k}" if k.startswith("loss") else k: last.get(k) for k in _FINAL_KEYS}
