"""The optimizer: AdamW on a warm-up + cosine schedule after global-norm clipping.

Its settings are the ``optimizer:`` section of a run config. They are part of what the train step
compiles (``gf_jax.step.StepConfig``), apart from the host loop's settings (``train:``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from gf_jax.layers import stacked_ndim


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
      lr, warmup, min_lr_ratio: peak learning rate, linear warm-up steps, then cosine decay to
        lr * min_lr_ratio at the run's last step (``train.steps``).
      weight_decay, b1, b2, eps: AdamW (decay is applied to matrices only, not norms).
      clip: global gradient-norm clipping threshold; 0 disables clipping.
    """

    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0


def validate_optimizer(o: OptimizerConfig) -> None:
    """One-sentence ValueError for settings AdamW cannot use."""
    if not o.lr > 0:
        raise ValueError(f"optimizer.lr must be > 0, got {o.lr}.")
    if o.warmup < 0:
        raise ValueError(f"optimizer.warmup must be >= 0, got {o.warmup}.")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    if o.clip < 0 or o.weight_decay < 0:
        raise ValueError("optimizer.clip and optimizer.weight_decay must be >= 0.")
    if not (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0):
        raise ValueError(f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {o.b1}, {o.b2}.")


def learning_rate(step, o: OptimizerConfig, total_steps: int):
    """LR of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup`` steps
    (step 0 already uses lr / warmup), then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    step = jnp.asarray(step, jnp.float32)
    warm = o.lr * (step + 1.0) / max(1, o.warmup)
    progress = jnp.clip((step - o.warmup) / max(1, total_steps - o.warmup), 0.0, 1.0)
    floor = o.lr * o.min_lr_ratio
    cosine = floor + (o.lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < o.warmup, warm, cosine)


def make_optimizer(o: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; no weight decay on vectors (norms)."""
    adamw = optax.adamw(
        lambda step: learning_rate(step, o, total_steps),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        # By the rank of one layer's weight, so norm scales stacked by model.scan_layers stay undecayed.
        mask=lambda params: jax.tree_util.tree_map_with_path(lambda path, p: stacked_ndim(path, p) >= 2, params),
    )
    if o.clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip), adamw)
    return adamw
