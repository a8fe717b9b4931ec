"""Starting a run from a pretrained model: ``train.init_from`` and ``train.init_adapters``.

``train.init_from`` is a model source (``gf_jax.run.source``: a Hugging Face directory, a run
directory or ``RUN_DIR@STEP``). The new run takes its architecture (a ``model:`` field in the
config that disagrees is an error naming it), its tokenizer unless ``data.tokenizer`` is set, and
its parameters (``gf_jax.run.adapters.base_params``; a fresh optimizer). A run directory that
already holds checkpoints resumes its own parameters as any other run; the source then only
supplies the architecture. ``train.init_adapters`` (a PEFT directory) sets ``model.lora``.
"""

from __future__ import annotations

import dataclasses

from gf_jax.config import RunConfig
from gf_jax.hf.peft import with_peft_settings
from gf_jax.model.config import ARCHITECTURE_FIELDS, ModelConfig
from gf_jax.run.source import ModelSource, architecture, tokenizer_path


def apply_init_from(config: RunConfig) -> RunConfig:
    """``config`` with the architecture (and, unless set, the tokenizer) of ``train.init_from``."""
    if not config.train.init_from:
        return config
    source = ModelSource.parse(config.train.init_from)
    theirs_config = architecture(source)
    defaults = ModelConfig()
    updates = {}
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(config.model, name), getattr(theirs_config, name)
        if mine == theirs:
            continue
        if mine != getattr(defaults, name):  # set in the config, and not to the source's value
            raise ValueError(
                f"train.init_from={source} has model.{name}={theirs!r} but the config sets {mine!r}; remove "
                f"model.{name} from the config (the architecture comes from init_from)."
            )
        updates[name] = theirs
    model = dataclasses.replace(config.model, **updates)
    data = config.data
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=tokenizer_path(source))
    return dataclasses.replace(config, model=model, data=data)


def apply_init_adapters(config: RunConfig) -> RunConfig:
    """``config`` with ``model.lora`` from ``train.init_adapters`` (a PEFT adapter directory)."""
    if not config.train.init_adapters:
        return config
    return dataclasses.replace(config, model=with_peft_settings(config.model, config.train.init_adapters))
