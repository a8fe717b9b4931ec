"""The base model of a fine-tuning experiment: pretrained on a background corpus before any arm
fine-tunes it, so that every arm starts from the same model that already knows the language, as
the paper's arms start from LLaMA-2-7B.

The base is an ordinary run directory (``<out>/base``) trained with standard loss on packed rows of
the background corpus; the arms then start from it with ``train.init_from``. Re-running an
experiment reuses a finished base (``--fresh`` retrains it).
"""

from __future__ import annotations

import dataclasses
import os

from gf_jax.config import replace_sections
from gf_jax.experiments.io import say
from gf_jax.experiments.training import train_arm
from gf_jax.goldfish import GoldfishConfig


def base_config(base, *, corpus_fields: dict, tokenizer_path: str, steps: int, lr: float | None,
                run_dir: str, init_from: str | None):
    """The validated run config of the base stage: standard loss on packed rows of the background
    corpus (``corpus_fields``: data source fields and path), with the experiment's tokenizer."""
    data = dataclasses.replace(
        base.data, **corpus_fields, tokenizer=tokenizer_path, mode="packed", validation_fraction=0.0,
        max_documents=None, canary_path=None, canary_repeats=0)
    train = dict(steps=steps, stop_at=0, run_dir=run_dir, eval_every=0, init_from=init_from or "")
    optimizer = dict(lr=lr if lr is not None else base.optimizer.lr, warmup=min(base.optimizer.warmup, steps - 1))
    return replace_sections(base, data=data, goldfish=GoldfishConfig(strategy="none"), train=train,
                            optimizer=optimizer)


def pretrain_base(config, *, devices, fresh: bool, tag: str) -> dict:
    """Trains (or reuses) the base run; returns its training summary. The model is dropped: the
    arms load it from the run directory."""
    say(f"[{tag}] base model: {config.train.steps} steps of standard loss on {config.data.path} "
        f"-> {config.train.run_dir}")
    model, _, summary = train_arm(config, devices=devices, fresh=fresh)
    del model
    return dict(summary, run_dir=os.path.abspath(config.train.run_dir), corpus=config.data.path,
                steps=config.train.steps, lr=config.optimizer.lr)
