"""Hugging Face tokenizers behind gf_jax's tokenizer interface.

``tokenizer.json`` (the ``tokenizers`` library: byte-level BPE of LLaMA-3 and Qwen, or the
sentencepiece-derived fast tokenizers of LLaMA-2/Mistral) becomes an :class:`HFTokenizer` with the
interface of :class:`gf_jax.tokenizer.interface.Tokenizer`. BOS/EOS/PAD come from, in order of precedence,
``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` and
``config.json`` of the same directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers

from gf_jax.tokenizer.interface import encode_framed, text_list

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# Everything a Hugging Face tokenizer may consist of (copied on import and export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
_ID_FILES = ("generation_config.json", "config.json")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map (a string or an
    AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_ids(directory: str, token_to_id) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id}`` (-1 when nowhere named) from the directory's files.

    ``token_to_id(text) -> int | None`` looks a token's text up in the vocabulary. A list of EOS
    ids (generation_config of LLaMA-3-Instruct) gives its first.
    """
    found: dict[str, int] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        values = _read_json(os.path.join(directory, name))
        for kind in ("bos", "eos", "pad"):
            text = _token_text(values.get(f"{kind}_token"))
            if kind not in found and text is not None and token_to_id(text) is not None:
                found[kind] = int(token_to_id(text))
    for name in _ID_FILES:
        values = _read_json(os.path.join(directory, name))
        for kind in ("bos", "eos", "pad"):
            value = values.get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if kind not in found and isinstance(value, int):
                found[kind] = value
    return {kind: found.get(kind, -1) for kind in ("bos", "eos", "pad")}


class HFTokenizer:
    """A ``tokenizer.json`` with the interface of :class:`gf_jax.tokenizer.interface.Tokenizer`.

    Attributes:
      vocab_size: number of ids, added tokens included.
      bos_id, eos_id: -1 when the tokenizer files name none.
      pad_id: the pad token, else EOS, else 0 (padded positions carry weight 0: the id never matters).
      path: the ``tokenizer.json`` file; its directory holds the special-token files.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a bad file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{path} is not a Hugging Face tokenizer.json ({why}); "
                "set data.tokenizer to a tokenizer.json, a folder holding one, or a sentencepiece .model file."
            ) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        ids = special_ids(os.path.dirname(os.path.abspath(path)), self._tok.token_to_id)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] >= 0 else (self.eos_id if self.eos_id >= 0 else 0)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (``add_special_tokens=False`` in HF terms)."""
        return [e.ids for e in self._tok.encode_batch(text_list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[np.ndarray]:
        """Like ``encode`` but int32 arrays, optionally framed by BOS/EOS (ids checked to exist)."""
        return encode_framed(self, texts, add_bos, add_eos)

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids, character offset where each token starts) of one text, special tokens written
        in the text (``<|im_end|>``) as their ids: what chat fine-tuning maps its spans with."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return list(encoding.ids), [start for start, _ in encoding.offsets]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of each id list (special tokens such as BOS/EOS/PAD decode to nothing)."""
        return self._tok.decode_batch([[int(i) for i in row] for row in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return (f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def is_tokenizer_json(path: str) -> bool:
    """True for a JSON file (whatever its name, e.g. a tokenizer.json a trainer copied elsewhere)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"
