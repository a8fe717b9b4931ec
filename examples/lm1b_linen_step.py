"""Goldfish loss in a Linen training step shaped like flax ``examples/lm1b``.

lm1b packs several documents into each row (``inputs_segmentation``, ``inputs_position``), pads
with id 0, and its decoder shifts the inputs right, so ``logits[:, t]`` predicts ``inputs[:, t]``:
the inputs are the targets and ``inputs_position`` is exactly gf_jax's ``positions_BxT``. The whole
change from the plain step (``plain_train_step``) to goldfish (``goldfish_train_step``)::

    -    weights = jnp.where(inputs > 0, 1, 0).astype(jnp.float32)
    -    loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights, label_smoothing)
    -    mean_loss = loss / weight_sum
    +    mean_loss, aux = gf_jax.loss_fn(logits, inputs, goldfish, pad_id=0, label_smoothing=label_smoothing,
    +                                    positions_BxT=batch["inputs_position"])

``goldfish = gf_jax.GoldfishConfig(k=4, h=13)`` is a static argument of the jitted step (a pytree
with no leaves); ``GoldfishConfig(strategy="none")`` gives lm1b's own loss back (float32 logits).
Keep the module import (``import gf_jax``): the step's own ``loss_fn`` closure keeps its name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import gf_jax


class TinyDecoder(nn.Module):
    """Stand-in for lm1b's Transformer decoder: sees the previous token and its position."""

    vocab_size: int
    width: int = 32
    max_len: int = 64

    @nn.compact
    def __call__(self, inputs_BxT, inputs_positions_BxT):
        previous_BxT = jnp.pad(inputs_BxT, ((0, 0), (1, 0)))[:, :-1]  # lm1b's shift_right
        h = nn.Embed(self.vocab_size, self.width)(previous_BxT)
        h = h + nn.Embed(self.max_len, self.width)(inputs_positions_BxT)
        h = nn.gelu(nn.Dense(self.width)(h))
        return nn.Dense(self.vocab_size)(h)


def compute_weighted_cross_entropy(logits, targets, weights, label_smoothing=0.0):
    """lm1b's loss, as it is there: smoothed cross-entropy summed with 0/1 weights."""
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    normalizing_constant = -(
        confidence * jnp.log(confidence) + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
    )
    soft_targets = jnp.where(jax.nn.one_hot(targets, vocab_size) > 0, confidence, low_confidence)
    loss = -jnp.sum(soft_targets * nn.log_softmax(logits), axis=-1) - normalizing_constant
    return (loss * weights).sum(), weights.sum()


def plain_train_step(state, batch, label_smoothing=0.1):
    inputs = batch["inputs"]

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, inputs, batch["inputs_position"])
        weights = jnp.where(inputs > 0, 1, 0).astype(jnp.float32)
        loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights, label_smoothing)
        mean_loss = loss / weight_sum
        return mean_loss, {}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, aux


def goldfish_train_step(state, batch, goldfish, label_smoothing=0.1):
    inputs = batch["inputs"]

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, inputs, batch["inputs_position"])
        mean_loss, aux = gf_jax.loss_fn(logits, inputs, goldfish, pad_id=0, label_smoothing=label_smoothing,
                                        positions_BxT=batch["inputs_position"])
        return mean_loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, aux


def packed_batch(batch_size=8, length=64, vocab_size=100, seed=0):
    """lm1b-style packed rows: documents back to back, then padding (id 0)."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((batch_size, length), np.int32)
    positions = np.zeros_like(inputs)
    segmentation = np.zeros_like(inputs)
    for row in range(batch_size):
        column, segment = 0, 1
        while column < length - 8:
            n = int(rng.integers(4, 30))
            n = min(n, length - 8 - column)
            inputs[row, column : column + n] = rng.integers(1, vocab_size, size=n)
            positions[row, column : column + n] = np.arange(n)
            segmentation[row, column : column + n] = segment
            column, segment = column + n, segment + 1
    return {"inputs": inputs, "inputs_position": positions, "inputs_segmentation": segmentation}


def create_state(vocab_size=100, seed=0):
    model = TinyDecoder(vocab_size)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(seed), dummy, dummy)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def sharded_steps(mesh):
    """Both steps under ``jax.jit``: the batch split over every device, parameters replicated
    (lm1b's data-parallel layout). The goldfish config has no leaves, so it needs no sharding."""
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    plain = jax.jit(plain_train_step, in_shardings=(None, data))
    goldfish = jax.jit(goldfish_train_step, in_shardings=(None, data, None))
    return plain, goldfish, data


if __name__ == "__main__":
    # lm1b's mesh: one data axis with automatic (GSPMD) sharding, as Linen layers expect.
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    plain, goldfish_step, data = sharded_steps(mesh)
    state = create_state()
    batch = jax.device_put(packed_batch(), data)
    for step in range(5):
        state, loss, aux = goldfish_step(state, batch, gf_jax.GoldfishConfig(k=4, h=13))
        print(f"step {step}: loss {float(loss):.4f}, kept {int(aux['n_kept'])} of {int(aux['n_valid'])}")
