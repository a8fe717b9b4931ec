"""Memorization, measured as the paper does: can the model recite the end of a document it was
trained on from the text before it?

Extraction protocol (the paper's): a document's token list is taken as trained (BOS/EOS
included). A trailing EOS is dropped first: it carries no text, and "the suffix" means the last
``suffix_len`` tokens of the document's text. The prompt is everything before the suffix, at most
``prefix_len`` tokens (default: all) and at most ``max_seq_len - suffix_len`` (the model's
context): when it is cut, the tokens right before the suffix are kept with their true positions,
as training saw them. ``suffix_len`` tokens are decoded greedily (or by beam search, the paper's
adaptive attack) and compared with the true suffix. Instruction and chat examples are judged on
their answers (:func:`answer_memorization`): the suffix ends where the (last) answer ends.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gf_jax.data.examples import EncodedExamples
from gf_jax.evaluate import metrics
from gf_jax.evaluate.extraction import discoverable_rates, extract_splits, suffix_log_probs


def extraction_split(tokens: Sequence[int], *, suffix_len: int, max_prompt_len: int,
                     prefix_len: int | None = None, eos_id: int | None = None):
    """(prompt, suffix, start position of the prompt) of one document, or None if it is too short.

    The trailing ``eos_id`` (if any) is dropped; the suffix is the last ``suffix_len`` tokens; the
    prompt the (at most ``min(prefix_len, max_prompt_len)``) tokens right before it. A document
    needs ``suffix_len + 1`` tokens besides its trailing EOS (one prompt token at least).
    """
    tokens = [int(t) for t in tokens]
    if eos_id is not None and tokens and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    if len(tokens) < suffix_len + 1:
        return None
    cut = len(tokens) - suffix_len
    keep = max_prompt_len if prefix_len is None else min(prefix_len, max_prompt_len)
    start = max(0, cut - keep)
    return tokens[start:cut], tokens[cut:], start


def _check_lengths(suffix_len, prefix_len, max_seq_len):
    if isinstance(suffix_len, bool) or not isinstance(suffix_len, int) or suffix_len < 1:
        raise ValueError(f"suffix_len must be a positive integer, got {suffix_len!r}.")
    if prefix_len is not None and prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1 or None (all), got {prefix_len!r}.")
    if suffix_len >= max_seq_len:
        raise ValueError(
            f"suffix_len={suffix_len} leaves no room for a prompt in the model's context of "
            f"{max_seq_len} tokens; use a suffix shorter than model.max_seq_len."
        )


def evaluate_memorization(
    model,
    tokenizer,
    docs_tokens: Sequence[Sequence[int]],
    *,
    doc_ids: Sequence[str] | None = None,
    suffix_len: int = 50,
    prefix_len: int | None = None,
    batch_size: int = 16,
    beam_width: int = 1,
    eos_id: int | None = None,
    mesh=None,
    sampling: bool = True,
    progress: bool | str = False,
) -> tuple[list[dict], dict]:
    """Suffix extraction on each document: does the model recite the end of it from the rest?

    Args:
      model: a ``gf_jax.model.Transformer``.
      tokenizer: a ``gf_jax.tokenizer.Tokenizer`` (decodes texts for RougeL), or None: RougeL
        is then computed on the ids written as words.
      docs_tokens: token ids of each document as trained (BOS/EOS included if training used them).
      doc_ids: names for the per-document results (default "0", "1", ...).
      suffix_len, prefix_len: see the module docstring.
      beam_width: 1 = greedy (the paper's metric); > 1 = beam search (adaptive attack).
      eos_id: trailing id to drop (default: the tokenizer's EOS).
      mesh: decode sharded over this mesh (batch over data/fsdp).
      sampling: also compute each suffix's probability ``p_z`` by teacher forcing (``log_p_suffix``
        per document) and the (n, p)-discoverable rates (``aggregate["discoverable"]``,
        ``gf_jax.evaluate.extraction``).

    Returns:
      (per_doc, aggregate). ``per_doc``: one dict per evaluated document with ``id``,
      ``prompt_len``, ``rougeL``, ``exact_match``, ``longest_run``, ``memorized``, ``generated``
      and ``reference`` (decoded texts of the generated and true suffix). ``aggregate``: see
      ``gf_jax.evaluate.metrics.aggregate_memorization``, plus ``skipped_ids`` (documents shorter than
      ``suffix_len + 1`` tokens, counted in ``n_skipped`` rather than silently dropped).
    """
    _check_lengths(suffix_len, prefix_len, model.config.max_seq_len)
    if doc_ids is None:
        doc_ids = [str(i) for i in range(len(docs_tokens))]
    if len(doc_ids) != len(docs_tokens):
        raise ValueError(f"got {len(doc_ids)} doc_ids for {len(docs_tokens)} documents; pass one id per document.")
    if eos_id is None and tokenizer is not None and tokenizer.eos_id >= 0:
        eos_id = tokenizer.eos_id
    pad_id = tokenizer.pad_id if tokenizer is not None else 0

    kept, skipped = _extraction_splits(docs_tokens, doc_ids, suffix_len, prefix_len,
                                       model.config.max_seq_len - suffix_len, eos_id)
    per_doc = extract_splits(model, tokenizer, kept, suffix_len, beam_width=beam_width, batch_size=batch_size,
                             mesh=mesh, progress=progress)
    aggregate = metrics.aggregate_memorization(per_doc, n_skipped=len(skipped))
    aggregate.update(suffix_len=suffix_len, prefix_len=prefix_len, beam_width=beam_width, skipped_ids=skipped)
    if sampling:  # what n samples would extract: p_z of the true suffix by teacher forcing
        log_p = suffix_log_probs(model, kept, batch_size=batch_size, mesh=mesh, pad_id=pad_id)
        for doc, value in zip(per_doc, log_p):
            doc["log_p_suffix"] = float(value)
        aggregate["discoverable"] = discoverable_rates(log_p)
    return per_doc, aggregate


def _extraction_splits(docs_tokens, doc_ids, suffix_len: int, prefix_len: int | None, max_prompt_len: int,
                       eos_id: int | None) -> tuple[list[tuple], list[str]]:
    """([(id, prompt, suffix, prompt's start position)] of the documents long enough, skipped ids);
    the skipped ones are counted on stderr, not dropped silently."""
    kept, skipped = [], []
    for doc_id, tokens in zip(doc_ids, docs_tokens):
        split = extraction_split(tokens, suffix_len=suffix_len, prefix_len=prefix_len,
                                 max_prompt_len=max_prompt_len, eos_id=eos_id)
        (kept.append((doc_id, *split)) if split is not None else skipped.append(doc_id))
    if skipped and not kept:  # a 0/0 report would read as "nothing memorized"
        longest = max(len(t) for t in docs_tokens)
        raise ValueError(f"all {len(skipped)} documents are shorter than suffix_len + 1 = {suffix_len + 1} tokens "
                         f"(the longest has {longest}); lower --suffix-len or evaluate longer documents.")
    if skipped:
        print(f"[gf_jax.evaluate] skipped {len(skipped)} of {len(docs_tokens)} documents shorter than "
              f"suffix_len + 1 = {suffix_len + 1} tokens (first: {skipped[0]!r}).", file=sys.stderr)
    return kept, skipped


def answer_memorization(model, tokenizer, items: EncodedExamples, *, suffix_len: int, **kw) -> tuple[list[dict], dict]:
    """``evaluate_memorization`` with the suffix at the end of each item's answer (a document's
    answer is all of it after its first token; an example's, its last answer, a chat template's
    end-of-turn text included, a trailing EOS not). An item whose answer is shorter than
    ``suffix_len`` tokens is skipped and counted; when every item is, that is an error."""
    eos = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id >= 0 else None
    tokens, usable, skipped = [], [], []
    for i, (t, (start, end)) in enumerate(zip(items.tokens, items.answers)):
        tokens.append([int(x) for x in t[:end]])  # cut after the answer: the suffix ends where the answer does
        answer_len = end - start - (1 if eos is not None and end > start and t[end - 1] == eos else 0)
        (usable if answer_len >= suffix_len else skipped).append(i)
    if not usable:
        longest = max((end - start for start, end in items.answers), default=0)
        raise ValueError(f"no document or answer among {len(items)} has the --suffix-len={suffix_len} tokens to "
                         f"extract (the longest has {longest}); use a shorter --suffix-len or longer documents.")
    per_doc, aggregate = evaluate_memorization(model, tokenizer, [tokens[i] for i in usable],
                                               doc_ids=[items.ids[i] for i in usable], suffix_len=suffix_len,
                                               eos_id=eos, **kw)
    aggregate["skipped_ids"] = aggregate["skipped_ids"] + [items.ids[i] for i in skipped]
    aggregate.update(metrics.aggregate_memorization(per_doc, n_skipped=len(aggregate["skipped_ids"])))
    if skipped:
        print(f"[gf_jax.evaluate] skipped {len(skipped)} of {len(items)} items whose answer is shorter than "
              f"suffix_len = {suffix_len} tokens (first: {items.ids[skipped[0]]!r}).", file=sys.stderr)
    return per_doc, aggregate
