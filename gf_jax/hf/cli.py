"""``python -m gf_jax.hf export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16|float32] [--merge-lora | --peft]`` and
``python -m gf_jax.hf import HF_DIR RUN_DIR [--param-dtype float32]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gf_jax.run.export import export_run
from gf_jax.run.hf_import import import_to_run
from gf_jax.util.commands import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gf_jax.hf",
                                description="Hugging Face checkpoints in and out of gf_jax runs.")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run directory's checkpoint as a Hugging Face model directory")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                    help="dtype of the written weights (default: the model's parameter dtype; float32 with --peft)")
    ex.add_argument("--merge-lora", action="store_true",
                    help="LoRA runs: a full model with the adapters merged into the base weights")
    ex.add_argument("--peft", action="store_true",
                    help="LoRA runs: the adapters only, as a PEFT directory (adapter_config.json, "
                         "adapter_model.safetensors) for peft and vLLM")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR whole when it holds an earlier export (never a folder of other files)")
    im = sub.add_parser("import", help="a run directory at step 0 from a Hugging Face model directory")
    im.add_argument("hf_dir")
    im.add_argument("run_dir")
    im.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="dtype the run stores its parameters in (default float32, for training)")
    im.add_argument("--overwrite", action="store_true",
                    help="replace RUN_DIR whole when it holds an earlier import that was not trained since")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    if args.command == "export":
        files = export_run(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype,
                           merge_lora=args.merge_lora, peft=args.peft, overwrite=args.overwrite)
        print(f"{args.out_dir}: {', '.join(files)}")
    else:
        run_dir = import_to_run(args.hf_dir, args.run_dir, param_dtype=args.param_dtype, overwrite=args.overwrite)
        print(f"{run_dir}: step 0")
