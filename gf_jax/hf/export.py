"""A gf_jax model as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: config.json, generation_config.json, safetensors shards
(at most 5 GB each, with the index) and the tokenizer files.

A model imported from Hugging Face (or fine-tuned from one) exports with the original's
``config.json`` keys, generation config and tokenizer files (kept in ``RUN_DIR/hf``); a model
trained from scratch exports as ``LlamaForCausalLM`` (``Qwen2``/``Qwen3`` when it has q/k/v
biases / q/k norms) with its sentencepiece tokenizer. Tensors are converted and written one at a
time, so the host holds the model plus one tensor. Run it on one process.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
from flax import nnx

from gf_jax.hf import config as hf_config
from gf_jax.hf import weights
from gf_jax.hf.safetensors_io import MAX_SHARD_BYTES, NUMPY_DTYPES, write_sharded
from gf_jax.model import layers
from gf_jax.tokenizer.hf_tokenizer import TOKENIZER_FILES
from gf_jax.util import paths
from gf_jax.util.staging import check_target, staged_folder


def _hf_order(path: tuple) -> tuple:
    """HF's tensor order: embedding, layers in order, final norm, head (readable indexes)."""
    if path[0] == layers.UNROLLED:
        return (1, path[1], path[2:])
    return ({"embedding": 0, "final_norm": 2, "lm_head": 3}[path[0]], 0, ())


def _per_layer(flat) -> list:
    """``(path, array)`` of every parameter in the unrolled layout: a stacked parameter
    (``model.scan_layers``) gives one entry per layer, its slices cut lazily (on the device)."""
    out = []
    for path, variable in flat:
        array = variable.get_value()
        if layers.is_stacked(path):
            out += [(layers.unrolled_path(path, i), (array, i)) for i in range(array.shape[0])]
        else:
            out.append((path, (array, None)))
    return out


def tensor_specs(model, dtype: str) -> list:
    """``(hf_name, hf_shape, dtype, producer)`` of every parameter, producers converting lazily."""
    config = model.config
    names = weights.parameter_names(config)
    flat = sorted(_per_layer(nnx.to_flat_state(nnx.state(model, nnx.Param))), key=lambda kv: _hf_order(kv[0]))
    np_dtype = NUMPY_DTYPES[dtype]
    specs = []
    for path, (array, layer) in flat:
        hf_name, layout = names[path]
        shape = array.shape if layer is None else array.shape[1:]

        def produce(array=array, layer=layer, layout=layout):
            host = np.asarray(jax.device_get(array if layer is None else array[layer]))
            return np.ascontiguousarray(weights.to_hf(host, layout)).astype(np_dtype)

        specs.append((hf_name, weights.hf_shape(layout, shape), np_dtype, produce))
    return specs


def _special_ids(tokenizer) -> dict:
    def known(i):
        return i if i is not None and i >= 0 else None

    return {"bos_token_id": known(tokenizer.bos_id), "eos_token_id": known(tokenizer.eos_id),
            "pad_token_id": known(getattr(tokenizer, "pad_id", None))}


def _sentencepiece_tokenizer_config(tokenizer, add_bos: bool) -> dict:
    """tokenizer_config.json for a gf_jax sentencepiece model: transformers' LlamaTokenizer in
    legacy mode encodes exactly as sentencepiece does."""
    def piece(i):
        return tokenizer.id_to_piece(i) if i is not None and i >= 0 else None

    values = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": add_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
              "unk_token": piece(tokenizer._sp.unk_id()), "pad_token": piece(tokenizer.pad_id)}
    return {k: v for k, v in values.items() if v is not None}


def write_tokenizer(tokenizer, out_dir: str, source_dir: str | None, add_bos: bool) -> None:
    """The tokenizer files: the original's when there is one, else the model's own."""
    if source_dir is not None and any(os.path.isfile(os.path.join(source_dir, f)) for f in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source_dir, name)):
                shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
        return
    if tokenizer.path.endswith(".json") or not hasattr(tokenizer, "_sp"):  # HFTokenizer
        shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.json"))
        return
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
    config = _sentencepiece_tokenizer_config(tokenizer, add_bos)
    paths.write_json(os.path.join(out_dir, "tokenizer_config.json"), config)


def export_model(model, tokenizer, out_dir: str, *, dtype: str | None = None, source_dir: str | None = None,
                 add_bos: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> list[str]:
    """Writes ``model`` (a gf_jax Transformer) and ``tokenizer`` as a Hugging Face directory.

    ``dtype``: of the written weights (default: the model's param_dtype). ``source_dir``: the
    HF metadata the model was imported from (its config.json keys and tokenizer files are kept).
    ``out_dir`` must be new or empty, or an earlier export with ``overwrite`` (replaced whole);
    it appears only once complete (``gf_jax.util.staging``). Returns the file names written.
    """
    config = model.config
    if config.lora.enabled:
        raise ValueError("the model has LoRA adapters; merge them first (gf_jax.model.transforms.merged) or export "
                         "them with gf_jax.hf.peft.export_peft.")
    dtype = dtype or config.param_dtype
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(NUMPY_DTYPES)}, got {dtype!r}.")
    check_target(out_dir, overwrite=overwrite, what="hf export")
    with staged_folder(out_dir, marker={"kind": "hf export"}) as tmp:
        return _write_model(model, tokenizer, tmp, dtype, source_dir, add_bos, max_shard_bytes)


def _write_model(model, tokenizer, out_dir, dtype, source_dir, add_bos, max_shard_bytes) -> list[str]:
    base = hf_config.read_config(source_dir) if source_dir else None
    ids = _special_ids(tokenizer)
    files = write_sharded(out_dir, tensor_specs(model, dtype), max_shard_bytes=max_shard_bytes)
    paths.write_json(os.path.join(out_dir, "config.json"),
                     hf_config.hf_config_from_model(model.config, dtype=dtype, special_ids=ids, base=base))
    generation = os.path.join(source_dir, "generation_config.json") if source_dir else None
    if generation and os.path.isfile(generation):
        shutil.copyfile(generation, os.path.join(out_dir, "generation_config.json"))
    else:
        paths.write_json(os.path.join(out_dir, "generation_config.json"),
                         {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}})
    write_tokenizer(tokenizer, out_dir, source_dir, add_bos)
    return [*files, "config.json", "generation_config.json"]
