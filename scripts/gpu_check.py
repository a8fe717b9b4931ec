"""Every GPU figure gf_jax still lacks, in one call: training MFU and the goldfish/standard ratio,
attention kernels, the chunked loss at a 128k vocabulary, decoding against transformers.

    python scripts/gpu_check.py --out results/gpu            # on one H100/H200 (about 8 minutes)
    python scripts/gpu_check.py --out /tmp/gpu --dry-run     # every step at tiny sizes, on the CPU
    python scripts/gpu_check.py --list                       # the steps and what they measure

Each step runs one benchmark script of ``scripts/`` in its own process (a crash, an
out-of-memory or a hung kernel costs that step only; device memory is fresh for each), with a
time limit; steps are skipped once the budget (``--budget-s``, default 470 s) would be exceeded.
The figures go to ``OUT/results.json`` (one record per step: status, seconds, the benchmark's own
JSON) and ``OUT/results.md`` (the tables docs/benchmarks.md takes), written after every step, so
what finished survives whatever comes after. ``scripts/gpu_check.sh`` installs gf_jax on the GPU
host first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYLLAMA = "configs/tinyllama-1b.yaml"
# The SmolLM2-135M shape (the real model of the paper-claims experiment): 30 layers, d 576, 9/3 heads.
SMOLLM2_135M = ["model.vocab_size=49152", "model.d_model=576", "model.n_layers=30", "model.n_heads=9",
                "model.n_kv_heads=3", "model.d_ff=1536", "model.tie_embeddings=true", "model.rope_theta=100000"]
TINY_MODEL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
              "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64", "model.dtype=float32"]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    what: str
    script: str
    args: list[str]
    dry_args: list[str]  # the same step at tiny sizes (CPU)
    timeout_s: int = 150

    def command(self, out_json: str, dry: bool) -> list[str]:
        args = self.dry_args if dry else self.args
        return [sys.executable, os.path.join(REPO, "scripts", self.script), "--json", out_json, *args]


def _train(config: str, model: list[str], extra: list[str], bench: list[str]) -> list[str]:
    return ["--config", config, *bench, *model, *extra]


STEPS = (
    Step("train_1b", "TinyLlama-1.1B bf16 training step: step time, tokens/s, MFU, goldfish/standard ratio",
         "bench_train.py",
         _train(TINYLLAMA, [], ["train.global_batch=8", "train.seq_len=2048", "train.grad_accum=1"],
                ["--steps", "4", "--repeats", "5"]),
         _train("configs/tiny.yaml", TINY_MODEL, ["train.global_batch=4", "train.seq_len=32"],
                ["--steps", "1", "--repeats", "2", "--mean-doc-len", "16"]), timeout_s=170),
    Step("train_135m", "SmolLM2-135M shape: the real-model experiment's step", "bench_train.py",
         _train(TINYLLAMA, SMOLLM2_135M, ["train.global_batch=16", "train.seq_len=2048", "loss.chunk_size=0"],
                ["--steps", "4", "--repeats", "5"]),
         _train("configs/tiny.yaml", TINY_MODEL, ["train.global_batch=4", "train.seq_len=32"],
                ["--steps", "1", "--repeats", "2", "--mean-doc-len", "16"])),
    Step("loss_128k_chunked", "1B shape, V = 128,256, chunked loss (512-token chunks): time and peak memory",
         "bench_train.py",
         _train(TINYLLAMA, ["model.vocab_size=128256"], ["train.global_batch=4", "train.seq_len=2048",
                                                         "loss.chunk_size=512"],
                ["--steps", "3", "--repeats", "3", "--standard-only"]),
         _train("configs/tiny.yaml", TINY_MODEL, ["train.global_batch=4", "train.seq_len=32", "loss.chunk_size=8"],
                ["--steps", "1", "--repeats", "1", "--standard-only", "--mean-doc-len", "16"])),
    Step("loss_128k_unchunked", "the same step with the B x T x V logits materialized", "bench_train.py",
         _train(TINYLLAMA, ["model.vocab_size=128256"], ["train.global_batch=4", "train.seq_len=2048",
                                                         "loss.chunk_size=0"],
                ["--steps", "3", "--repeats", "3", "--standard-only"]),
         _train("configs/tiny.yaml", TINY_MODEL, ["train.global_batch=4", "train.seq_len=32", "loss.chunk_size=0"],
                ["--steps", "1", "--repeats", "1", "--standard-only", "--mean-doc-len", "16"])),
    Step("attention", "xla / cuDNN / Pallas-GPU attention with packed segments: fwd+bwd time, error vs f32 XLA",
         "bench_attention.py",
         ["--batch", "8", "--seq-len", "2048", "--heads", "32", "--kv-heads", "4", "--head-dim", "64"],
         ["--batch", "2", "--seq-len", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--iters", "2",
          "--mean-doc-len", "16", "--dtype", "float32"], timeout_s=120),
    Step("decode", "greedy decoding, 1B bf16: KV cache vs transformers generate, tokens equal", "bench_decode.py",
         ["--config", TINYLLAMA, "--batch", "16", "--prompt-len", "1024", "--new-tokens", "50", "--no-recompute"],
         ["--config", "configs/tiny.yaml", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats",
          "1", *TINY_MODEL, "train.seq_len=32"], timeout_s=150),
    Step("decode_f32", "the same in float32: tokens equal to transformers' float32 greedy output",
         "bench_decode.py",
         ["--config", TINYLLAMA, "--batch", "4", "--prompt-len", "256", "--new-tokens", "50", "--no-recompute",
          "model.dtype=float32"],
         ["--config", "configs/tiny.yaml", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats",
          "1", "--no-recompute", *TINY_MODEL, "train.seq_len=32"], timeout_s=120),
)


def run_step(step: Step, out: str, dry: bool) -> dict:
    """Runs one step in its own process; returns its record (never raises)."""
    out_json = os.path.join(out, f"{step.name}.json")
    log = os.path.join(out, f"{step.name}.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:  # one CPU device, whatever the caller simulates (the tiny batches do not split over 8)
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    started = time.perf_counter()
    record = {"step": step.name, "what": step.what, "command": " ".join(step.command(out_json, dry)[1:])}
    try:
        with open(log, "w") as f:
            proc = subprocess.run(step.command(out_json, dry), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=step.timeout_s)
        record["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        record["status"] = f"timed out after {step.timeout_s} s"
    record["seconds"] = round(time.perf_counter() - started, 1)
    if os.path.isfile(out_json):
        with open(out_json) as f:
            record["result"] = json.load(f)
    if record["status"] != "ok":
        with open(log) as f:
            record["log_tail"] = f.read()[-2000:]
    return record


def markdown(records: list[dict], device: str) -> str:
    """The tables docs/benchmarks.md takes, from the step records."""
    lines = [f"# gf_jax GPU check ({device}, {time.strftime('%Y-%m-%d')})", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {_figures(r.get('result'))} |")
    return "\n".join(lines) + "\n"


def _figures(result: dict | None) -> str:
    if not result:
        return ""
    if "standard" in result:  # bench_train
        parts = []
        for variant in ("standard", "goldfish"):
            if variant in result:
                v = result[variant]
                mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
                parts.append(f"{variant} {v['step_time_s'] * 1e3:.1f} ms/step, {v['tokens_per_s']:,.0f} tok/s, "
                             f"MFU {mfu}")
        if "goldfish_over_standard" in result:
            parts.append(f"goldfish/standard {result['goldfish_over_standard']:.3f}")
        if result.get("peak_bytes_in_use"):
            parts.append(f"peak {result['peak_bytes_in_use'] / 2**30:.1f} GiB")
        return "; ".join(parts)
    if "implementations" in result:  # bench_attention
        def one(v):
            if "error" in v:
                return v["error"]
            return f"{v['fwd_bwd_ms']:.2f} ms, {v['tflops']:.1f} TFLOP/s, err {v['max_abs_diff_vs_f32_xla']:.2g}"

        return "; ".join(f"{n}: {one(v)}" for n, v in result["implementations"].items())
    if "methods" in result:  # bench_decode
        parts = [f"{n}: {v['tokens_per_s']:,.0f} tok/s" for n, v in result["methods"].items()]
        if result.get("speedup_over_hf") is not None:
            parts.append(f"{result['speedup_over_hf']:.2f}x transformers, "
                         f"tokens equal {result['tokens_equal_to_hf']:.1%}")
        elif result.get("hf_note"):
            parts.append("transformers not installed: no comparison")
        return "; ".join(parts)
    return ""


def select(names_only: list[str] | None, skip: list[str]) -> list[Step]:
    known = {s.name for s in STEPS}
    unknown = sorted((set(names_only or []) | set(skip)) - known)
    if unknown:
        raise SystemExit(f"error: unknown step {unknown[0]!r}; the steps are {', '.join(sorted(known))}.")
    return [s for s in STEPS if (not names_only or s.name in names_only) and s.name not in skip]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for results.json, results.md and each step's JSON and log")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    p.add_argument("--only", nargs="*", default=None, help="run these steps only")
    p.add_argument("--skip", nargs="*", default=[], help="skip these steps")
    p.add_argument("--budget-s", type=float, default=470.0, help="skip steps that would end past this")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    a = p.parse_args(argv)
    steps = select(a.only, a.skip)
    if a.list:
        for s in steps:
            print(f"{s.name:22s} {s.what}")
        return 0
    if not a.out:
        raise SystemExit("error: --out is required; pass a folder for the results.")
    os.makedirs(a.out, exist_ok=True)
    device = _device_kind(a.dry_run)
    records, started = [], time.perf_counter()
    for i, step in enumerate(steps, 1):
        if time.perf_counter() - started + step.timeout_s > a.budget_s and not a.dry_run:
            records.append({"step": step.name, "what": step.what, "status": "skipped (time budget)"})
        else:
            print(f"[gpu_check] {i}/{len(steps)} {step.name}: {step.what}", flush=True)
            records.append(run_step(step, a.out, a.dry_run))
            print(f"[gpu_check] {step.name}: {records[-1]['status']} in {records[-1]['seconds']} s "
                  f"({time.perf_counter() - started:.0f} s in all)", flush=True)
        _write(a.out, records, device)
    print(open(os.path.join(a.out, "results.md")).read())
    return 0 if all(r["status"] in ("ok", "skipped (time budget)") for r in records) else 1


def _device_kind(dry: bool) -> str:
    if dry:
        return "cpu (dry run)"
    code = "import jax; print(jax.devices()[0].device_kind)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or "unknown"


def _write(out: str, records: list[dict], device: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), "steps": records}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(records, device))


if __name__ == "__main__":
    sys.exit(main())
