"""A trained or pretrained model, its run config and its tokenizer, from any model source.

    model, config, tokenizer = load_model("runs/tiny")          # newest checkpoint that restores
    model, config, tokenizer = load_model("runs/tiny@200")      # that step
    model, config, tokenizer = load_model("/models/Llama-3.2-1B")   # a Hugging Face directory
    model, config, tokenizer = load_model("out/adapter", base="/models/Llama-3.2-1B")   # PEFT

Only parameters are read (never the optimizer state), each straight onto its device shards.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from gf_jax.config import RunConfig, config_from_dict
from gf_jax.hf import load as hf_load
from gf_jax.hf.peft import read_adapter_config, with_peft_settings
from gf_jax.model import lora
from gf_jax.model.sharding import abstract_with_shardings, shardings_on
from gf_jax.model.transformer import abstract_model
from gf_jax.run import adapters
from gf_jax.run.checkpoint import Checkpointer
from gf_jax.run.source import ModelSource, hf_run_config, run_tokenizer
from gf_jax.tokenizer import load_tokenizer


def load_model(source: str | ModelSource, step: int | None = None, *, mesh=None, param_dtype: str | None = None,
               base: str | None = None, scan_layers: bool | None = None):
    """Restores a model from a run directory, a Hugging Face directory or a PEFT adapter directory.

    Args:
      source: a run directory (``RUN_DIR@STEP`` for a step), an HF directory or a PEFT directory
        (``gf_jax.run.source.ModelSource``).
      step: which checkpoint of a run (default: its ``@STEP``, else the newest that restores).
      mesh: where to place the parameters (default: the first local device).
      param_dtype: HF directories (and the HF base of a PEFT directory) only: the parameters' dtype
        (default: the checkpoint's).
      base: LoRA runs and PEFT directories only: the base model (default: the run's
        ``train.init_from``; a PEFT directory's ``base_model_name_or_path``); a run's base must be
        the model its adapters were trained on (its fingerprint is checked).
      scan_layers: the block layout of the returned model (``model.scan_layers``; default: the
        run's own, unrolled for an HF directory); a checkpoint in the other layout is converted.

    Returns:
      (model: gf_jax.model.Transformer, run_config: gf_jax.config.RunConfig, tokenizer). A LoRA
      run's model is its base with the adapters applied (``gf_jax.model.transforms.merged`` folds
      them into the weights).
    """
    source = ModelSource.parse(source)
    if source.kind == "hf":
        return _load_hf(source.path, mesh=mesh, param_dtype=param_dtype, scan_layers=scan_layers)
    if source.kind == "peft":
        return _load_peft(source.path, base, mesh=mesh, param_dtype=param_dtype)
    return _load_run(source.path, step if step is not None else source.step, mesh=mesh, base=base,
                     scan_layers=scan_layers)


def load_pretrained(source: str | ModelSource, *, mesh=None, param_dtype: str | None = None,
                    scan_layers: bool | None = None):
    """``(model, ModelConfig, tokenizer)`` of a run or HF source."""
    model, config, tokenizer = load_model(source, mesh=mesh, param_dtype=param_dtype, scan_layers=scan_layers)
    return model, config.model, tokenizer


def _load_hf(hf_dir: str, *, mesh=None, param_dtype: str | None = None, scan_layers: bool | None = None):
    tokenizer = load_tokenizer(hf_dir)
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    if scan_layers is not None:
        overrides["scan_layers"] = scan_layers
    config = hf_run_config(hf_dir, tokenizer, **overrides)
    return hf_load.load_model(hf_dir, config.model, mesh=mesh), config, tokenizer


def _load_run(run_dir: str, step: int | None, *, mesh=None, base: str | None = None,
              scan_layers: bool | None = None):
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        ckpt.step_for(None)  # a run without checkpoints is one sentence, before any restore
        if step is not None:
            ckpt.step_for(step)  # and so is a step it does not have

        def restore(step):
            config = config_from_dict(ckpt.saved_config(step))
            if scan_layers is not None:  # the layout asked for; Checkpointer.restore converts
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=scan_layers))
            graphdef, abstract_state = abstract_model(config.model)
            abstract = abstract_with_shardings(abstract_state, shardings_on(abstract_state, mesh))
            saved = adapters.saved_part(abstract, config.model)
            return config, graphdef, abstract, ckpt.restore(step, abstract_model=saved)

        if step is None:  # the newest checkpoint that restores; a corrupt one is skipped with a line why
            step, (config, graphdef, abstract, restored) = ckpt.restore_newest_good(restore)
        else:
            config, graphdef, abstract, restored = ckpt.restore_step(step, restore)
    finally:
        ckpt.close()
    state = restored["model"]
    if config.model.lora.enabled:
        state = adapters.with_base(state, restored["loop"].get("lora_base"), base or config.train.init_from,
                                   abstract, config.model, run_dir)
    tokenizer = load_tokenizer(run_tokenizer(ModelSource.parse(run_dir).run_dir, config))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer.path))
    return nnx.merge(graphdef, state), config, tokenizer


def _load_peft(peft_dir: str, base: str | None, *, mesh=None, param_dtype: str | None = None):
    """The base (an HF or run directory; default: the adapter's ``base_model_name_or_path`` when
    that is a local directory; an HF base in ``param_dtype``) with ``peft_dir``'s adapters applied."""
    _, recorded_base = read_adapter_config(peft_dir)
    base = base or recorded_base
    base_source = ModelSource.parse(base) if base else None
    if base_source is None or not os.path.isdir(base_source.path):
        raise FileNotFoundError(f"the base model of {peft_dir} ({recorded_base or 'not recorded'}) is not a local "
                                "directory; pass base=PATH (a Hugging Face or run directory).")
    base_model, config, tokenizer = load_model(base_source, mesh=mesh, param_dtype=param_dtype)
    model_config = with_peft_settings(config.model, peft_dir)
    graphdef, abstract = abstract_model(model_config)
    state = lora.join(nnx.state(base_model), adapters.peft_adapters(peft_dir, abstract, shardings_on(abstract, mesh)))
    config: RunConfig = dataclasses.replace(config, model=model_config,
                                            train=dataclasses.replace(config.train, init_from=os.path.abspath(base)))
    return nnx.merge(graphdef, state), config, tokenizer
