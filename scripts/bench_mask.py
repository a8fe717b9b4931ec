"""Benchmark the goldfish mask and loss.

Measures, side by side in one run (ratios, because these machines are noisy):
  1. mask throughput (tokens/s) of every strategy;
  2. cost of goldfish loss (mask + masked mean) over plain mean cross-entropy, forward+backward
     w.r.t. the logits, timed interleaved;
  3. compiled peak temporary memory of plain vs chunked loss (forward+backward from hidden states
     and the output projection), from XLA's memory analysis (no allocation needed);
  4. compile time and run time of the ``hash`` mask for several hash windows h (``--windows``):
     the window is a scan, so compile time stays flat in h.

    python scripts/bench_mask.py                       # B=8, T=2048, V=32000
    python scripts/bench_mask.py --batch 2 --seq 512 --vocab 8000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gf_jax import GoldfishConfig, chunked_loss_fn, goldfish_mask, loss_fn


def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved(fns: dict, args, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, the calls interleaved so load hits all alike."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, *args))
    return {name: statistics.median(t) for name, t in times.items()}


def hash_window_costs(targets_BxT, positions_BxT, windows: list[int]) -> dict:
    """Compile seconds and run milliseconds of the ``hash`` mask at each window ``h``."""
    print("\nhash mask by window h (compile once, then the median of 5 calls)")
    out = {}
    for h in windows:
        fn = jax.jit(lambda t, p, h=h: goldfish_mask(t, GoldfishConfig(h=h), positions_BxT=p))
        started = time.perf_counter()
        compiled = fn.lower(targets_BxT, positions_BxT).compile()
        compile_s = time.perf_counter() - started
        run_s = statistics.median(timed(compiled, targets_BxT, positions_BxT) for _ in range(5))
        print(f"  h={h:5d}  compile {compile_s:6.2f} s   run {run_s * 1e3:8.2f} ms")
        out[h] = {"compile_s": compile_s, "run_ms": run_s * 1e3}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=2048, help="hidden width for the memory comparison")
    parser.add_argument("--chunks", default="128,256,512", help="chunk sizes of the chunked loss, comma separated")
    parser.add_argument("--windows", default="13,50,256,1024", help="hash windows h of section 4, comma separated")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    B, T, V, D = args.batch, args.seq, args.vocab, args.d_model
    rng = np.random.default_rng(0)
    targets_BxT = jnp.asarray(rng.integers(0, V, size=(B, T), dtype=np.int32))
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    host = platform.processor() or platform.machine()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  ({host})")
    print(f"shape: B={B} T={T} V={V}")
    results: dict = {"B": B, "T": T, "V": V, "device": jax.devices()[0].device_kind}

    # 1. Mask throughput.
    key = jax.random.key(0)
    masks = {
        strategy: jax.jit(
            lambda t, p, s=strategy: goldfish_mask(t, GoldfishConfig(strategy=s), positions_BxT=p, rng=key)
        )
        for strategy in ("hash", "hash-table", "static", "random")
    }
    mask_times = interleaved(masks, (targets_BxT, positions_BxT), args.reps)
    print("\nmask throughput")
    for name, sec in mask_times.items():
        print(f"  {name:11s} {B * T / sec / 1e6:9.1f} M tokens/s   ({sec * 1e3:.2f} ms)")
    results["mask_tokens_per_s"] = {name: B * T / sec for name, sec in mask_times.items()}

    # 2. Goldfish loss vs plain cross-entropy, forward + backward w.r.t. logits.
    logits_BxTxV = jnp.asarray(rng.normal(size=(B, T, V)).astype(np.float32))

    def plain_xent(logits, targets):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    def goldfish(logits, targets, strategy):
        return loss_fn(logits, targets, GoldfishConfig(strategy=strategy), positions_BxT=positions_BxT)[0]

    losses = {
        "plain xent": jax.jit(jax.value_and_grad(plain_xent)),
        "loss_fn none": jax.jit(jax.value_and_grad(lambda lg, t: goldfish(lg, t, "none"))),
        "loss_fn hash": jax.jit(jax.value_and_grad(lambda lg, t: goldfish(lg, t, "hash"))),
        "loss_fn hash-table": jax.jit(jax.value_and_grad(lambda lg, t: goldfish(lg, t, "hash-table"))),
    }
    loss_times = interleaved(losses, (logits_BxTxV, targets_BxT), max(3, args.reps // 2))
    base = loss_times["plain xent"]
    print("\nloss forward+backward (w.r.t. logits), relative to plain mean cross-entropy")
    for name, sec in loss_times.items():
        print(f"  {name:19s} {sec * 1e3:9.1f} ms   x{sec / base:.3f}")
    results["loss_ms"] = {name: sec * 1e3 for name, sec in loss_times.items()}
    results["goldfish_over_plain"] = loss_times["loss_fn hash"] / base
    # What the mask itself adds: the same loss_fn with and without dropping.
    results["hash_over_none"] = loss_times["loss_fn hash"] / loss_times["loss_fn none"]
    # The mask alone, timed in section 1 of this run, as a share of the loss it is added to: the
    # end-to-end ratio above is within timing noise when the mask is this small.
    results["mask_share_of_loss"] = mask_times["hash"] / loss_times["loss_fn none"]
    print(f"  loss_fn hash / loss_fn none = x{results['hash_over_none']:.3f} (timing noise dominates)")
    print(f"  hash mask alone = {100 * results['mask_share_of_loss']:.3f}% of the loss's forward+backward")
    del logits_BxTxV

    # 3. Peak memory: plain loss from materialised logits vs chunked loss, forward + backward.
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    t = jax.ShapeDtypeStruct((B, T), jnp.int32)
    cfg = GoldfishConfig()

    def peak(fn):
        grad = jax.jit(jax.grad(lambda h, w, t: fn(h, w, t)[0], argnums=(0, 1)))
        return grad.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes

    plain_peak = peak(lambda h, w, t: loss_fn(jnp.einsum("btd,dv->btv", h, w), t, cfg))
    print(f"\npeak temporary memory, loss forward+backward from h (D={D}) and w (DxV)")
    print(f"  plain            {plain_peak / 2**20:9.1f} MiB")
    results["peak_mib"] = {"plain": plain_peak / 2**20}
    for chunk in (int(c) for c in args.chunks.split(",")):
        chunked_peak = peak(lambda h, w, t, c=chunk: chunked_loss_fn(h, w, t, cfg, chunk_size=c))
        ratio = plain_peak / chunked_peak
        print(f"  chunked ({chunk:5d}) {chunked_peak / 2**20:9.1f} MiB   plain/chunked = {ratio:.1f}x")
        results["peak_mib"][f"chunked_{chunk}"] = chunked_peak / 2**20
    results["hash_windows"] = hash_window_costs(targets_BxT, positions_BxT, [int(h) for h in args.windows.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
