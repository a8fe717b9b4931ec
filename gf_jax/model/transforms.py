"""A model turned into another model of the same function: its blocks in the other layout, or its
LoRA adapters folded into the base weights (for an export without adapters)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gf_jax.model import layers
from gf_jax.model.config import LoRAConfig
from gf_jax.model.lora import adapter_updates
from gf_jax.model.transformer import abstract_model


def merged(model, param_dtype: str | None = None):
    """``model`` (a Transformer with adapters) as a Transformer without them whose weights are
    ``W + (alpha / r) A B``, computed in float32 and stored in ``param_dtype`` (default: the base's)."""
    config = model.config
    plain = dataclasses.replace(config, lora=LoRAConfig(), param_dtype=param_dtype or config.param_dtype)
    graphdef, abstract = abstract_model(plain)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    updates = adapter_updates(flat, config.lora.scale)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        value = flat[path].get_value()
        if path in updates:
            value = value.astype(jnp.float32) + updates[path].reshape(value.shape)
        leaves.append((path, variable.replace(value.astype(variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def relayout(model, scan_layers: bool):
    """``model`` (a gf_jax Transformer) with its blocks in the layout ``scan_layers`` asks for,
    each array on the devices (and shards) of its source; ``model`` itself when already so."""
    if model.config.scan_layers == scan_layers:
        return model
    graphdef, _ = abstract_model(dataclasses.replace(model.config, scan_layers=scan_layers))
    state = nnx.state(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return nnx.merge(graphdef, layers.convert(state, layers.other_layout(abstract)))
