"""Extraction beyond greedy decoding: the probability of the exact suffix, what n samples would
extract, and prefixes that do not start at the document's beginning.

- **(n, p)-discoverable extraction** (Hayes et al. 2024, arXiv 2410.19482): with ``p_z`` the
  model's probability of the true suffix given its prompt, computed exactly by teacher forcing (the
  sum of the suffix tokens' log-probabilities), one of ``n`` samples reproduces the suffix with
  probability ``1 - (1 - p_z)^n``; a document is (n, p)-discoverable when that is at least ``p``.
  ``discoverable_rates`` gives the share of documents per (n, p) (plain sampling at temperature 1).
- **Prefix offsets** (arXiv 2505.13171: recall is triggered most by prefixes at the start of the
  context): ``offset_extraction`` puts a ``prefix_len``-token prompt at several offsets inside each
  document, with the ``suffix_len`` tokens after it as the suffix, and reports greedy extraction
  and the discoverable rates per offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gf_jax.evaluate import metrics
from gf_jax.evaluate.scoring import ScoredRows, decoded_texts, token_statistics
from gf_jax.model.generate import generate

NS = (1, 10, 100, 1000)
PS = (0.1, 0.5, 0.9)
OFFSETS = (0, 32, 128, 512)


def extraction_probability(log_p_suffix, n) -> np.ndarray:
    """``1 - (1 - p_z)^n`` from ``log p_z``, without rounding a tiny ``p_z`` to 0 (log1p / expm1)."""
    p_z = np.exp(np.asarray(log_p_suffix, np.float64))
    return -np.expm1(n * np.log1p(-np.minimum(p_z, 1.0 - 1e-16)))


def discoverable_rates(log_p_suffix: Sequence[float], ns: Sequence[int] = NS, ps: Sequence[float] = PS) -> dict:
    """``{"n": {str(n): {str(p): share of documents (n, p)-discoverable}}, "n_documents", "mean_log_p"}``."""
    log_p = np.asarray(log_p_suffix, np.float64)
    if log_p.size == 0:
        raise ValueError("discoverable rates need at least one document's suffix probability.")
    rates = {str(n): {str(p): float(np.mean(extraction_probability(log_p, n) >= p)) for p in ps} for n in ns}
    return {"n": rates, "n_documents": int(log_p.size), "mean_log_p": float(log_p.mean()),
            "median_log_p": float(np.median(log_p))}


def suffix_log_probs(model, splits: Sequence[tuple], *, batch_size: int = 16, mesh=None, pad_id: int = 0,
                     progress: bool | str = False) -> np.ndarray:
    """``log p_z`` of each ``(id, prompt, suffix, start_position)`` split: the true suffix's
    log-probability given its prompt, by teacher forcing at the prompt's true positions."""
    rows = [(np.concatenate([np.asarray(p, np.int32), np.asarray(s, np.int32)]),
             np.concatenate([np.zeros(len(p), bool), np.ones(len(s), bool)])) for _, p, s, _ in splits]
    stats = token_statistics(model, ScoredRows(rows), batch_size=batch_size, mesh=mesh, pad_id=pad_id,
                             start_positions=[start for *_, start in splits], progress=progress)
    return np.array([float(np.sum(s["logprob"])) for s in stats], np.float64)


def extract_splits(model, tokenizer, splits: Sequence[tuple], suffix_len: int, *, beam_width: int = 1,
                   batch_size: int = 16, mesh=None, progress: bool | str = False) -> list[dict]:
    """Greedy (or beam) decoding of ``suffix_len`` tokens from each ``(id, prompt, suffix, start)``
    split's prompt at its true positions, scored against the true suffix (``scored_splits``)."""
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    out = generate(model, [k[1] for k in splits], suffix_len, start_positions=[k[3] for k in splits],
                   beam_width=beam_width, batch_size=batch_size, mesh=mesh, pad_id=pad_id, progress=progress)
    return scored_splits(splits, out.tokens, tokenizer)


def scored_splits(kept: list[tuple], generated_UxA: np.ndarray, tokenizer) -> list[dict]:
    """One result dict per kept document: RougeL and exact matches of its generated suffix."""
    generated_texts = decoded_texts(tokenizer, generated_UxA.tolist())
    reference_texts = decoded_texts(tokenizer, [k[2] for k in kept])
    rouges = metrics.rouge_l(generated_texts, reference_texts)
    per_doc = []
    for (doc_id, prompt, suffix, _), gen_ids, gen_text, ref_text, rouge in zip(
        kept, generated_UxA, generated_texts, reference_texts, rouges
    ):
        per_doc.append({
            "id": doc_id,
            "prompt_len": len(prompt),
            "rougeL": rouge,
            **metrics.suffix_match(gen_ids, suffix),
            "generated": gen_text,
            "reference": ref_text,
        })
    return per_doc


def offset_splits(docs_tokens: Sequence[Sequence[int]], doc_ids: Sequence[str], offset: int, prefix_len: int,
                  suffix_len: int) -> list[tuple]:
    """``(id, prompt, suffix, start)`` of each document long enough for a ``prefix_len`` prompt at
    ``offset`` followed by a ``suffix_len`` suffix."""
    out = []
    for doc_id, tokens in zip(doc_ids, docs_tokens):
        end = offset + prefix_len + suffix_len
        if len(tokens) >= end:
            tokens = [int(t) for t in tokens]
            out.append((doc_id, tokens[offset:offset + prefix_len], tokens[offset + prefix_len:end], offset))
    return out


def offset_extraction(model, tokenizer, docs_tokens: Sequence[Sequence[int]], *, doc_ids=None,
                      offsets: Sequence[int] = OFFSETS, prefix_len: int = 32, suffix_len: int = 32,
                      batch_size: int = 16, mesh=None, progress: bool | str = False) -> dict:
    """Greedy extraction and (n, p)-discoverable rates with the prompt at each of ``offsets``:
    ``{str(offset): {"aggregate": {...}, "discoverable": {...}} or {"n_documents": 0}}``. An offset
    no document is long enough for is reported with 0 documents, not dropped."""
    if prefix_len + suffix_len > model.config.max_seq_len:
        raise ValueError(f"prefix_len + suffix_len = {prefix_len + suffix_len} exceeds the model's context of "
                         f"{model.config.max_seq_len} tokens; use shorter ones.")
    doc_ids = [str(i) for i in range(len(docs_tokens))] if doc_ids is None else list(doc_ids)
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    results = {}
    for offset in offsets:
        splits = offset_splits(docs_tokens, doc_ids, offset, prefix_len, suffix_len)
        if not splits:
            results[str(offset)] = {"n_documents": 0}
            continue
        desc = f"{progress}: offset {offset}" if isinstance(progress, str) else progress
        per_doc = extract_splits(model, tokenizer, splits, suffix_len, batch_size=batch_size, mesh=mesh,
                                 progress=desc)
        log_p = suffix_log_probs(model, splits, batch_size=batch_size, mesh=mesh, pad_id=pad_id)
        results[str(offset)] = {"n_documents": len(splits), "aggregate": metrics.aggregate_memorization(per_doc),
                                "discoverable": discoverable_rates(log_p)}
    return {"prefix_len": prefix_len, "suffix_len": suffix_len, "offsets": results}
