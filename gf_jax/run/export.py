"""A model source as a Hugging Face directory: ``python -m gf_jax.hf export RUN_DIR OUT_DIR``.

A run's checkpoint (default: the newest), an HF directory (re-exported, e.g. in another dtype) or
a LoRA run (``merge_lora``: a full model with the adapters merged in; ``peft``: a PEFT adapter
directory). The writing itself is the codecs' (``gf_jax.hf.export``, ``gf_jax.hf.peft``).
"""

from __future__ import annotations

import os

from gf_jax.hf.export import export_model
from gf_jax.hf.peft import export_peft
from gf_jax.hf.safetensors_io import MAX_SHARD_BYTES
from gf_jax.model.transforms import merged
from gf_jax.run.load import load_model
from gf_jax.run.rundir import RunDir
from gf_jax.run.source import ModelSource
from gf_jax.util import paths
from gf_jax.util.staging import check_target


def export_run(source: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
               merge_lora: bool = False, peft: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
               overwrite: bool = False) -> list[str]:
    """Writes ``source`` (a run directory, ``RUN@STEP``, an HF or a PEFT directory) to ``out_dir``
    (new or empty, or an earlier export with ``overwrite``); returns the file names written."""
    if merge_lora and peft:
        raise ValueError("--merge-lora and --peft exclude each other; pass one of them.")
    source = ModelSource.parse(source)
    check_export_target(source.path, out_dir, overwrite=overwrite)  # before the model is loaded
    model, run_config, tokenizer = load_model(source, step)
    has_adapters = model.config.lora.enabled
    if (merge_lora or peft) and not has_adapters:
        raise ValueError(f"{source} has no LoRA adapters (model.lora.rank is 0); export it without "
                         f"{'--merge-lora' if merge_lora else '--peft'}.")
    if peft:
        return export_peft(model, out_dir, base_name=_base_name(run_config.train.init_from), dtype=dtype or "float32",
                           overwrite=overwrite)
    if has_adapters and not merge_lora:
        raise ValueError(
            f"{source} is a LoRA run (rank-{model.config.lora.rank} adapters on {run_config.train.init_from}); pass "
            "--merge-lora for a full Hugging Face model with the adapters merged in, or --peft for a PEFT adapter "
            "directory."
        )
    metadata_dir = source.metadata_dir()
    if has_adapters:
        model = merged(model, param_dtype=dtype)
        metadata_dir = metadata_dir or ModelSource.parse(run_config.train.init_from).metadata_dir()
    return export_model(model, tokenizer, out_dir, dtype=dtype, source_dir=metadata_dir,
                        add_bos=run_config.data.add_bos, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def check_export_target(source_path: str, out_dir: str, *, overwrite: bool) -> None:
    """Refuses, before anything is loaded or written, a target that is the source, lies inside it,
    or is or lies inside a run directory (an export there would make the run look like an HF
    folder), and any target ``gf_jax.util.staging.check_target`` refuses."""
    target = os.path.realpath(out_dir) if not paths.is_url(out_dir) else None
    if target is None:
        check_target(out_dir, overwrite=overwrite, what="hf export")  # refuses the URL
    source = os.path.realpath(source_path) if not paths.is_url(source_path) else None
    if source is not None and (target == source or target.startswith(source + os.sep)):
        raise ValueError(f"{out_dir} is inside the exported model {source_path}; export to a folder outside it.")
    folder = target
    while True:
        if _is_run_dir(folder):
            raise ValueError(f"{out_dir} is inside the run directory {folder}; export to a folder outside it.")
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    check_target(out_dir, overwrite=overwrite, what="hf export")


def _is_run_dir(folder: str) -> bool:
    run = RunDir(folder)
    return os.path.isdir(run.checkpoints) or os.path.isfile(run.lock) or (
        run.has_config() and os.path.isfile(run.metrics))


def _base_name(init_from: str) -> str:
    """``base_model_name_or_path`` of a PEFT export: the absolute path of the run's base."""
    base = ModelSource.parse(init_from)
    return paths.absolute(base.path) + ("" if base.step is None else f"@{base.step}")
