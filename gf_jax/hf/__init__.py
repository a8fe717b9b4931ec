"""Hugging Face formats in and out: codecs between gf_jax's model and HF's files (LLaMA 2/3/3.1/3.2,
Mistral, Qwen2, Qwen3), and the ``python -m gf_jax.hf export|import`` command.

    python -m gf_jax.hf export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]      # export
    python -m gf_jax.hf export LORA_RUN OUT_DIR --merge-lora | --peft             # a LoRA run
    python -m gf_jax.hf import HF_DIR RUN_DIR                                     # run dir at step 0

Codecs, which know HF's formats and gf_jax's model and nothing of runs: ``config`` (config.json <->
ModelConfig), ``weights`` (tensor names and layouts), ``safetensors_io`` (memory-mapped reading,
streaming sharded writing), ``load`` (parameters straight onto their device shards), ``export``
(a model in memory -> an HF directory), ``peft`` (LoRA adapters <-> PEFT adapter directories).
The tokenizer side is ``gf_jax.tokenizer.hf_tokenizer``. Runs made from or exported to HF
directories: ``gf_jax.run.hf_import`` and ``gf_jax.run.export``.
"""

from __future__ import annotations

import json
import os

from gf_jax.tokenizer.hf_tokenizer import TOKENIZER_FILES

CONFIG_FILE = "config.json"
# The files of an HF model besides its weights: kept by a run made from one, so its exports get
# the original's architecture keys, generation config and tokenizer back.
METADATA_FILES = (CONFIG_FILE, "generation_config.json", *TOKENIZER_FILES)


def is_hf_dir(path: str) -> bool:
    """True for a local Hugging Face model directory (a ``config.json`` with ``architectures`` or
    ``model_type``), False for anything else (e.g. a gf_jax run directory)."""
    config = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            values = json.load(f)
    except ValueError:
        return False
    return isinstance(values, dict) and ("architectures" in values or "model_type" in values)
