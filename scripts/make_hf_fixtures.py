"""Writes tiny Hugging Face models of every supported architecture, with reference outputs.

Run once, in a separate environment with torch and transformers (never a gf_jax dependency):

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch transformers safetensors tokenizers sentencepiece numpy
    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py            # -> tests/fixtures/hf/

Everything is built locally (nothing comes from a hub): a byte-level BPE tokenizer trained with
``tokenizers`` and a byte-fallback sentencepiece model, both on data/tinyshakespeare.txt. Each
model is randomly initialised (norm scales and biases moved away from 1 and 0 so a missing
one shows) and saved with ``save_pretrained``; ``reference/<name>.npz`` holds Hugging Face float32
logits of fixed prompts and greedy continuations, ``reference/<name>.json`` the tokenizer ids of
fixed texts. The tests (tests/test_hf*.py) compare gf_jax against these on CPU without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
PROMPTS = ["First Citizen:\nBefore we proceed any further",
           "All:\nSpeak, speak.",
           "You are all resolved rather to die than to famish?"]
TEXTS = PROMPTS + ["  Two  spaces, tabs\tand Ünïcödé ✓ 🐟 newlines\n\nend", "", "MENENIUS: 1234 5678 — what?"]
GREEDY_STEPS = 8
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.15)


def corpus_lines() -> list[str]:
    with open(CORPUS) as f:
        return [line for line in f.read()[:200_000].splitlines() if line.strip()]


def byte_level_bpe(out_dir: str, specials: dict):
    """A 320-id byte-level BPE tokenizer (the LLaMA-3 / Qwen kind), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    names = [t for t in dict.fromkeys(specials.values()) if t]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=names,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in specials.items() if v})
    fast.save_pretrained(out_dir)
    return fast


def sentencepiece_model(out_dir: str, keep_json: bool):
    """A 400-piece byte-fallback sentencepiece BPE (the LLaMA-2 / Mistral kind: no normalization,
    whitespace kept) as tokenizer.model, loaded by transformers' AutoTokenizer (LlamaTokenizer);
    ``keep_json`` keeps the tokenizer.json transformers converts it to."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(corpus_lines()), model_prefix=prefix,
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    os.remove(prefix + ".vocab")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "legacy": True}, f)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if not keep_json and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer.json"))
    return tok


def perturb_(model) -> None:
    """Norm scales in [0.5, 1.5], biases ~ N(0, 0.2): the defaults would hide a missing one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)


def greedy(model, ids: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy continuation (full forward each step) and the smallest top-1/top-2 logit margin."""
    ids, margin = list(ids), float("inf")
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(logits)))
    return ids, margin


def build(name: str, arch: str, hf_config: dict, tokenizer_kind: str, dtype=torch.float32,
          max_shard_size: str | None = None, legacy_config: dict | None = None) -> None:
    import transformers

    out_dir = os.path.join(OUT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    if tokenizer_kind == "bpe-llama3":
        tok = byte_level_bpe(out_dir, {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None})
    elif tokenizer_kind == "bpe-qwen":
        tok = byte_level_bpe(out_dir, {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"})
    else:
        tok = sentencepiece_model(out_dir, keep_json=tokenizer_kind == "sp+json")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = config_cls(**TINY, vocab_size=len(tok), **{f"{k}_token_id": v for k, v in ids.items()}, **hf_config)
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, arch)(config).eval()
    perturb_(model)
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True, **shard)
    # The reference runs in float32 on exactly the stored (possibly rounded) weights.
    model = getattr(transformers, arch).from_pretrained(out_dir, dtype=torch.float32).eval()
    if legacy_config is not None:  # rewrite config.json in the transformers-4 dialect
        with open(os.path.join(out_dir, "config.json")) as f:
            values = json.load(f)
        for key in ("rope_parameters", "dtype"):
            values.pop(key, None)
        values.update(legacy_config)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(values, f, indent=2)
    reference(name, model, tok, ids)


def reference(name: str, model, tok, ids: dict) -> None:
    bos = [ids["bos"]] if ids["bos"] is not None else []
    arrays, margins = {}, []
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = bos + tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            arrays[f"logits_{i}"] = model(torch.tensor([prompt_ids])).logits[0].float().numpy()
        arrays[f"prompt_{i}"] = np.asarray(prompt_ids, np.int32)
        out, margin = greedy(model, prompt_ids, GREEDY_STEPS)
        arrays[f"greedy_{i}"] = np.asarray(out[len(prompt_ids):], np.int32)
        margins.append(margin)
    os.makedirs(os.path.join(OUT, "reference"), exist_ok=True)
    np.savez_compressed(os.path.join(OUT, "reference", f"{name}.npz"), **arrays)
    info = {"texts": TEXTS, "ids": [tok(t, add_special_tokens=False).input_ids for t in TEXTS],
            "decoded": [tok.decode(tok(t, add_special_tokens=False).input_ids) for t in TEXTS],
            "special_ids": ids, "min_greedy_margin": min(margins)}
    with open(os.path.join(OUT, "reference", f"{name}.json"), "w") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
    print(f"{name}: min greedy margin {min(margins):.4f}", file=sys.stderr)


def main() -> None:
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64, "rope_theta": 50000.0}
    # LLaMA-3.1-style: llama3 RoPE, untied, byte-level BPE, transformers-5 config dialect.
    build("llama3", "LlamaForCausalLM", {"rope_parameters": llama3_rope, "tie_word_embeddings": False},
          "bpe-llama3")
    # LLaMA-2-style: sentencepiece tokenizer.model only, linear RoPE, tied, transformers-4 dialect.
    build("llama2", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 10000.0},
                                         "tie_word_embeddings": True},
          "sp", legacy_config={"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
                               "torch_dtype": "float32"})
    # Mistral: bfloat16 weights in several shards with an index, window larger than the context.
    build("mistral", "MistralForCausalLM", {"sliding_window": 4096, "tie_word_embeddings": False},
          "sp+json", dtype=torch.bfloat16, max_shard_size="60KB")
    # Qwen2: q/k/v biases, tied embeddings, float16 weights, no BOS.
    build("qwen2", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, "bpe-qwen", dtype=torch.float16)
    # Qwen3: q/k RMSNorm, head_dim 32 != hidden_size / heads, untied.
    build("qwen3", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}, "bpe-qwen")


if __name__ == "__main__":
    main()
