"""Sentencepiece tokenizer: load any ``.model`` (e.g. LLaMA-2's), or train one on a corpus, cached.

Command line::

    python -m gf_jax.tokenizer train --input data/tinyshakespeare.txt --vocab-size 512 --out /tmp/tok

Trained tokenizers use byte fallback (no text is unencodable), no normalization (decoding gives
back the exact text, newlines included) and the ids
``unk=0, bos=1, eos=2, pad=3``; a loaded model keeps its own ids (a model without a pad piece,
like LLaMA-2's, pads with ``unk``: padded positions carry weight 0, so the id never matters).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from gf_jax.textcheck import check_text_file

# Options of every trained tokenizer; part of the cache key, so changing one retrains.
_TRAIN_OPTIONS = dict(
    model_type="unigram",
    byte_fallback=True,
    character_coverage=0.9995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    split_digits=True,
    # Exact round trip (decode(encode(text)) == text): no NFKC, whitespace kept, newlines are a
    # piece of their own. Memorization is judged on decoded text, so nothing may be normalized away.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    user_defined_symbols="\n",
    # Long lines (whole paragraphs) are kept rather than silently skipped.
    max_sentence_length=1 << 16,
    # Bounded memory on large corpora; sampled with sentencepiece's fixed internal seed.
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    # One thread: sentencepiece's multithreaded trainer is not bit-for-bit reproducible, and every
    # host of a pod must derive the same vocabulary from the same corpus.
    num_threads=1,
)


class Tokenizer:
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
    def load(cls, path: str) -> Tokenizer:
        """Loads a sentencepiece ``.model`` file, or a Hugging Face ``tokenizer.json`` / model
        directory (an ``HFTokenizer`` with the same interface, see ``gf_jax.hf.tokenizer``);
        raises FileNotFoundError with the path."""
        from gf_jax import rundir
        from gf_jax.hf import tokenizer as hf_tokenizer

        path = os.fspath(path)
        if rundir.is_url(path) and rundir.exists(path):  # e.g. gs://bucket/run/tokenizer.model
            path = rundir.localize(path)
        if os.path.isdir(path):
            return hf_tokenizer.load_directory(path)
        if hf_tokenizer.is_tokenizer_json(path):
            return hf_tokenizer.HFTokenizer(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer model {path!r} does not exist; set data.tokenizer to a sentencepiece "
                ".model file, or to null to train one on the corpus."
            )
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
        from gf_jax.hf.tokenizer import text_list

        return self._sp.encode(text_list(texts), out_type=int)

    def encode_arrays(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[np.ndarray]:
        """Like ``encode`` but int32 arrays, optionally framed by BOS/EOS (ids checked to exist)."""
        from gf_jax.hf.tokenizer import encode_framed

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
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def _read_inputs(inputs: Sequence[str]) -> list[str]:
    """Texts of the input files; a folder contributes its ``.txt`` files (sorted)."""
    texts = []
    for path in inputs:
        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(
                f"tokenizer training input {path!r} does not exist; pass an existing file or folder."
            )
        for f in files:
            check_text_file(f, what="tokenizer training input")
            with open(f, encoding="utf-8-sig", errors="replace") as fh:
                texts.append(fh.read())
    return texts


def train_from_texts(texts: Sequence[str], vocab_size: int, out_dir: str) -> str:
    """Trains a byte-fallback sentencepiece model on ``texts``; returns ``out_dir/tokenizer.model``."""
    lines = list(_lines(texts))
    if not lines:
        raise ValueError("the tokenizer training corpus is empty; point it at a file with text in it.")
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            minloglevel=2, **_TRAIN_OPTIONS,
        )
    except RuntimeError as e:
        msg = str(e)
        low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg)
        if low:
            raise ValueError(f"vocab_size {vocab_size} is too small for this corpus (byte fallback, special pieces "
                             f"and its characters need {low.group(1)}); raise data.vocab_size.") from None
        if high:
            raise ValueError(f"the corpus is too small for a {vocab_size}-piece tokenizer (at most {high.group(1)}); "
                             "lower data.vocab_size or use a larger corpus.") from None
        raise
    path = os.path.join(out_dir, "tokenizer.model")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(model.getvalue())
    os.replace(tmp, path)  # atomic: concurrent trainers (hosts sharing a disk) never see half a file
    return path


def train_tokenizer(inputs: list[str], vocab_size: int, out_dir: str) -> str:
    """Trains a tokenizer on text files (or folders of ``.txt``); returns the ``.model`` path."""
    return train_from_texts(_read_inputs(inputs), vocab_size, out_dir)


def cache_key(texts: Sequence[str], vocab_size: int) -> str:
    """Hash of corpus content, vocabulary size, training options and sentencepiece version."""
    h = hashlib.sha256()
    h.update(repr((sorted(_TRAIN_OPTIONS.items()), vocab_size, spm.__version__)).encode())
    for text in texts:
        data = text.encode("utf-8", errors="replace")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:20]


def cached_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str, *, verbose: bool = True) -> Tokenizer:
    """Trains a tokenizer on ``texts`` once; later calls with the same corpus load it from the cache."""
    out_dir = os.path.join(cache_dir, f"sp{vocab_size}-{cache_key(texts, vocab_size)}")
    path = os.path.join(out_dir, "tokenizer.model")
    if not os.path.isfile(path):
        if verbose:
            n_chars = sum(len(t) for t in texts)
            print(f"[gf_jax.tokenizer] training a {vocab_size}-piece sentencepiece tokenizer on "
                  f"{n_chars:,} characters -> {path}", file=sys.stderr)
        tmp_dir = tempfile.mkdtemp(prefix=".train-", dir=_ensure_dir(cache_dir))
        try:
            tmp_path = train_from_texts(texts, vocab_size, tmp_dir)
            os.makedirs(out_dir, exist_ok=True)
            os.replace(tmp_path, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return Tokenizer.load(path)


def _ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def default_tokenizer(corpus_path: str, vocab_size: int, cache_dir: str) -> Tokenizer:
    """The tokenizer trained on ``corpus_path`` (file or folder of ``.txt``), trained on first use."""
    return cached_tokenizer(_read_inputs([corpus_path]), vocab_size, cache_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gf_jax.tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-fallback sentencepiece model")
    train.add_argument("--input", nargs="+", required=True, help="text files or folders of .txt files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output folder (tokenizer.model is written there)")
    args = parser.parse_args(argv)
    try:
        missing = [p for p in args.input if not os.path.exists(p)]
        if missing:
            raise ValueError(f"--input {missing[0]} does not exist; pass text files or folders of .txt files.")
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive number of pieces (e.g. 4096), got {args.vocab_size}.")
        path = train_tokenizer(args.input, args.vocab_size, args.out)
    except (ValueError, OSError) as e:  # user errors: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{path}: {Tokenizer.load(path)}")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# A tokenizer for a configured corpus (gf_jax.data.DataConfig).


def corpus_tokenizer(data_config, texts: Sequence[str] | None = None, *, max_chars: int = 50_000_000) -> Tokenizer:
    """``data_config.tokenizer`` if set, else a ``data_config.vocab_size``-piece tokenizer trained on
    ``texts`` (default: the corpus's train split up to ``max_chars`` characters, canaries excluded;
    see ``gf_jax.data.train_texts``), cached in ``data_config.tokenizer_cache_dir`` by content, so a
    changed corpus retrains."""
    if data_config.tokenizer:
        return Tokenizer.load(data_config.tokenizer)
    if texts is None:
        from gf_jax import data  # here, not at the top: the tokenizer module does not need the data pipeline

        texts = data.train_texts(data_config, max_chars=max_chars)
    return cached_tokenizer(list(texts), data_config.vocab_size, data_config.tokenizer_cache_dir)
