"""A GGUF file's tokenizer as Hugging Face tokenizer files, rebuilt from its ``tokenizer.ggml.*``
metadata with the ``tokenizers`` library, as transformers' GGUF loader rebuilds it.

``gpt2`` (byte-level BPE: GPT-2, LLaMA-3, Qwen, SmolLM): the vocabulary and merges into a BPE
model with the byte-level pre-tokenizer and decoder. ``llama`` (sentencepiece BPE with byte
fallback: LLaMA-2, Mistral, TinyLlama): the pieces into a BPE model with byte fallback, its merges
generated from the pieces' scores (as transformers' converter does when the file has none), spaces
written as "▁" (with the dummy prefix when ``add_space_prefix``). In both, control tokens
(``<|im_start|>``, ``<s>``, ...) become special added tokens; BOS / EOS / PAD / UNK and the chat
template go to tokenizer_config.json. Other types are one sentence.
"""

from __future__ import annotations

import os

from gf_jax.util import paths

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _field(reader, key: str, default=None):
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def write_tokenizer(reader, out_dir: str, path: str) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json of the file into ``out_dir``."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{path} has a {kind!r} tokenizer; gf_jax rebuilds GGUF tokenizers of type 'gpt2' "
                         "(byte-level BPE) and 'llama' (sentencepiece BPE); use the model's Hugging Face directory.")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    if kind == "gpt2":
        tokenizer = _bpe(tokens, types, merges, bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)))
    else:
        scores = list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
        tokenizer = _sentencepiece_bpe(tokens, types, scores, merges, reader)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    paths.write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(reader, tokens))
    ids = {f"{k}_token_id": _field(reader, f"tokenizer.ggml.{g}_token_id") for k, g in
           (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    paths.write_json(os.path.join(out_dir, "generation_config.json"),
                     {"_from_model_config": True, **{k: int(v) for k, v in ids.items() if v is not None}})


def _bpe(tokens: list[str], types: list[int], merges: list[str], add_prefix_space: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # GGUF sources only

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    tokenizer.add_special_tokens(specials)
    if user:
        tokenizer.add_tokens(user)
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float], merges: list[str], reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # GGUF sources only

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else generated_merges(vocab, scores)
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None if unk is None else tokens[int(unk)],
                                     fuse_unk=True, byte_fallback=True))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + steps)
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL])
    return tokenizer


def generated_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary without stored merges: every split of a piece into two
    pieces, the merges of higher-scored pieces first (transformers' ``generate_merges``)."""
    ranked = []
    for piece, score in zip(vocab, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        ranked += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    ranked.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _tokenizer_config(reader, tokens: list[str]) -> dict:
    def token(kind: str):
        value = _field(reader, f"tokenizer.ggml.{kind}_token_id")
        return tokens[int(value)] if value is not None and 0 <= int(value) < len(tokens) else None

    values = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"), "eos_token": token("eos"),
              "pad_token": token("padding"), "unk_token": token("unknown"),
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "chat_template": _field(reader, "tokenizer.chat_template")}
    return {k: v for k, v in values.items() if v is not None}
