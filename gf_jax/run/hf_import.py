"""A run directory made from a Hugging Face model: ``python -m gf_jax.hf import HF_DIR RUN_DIR``.

The run holds the model's parameters at step 0 (no optimizer state) and, in ``RUN/hf/``, the
original's ``config.json``, generation config and tokenizer files, so it trains, evaluates and
exports (with the original's architecture keys and tokenizer) like any run.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from gf_jax.config import save_config, to_dict
from gf_jax.hf import load as hf_load
from gf_jax.run.checkpoint import Checkpointer
from gf_jax.run.rundir import RunDir, copy_metadata
from gf_jax.run.source import hf_run_config
from gf_jax.tokenizer import load_tokenizer


def import_to_run(hf_dir: str, run_dir: str, *, param_dtype: str = "float32") -> str:
    """Writes ``run_dir`` at step 0 (parameters only, no optimizer state) from ``hf_dir``."""
    run = RunDir(run_dir)
    if os.path.exists(run.checkpoints):
        raise FileExistsError(f"{run_dir!r} already holds checkpoints; choose a new run directory.")
    os.makedirs(run_dir, exist_ok=True)
    copy_metadata([hf_dir], run.hf)
    tokenizer = load_tokenizer(run.hf)
    config = hf_run_config(run.hf, tokenizer, param_dtype=param_dtype)
    # The run refers to its own copy of the tokenizer (RUN/hf), found again by source.run_tokenizer.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=None))
    model = hf_load.load_model(hf_dir, config.model)
    save_config(config, run.config)
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        ckpt.save(0, model_state=nnx.state(model), opt_state=None, loop_state={"step": 0},
                  config_dict=to_dict(config))
        ckpt.wait()
    finally:
        ckpt.close()
    return run_dir
