"""Downstream utility: multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness
scores its ``multiple_choice`` tasks (the paper's second claim: goldfish loss leaves downstream
performance intact).

A task is a JSONL file, one item per line::

    {"id": "q1", "context": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "gold": 0}

Each choice is a continuation of the context after a single space (the harness's default
``target_delimiter``). Its log-likelihood is the sum of the log-probabilities of its tokens given
the context, with the text tokenized whole and split where the context's own tokens end (the
harness's split, so a token that spans the boundary counts to the continuation). ``acc``: the
highest log-likelihood is the gold choice; ``acc_norm``: the highest log-likelihood per UTF-8
byte of the continuation is (longer answers are not penalised for their length).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from gf_jax.evaluate.scoring import ScoredRows, token_statistics

TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


def read_task(path: str) -> list[ChoiceItem]:
    """The items of a multiple-choice JSONL file; a malformed line is one sentence naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"multiple-choice task {path!r} does not exist; pass a JSONL file of "
                                '{"context", "choices", "gold"} items.')
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                items.append(_item(line, f"{path}:{line_no}"))
    if not items:
        raise ValueError(f"multiple-choice task {path} has no items; add JSONL lines.")
    return items


def _item(line: str, where: str) -> ChoiceItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); fix or delete that line.") from None
    choices = record.get("choices") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("context"), str) and isinstance(choices, list)
            and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: an item needs a string 'context' and a list of at least 2 non-empty string "
                         "'choices'; fix that line.")
    gold = record.get("gold")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: 'gold' must be the index of the right choice (0 to {len(choices) - 1}).")
    return ChoiceItem(str(record.get("id", where)), record["context"], tuple(choices), gold)


def continuation_tokens(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], int]:
    """(token ids of context + continuation, index of the first continuation token), split as the
    harness does: the whole text tokenized at once, the continuation being what follows the
    context's own token count."""
    whole = tokenizer.encode([context + continuation])[0]
    n_context = len(tokenizer.encode([context])[0]) if context else 0
    n_context = min(n_context, len(whole) - 1)  # at least one continuation token
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    return bos + list(whole), len(bos) + n_context


def choice_log_likelihoods(model, tokenizer, items: Sequence[ChoiceItem], *, add_bos: bool = True,
                           batch_size: int = 16, mesh=None, progress: bool | str = False) -> list[np.ndarray]:
    """For each item, the log-likelihood (nats) of each choice given its context."""
    rows, owners = [], []
    max_len = model.config.max_seq_len + 1
    for i, item in enumerate(items):
        for choice in item.choices:
            ids, first = continuation_tokens(tokenizer, item.context, TARGET_DELIMITER + choice, add_bos)
            if len(ids) > max_len:  # keep the end: the continuation and the context right before it
                cut = len(ids) - max_len
                ids, first = ids[cut:], max(first - cut, 1)
            scored = np.zeros(len(ids), bool)
            scored[first:] = True
            rows.append((np.asarray(ids, np.int32), scored))
            owners.append(i)
    stats = token_statistics(model, ScoredRows(rows), batch_size=batch_size, mesh=mesh, pad_id=tokenizer.pad_id,
                             progress=progress)
    out = [np.zeros(len(item.choices)) for item in items]
    counters = [0] * len(items)
    for owner, s in zip(owners, stats):
        out[owner][counters[owner]] = float(np.sum(s["logprob"]))
        counters[owner] += 1
    return out


def accuracy(items: Sequence[ChoiceItem], log_likelihoods: Sequence[np.ndarray]) -> dict:
    """``{"acc", "acc_norm", "n_items", "acc_stderr"}``: ties go to the first choice (``np.argmax``)."""
    correct, correct_norm = [], []
    for item, ll in zip(items, log_likelihoods):
        byte_lengths = np.array([len((TARGET_DELIMITER + c).encode("utf-8")) for c in item.choices], np.float64)
        correct.append(int(np.argmax(ll)) == item.gold)
        correct_norm.append(int(np.argmax(np.asarray(ll) / byte_lengths)) == item.gold)
    n = len(correct)
    acc = float(np.mean(correct))
    return {"acc": acc, "acc_norm": float(np.mean(correct_norm)), "n_items": n,
            "acc_stderr": float(np.sqrt(acc * (1 - acc) / max(n - 1, 1)))}


def evaluate_choices(model, tokenizer, path: str, *, add_bos: bool = True, batch_size: int = 16, mesh=None,
                     progress: bool | str = False) -> dict:
    """A multiple-choice task file scored on ``model``: accuracy figures plus per-item choices."""
    items = read_task(path)
    lls = choice_log_likelihoods(model, tokenizer, items, add_bos=add_bos, batch_size=batch_size, mesh=mesh,
                                 progress=progress)
    per_item = [{"id": it.id, "gold": it.gold, "log_likelihoods": ll.tolist()} for it, ll in zip(items, lls)]
    return {"task": os.path.basename(path), **accuracy(items, lls), "per_item": per_item}
