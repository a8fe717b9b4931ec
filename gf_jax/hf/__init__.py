"""Hugging Face LLaMA-family checkpoints in and out (LLaMA 2/3/3.1/3.2, Mistral, Qwen2, Qwen3).

    model, config, tokenizer = gf_jax.checkpoint.load_model("path/to/hf_dir")   # import
    python -m gf_jax.hf export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]      # export
    python -m gf_jax.hf export LORA_RUN OUT_DIR --merge-lora | --peft             # a LoRA run
    python -m gf_jax.hf import HF_DIR RUN_DIR                                     # run dir at step 0

Files: ``config`` (config.json <-> ModelConfig), ``weights`` (tensor names and layouts),
``safetensors_io`` (memory-mapped reading, streaming sharded writing), ``load`` (parameters
straight onto their device shards), ``tokenizer`` (tokenizer.json behind gf_jax's tokenizer
interface), ``export`` (run directory -> HF directory), ``runs`` (HF directory -> run directory),
``peft`` (LoRA adapters <-> PEFT adapter directories).
This module imports nothing heavy, so ``gf_jax.tokenizer`` can use ``gf_jax.hf.tokenizer``.
"""

from __future__ import annotations

import os


def is_hf_dir(path: str) -> bool:
    """True for a local Hugging Face model directory (a ``config.json`` with ``architectures`` or
    ``model_type``), False for anything else (e.g. a gf_jax run directory)."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return False
    import json

    try:
        with open(config) as f:
            values = json.load(f)
    except ValueError:
        return False
    return isinstance(values, dict) and ("architectures" in values or "model_type" in values)
