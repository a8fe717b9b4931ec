"""Who gets which document: the train/validation split (by id hash) and each process's share.

Both are pure functions of stable inputs (a document id; a stream length and process index),
so every run, seed and host agrees on them without talking to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gf_jax.data.canaries import CANARY_PREFIX, load_canaries
from gf_jax.data.config import DataConfig, check_choice
from gf_jax.data.sources import Document, read_background, read_in_chunks


def split_of(doc_id: str, validation_fraction: float) -> str:
    """``validation`` or ``train``, from a hash of the id (stable across runs, seeds and hosts)."""
    if validation_fraction <= 0 or doc_id.startswith(CANARY_PREFIX):
        return "train"
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def process_share(n: int, process_index: int, process_count: int) -> range:
    """Contiguous, disjoint share of ``range(n)`` for one process; the shares cover everything."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count}).")
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


def load_documents(config: DataConfig, split: str = "all") -> list[Document]:
    """Unique documents of ``config`` (each injected canary once), filtered to a split.

    ``split``: ``train`` (what the model trains on: background train split + injected canaries),
    ``validation`` (held out by ``validation_fraction``) or ``all``. Reads the whole source.
    """
    docs = read_background(config)
    extra = load_canaries(config)[0] if config.canary_repeats else []
    return select_split(docs, config, split, extra)


def select_split(records: Sequence, config: DataConfig, split: str, extra: Sequence = ()) -> list:
    """The records (documents or examples, read in chunks) and ``extra`` ones of ``split``."""
    check_choice("split", split, ("train", "validation", "all"))
    docs = [d for chunk in read_in_chunks(records, range(len(records))) for d in chunk] + list(extra)
    if split != "all":
        docs = [d for d in docs if split_of(d.id, config.validation_fraction) == split]
    return docs


def train_texts(config: DataConfig, *, max_chars: int = 50_000_000, records: Sequence | None = None) -> list[str]:
    """Texts of the train split of ``records`` (default: the source's documents), in order, until
    ``max_chars`` characters (whole chunks of documents): a tokenizer's training text. Canaries are
    not part of it."""
    background = read_background(config) if records is None else records
    texts, n_chars = [], 0
    for chunk in read_in_chunks(background, range(len(background))):
        for d in chunk:
            if split_of(d.id, config.validation_fraction) == "train":
                texts.append(d.text)
                n_chars += len(d.text)
        if n_chars >= max_chars:
            break
    return texts
