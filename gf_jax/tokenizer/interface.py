"""The one tokenizer interface of gf_jax, which the sentencepiece and the Hugging Face tokenizers share.

    tokenizer = load_tokenizer(path)          # gf_jax.tokenizer.loading: a .model, a tokenizer.json,
    ids = tokenizer.encode(["some text"])[0]  # or a Hugging Face model directory

Token ids are plain ints; BOS/EOS/PAD ids are -1 when the tokenizer has none (PAD falls back to
another id: padded positions carry weight 0, so the id never matters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the data pipeline, evaluation and export need of a tokenizer.

    Attributes:
      vocab_size: number of ids (added tokens included).
      bos_id, eos_id: begin/end-of-document ids, -1 when the tokenizer has none.
      pad_id: the id padding carries.
      path: the file it was loaded from (a ``.model`` or a ``tokenizer.json``).
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    path: str | None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""

    def encode_arrays(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[np.ndarray]:
        """Like ``encode`` but int32 arrays, optionally framed by BOS/EOS."""

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids, character offset where each token starts) of one text, special tokens written
        in the text as their ids (what chat fine-tuning maps its spans with)."""

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of each id list (special tokens decode to nothing)."""

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i``."""


def text_list(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list; a bare string is refused (iterating it would encode each character)."""
    if isinstance(texts, str):
        raise TypeError("encode takes a list of texts; for one text use encode([text])[0].")
    return list(texts)


def encode_framed(tokenizer, texts: Sequence[str], add_bos: bool, add_eos: bool) -> list[np.ndarray]:
    """``tokenizer.encode(texts)`` as int32 arrays framed by BOS/EOS (either tokenizer class)."""
    if add_bos and tokenizer.bos_id < 0:
        raise ValueError(f"tokenizer {tokenizer.path!r} names no BOS token; set data.add_bos=false.")
    if add_eos and tokenizer.eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer.path!r} names no EOS token; set data.add_eos=false.")
    head = [tokenizer.bos_id] if add_bos else []
    tail = [tokenizer.eos_id] if add_eos else []
    return [np.asarray(head + ids + tail, np.int32) for ids in tokenizer.encode(texts)]
