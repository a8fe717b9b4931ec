"""Starting a run from a pretrained model: ``train.init_from=PATH``.

PATH is a Hugging Face model directory, a gf_jax run directory, or ``RUN_DIR@STEP``. The new run
takes PATH's parameters (placed straight onto their shardings; a fresh optimizer), PATH's
architecture (a ``model:`` field in the config that disagrees is an error naming it), and PATH's
tokenizer unless ``data.tokenizer`` is set. A run directory that already holds checkpoints
resumes its own parameters as any other run; PATH then only supplies the architecture.
"""

from __future__ import annotations

import dataclasses

from gf_jax import rundir
from gf_jax.checkpoint import (
    ARCHITECTURE_FIELDS,
    find_tokenizer,
    load_pretrained_params,
    pretrained_model_config,
    split_step,
)
from gf_jax.config import RunConfig
from gf_jax.model import ModelConfig

# Tokenizer and architecture files a run keeps under RUN_DIR/hf when its tokenizer is a Hugging
# Face one (so evaluation reloads it with its special tokens, and export restores the original).
HF_SUBDIR = "hf"


def apply_init_from(config: RunConfig) -> RunConfig:
    """``config`` with the architecture (and, unless set, the tokenizer) of ``train.init_from``."""
    spec = config.train.init_from
    if not spec:
        return config
    source = pretrained_model_config(spec)
    defaults = ModelConfig()
    updates = {}
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(config.model, name), getattr(source, name)
        if mine == theirs:
            continue
        if mine != getattr(defaults, name):  # set in the config, and not to PATH's value
            raise ValueError(
                f"train.init_from={spec} has model.{name}={theirs!r} but the config sets {mine!r}; remove "
                f"model.{name} from the config (the architecture comes from init_from)."
            )
        updates[name] = theirs
    model = dataclasses.replace(config.model, **updates)
    data = config.data
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=pretrained_tokenizer_path(spec))
    return dataclasses.replace(config, model=model, data=data)


def pretrained_tokenizer_path(spec: str) -> str:
    """The tokenizer that comes with ``spec``: an HF directory itself, or a run's tokenizer copy."""
    from gf_jax.hf import is_hf_dir

    path, _ = split_step(spec)
    if is_hf_dir(path):
        return path
    return find_tokenizer(path, RunConfig())


def apply_init_adapters(config: RunConfig) -> RunConfig:
    """``config`` with ``model.lora`` from ``train.init_adapters`` (a PEFT adapter directory)."""
    if not config.train.init_adapters:
        return config
    from gf_jax.hf.peft import with_peft_settings

    return dataclasses.replace(config, model=with_peft_settings(config.model, config.train.init_adapters))


def load_init_adapters(peft_dir: str, fns):
    """The adapters of ``peft_dir`` on the run's shardings (``fns``: gf_jax.step.StepFunctions)."""
    from gf_jax import lora
    from gf_jax.hf.peft import load_adapters

    return load_adapters(peft_dir, lora.split(fns.abstract_model_state)[1], lora.split(fns.model_shardings)[1])


def load_init_params(spec: str, fns, model_config: ModelConfig):
    """The parameters of ``spec`` as this run's model state, on the run's shardings (``fns``:
    gf_jax.step.StepFunctions). With ``model.lora``, the base parameters only (no adapters)."""
    from gf_jax import lora

    abstract, shardings = fns.abstract_model_state, fns.model_shardings
    if model_config.lora.enabled:
        abstract, shardings = lora.split(abstract)[0], lora.split(shardings)[0]
    return load_pretrained_params(spec, abstract, shardings, model_config)


def tokenizer_copy_path(run_dir: str, tokenizer) -> str:
    """Where a run keeps its tokenizer: ``tokenizer.model`` (sentencepiece) or ``hf/`` (HF files)."""
    from gf_jax.checkpoint import TOKENIZER_FILE
    from gf_jax.hf.tokenizer import HFTokenizer

    return rundir.join(run_dir, HF_SUBDIR if isinstance(tokenizer, HFTokenizer) else TOKENIZER_FILE)


def existing_tokenizer_copy(run_dir: str) -> str | None:
    """The tokenizer copy of a run directory written earlier (a resume), or None."""
    from gf_jax.checkpoint import TOKENIZER_FILE

    for name, marker in ((TOKENIZER_FILE, None), (HF_SUBDIR, "tokenizer.json")):
        path = rundir.join(run_dir, name)
        if rundir.exists(rundir.join(path, marker) if marker else path):
            return path
    return None


def tokenizer_file(path: str) -> str:
    """The file whose bytes identify a tokenizer copy (``hf/`` -> its tokenizer.json)."""
    hf_json = rundir.join(path, "tokenizer.json")
    return hf_json if rundir.exists(hf_json) else path


def write_tokenizer_copy(tokenizer, copy_path: str, init_from: str = "") -> None:
    """Copies the tokenizer (an HF tokenizer with its special-token files, plus the original's
    ``config.json`` / ``generation_config.json`` when starting from an HF model) to ``copy_path``."""
    import os

    from gf_jax.hf.runs import METADATA_FILES

    if not copy_path.endswith(HF_SUBDIR):
        rundir.copy_file(tokenizer.path, copy_path)
        return
    rundir.makedirs(copy_path)
    from gf_jax.hf import is_hf_dir

    source_dirs = [os.path.dirname(os.path.abspath(tokenizer.path))]
    if init_from and is_hf_dir(split_step(init_from)[0]):
        source_dirs.append(split_step(init_from)[0])
    for source in source_dirs:
        for name in METADATA_FILES:
            src = os.path.join(source, name)
            if os.path.isfile(src) and not rundir.exists(rundir.join(copy_path, name)):
                rundir.copy_file(src, rundir.join(copy_path, name))
