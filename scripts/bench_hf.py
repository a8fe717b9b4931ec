"""Import/export time and peak host memory for a ~1B-parameter Hugging Face checkpoint.

    PYTHONPATH=. python scripts/bench_hf.py [--dir /tmp/gf_bench_hf] [--dtype bfloat16]

Writes a synthetic LLaMA-style model (d=2048, 16 layers, 32/8 heads, d_ff=8192, vocab 32000,
untied: 1.10B parameters) as safetensors shards of at most 1 GB, streamed tensor by tensor,
then in fresh processes (so each peak is its own) times ``gf_jax.run.load.load_model(HF_DIR)`` and
``hf export`` of the loaded model, reading each process's peak RSS (``ru_maxrss``). The
requirement is peak RSS < 1.3x the model's size in memory: no second copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8)

CHILD = r"""
import json, os, resource, sys, time
import jax
from gf_jax.run.load import load_model
from gf_jax.hf.export import export_model
hf_dir, out_dir, mode = sys.argv[1:4]
jax.devices()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # runtime, no model yet
t0 = time.perf_counter()
model, config, tok = load_model(hf_dir)
jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(model))))
t1 = time.perf_counter()
if mode == "export":
    export_model(model, tok, out_dir, source_dir=hf_dir)
t2 = time.perf_counter()
print(json.dumps({"baseline_rss_bytes": baseline, "load_s": t1 - t0, "export_s": t2 - t1,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_synthetic(hf_dir: str, dtype: str) -> int:
    """Streams a random checkpoint to ``hf_dir``; returns its size in bytes."""
    import ml_dtypes

    from gf_jax.hf.safetensors_io import write_sharded

    np_dtype = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}[dtype]
    v, d = SHAPE["vocab_size"], SHAPE["hidden_size"]
    f, n_layers = SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    kv = d * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                   (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                   (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                   (p + "mlp.down_proj.weight", (d, f))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    rng = np.random.default_rng(0)

    def produce(shape):
        return lambda: (rng.random(shape, dtype=np.float32) * 0.04 - 0.02).astype(np_dtype)

    os.makedirs(hf_dir, exist_ok=True)
    write_sharded(hf_dir, [(n, s, np_dtype, produce(s)) for n, s in shapes], max_shard_bytes=10**9)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype,
              "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as fh:  # a minimal byte-level tokenizer
        from tokenizers import Tokenizer, models, pre_tokenizers
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
        fh.write(tok.to_str())
    return sum(int(np.prod(s)) for _, s in shapes) * np_dtype.itemsize


def run_child(hf_dir: str, out_dir: str, mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD, hf_dir, out_dir, mode], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/gf_bench_hf")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args()
    hf_dir, out_dir = os.path.join(args.dir, "in"), os.path.join(args.dir, "out")
    t0 = time.perf_counter()
    size = write_synthetic(hf_dir, args.dtype)
    write_s = time.perf_counter() - t0
    load = run_child(hf_dir, out_dir, "load")
    both = run_child(hf_dir, out_dir, "export")
    n_params = size // np.dtype({"bfloat16": np.float16, "float32": np.float32}[args.dtype]).itemsize
    rows = [("write synthetic checkpoint", write_s, None),
            ("import (load_model, 1 CPU device)", load["load_s"], load["peak_rss_bytes"]),
            ("import + export", both["load_s"] + both["export_s"], both["peak_rss_bytes"])]
    print(f"model: {n_params / 1e9:.2f}B parameters, {args.dtype}, {size / 2**30:.2f} GiB")
    print("| step | time (s) | peak RSS (GiB) | peak RSS / model size |")
    print("|---|---|---|---|")
    for name, secs, rss in rows:
        rss_cols = f"{rss / 2**30:.2f} | {rss / size:.2f}x" if rss else "- | -"
        print(f"| {name} | {secs:.1f} | {rss_cols} |")
    print(f"export alone: {both['export_s']:.1f} s; JAX runtime before loading: "
          f"{load['baseline_rss_bytes'] / 2**30:.2f} GiB peak RSS")


if __name__ == "__main__":
    main()
