"""Spans that must never be learned: kept in the context, never supervised (SLUNG, Wang et al. 2025,
arXiv 2505.03052), on top of the goldfish mask.

Goldfish loss leaves a pseudo-random 1/k of the tokens out of the loss, so a passage seen many times
is never learned whole; but the other (k-1)/k of an e-mail address or an id are still learned, and
a near-duplicate copy (another window, other holes) may supply the rest. A user who knows where the
sensitive spans are can take them out of the loss altogether: the model still reads them (the text
around them is unchanged), it is never trained to produce them.

Where the spans come from (``gf_jax.data.config.DataConfig``):
- ``data.protect``: regular expressions, or the names of the built-in ones (``PRESETS``: ``email``,
  ``phone``, ``ipv4``, ``iban``), matched in each document's text (text data) or in the text an
  instruction or chat example is rendered to (its answers included);
- ``data.protect_field``: a JSONL key holding a document's character spans ``[[start, end], ...]``
  (text data from JSONL; the ends are exclusive, as Python slices).
A token is protected when its characters overlap a protected span; its target weight is 0.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from gf_jax.data.config import DataConfig
from gf_jax.data.sources import JSONL_SUFFIXES, Document, list_files

PRESETS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?<![\w+])\+?\d(?:[\s().-]?\d){6,14}(?!\w)",
    "ipv4": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
    "iban": r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b",
}


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    """The regular expressions of ``data.protect`` (preset names replaced by their expressions)."""
    out = []
    for pattern in patterns:
        try:
            out.append(re.compile(PRESETS.get(pattern, pattern)))
        except re.error as e:
            raise ValueError(f"data.protect entry {pattern!r} is not a regular expression ({e}); fix it or use one "
                             f"of {', '.join(PRESETS)}.") from None
    return out


def pattern_spans(text: str, patterns: Sequence[re.Pattern]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of every match of ``patterns`` in ``text``."""
    return [m.span() for p in patterns for m in p.finditer(text) if m.end() > m.start()]


def covered(starts_U: np.ndarray, n_chars: int, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Which tokens overlap a span: token j covers characters ``[starts[j], starts[j+1])`` (the last
    one up to the end of the text)."""
    starts_U = np.asarray(starts_U, np.int64)
    ends_U = np.append(starts_U[1:], n_chars) if starts_U.size else starts_U
    ends_U = np.maximum(ends_U, starts_U + 1)  # a token without characters of its own still has a place
    out = np.zeros(starts_U.size, bool)
    for lo, hi in spans:
        out |= (starts_U < hi) & (ends_U > lo)
    return out


def protected_targets(docs: Sequence[Document], tokenizer, config: DataConfig, tokens: Sequence[np.ndarray],
                      field_spans: dict[str, list] | None = None) -> list[np.ndarray]:
    """For each document, a bool array over its tokens (BOS/EOS framing as in ``tokens``): True where
    the token is protected, so the target predicting it gets weight 0."""
    patterns = compile_patterns(config.protect)
    out = []
    for doc, doc_tokens in zip(docs, tokens):
        ids, starts = tokenizer.encode_offsets(doc.text)
        spans = pattern_spans(doc.text, patterns) + [tuple(s) for s in (field_spans or {}).get(doc.id, [])]
        inner = covered(np.asarray(starts), len(doc.text), spans)
        bos = int(config.add_bos and tokenizer.bos_id >= 0)
        if len(ids) + bos + int(config.add_eos and tokenizer.eos_id >= 0) != len(doc_tokens):
            raise ValueError(f"document {doc.id}: its tokens with offsets differ from its tokens ({len(ids)} vs "
                             f"{len(doc_tokens)}); data.protect needs a tokenizer that encodes texts the same way.")
        mask = np.zeros(len(doc_tokens), bool)
        mask[bos:bos + len(ids)] = inner
        out.append(mask)
    return out


def read_field_spans(config: DataConfig) -> dict[str, list]:
    """``{document id: [[start, end], ...]}`` from ``data.protect_field`` of a JSONL source (ids as the
    source gives them: ``id_field``, else ``relpath:line``); checked to be character spans."""
    if not config.protect_field:
        return {}
    files, root = list_files(config.path, JSONL_SUFFIXES, "JSONL")
    out = {}
    for f in files:
        if not f.endswith(".jsonl"):
            raise ValueError(f"data.protect_field reads plain .jsonl files; decompress {f} first.")
        rel = os.path.relpath(f, root) if root else os.path.basename(f)  # as the JSONL source names them
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                spans = record.get(config.protect_field, [])
                where = f"{f}:{line_no}"
                if not isinstance(spans, list) or not all(
                        isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s) and 0 <= s[0] <= s[1]
                        for s in spans):
                    raise ValueError(f"{where}: {config.protect_field!r} must be a list of [start, end] character "
                                     "offsets; fix that line.")
                doc_id = str(record[config.id_field]) if config.id_field else f"{rel}:{line_no}"
                out[doc_id] = spans
    return out
