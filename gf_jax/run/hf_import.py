"""A run directory made from a Hugging Face model: ``python -m gf_jax.hf import HF_DIR RUN_DIR``.

The run holds the model's parameters at step 0 (no optimizer state) and, in ``RUN/hf/``, the
original's ``config.json``, generation config and tokenizer files, so it trains (``train.run_dir=RUN``
starts from these parameters with a fresh optimizer), evaluates and exports (with the original's
architecture keys and tokenizer) like any run.

The weights are read and checked before anything is written, and the run directory is written into
a hidden folder beside it and renamed into place when complete (``gf_jax.util.staging``): a failed
or interrupted import leaves nothing a later run could mistake for its own, and can be retried.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from gf_jax.config import save_config, to_dict
from gf_jax.hf import load as hf_load
from gf_jax.run.checkpoint import Checkpointer
from gf_jax.run.rundir import RunDir, copy_metadata
from gf_jax.run.source import ModelSource, hf_run_config
from gf_jax.tokenizer import load_tokenizer
from gf_jax.util.staging import check_target, is_own_output, staged_folder


def import_to_run(hf_dir: str, run_dir: str, *, param_dtype: str = "float32", overwrite: bool = False) -> str:
    """Writes ``run_dir`` at step 0 (parameters only, no optimizer state) from ``hf_dir``.
    ``run_dir`` must be new or empty, or (with ``overwrite``) an earlier import not trained since."""
    check_import_target(run_dir, overwrite=overwrite)
    hf_dir = ModelSource.parse(hf_dir).path  # a GGUF file: its converted HF directory
    tokenizer = load_tokenizer(hf_dir)
    config = hf_run_config(hf_dir, tokenizer, param_dtype=param_dtype)
    # The run refers to its own copy of the tokenizer (RUN/hf), found again by source.run_tokenizer.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=None))
    model = hf_load.load_model(hf_dir, config.model)  # every tensor read and checked before a write
    with staged_folder(run_dir, marker={"kind": "hf import", "source": os.path.abspath(hf_dir)}) as staged:
        run = RunDir(staged)
        copy_metadata([hf_dir], run.hf)
        save_config(config, run.config)
        ckpt = Checkpointer(staged, async_save=False)
        try:
            ckpt.save(0, model_state=nnx.state(model), opt_state=None, loop_state={"step": 0},
                      config_dict=to_dict(config))
            ckpt.wait()
        finally:
            ckpt.close()
    return run_dir


def check_import_target(run_dir: str, *, overwrite: bool) -> None:
    """Refuses (one sentence, nothing written) a run directory in use, one trained since an earlier
    import, and any target ``check_target`` refuses (somebody's files; an earlier import without
    ``overwrite``)."""
    run = RunDir(run_dir)
    if os.path.exists(run.lock):
        raise ValueError(f"{run_dir} is a run directory in use or left by a run (it holds "
                         f"{os.path.basename(run.lock)}); import into a new folder.")
    if is_own_output(run_dir) and (os.path.exists(run.metrics) or _trained_steps(run)):
        raise ValueError(f"{run_dir} has been trained since it was imported; import into a new folder.")
    check_target(run_dir, overwrite=overwrite, what="hf import")


def _trained_steps(run: RunDir) -> list[str]:
    if not os.path.isdir(run.checkpoints):
        return []
    return [name for name in os.listdir(run.checkpoints) if name != "0"]
