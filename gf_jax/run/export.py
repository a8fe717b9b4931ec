"""A model source as a Hugging Face directory: ``python -m gf_jax.hf export RUN_DIR OUT_DIR``.

A run's checkpoint (default: the newest), an HF directory (re-exported, e.g. in another dtype) or
a LoRA run (``merge_lora``: a full model with the adapters merged in; ``peft``: a PEFT adapter
directory). The writing itself is the codecs' (``gf_jax.hf.export``, ``gf_jax.hf.peft``).
"""

from __future__ import annotations

from gf_jax.hf.export import export_model
from gf_jax.hf.peft import export_peft
from gf_jax.hf.safetensors_io import MAX_SHARD_BYTES
from gf_jax.model.transforms import merged
from gf_jax.run.load import load_model
from gf_jax.run.source import ModelSource
from gf_jax.util import paths


def export_run(source: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
               merge_lora: bool = False, peft: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Writes ``source`` (a run directory, ``RUN@STEP``, an HF or a PEFT directory) to ``out_dir``;
    returns the file names written."""
    if merge_lora and peft:
        raise ValueError("--merge-lora and --peft exclude each other; pass one of them.")
    source = ModelSource.parse(source)
    model, run_config, tokenizer = load_model(source, step)
    has_adapters = model.config.lora.enabled
    if (merge_lora or peft) and not has_adapters:
        raise ValueError(f"{source} has no LoRA adapters (model.lora.rank is 0); export it without "
                         f"{'--merge-lora' if merge_lora else '--peft'}.")
    if peft:
        return export_peft(model, out_dir, base_name=_base_name(run_config.train.init_from), dtype=dtype or "float32")
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
                        add_bos=run_config.data.add_bos, max_shard_bytes=max_shard_bytes)


def _base_name(init_from: str) -> str:
    """``base_model_name_or_path`` of a PEFT export: the absolute path of the run's base."""
    base = ModelSource.parse(init_from)
    return paths.absolute(base.path) + ("" if base.step is None else f"@{base.step}")
