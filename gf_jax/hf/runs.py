"""Hugging Face directories as gf_jax runs: the run config of an HF model, and a run directory
made from one (``python -m gf_jax.hf import HF_DIR RUN_DIR``).

A run made from (or fine-tuned from) a Hugging Face model keeps the original's ``config.json``,
``generation_config.json`` and tokenizer files in ``RUN_DIR/hf/`` (:func:`copy_hf_metadata`), so
``gf_jax.checkpoint.load_model`` finds its tokenizer there and an export gets the original's
architecture and tokenizer back.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from gf_jax.hf import config as hf_config
from gf_jax.hf.tokenizer import TOKENIZER_FILES

HF_SUBDIR = "hf"
METADATA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def hf_metadata_dir(path: str) -> str | None:
    """Where the HF metadata of ``path`` lives: ``path`` itself for an HF directory, ``path/hf``
    for a run made from one, else None."""
    from gf_jax.hf import is_hf_dir

    if is_hf_dir(path):
        return path
    sub = os.path.join(path, HF_SUBDIR)
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else None


def copy_hf_metadata(hf_dir: str, run_dir: str) -> str:
    """Copies config/generation/tokenizer files of ``hf_dir`` (an HF directory, or a run holding
    them) to ``run_dir/hf`` (no weights); returns that directory. Call it when a run starts from
    a pretrained model, so its exports keep the original's architecture and tokenizer."""
    src = hf_metadata_dir(hf_dir)
    dst = os.path.join(run_dir, HF_SUBDIR)
    if src is None or os.path.abspath(src) == os.path.abspath(dst):
        return dst
    os.makedirs(dst, exist_ok=True)
    for name in METADATA_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


def run_config(hf_dir: str, tokenizer, **model_overrides):
    """The ``RunConfig`` an HF model is evaluated or trained under: its architecture, its
    tokenizer directory, BOS framing when the tokenizer has a BOS (LLaMA: yes, Qwen: no)."""
    from gf_jax.config import RunConfig, TrainConfig
    from gf_jax.data import DataConfig

    model = hf_config.model_config_from_hf(hf_config.read_config(hf_dir), **model_overrides)
    data = DataConfig(tokenizer=os.path.abspath(hf_dir), add_bos=tokenizer.bos_id >= 0,
                      add_eos=tokenizer.eos_id >= 0)
    train = TrainConfig(seq_len=min(TrainConfig().seq_len, model.max_seq_len))
    return RunConfig(model=model, data=data, train=train)


def import_to_run(hf_dir: str, run_dir: str, *, param_dtype: str = "float32") -> str:
    """Writes ``run_dir`` at step 0 (parameters only, no optimizer state) from ``hf_dir``."""
    from flax import nnx

    from gf_jax.checkpoint import Checkpointer
    from gf_jax.config import save_config, to_dict
    from gf_jax.hf.load import load_model
    from gf_jax.tokenizer import Tokenizer

    if os.path.exists(os.path.join(run_dir, "checkpoints")):
        raise FileExistsError(f"{run_dir!r} already holds checkpoints; choose a new run directory.")
    os.makedirs(run_dir, exist_ok=True)
    meta = copy_hf_metadata(hf_dir, run_dir)
    tokenizer = Tokenizer.load(meta)
    config = run_config(meta, tokenizer, param_dtype=param_dtype)
    # The run refers to its own copy of the tokenizer, found again by checkpoint.find_tokenizer.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=None))
    model = load_model(hf_dir, config.model)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        ckpt.save(0, model_state=nnx.state(model), opt_state=None, loop_state={"step": 0},
                  config_dict=to_dict(config))
        ckpt.wait()
    finally:
        ckpt.close()
    return run_dir
