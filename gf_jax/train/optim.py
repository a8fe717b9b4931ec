"""The optimizer: AdamW on a warm-up + cosine schedule after global-norm clipping.

Its settings are the ``optimizer:`` section of a run config (``gf_jax.config.sections``). They are
part of what the train step compiles (``gf_jax.train.step.StepConfig``), apart from the host loop's
settings (``train:``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gf_jax.config.sections import OptimizerConfig
from gf_jax.model.layers import stacked_ndim


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
