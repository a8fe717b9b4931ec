"""The documents of an experiment: reading a source in order, a tokenizer for the corpus, documents
cut to an exact number of tokens, their token ids as the pipeline frames them, rows per pass."""

from __future__ import annotations

from collections.abc import Iterable

from gf_jax import data
from gf_jax.data import Document

# Cuts tried around the wanted length, nearest first (see truncate_to_tokens).
_CUT_DELTAS = (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8)


def truncate_to_tokens(text: str, tokenizer, n_tokens: int) -> str | None:
    """The longest prefix of ``text`` made of whole tokens that encodes to exactly ``n_tokens``
    tokens (None if the text is shorter). The tokenizer round-trips exactly, so the prefix is
    the original text cut at a token boundary."""
    ids = tokenizer.encode([text])[0]
    if len(ids) < n_tokens:
        return None
    # Re-encoding a cut text can segment its end differently (one token more or less): try the
    # cuts nearest n_tokens until one re-encodes to exactly n_tokens.
    for delta in _CUT_DELTAS:
        cut = n_tokens + delta
        if 0 < cut <= len(ids):
            prefix = tokenizer.decode([ids[:cut]])[0]
            if len(tokenizer.encode([prefix])[0]) == n_tokens:
                return prefix
    raise ValueError(f"no cut of a {len(ids)}-token document re-encodes to exactly {n_tokens} tokens; "
                     "choose another experiment.doc_tokens / canary_tokens.")


def cut_documents(docs: Iterable, tokenizer, data_config, *, n_tokens: int, limit: int) -> list:
    """The first ``limit`` documents with at least ``n_tokens`` tokens (BOS/EOS included), each cut
    to exactly that length, in corpus order; fewer when the corpus runs out."""
    n_special = int(data_config.add_bos) + int(data_config.add_eos)
    chosen = []
    for doc in docs:  # lazily: a large corpus is read only as far as needed
        text = truncate_to_tokens(doc.text, tokenizer, n_tokens - n_special)
        if text is not None:
            chosen.append(Document(doc.id, text))
        if len(chosen) == limit:
            break
    return chosen


def document_tokens(docs, tokenizer, data_config) -> list[list[int]]:
    """Token ids of each document exactly as the data pipeline frames them (BOS/EOS)."""
    return [t.tolist() for t in data.tokenize_documents(docs, tokenizer, data_config.add_bos, data_config.add_eos)]


def document_chunks(docs, *, chunk: int, stop: int | None = None):
    """Lists of ``chunk`` consecutive documents of a source, from the first chunk up to the one that
    starts before ``stop`` (default: all); one request per chunk for sources that serve many at
    once (TFDS)."""
    end = len(docs) if stop is None else min(len(docs), stop)
    for start in range(0, end, chunk):
        indices = range(start, min(start + chunk, len(docs)))
        yield docs.get_many(indices) if hasattr(docs, "get_many") else [docs[i] for i in indices]


def validation_documents(data_config, limit: int, scan: int = 200_000) -> list:
    """The first ``limit`` background documents of the validation split (scanning about ``scan``)."""
    if limit == 0 or data_config.validation_fraction <= 0:
        return []
    found = []
    for docs in document_chunks(data.read_background(data_config), chunk=1024, stop=scan):
        found += [d for d in docs if data.split_of(d.id, data_config.validation_fraction) == "validation"]
        if len(found) >= limit:
            break
    return found[:limit]
