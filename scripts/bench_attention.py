"""Attention benchmark on a GPU: forward + backward time of the training attention with packed
segments, per implementation, side by side.

    python scripts/bench_attention.py                       # TinyLlama-1B heads, B=8, T=2048, bf16
    python scripts/bench_attention.py --seq-len 4096 --batch 4 --heads 32 --kv-heads 32 --head-dim 128

Rows:
  cudnn (dense mask)    jax.nn.dot_product_attention, segments as a B x 1 x T x T boolean mask
                        (what ``attention: cudnn`` / ``auto`` run on GPU today)
  cudnn (no segments)   the same call with causal masking only: the upper bound, not a correct
                        packed-document attention
  pallas_gpu            Pallas/Triton flash attention with segment ids, no dense mask
  xla                   the einsum reference
TFLOP/s count QK^T and PV over the full T x T square, forward + backward = 3 x forward (the
convention of gf_jax.model.counting.flops_per_token). On a non-GPU backend only ``xla`` runs (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gf_jax.model import attention as attn


def packed_segments(batch: int, seq_len: int, mean_doc_len: int, seed: int = 0) -> np.ndarray:
    """``segment_ids_BxT``: documents of random lengths laid end to end (ids 1, 2, ...)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        t, s = 0, 1
        while t < seq_len:
            n = int(rng.integers(mean_doc_len // 2, 2 * mean_doc_len))
            seg[b, t:t + n] = s
            t, s = t + n, s + 1
    return seg


def time_fwd_bwd(fn, q, k, v, seg, iters: int) -> float:
    """Median seconds of one jitted forward + backward (gradients of all of q, k, v)."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))  # compile
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mean-doc-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    b, t, n, kv, h = a.batch, a.seq_len, a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), a.dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kv, h)), a.dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kv, h)), a.dtype)
    seg = jnp.asarray(packed_segments(b, t, a.mean_doc_len))

    def xla(q, k, v, s):
        return attn.attention_xla(q, k, v, attn.causal_segment_mask(s))

    impls = {"xla": xla}
    if jax.default_backend() == "gpu":
        impls = {
            "cudnn (dense mask)": attn.attention_fused,
            "cudnn (no segments)": lambda q, k, v, s: attn.attention_fused(q, k, v, None),
            "pallas_gpu": attn.attention_pallas_gpu,
            **impls,
        }
    flops = 3 * 4 * b * t * t * n * h
    device = jax.devices()[0]
    print(f"{device.device_kind}: B={b} T={t} N={n} K={kv} H={h} {a.dtype}, documents ~{a.mean_doc_len} tokens")
    # The numerics reference: XLA attention in float32 on the same (rounded) inputs, packed segments.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = jax.jit(xla)(*f32, seg)
    results = {"device": device.device_kind, "batch": b, "seq_len": t, "heads": n, "kv_heads": kv, "head_dim": h,
               "dtype": a.dtype, "mean_doc_len": a.mean_doc_len, "implementations": {}}
    for name, fn in impls.items():
        try:
            seconds = time_fwd_bwd(fn, q, k, v, seg, a.iters)
            err = float(jnp.max(jnp.abs(jax.jit(fn)(q, k, v, seg).astype(jnp.float32) - reference)))
        except Exception as e:  # one implementation failing (shapes, versions) must not hide the others
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results["implementations"][name] = {"error": why}
            print(f"{name:22s} failed: {why}")
            continue
        results["implementations"][name] = {"fwd_bwd_ms": 1e3 * seconds, "tflops": flops / seconds / 1e12,
                                            "max_abs_diff_vs_f32_xla": err}
        print(f"{name:22s} {1e3 * seconds:8.2f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s  "
              f"max|diff vs f32 xla| {err:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
