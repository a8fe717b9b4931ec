"""Greedy decoding throughput: KV cache vs full recomputation (vs HF ``generate``), side by side.

    .venv/bin/python scripts/bench_decode.py                       # configs/tiny.yaml model, CPU
    .venv/bin/python scripts/bench_decode.py --config configs/tinyllama-1b.yaml --batch 16 \\
        --prompt-len 1024 --new-tokens 50                          # the 1B, on a GPU

Random weights (speed does not depend on them). Measured in one run, same machine, same shapes:
  1. ``gf_jax.model.generate.decode_batch``: one prefill + a ``fori_loop`` of one-token steps with the KV
     cache, all in one jit;
  2. ``decode_batch_recompute``: greedy by running the whole sequence again for every token
     (also one jit; the reference the cache equals token for token);
  3. where torch and transformers are importable: HF ``LlamaForCausalLM.generate`` (greedy, KV
     cache) with the same weights copied in, the tool the authors' evaluation script uses.
Reported: generated tokens/s (batch x new tokens / wall time, prefill included, best of
``--repeats`` after a warm-up call that compiles) and ratios. Both ours and HF's token outputs are
compared: the same weights should give the same greedy text.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_model_from(model, config):
    """A transformers LlamaForCausalLM with ``model``'s weights (rotate-half RoPE in both)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d, n, k, h = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=d, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=n, num_key_value_heads=k, head_dim=h,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = LlamaForCausalLM(hf_config).eval()
    # Same compute dtype as ours (bfloat16 on GPU for the 1B config, float32 on CPU).
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        np.dtype(config.compute_dtype).name]

    def t(x):
        return torch.from_numpy(np.asarray(x, np.float32).copy())

    from gf_jax.model.transforms import relayout

    model = relayout(model, scan_layers=False)  # one block per HF layer
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(t(model.embedding[...]))
        for layer, block in zip(hf.model.layers, model.blocks):
            a = block.attn
            layer.self_attn.q_proj.weight.copy_(t(np.asarray(a.wq[...]).reshape(d, n * h).T))
            layer.self_attn.k_proj.weight.copy_(t(np.asarray(a.wk[...]).reshape(d, k * h).T))
            layer.self_attn.v_proj.weight.copy_(t(np.asarray(a.wv[...]).reshape(d, k * h).T))
            layer.self_attn.o_proj.weight.copy_(t(np.asarray(a.wo[...]).reshape(n * h, d).T))
            layer.mlp.gate_proj.weight.copy_(t(np.asarray(block.mlp.w_gate[...]).T))
            layer.mlp.up_proj.weight.copy_(t(np.asarray(block.mlp.w_up[...]).T))
            layer.mlp.down_proj.weight.copy_(t(np.asarray(block.mlp.w_down[...]).T))
            layer.input_layernorm.weight.copy_(t(block.attn_norm.scale[...]))
            layer.post_attention_layernorm.weight.copy_(t(block.mlp_norm.scale[...]))
        hf.model.norm.weight.copy_(t(model.final_norm.scale[...]))
        if not config.tie_embeddings:
            hf.lm_head.weight.copy_(t(np.asarray(model.lm_head[...]).T))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return hf.to(device=device, dtype=dtype), device


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="run config whose model section is used")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=50, help="decoded tokens (the paper's suffix: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=0, help="pin to this many CPU cores (0: no pinning)")
    parser.add_argument("--no-recompute", action="store_true", help="skip the recomputation baseline")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    parser.add_argument("--scan-layers", choices=["config", "true", "false"], default="config",
                        help="model.scan_layers: the config's, or scanned / unrolled blocks and KV cache")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config's model")
    args = parser.parse_args(argv)
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])

    import jax
    from flax import nnx

    from gf_jax.config import load_config
    from gf_jax.model import param_count
    from gf_jax.model.generate import decode_batch, decode_batch_recompute
    from gf_jax.model.transformer import Transformer

    overrides = list(args.overrides)
    overrides += [] if args.scan_layers == "config" else [f"model.scan_layers={args.scan_layers}"]
    config = load_config(args.config, overrides).model
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    if P + N > config.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {P + N} exceeds model.max_seq_len={config.max_seq_len}.")
    model = nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(0)))()
    prompts_BxP = np.random.default_rng(0).integers(0, config.vocab_size, (B, P)).astype(np.int32)
    print(f"model {args.config}: {param_count(config) / 1e6:.1f}M params, scan_layers={config.scan_layers}, "
          f"compute {np.dtype(config.compute_dtype)}, "
          f"device {jax.devices()[0].device_kind}; batch {B}, prompt {P}, {N} new tokens")

    results = {}
    outputs = {}

    def run_cached():
        outputs["cache"] = np.asarray(decode_batch(model, prompts_BxP, max_new_tokens=N)[0])

    results["jax KV cache"] = best_time(run_cached, args.repeats)
    if not args.no_recompute:
        def run_recompute():
            outputs["recompute"] = np.asarray(decode_batch_recompute(model, prompts_BxP, max_new_tokens=N)[0])

        results["jax recompute"] = best_time(run_recompute, args.repeats)
    hf_note = ""
    if not args.no_hf:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError:
            hf_note = ("HF comparison skipped: torch and transformers are not installed "
                       "(pip install torch transformers).")
        else:
            hf, device = hf_model_from(model, config)
            ids = torch.from_numpy(prompts_BxP.astype(np.int64)).to(device)

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                      do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
                if device == "cuda":
                    torch.cuda.synchronize()
                outputs["hf"] = out[:, P:].cpu().numpy()

            results[f"HF generate (torch {torch.__version__})"] = best_time(run_hf, args.repeats)

    base = results["jax KV cache"]
    print("\n| method | seconds | generated tokens/s | time / KV-cache time |\n| --- | --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {B * N / seconds:,.0f} | {seconds / base:.2f}x |")
    if "recompute" in outputs:
        print(f"\ncache == recompute, token for token: {np.array_equal(outputs['cache'], outputs['recompute'])}")
    if "hf" in outputs:
        print(f"tokens equal to HF generate: {np.mean(outputs['cache'] == outputs['hf']):.1%}")
    if hf_note:
        print(f"\n{hf_note}")
    summary = {
        "config": args.config, "overrides": args.overrides, "device": jax.devices()[0].device_kind,
        "batch": B, "prompt_len": P, "new_tokens": N, "dtype": str(np.dtype(config.compute_dtype)),
        "methods": {name: {"seconds": s, "tokens_per_s": B * N / s} for name, s in results.items()},
        "cache_equals_recompute": (bool(np.array_equal(outputs["cache"], outputs["recompute"]))
                                   if "recompute" in outputs else None),
        "tokens_equal_to_hf": float(np.mean(outputs["cache"] == outputs["hf"])) if "hf" in outputs else None,
        "hf_note": hf_note or None,
    }
    hf_times = [s for name, s in results.items() if name.startswith("HF")]
    summary["speedup_over_hf"] = hf_times[0] / base if hf_times else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
