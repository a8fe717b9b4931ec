"""LoRA in the model: low-rank adapters on the projection weights, trained while the base stays frozen.

``model.lora: {rank, alpha, targets, dropout}`` (:class:`gf_jax.model.config.LoRAConfig`; ``rank:
0``, the default, means no adapters). Each targeted projection ``W`` (``q k v o`` of attention,
``gate up down`` of the MLP) gets an ``nnx.LoRA`` adapter ``A`` (``I x r``) and ``B`` (``r x O``,
zeros at the start, so step 0 computes exactly the base model), and computes
``x W + (alpha / r) * dropout(x) A B`` with ``x`` flattened to the projection's input features
``I`` (``D``, or ``N * H`` for ``o``) and the result reshaped to its output (``N x H`` for ``q``).
Adapters are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``) in float32 whatever
``model.param_dtype`` the base has; the train step takes gradients and optimizer state for them
only (:func:`trainable`).

Dropout masks come from an explicit key: the train step passes one key to the model, the model
splits it into one key per layer (``layer_keys``: the same keys in both block layouts, so a
scanned model draws the masks an unrolled one does) and each adapter folds in its target's index.

Here too: a model state split into base and adapters and joined back, and each adapter's update
as a weight delta (:func:`adapter_updates`; ``gf_jax.model.transforms.merged`` folds them in).
Saving, loading and checking a run's adapters against its base: ``gf_jax.run.adapters``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gf_jax.model.config import LORA_TARGETS

# The base weight (of Attention or MLP) each target updates.
BASE_WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
ADAPTERS = "lora"  # attribute of Attention / MLP holding the adapters (an nnx.Dict by target)


# ---- adapters in the model ---------------------------------------------------------------------


def _a_init(in_name):
    # PEFT's kaiming_uniform_(a=sqrt(5)) on the A matrix: uniform(-1/sqrt(I), 1/sqrt(I)).
    init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)
    return nnx.with_partitioning(init, (in_name, None), eager_sharding=False)


def _b_init(out_name):
    return nnx.with_partitioning(nnx.initializers.zeros, (None, out_name), eager_sharding=False)


def _in_input_dtype(arrays, dtype=None):
    """``promote_dtype`` of the adapters: compute in the input's dtype (the model's compute dtype),
    as the base weights do, instead of promoting bfloat16 activations to the adapters' float32."""
    del dtype
    return tuple(a.astype(arrays[0].dtype) for a in arrays)


def make_adapters(config, shapes: dict, rngs: nnx.Rngs) -> nnx.Dict | None:
    """The adapters of one module: ``nnx.Dict`` target -> ``nnx.LoRA``, or None when none applies.

    ``config``: the ModelConfig; ``shapes``: target -> ``(in_features, out_features, in_name,
    out_name)`` for this module's projections (logical axis names of the flattened input and
    output, so gf_jax.model.sharding places A and B like the base weight's matching dimensions).
    """
    lora = config.lora
    chosen = [t for t in LORA_TARGETS if t in shapes and lora.enabled and t in lora.targets]
    if not chosen:
        return None  # no attribute at all: a model without adapters keeps its state unchanged
    return nnx.Dict({
        target: nnx.LoRA(
            shapes[target][0], lora.rank, shapes[target][1], param_dtype=jnp.float32,
            a_initializer=_a_init(shapes[target][2]), b_initializer=_b_init(shapes[target][3]),
            promote_dtype=_in_input_dtype, rngs=rngs,
        )
        for target in chosen
    })


def add_update(module, target: str, y_BxTx_, x_BxTx_, config, dropout_key=None):
    """``y + (alpha / r) * dropout(x) A B`` when ``module`` has an adapter for ``target``, else ``y``.

    ``x_BxTx_`` is the projection's input (trailing axes flattened to the adapter's input features),
    ``y_BxTx_`` its output (the update is reshaped to it); both in the compute dtype.
    ``dropout_key``: the layer's key (training steps only; None = no dropout).
    """
    adapters = getattr(module, ADAPTERS, None)
    if adapters is None or target not in adapters:
        return y_BxTx_
    adapter = adapters[target]
    x_BxTxI = x_BxTx_.reshape(*x_BxTx_.shape[:2], adapter.in_features)
    if dropout_key is not None and config.lora.dropout > 0:
        x_BxTxI = dropout(x_BxTxI, config.lora.dropout, jax.random.fold_in(dropout_key, LORA_TARGETS.index(target)))
    update_BxTxO = adapter(x_BxTxI) * jnp.asarray(config.lora.scale, x_BxTxI.dtype)
    return y_BxTx_ + update_BxTxO.reshape(y_BxTx_.shape)


def dropout(x, rate: float, key):
    """Inverted dropout: each element kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def layer_keys(key, n_layers: int):
    """One dropout key per layer (``L`` keys), or None when ``key`` is None. Layer ``l`` gets the
    same key in either block layout."""
    return None if key is None else jax.random.split(key, n_layers)


def dropout_active(model_config) -> bool:
    """Whether a training step draws adapter dropout masks at all."""
    return model_config.lora.enabled and model_config.lora.dropout > 0


# ---- what trains, and the state split ----------------------------------------------------------


def trainable(model_config):
    """The nnx filter of the parameters the optimizer updates: the adapters of a LoRA model, else
    every parameter."""
    return nnx.LoRAParam if model_config.lora.enabled else nnx.Param


def split(state) -> tuple[nnx.State, nnx.State]:
    """``(base, adapters)`` of a model state (or of a tree of shardings / abstract leaves like it)."""
    adapters, base = nnx.split_state(state, nnx.LoRAParam, ...)
    return base, adapters


def join(base, adapters) -> nnx.State:
    """The full model state of :func:`split`'s two parts."""
    return nnx.merge_state(base, adapters)


def adapter_updates(flat_state: dict, scale: float) -> dict:
    """Base weight path -> ``scale * A @ B`` in float32, flattened ``... x I x O`` (leading axes,
    e.g. stacked layers, kept), for every adapter in a flat state (path -> Variable or array)."""
    def value(x):
        return x.get_value() if isinstance(x, nnx.Variable) else x

    updates = {}
    for path in flat_state:
        if path[-1] != "lora_a":
            continue
        module_path, target = path[:-3], path[-2]  # (..., "attn", "lora", "q", "lora_a")
        a = jnp.asarray(value(flat_state[path]), jnp.float32)
        b = jnp.asarray(value(flat_state[(*path[:-1], "lora_b")]), jnp.float32)
        updates[(*module_path, BASE_WEIGHTS[target])] = scale * jnp.einsum("...ir,...ro->...io", a, b)
    return updates
