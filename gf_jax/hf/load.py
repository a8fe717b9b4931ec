"""Loading a Hugging Face directory's weights straight onto their device shards.

Every parameter is built with ``jax.make_array_from_callback``: the callback runs once per
addressable shard and reads only that shard's rows/columns from the memory-mapped safetensors
file, converted to gf_jax's layout. A process therefore reads only what its own devices hold
(multi-process runs included), and after each parameter its file pages are dropped, so the host
never holds a second full copy of the model.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from gf_jax.hf import weights
from gf_jax.hf.safetensors_io import SafetensorsReader
from gf_jax.model import layers
from gf_jax.model.config import ModelConfig
from gf_jax.model.sharding import shardings_on
from gf_jax.model.transformer import abstract_model


def _check_tensors(reader: SafetensorsReader, names: dict, config: ModelConfig, hf_dir: str) -> None:
    wanted = {hf for hf, _ in names.values()}
    missing = sorted(wanted - set(reader.files))
    if missing:
        raise ValueError(f"{hf_dir!r} lacks tensor {missing[0]} that its config.json implies; "
                         "the checkpoint does not match its config (re-download or re-export it).")
    extra = [n for n in reader.files if n not in wanted and not n.endswith(weights.IGNORED_SUFFIXES)
             and not (config.tie_embeddings and n == "lm_head.weight")]  # tied: HF ignores a stored head
    if extra:
        raise ValueError(f"{hf_dir!r} has tensor {sorted(extra)[0]}, a feature gf_jax's model lacks; "
                         "only LLaMA/Mistral/Qwen2/Qwen3 layouts can be imported.")


def load_params(hf_dir: str, abstract_state, shardings, config: ModelConfig):
    """Reads the parameters of ``hf_dir`` into an ``nnx.State`` shaped like ``abstract_state``.

    Args:
      hf_dir: a Hugging Face model directory (safetensors weights).
      abstract_state: ``nnx.split(nnx.eval_shape(lambda: Transformer(config, ...)))[1]``; its
        leaves' dtypes are the dtypes the arrays get (the checkpoint's are cast). Either block
        layout: a stacked parameter (``model.scan_layers``) is filled from every layer's tensor.
      shardings: a matching tree of ``jax.sharding.Sharding`` (e.g. from
        ``gf_jax.model.sharding.model_shardings``): where each array is placed.
      config: the ModelConfig ``abstract_state`` was built from.
    """
    reader = SafetensorsReader(hf_dir)
    names = weights.parameter_names(config)
    _check_tensors(reader, names, config, hf_dir)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    leaves = []
    for path, variable in nnx.to_flat_state(abstract_state):
        sharding = flat_shardings[path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        array = _read_parameter(reader, names, path, variable.shape, variable.dtype, sharding, hf_dir)
        leaves.append((path, variable.replace(array)))
    return nnx.from_flat_state(leaves)


def _read_parameter(reader: SafetensorsReader, names: dict, path: tuple, shape, dtype, sharding, hf_dir: str):
    """One parameter of ours, each device shard read from the HF tensor(s) it covers. A stacked
    parameter's leading axis runs over the layers: shard rows come from each layer's tensor."""
    stacked = layers.is_stacked(path)
    sources = [names[layers.unrolled_path(path, i)] for i in range(shape[0])] if stacked else [names[path]]
    layout, layer_shape = sources[0][1], tuple(shape[1:] if stacked else shape)
    expected = weights.hf_shape(layout, layer_shape)
    for hf_name, _ in sources:
        if reader.shape(hf_name) != expected:
            raise ValueError(f"tensor {hf_name} in {hf_dir!r} has shape {reader.shape(hf_name)}, but its "
                             f"config.json implies {expected}; the checkpoint does not match its config.")
    views = [reader.view(hf_name) for hf_name, _ in sources]

    def read(index):
        if not stacked:
            return weights.read_block(views[0], layout, layer_shape, index).astype(dtype, copy=False)
        rows = range(*index[0].indices(shape[0])) if index else range(shape[0])
        return np.stack([weights.read_block(views[i], layout, layer_shape, index[1:]) for i in rows]).astype(dtype)

    array = jax.make_array_from_callback(tuple(shape), sharding, read)
    array.block_until_ready()  # the pages may be dropped only once the shards hold copies
    views.clear()  # drop the memory maps before their pages are released
    for hf_name, _ in sources:
        reader.release(hf_name)
    return array


def load_model(hf_dir: str, config: ModelConfig, *, mesh=None):
    """The ``Transformer`` of ``hf_dir`` with ``config`` (``gf_jax.hf.config.model_config_from_hf``), its
    parameters on ``mesh`` by the logical-axis rules, or on the first local device."""
    graphdef, abstract_state = abstract_model(config)
    state = load_params(hf_dir, abstract_state, shardings_on(abstract_state, mesh), config)
    return nnx.merge(graphdef, state)


def numpy_state(model) -> dict[tuple, np.ndarray]:
    """Host copies of every parameter, by state path (for tests and small models)."""
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
