"""Training a sentencepiece tokenizer on a corpus, cached by the corpus's content.

Trained tokenizers use byte fallback (no text is unencodable), no normalization (decoding gives
back the exact text, newlines included) and the ids ``unk=0, bos=1, eos=2, pad=3``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from gf_jax.tokenizer.sentencepiece_model import SentencePieceTokenizer
from gf_jax.util.textcheck import check_text_file

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



def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield from _pieces(line)


def _pieces(line: str, max_bytes: int = _TRAIN_OPTIONS["max_sentence_length"] - 1) -> Iterator[str]:
    """``line`` cut (at a space where there is one) into pieces of at most ``max_bytes`` UTF-8 bytes:
    sentencepiece skips longer sentences, and fails outright when every line is longer (minified
    JSON, one document per line)."""
    while len(line.encode("utf-8")) > max_bytes:
        cut = len(line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))  # whole characters
        space = line.rfind(" ", 0, cut)
        cut = space + 1 if space > cut // 2 else cut
        yield line[:cut]
        line = line[cut:]
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


def cached_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str, *,
                     verbose: bool = True) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer.load(path)


def _ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def default_tokenizer(corpus_path: str, vocab_size: int, cache_dir: str) -> SentencePieceTokenizer:
    """The tokenizer trained on ``corpus_path`` (file or folder of ``.txt``), trained on first use."""
    return cached_tokenizer(_read_inputs([corpus_path]), vocab_size, cache_dir)
