"""Data pipeline throughput next to what a training step of the tiny config consumes.

    .venv/bin/python scripts/bench_data.py            # configs/tiny.yaml: batch 16 x 128, vocab 1024
    .venv/bin/python scripts/bench_data.py --cores 2 --steps 10 --rounds 5 --config configs/tiny.yaml
    .venv/bin/python scripts/bench_data.py --scale 10,100,1000   # tokenized store vs in memory (MB)

Measured side by side in one run (same machine, same cores):
  1. tokenization of the whole corpus (one-off, before training), tokens/s;
  2. batch assembly (``BatchIterator.batch``: packing, positions, segments, weights), tokens/s;
  3. a jitted training step of the tiny model (forward + backward + AdamW, goldfish loss), on
     a batch that is already in memory, tokens/s consumed;
  4. the same training loop fed by the prefetching iterator, alternating with (3) over rounds;
     and the time the loop spent waiting inside ``next()`` for a batch (0 when prefetch keeps up).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to pin the process to")
    parser.add_argument("--config", default="configs/tiny.yaml", help="run config (data, model, batch shape)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", default="", help="only the scale section: corpus sizes in MB, e.g. 10,100,1000 "
                        "(see scripts/bench_data_scale.py)")
    parser.add_argument("--scale-dir", default="/tmp/gf_jax_bench_scale", help="where the scale corpora and stores go")
    parser.add_argument("--skip-memory-above", type=int, default=10**9,
                        help="scale: MB above which the in-memory pipeline is not run")
    parser.add_argument("--keep-stores", action="store_true",
                        help="scale: reuse the stores already in --scale-dir (prepare rates from their manifests)")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        os.sched_setaffinity(0, cores)
        print(f"pinned to cores {cores}")

    if args.scale:
        # The scale benchmark is its sibling script, loaded by path (scripts/ is not a package).
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_data_scale.py")
        spec = importlib.util.spec_from_file_location("bench_data_scale", path)
        bench_data_scale = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_data_scale)
        bench_data_scale.run([int(x) for x in args.scale.split(",")], args.scale_dir, args.config,
                             args.skip_memory_above, args.keep_stores)
        return 0

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gf_jax import data
    from gf_jax.config import load_config
    from gf_jax.data import corpus_tokenizer
    from gf_jax.loss import loss_fn
    from gf_jax.model.transformer import Transformer

    run_config = load_config(args.config)
    config, model_config = run_config.data, run_config.model
    tokenizer = corpus_tokenizer(config)  # cached after the first run
    B, T = run_config.train.global_batch, run_config.train.seq_len
    tokens_per_step = B * T

    # 1. Tokenization (once per run).
    docs = data.load_documents(config, "train")
    t0 = time.perf_counter()
    tokens = data.tokenize_documents(docs, tokenizer, config.add_bos, config.add_eos)
    t_tok = time.perf_counter() - t0
    n_tokens = sum(len(t) for t in tokens)
    tok_rate = n_tokens / t_tok

    # 2. Batch assembly, no prefetch (pure host cost per batch), over more than one epoch boundary.
    it = data.BatchIterator(tokens, global_batch=B, seq_len=T, seed=0, process_index=0, process_count=1,
                            pad_id=tokenizer.pad_id, prefetch=0)
    it.batch(0)
    n_batches = 300
    t0 = time.perf_counter()
    for s in range(n_batches):
        it.batch(s)
    t_batch = (time.perf_counter() - t0) / n_batches
    batch_rate = tokens_per_step / t_batch

    # 3. Tiny training step (jitted), fed one fixed batch.
    data.check_vocab_fits(tokenizer, model_config.vocab_size)
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    gl = run_config.goldfish

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_of(model):
            logits = model(batch.inputs_BxT, positions_BxT=batch.positions_BxT,
                           segment_ids_BxT=batch.segment_ids_BxT)
            loss, _ = loss_fn(logits, batch.targets_BxT, gl, weights_BxT=batch.weights_BxT,
                              positions_BxT=batch.positions_BxT)
            return loss

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    fixed = jax.tree.map(jnp.asarray, it.batch(0))
    fed = data.BatchIterator(tokens, global_batch=B, seq_len=T, seed=0, process_index=0, process_count=1,
                             pad_id=tokenizer.pad_id, prefetch=2)
    jax.block_until_ready(train_step(model, optimizer, fixed))  # compile

    def timed(feed):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(model, optimizer, feed())
        jax.block_until_ready(loss)
        return (time.perf_counter() - t0) / args.steps

    # 3 and 4 alternate over rounds (median per variant), so load from other processes on the
    # machine hits both alike.
    unfetched = data.BatchIterator(tokens, global_batch=B, seq_len=T, seed=0, process_index=0, process_count=1,
                                   pad_id=tokenizer.pad_id, prefetch=0)
    waits = {fed: [], unfetched: []}

    def from_pipeline(source):
        t0 = time.perf_counter()
        batch = next(source)  # with prefetch: returns at once when the thread kept up
        waits[source].append(time.perf_counter() - t0)
        return jax.tree.map(jnp.asarray, batch)

    fixed_times, fed_times, sync_times = [], [], []
    for _ in range(args.rounds):
        fixed_times.append(timed(lambda: fixed))
        fed_times.append(timed(lambda: from_pipeline(fed)))
        sync_times.append(timed(lambda: from_pipeline(unfetched)))
    fed.close()
    t_step, t_fed = float(np.median(fixed_times)), float(np.median(fed_times))
    step_rate = tokens_per_step / t_step

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, config {args.config}, corpus "
          f"{config.path}: {len(docs):,} training documents, {n_tokens:,} tokens (vocab {tokenizer.vocab_size}), "
          f"model d={model_config.d_model} x {model_config.n_layers} layers, batch {B}x{T}")
    print(f"{'stage':44s} {'tokens/s':>12s} {'ms/batch':>9s}")
    print(f"{'tokenization (once, before training)':44s} {tok_rate:12,.0f} {'':>9s}")
    print(f"{'batch assembly (host, per batch)':44s} {batch_rate:12,.0f} {t_batch * 1e3:9.2f}")
    print(f"{'training step of the model, batch in memory':44s} {step_rate:12,.0f} {t_step * 1e3:9.2f}")
    print(f"{'training step fed by the prefetching pipeline':44s} {tokens_per_step / t_fed:12,.0f} {t_fed * 1e3:9.2f}")
    t_sync = float(np.median(sync_times))
    print(f"{'training step fed without prefetch':44s} {tokens_per_step / t_sync:12,.0f} {t_sync * 1e3:9.2f}")
    for name, source in (("prefetch=2", fed), ("prefetch=0", unfetched)):
        w = waits[source]
        print(f"time the loop waited inside next(), {name}: median {np.median(w) * 1e3:.2f} ms, "
              f"max {max(w) * 1e3:.2f} ms ({len(w)} steps)")

    def spread(ts):
        return f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f} ms"

    print(f"per-round step times over {args.rounds} rounds: in memory {spread(fixed_times)}, "
          f"prefetched {spread(fed_times)}, no prefetch {spread(sync_times)}")
    print(f"batch assembly is {batch_rate / step_rate:.0f}x faster than the step consumes; "
          f"feeding from the pipeline changes the step time by {100 * (t_fed / t_step - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
