"""Goldfish loss in a Flax NNX training step on an explicit-axis mesh with a sharded vocabulary.

The layout of flax ``examples/gemma``: ``jax.make_mesh`` (explicit axes by default) with ``fsdp``
and ``tensor`` axes, logits sharded ``P("fsdp", None, "tensor")``. gf_jax picks the target logit
and the log-partition where the vocabulary shards lie, so the logits are never gathered. The whole
change from the plain step (``plain_train_step``) to goldfish (``goldfish_train_step``)::

    -    loss = cross_entropy(logits, batch["targets"], batch["mask"])
    +    loss, aux = gf_jax.loss_fn(logits, batch["targets"], goldfish, weights_BxT=batch["mask"],
    +                               positions_BxT=batch["positions"])

For long sequences, skip the B x T x V logits with the chunked loss and the model's own head::

    loss, aux = gf_jax.chunked_loss_fn(model.hidden(inputs), model.head, targets, goldfish, ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import gf_jax


class TinyLM(nnx.Module):
    """Embedding (replicated), one MLP layer, and an output head whose vocabulary is split over
    ``tensor`` (a D x V kernel sharded ``P(None, "tensor")``), like Gemma's logits."""

    def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.5)
        self.embedding = nnx.Param(jax.device_put(init(rngs.params(), (vocab_size, width)), P(None, None)))
        self.mlp = nnx.Param(jax.device_put(init(rngs.params(), (width, width)), P(None, None)))
        self.head_DxV = nnx.Param(jax.device_put(init(rngs.params(), (width, vocab_size)), P(None, "tensor")))
        self.bias_V = nnx.Param(jax.device_put(jnp.zeros((vocab_size,)), P("tensor")))

    def hidden(self, inputs_BxT):
        hidden_BxTxD = self.embedding[...].at[inputs_BxT].get(out_sharding=P("fsdp", None, None))
        return hidden_BxTxD + jax.nn.gelu(hidden_BxTxD @ self.mlp[...])

    def head(self, hidden_BxTxD):
        return hidden_BxTxD @ self.head_DxV[...] + self.bias_V[...]  # P("fsdp", None, "tensor")

    def __call__(self, inputs_BxT):
        return self.head(self.hidden(inputs_BxT))


def cross_entropy(logits, targets, mask):
    """A plain masked cross-entropy (Gemma-style one-hot), as the step had it."""
    one_hot = jax.nn.one_hot(targets, logits.shape[-1])
    per_token = -jnp.sum(one_hot * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
    return jnp.sum(per_token * mask) / jnp.sum(mask)


@nnx.jit
def plain_train_step(model, optimizer, batch):
    def loss_fn(model):
        logits = model(batch["inputs"])
        loss = cross_entropy(logits, batch["targets"], batch["mask"])
        return loss, {}

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux


@nnx.jit
def goldfish_train_step(model, optimizer, batch, goldfish):
    def loss_fn(model):
        logits = model(batch["inputs"])
        loss, aux = gf_jax.loss_fn(logits, batch["targets"], goldfish, weights_BxT=batch["mask"],
                                   positions_BxT=batch["positions"])
        return loss, aux

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux


@nnx.jit
def chunked_goldfish_train_step(model, optimizer, batch, goldfish):
    """The same step without the B x T x V logits: the model's own head, chunk by chunk."""

    def loss_fn(model):
        return gf_jax.chunked_loss_fn(model.hidden(batch["inputs"]), model.head, batch["targets"], goldfish,
                                      weights_BxT=batch["mask"], positions_BxT=batch["positions"], chunk_size=16)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux


def make_batch(batch_size=8, length=48, vocab_size=128, seed=0):
    """One token stream per row, cut into inputs and next-token targets; the last rows padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(batch_size, length + 1), dtype=np.int32)
    mask = np.ones((batch_size, length), np.float32)
    mask[batch_size // 2 :, length * 3 // 4 :] = 0
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": mask,
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
    }
    return {k: jax.device_put(v, P("fsdp")) for k, v in batch.items()}  # rows split over fsdp


def create(vocab_size=128, width=32, seed=0):
    """Model and optimizer; call under ``jax.set_mesh(mesh)``."""
    model = TinyLM(vocab_size, width, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def make_mesh():
    # 2 x 4 over 8 devices; jax.make_mesh gives explicit axes by default.
    return jax.make_mesh((2, jax.device_count() // 2), ("fsdp", "tensor"))


if __name__ == "__main__":
    # Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU.
    with jax.set_mesh(make_mesh()):
        model, optimizer = create()
        batch = make_batch()
        for step in range(5):
            loss, aux = goldfish_train_step(model, optimizer, batch, gf_jax.GoldfishConfig(k=4, h=13))
            print(f"step {step}: loss {float(loss):.4f}, kept {int(aux['n_kept'])} of {int(aux['n_valid'])}")
