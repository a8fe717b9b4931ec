"""Scale section of ``bench_data.py``: the tokenized store against the in-memory pipeline as the
corpus grows (``bench_data.py --scale 10,100,1000``, sizes in MB).

For each size, a synthetic JSONL corpus of distinct documents is generated from the embedded Tiny
Shakespeare text (each document: a unique header and 3-8 random speeches), then
  1. prepare throughput of the store, tokens/s, with 1 and 2 worker processes;
  2. time to the first batch (building the training iterator with configs/tiny.yaml's batch, after
     imports) and peak RSS at that point, each in a fresh subprocess so the figures are that run's
     alone: with ``data.store=on`` at the first start (which computes the store's index files)
     and at a later start (which maps them; what every resume and rerun sees), then a later start
     with ``data.shuffle_algorithm=permutation`` (the materialised numpy permutations of runs
     started before the Feistel orders), and with ``data.store=off`` (the in-memory pipeline);
  3. then 100 batches spread over the corpus (random access): ms per batch, and the private
     memory (RssAnon) after them; memory-mapped pages are page cache, not counted there.
The tokenizer is the tiny config's (trained once on Tiny Shakespeare), so only the pipeline is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(path: str, megabytes: int, seed: int = 0) -> int:
    """Writes a JSONL corpus of about ``megabytes`` MB (distinct documents); returns documents."""
    from gf_jax.data import split_blank_lines

    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as fh:
        speeches = split_blank_lines(fh.read())
    rng = np.random.default_rng(seed)
    target, written, n = megabytes * 1_000_000, 0, 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        while written < target:
            picks = rng.integers(0, len(speeches), size=rng.integers(3, 9))
            text = f"Document {n}.\n" + "\n\n".join(speeches[i] for i in picks)
            line = json.dumps({"text": text}) + "\n"
            fh.write(line)
            written += len(line)
            n += 1
    os.replace(tmp, path)
    return n


def first_batch(mode: str, corpus: str, tokenizer_path: str, store_dir: str, global_batch: int, seq_len: int,
                algorithm: str = "auto") -> dict:
    """In this (fresh) process: seconds to build the iterator and get its first batch, peak RSS."""
    from gf_jax import data
    from gf_jax.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_path)
    config = data.DataConfig(source="jsonl", path=corpus, tokenizer=tokenizer_path, store=mode, store_dir=store_dir,
                             shuffle_algorithm=algorithm)
    it = data.make_train_iterator(config, tok, global_batch=global_batch, seq_len=seq_len, process_index=0,
                                  process_count=1, prefetch=0)
    next(it)
    seconds = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a subprocess would report at
    # least the RSS of the benchmark process that started it (which has just prepared a store).
    peak_mb = _status_mb("VmHWM")
    t1 = time.perf_counter()
    for s in range(1, 101):
        it.batch(s * 997)  # spread over the corpus: random access, not a warm neighbourhood
    per_batch = (time.perf_counter() - t1) / 100
    # Private memory after random batches: mapped store pages are page cache (RssFile), which the
    # kernel reclaims, so they are left out here.
    return {"seconds": seconds, "rss_mb": peak_mb, "anon_mb": _status_mb("RssAnon"), "batch_ms": per_batch * 1e3}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _in_subprocess(mode, corpus, tok_path, store_dir, B, T, algorithm="auto") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "first-batch", mode, corpus, tok_path, store_dir, str(B), str(T),
           algorithm]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(sizes_mb: list[int], work_dir: str, config_path: str, skip_memory_above_mb: int,
        keep_stores: bool = False) -> None:
    """The scale table. ``keep_stores``: reuse stores already in ``work_dir`` and take their prepare
    rates from their manifests (``prepare_seconds``, the time ``prepare_store`` took)."""
    from gf_jax import data
    from gf_jax.config import load_config
    from gf_jax.data import corpus_tokenizer

    run_config = load_config(config_path)
    tok = corpus_tokenizer(run_config.data)
    B, T = run_config.train.global_batch, run_config.train.seq_len
    os.makedirs(work_dir, exist_ok=True)
    print(f"scale: tokenizer {tok.path} (vocab {tok.vocab_size}), batch {B}x{T}, work dir {work_dir}, "
          f"{len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'corpus':>8s} {'docs':>9s} {'tokens':>12s} {'prep 1w tok/s':>14s} {'prep 2w tok/s':>14s} "
          f"| store, first start: {'1st batch':>9s} {'peak RSS':>8s} {'private':>8s} {'ms/batch':>8s} "
          f"| store, later start: {'1st batch':>9s} {'peak RSS':>8s} {'private':>8s} {'ms/batch':>8s} "
          f"| store, permutation, later: {'1st batch':>9s} {'peak RSS':>8s} {'private':>8s} {'ms/batch':>8s} "
          f"| memory: {'1st batch':>9s} {'peak RSS':>8s} {'private':>8s} {'ms/batch':>8s}")
    for mb in sizes_mb:
        corpus = os.path.join(work_dir, f"corpus-{mb}mb.jsonl")
        if not os.path.exists(corpus):
            make_corpus(corpus, mb)
        config = data.DataConfig(source="jsonl", path=corpus, tokenizer=tok.path)
        rates = {}
        for workers in (1, 2):
            path = os.path.join(work_dir, f"store-{mb}mb-{workers}w")
            if not (keep_stores and os.path.exists(os.path.join(path, "manifest.json"))):
                shutil.rmtree(path, ignore_errors=True)
                data.prepare_store(config, tok, path=path, workers=workers, progress=False)
            with open(os.path.join(path, "manifest.json")) as fh:
                manifest = json.load(fh)
            rates[workers] = manifest["tokens"] / manifest["prepare_seconds"]
        store_dir = os.path.join(work_dir, f"store-{mb}mb-2w")
        shutil.rmtree(os.path.join(store_dir, "index"), ignore_errors=True)  # so the first start builds them
        first = _in_subprocess("on", corpus, tok.path, store_dir, B, T, "feistel")
        later = _in_subprocess("on", corpus, tok.path, store_dir, B, T, "feistel")
        _in_subprocess("on", corpus, tok.path, store_dir, B, T, "permutation")  # its own layout files
        legacy = _in_subprocess("on", corpus, tok.path, store_dir, B, T, "permutation")
        memory = (_in_subprocess("off", corpus, tok.path, "", B, T) if mb <= skip_memory_above_mb
                  else dict.fromkeys(("seconds", "rss_mb", "anon_mb", "batch_ms"), float("nan")))
        m = json.load(open(os.path.join(work_dir, f"store-{mb}mb-2w", "manifest.json")))
        print(f"{mb:>6d}MB {m['documents']:>9,d} {m['tokens']:>12,d} {rates[1]:>14,.0f} {rates[2]:>14,.0f} "
              f"| {_cells(first)} | {_cells(later)} | {_cells(legacy)} | {_cells(memory)}", flush=True)


def _cells(r: dict) -> str:
    """Time to first batch, peak RSS at it, private memory after 100 random batches, ms per batch."""
    return f"{r['seconds']:>15.2f}s {r['rss_mb']:>6.0f}MB {r['anon_mb']:>6.0f}MB {r['batch_ms']:>8.2f}"


def read_tokens(path: str) -> int:
    with open(os.path.join(path, "manifest.json")) as fh:
        return json.load(fh)["tokens"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "first-batch":
    mode, corpus, tok_path, store_dir, B, T, algorithm = sys.argv[2:9]
    print(json.dumps(first_batch(mode, corpus, tok_path, store_dir or None, int(B), int(T), algorithm)))
