"""Compile a config's train step (and optionally greedy decoding) for a TPU topology on a CPU host
and print the per-chip memory: does it fit the chip?

    python scripts/aot_tpu.py --config configs/tinyllama-1b.yaml --topology v5e:2x4 [section.key=value ...]
    python scripts/aot_tpu.py --config configs/llama2-7b.yaml --topology v5p:2x2x2 --decode

Needs ``libtpu`` (requirements.txt); no TPU. See docs/tpu.md and gf_jax/train/aot.py.
"""

from __future__ import annotations

import argparse
import os
import sys

# The host's own backend is the CPU: never try to initialise a TPU here.
os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v6e:4x4, v5p:2x2x1, v4:2x2x2")
    parser.add_argument("--decode", action="store_true", help="also compile greedy KV-cache decoding")
    parser.add_argument("--decode-batch", type=int, default=0, help="rows (default: one per data shard x 8)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    from gf_jax.config import load_config
    from gf_jax.train import aot

    config = aot.for_tpu(load_config(args.config, args.overrides))
    devices = aot.topology_devices(args.topology)
    m, t = config.model, config.train
    micro = t.global_batch // t.grad_accum
    print(f"{args.config} {' '.join(args.overrides)} on {args.topology} ({len(devices)} chips): "
          f"remat={m.remat} scan_layers={m.scan_layers} attention={m.attention} dtype={m.dtype} mesh={config.mesh} "
          f"global_batch={t.global_batch} grad_accum={t.grad_accum} (micro-batch {micro} rows) "
          f"seq_len={t.seq_len} loss.chunk_size={config.loss.chunk_size}", flush=True)
    _, report = aot.compile_train_step(config, devices)
    print(f"train step: {report.format()}", flush=True)
    if args.decode:
        batch = args.decode_batch or 8 * len(devices) // config.mesh.tensor
        _, report = aot.compile_decode(config, devices, batch=batch, prompt_len=args.prompt_len,
                                       new_tokens=args.new_tokens)
        print(f"decode ({batch} rows, prompt {args.prompt_len}, {args.new_tokens} new): {report.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
