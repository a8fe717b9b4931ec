"""Sentencepiece tokenizers: any ``.model`` (e.g. LLaMA-2's), or one gf_jax trained (``training``).

A gf_jax-trained model uses the ids ``unk=0, bos=1, eos=2, pad=3``; a loaded model keeps its own
ids (one without a pad piece, like LLaMA-2's, pads with ``unk``: padded positions carry weight 0,
so the id never matters).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from gf_jax.tokenizer.interface import encode_framed, text_list


class SentencePieceTokenizer:
    """A sentencepiece model with the ids the data pipeline needs.

    Attributes:
      vocab_size: number of pieces (ids are in ``[0, vocab_size)``).
      bos_id, eos_id: begin/end-of-document ids (-1 when the model has none).
      pad_id: id used for padding (the model's pad piece, else unk, else 0).
      path: the ``.model`` file it was loaded from.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        self.vocab_size = int(processor.get_piece_size())
        self.bos_id = int(processor.bos_id())
        self.eos_id = int(processor.eos_id())
        pad = int(processor.pad_id())
        unk = int(processor.unk_id())
        self.pad_id = pad if pad >= 0 else (unk if unk >= 0 else 0)

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Loads a local sentencepiece ``.model`` file (any tokenizer: ``gf_jax.tokenizer.load_tokenizer``)."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"{path!r} is not a sentencepiece model ({e}); point data.tokenizer at a .model file."
            ) from None
        return cls(processor, path)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        return self._sp.encode(text_list(texts), out_type=int)

    def encode_arrays(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[np.ndarray]:
        """Like ``encode`` but int32 arrays, optionally framed by BOS/EOS (ids checked to exist)."""
        return encode_framed(self, texts, add_bos, add_eos)

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids, character offset where each token starts) of one text; BOS/EOS pieces written
        in the text (``<s>``, as chat templates do) become their ids, as in transformers' slow
        tokenizers, and the text between them is encoded piece by piece."""
        specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        ids, starts, at = [], [], 0
        pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        for part in re.split(f"({pattern})", text) if pattern else [text]:
            if part in specials:
                ids.append(specials[part])
                starts.append(at)
            elif part:
                # sentencepiece reports byte offsets; map them to characters of ``part``.
                char_of_byte = np.repeat(np.arange(len(part) + 1), [len(c.encode()) for c in part] + [1])
                for piece in self._sp.encode(part, out_type="proto").pieces:
                    ids.append(int(piece.id))
                    starts.append(at + int(char_of_byte[min(piece.begin, len(char_of_byte) - 1)]))
            at += len(part)
        return ids, starts

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of each id list (special ids such as BOS/EOS/PAD decode to nothing)."""
        return [self._sp.decode([int(i) for i in row]) for row in ids]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")
