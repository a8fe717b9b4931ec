"""Per-device memory of the compiled train step, full fine-tuning vs LoRA, from abstract shapes.

    python scripts/bench_lora_memory.py                                  # LLaMA-2-7B, seq 2048, 1 and 8 CPU devices
    python scripts/bench_lora_memory.py --devices --tpu v5p:2x2x1 --tpu-chips 1   # one v5p chip only
    python scripts/bench_lora_memory.py --devices 1 --modes lora -- model.n_layers=2 model.remat=none

The trainer's own jitted step (gf_jax.train.step) is lowered from abstract arguments (shapes, dtypes and
shardings; no weights exist) and compiled; ``compiled.memory_analysis()`` gives the bytes of its
arguments (parameters, optimizer state, batch), outputs (aliased to the donated arguments) and
temporaries per device. On the CPU backend this is a rough guide: XLA:CPU schedules and fuses
differently from a GPU or TPU, and attention here is the einsum path (no flash kernel). ``--tpu``
adds ahead-of-time compiles for the first ``--tpu-chips`` chips of a TPU topology (gf_jax/train/aot.py,
needs libtpu), which the TPU compiler refuses when the step does not fit the chip.

Modes: ``full`` trains every weight (float32 weights and AdamW moments, as configs/llama2-7b.yaml);
``lora`` trains rank-r adapters on all seven projections of a bfloat16 base.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

GIB = 1024**3


def mode_overrides(mode: str, rank: int) -> list[str]:
    if mode == "full":
        return ["model.param_dtype=float32"]
    return ["model.param_dtype=bfloat16", f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}",
            "model.lora.targets=[q,k,v,o,gate,up,down]"]


def trainable_count(config) -> tuple[int, int]:
    """(trainable parameters, all parameters) of the config's model, from abstract shapes."""
    import jax
    from flax import nnx

    from gf_jax.model import lora
    from gf_jax.model.transformer import Transformer

    state = nnx.state(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    base, adapters = lora.split(state)
    return (count(adapters) if config.model.lora.enabled else count(base)), count(state)


def measure(config, devices):
    from gf_jax.train import aot

    started = time.perf_counter()
    _, report = aot.compile_train_step(config, devices)
    return report, time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama2-7b.yaml")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="sequences per device per micro-batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--devices", type=int, nargs="*", default=[1, 8], help="CPU device counts (none: no CPU rows)")
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--tpu", default="", help="also compile for chips of this TPU topology, e.g. v5p:2x2x1")
    p.add_argument("--tpu-chips", type=int, nargs="+", default=[1], help="how many of the topology's chips")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)

    import jax

    from gf_jax.config import load_config

    targets = [(f"cpu x{n}", jax.devices()[:n]) for n in args.devices]
    if args.tpu:
        from gf_jax.train import aot

        chips = aot.topology_devices(args.tpu)
        targets += [(f"{chips[0].device_kind} x{n} ({args.tpu})", chips[:n]) for n in args.tpu_chips if n <= len(chips)]
    print(f"{args.config}, seq {args.seq}, {args.rows} row(s) per device, LoRA rank {args.rank} "
          f"({' '.join(args.overrides)})", flush=True)
    print("| mode | devices | trainable params | arguments GiB | temporaries GiB | total GiB / device | compile s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for mode in args.modes:
        for name, devices in targets:
            n = len(devices)
            config = load_config(args.config, [
                f"train.seq_len={args.seq}", f"train.global_batch={args.rows * n}", "train.grad_accum=1",
                "mesh.data=1", f"mesh.fsdp={n}", "mesh.tensor=1", *mode_overrides(mode, args.rank), *args.overrides,
            ])
            trainable, total = trainable_count(config)
            report, seconds = measure(config, devices)
            if report.error is not None:
                print(f"| {mode} | {name} | {trainable / 1e6:,.1f} M of {total / 1e9:.2f} B | does not compile: "
                      f"{report.error} | | | {seconds:.0f} |", flush=True)
                continue
            print(f"| {mode} | {name} | {trainable / 1e6:,.1f} M of {total / 1e9:.2f} B | {report.arguments / GIB:.2f} "
                  f"| {report.temporaries / GIB:.2f} | {report.total / GIB:.2f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
