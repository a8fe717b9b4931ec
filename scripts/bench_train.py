"""Training-step benchmark: tokens/s, step time, TFLOP/s/device and MFU, and the cost of the
goldfish mask as a step-time ratio goldfish / standard measured side by side in one run.

    python scripts/bench_train.py --config configs/tiny.yaml
    python scripts/bench_train.py --config configs/tinyllama-1b.yaml train.global_batch=8 train.grad_accum=1

The step is the trainer's own jitted step (``gf_jax.train.step.make_step_functions``: sharded state,
donated, goldfish mask inside the step) on a fixed, device-resident batch of packed synthetic
documents, so the figures measure the step, not the input pipeline. The two variants run in
alternating blocks (standard, goldfish, standard, ...); each variant reports its median block and
the ratio is the median of the paired block ratios, so drift in machine load affects both alike.
MFU uses the model FLOPs per token of ``gf_jax.model.counting.flops_per_token`` and the per-chip peak of
``gf_jax.train.tracker.PEAK_TFLOPS`` (CPU has no peak: MFU is not reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from gf_jax import data as data_lib
from gf_jax.batch import Batch
from gf_jax.config import load_config
from gf_jax.goldfish import GoldfishConfig, goldfish_mask
from gf_jax.model import flops_per_token, param_count
from gf_jax.model.sharding import make_mesh
from gf_jax.train.step import make_step_functions
from gf_jax.train.tracker import peak_tflops


def synthetic_batch(batch: int, seq_len: int, vocab: int, mean_doc_len: int, seed: int = 0) -> Batch:
    """A packed batch per the batch convention: documents of random lengths (BOS-framed) laid end
    to end, true positions, segment ids, weight 0 on targets that cross a document boundary."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(4, vocab, (batch, seq_len + 1), dtype=np.int32)
    positions = np.zeros((batch, seq_len + 1), np.int32)
    segments = np.zeros((batch, seq_len + 1), np.int32)
    for b in range(batch):
        t, segment = 0, 1
        start = int(rng.integers(0, mean_doc_len))  # the row starts mid-document
        while t < seq_len + 1:
            length = int(rng.integers(mean_doc_len // 2, 2 * mean_doc_len)) - start
            end = min(seq_len + 1, t + max(1, length))
            positions[b, t:end] = np.arange(start, start + end - t)
            segments[b, t:end] = segment
            if start == 0:
                inputs[b, t] = 1  # BOS
            t, segment, start = end, segment + 1, 0
    return Batch(
        inputs_BxT=inputs[:, :-1],
        targets_BxT=inputs[:, 1:],
        positions_BxT=positions[:, :-1],
        segment_ids_BxT=segments[:, :-1],
        weights_BxT=(segments[:, 1:] == segments[:, :-1]).astype(np.float32),
    )


def time_block(fns, state, batch, steps: int):
    """Runs ``steps`` steps; returns (new state, seconds per step, last metrics)."""
    model_state, opt_state = state
    t0 = time.perf_counter()
    for _ in range(steps):
        model_state, opt_state, metrics = fns.train_step(model_state, opt_state, batch)
    jax.block_until_ready((model_state, opt_state, metrics))
    return (model_state, opt_state), (time.perf_counter() - t0) / steps, metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per variant (alternating)")
    parser.add_argument("--mean-doc-len", type=int, default=512, help="mean synthetic document length (tokens)")
    parser.add_argument("--standard-only", action="store_true", help="skip the goldfish variant")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.overrides)
    t = config.train
    mesh = make_mesh(config.mesh)
    goldfish = config.goldfish if config.goldfish.strategy != "none" else GoldfishConfig()
    variants = {"standard": dataclasses.replace(config, goldfish=GoldfishConfig(strategy="none"))}
    if not args.standard_only:
        variants["goldfish"] = dataclasses.replace(config, goldfish=goldfish)

    device = mesh.devices.flat[0]
    host_batch = synthetic_batch(t.global_batch, t.seq_len, config.model.vocab_size, args.mean_doc_len)
    print(f"[bench_train] {args.config}: {param_count(config.model) / 1e6:.1f}M parameters, batch "
          f"{t.global_batch} x {t.seq_len} (grad_accum {t.grad_accum}), mesh {dict(mesh.shape)}, "
          f"{mesh.devices.size} x {device.device_kind}, compute dtype {config.model.dtype}", flush=True)

    runs = {}
    for name, variant in variants.items():
        fns = make_step_functions(variant, mesh)
        batch = data_lib.to_global_batch(host_batch, fns.batch_sharding)
        state = fns.init()
        t0 = time.perf_counter()
        state, _, _ = time_block(fns, state, batch, 2)  # compile + one warm step
        print(f"[bench_train] {name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        runs[name] = {"fns": fns, "batch": batch, "state": state, "times": []}

    for r in range(args.repeats):
        for run in runs.values():
            run["state"], seconds, metrics = time_block(run["fns"], run["state"], run["batch"], args.steps)
            run["times"].append(seconds)
            run["drop_fraction"] = float(metrics["drop_fraction"])
        print(f"[bench_train] block {r + 1}/{args.repeats}: "
              + ", ".join(f"{n} {run['times'][-1] * 1e3:.1f} ms/step" for n, run in runs.items()), flush=True)

    tokens = t.global_batch * t.seq_len
    fpt = flops_per_token(config.model, t.seq_len)
    peak = peak_tflops(device)
    results = {
        "config": args.config, "overrides": args.overrides, "device": device.device_kind,
        "devices": mesh.devices.size, "mesh": dict(mesh.shape), "global_batch": t.global_batch,
        "seq_len": t.seq_len, "grad_accum": t.grad_accum, "dtype": config.model.dtype,
        "params": param_count(config.model), "flops_per_token": fpt, "peak_tflops_per_device": peak,
    }
    print()
    print("| variant | step time (ms) | tokens/s | TFLOP/s/device | MFU | drop fraction |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        step = statistics.median(run["times"])
        tflops = fpt * tokens / step / mesh.devices.size / 1e12
        mfu = None if peak is None else tflops / peak
        results[name] = {"step_time_s": step, "tokens_per_s": tokens / step, "tflops_per_device": tflops,
                         "mfu": mfu, "drop_fraction": run["drop_fraction"], "block_times_s": run["times"]}
        mfu_text = "n/a (no peak for CPU)" if mfu is None else f"{100 * mfu:.1f}%"
        print(f"| {name} | {step * 1e3:.1f} | {tokens / step:,.0f} | {tflops:.3f} | {mfu_text} | "
              f"{run['drop_fraction']:.3f} |")
    if "goldfish" in runs:
        # Median of the per-block ratios: each goldfish block is compared with the standard block
        # run just before it, under the same machine load.
        ratios = [g / s for g, s in zip(runs["goldfish"]["times"], runs["standard"]["times"])]
        ratio = statistics.median(ratios)
        results["goldfish_over_standard"] = ratio
        results["goldfish_over_standard_blocks"] = ratios
        print(f"\ngoldfish / standard step time: {ratio:.3f} (median of {len(ratios)} paired blocks, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}; {goldfish.strategy}, k={goldfish.k}, h={goldfish.h})")
    if "goldfish" in runs:
        # The mask alone, timed in isolation (many repetitions, low noise): the overhead the
        # goldfish step can at most add, whatever the load-induced spread of the step times.
        mask_fn = jax.jit(lambda b: goldfish_mask(b.targets_BxT, goldfish, positions_BxT=b.positions_BxT))
        batch = runs["goldfish"]["batch"]
        jax.block_until_ready(mask_fn(batch))
        reps, t0 = 50, time.perf_counter()
        for _ in range(reps):
            out = mask_fn(batch)
        jax.block_until_ready(out)
        mask_s = (time.perf_counter() - t0) / reps
        share = mask_s / results["standard"]["step_time_s"]
        results["mask_only_s"] = mask_s
        print(f"goldfish mask alone: {mask_s * 1e3:.3f} ms = {100 * share:.3f}% of the standard step")
    results["peak_bytes_in_use"] = peak_bytes(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def peak_bytes(device) -> int | None:
    """The device's peak allocated bytes since the process started (None where the backend keeps
    no statistics, e.g. the CPU): the memory figure of a run in its own process."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


if __name__ == "__main__":
    main(sys.argv[1:])
