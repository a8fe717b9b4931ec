"""Instruction and chat examples: JSONL records to tokens plus the mask of supervised targets.

``data.format``: ``prompt_completion`` (fields ``data.prompt_field`` / ``data.completion_field``)
or ``chat`` (``data.messages_field``: a list of ``{role, content}``, roles system, user, assistant,
tool, rendered with a chat template, see ``gf_jax.data.chat``). Only the completion, or the
assistant turns, are supervised (``data.train_on_prompt`` supervises everything). An ``Example``
has an ``id`` and a ``text`` like a ``Document``, so splits and tokenizer training treat it as one.

Every mistake in a record is reported as one sentence naming its file and line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from gf_jax.data import chat
from gf_jax.data.config import DataConfig
from gf_jax.data.protect import compile_patterns, covered, pattern_spans
from gf_jax.data.sources import check_records, list_files


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction or chat example.

    Attributes:
      id: stable id (``data.id_field``, else ``relpath:line``), as for documents.
      text: its plain text (prompt and completion, or the turns' contents), for tokenizer training.
      where: ``file:line`` for error messages.
      prompt, completion: the ``prompt_completion`` fields (None for chat).
      messages: the chat turns (None for prompt/completion).
    """

    id: str
    text: str
    where: str
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Examples (or documents) as tokens: ``tokens[i]`` int32 and ``supervised[i]`` bool of the same
    length, True where token j is a supervised *target* (it is predicted from tokens < j); ``ids[i]``
    its id; ``answers[i]`` the token span [start, end) of its (last) answer, whatever
    ``train_on_prompt`` says: evaluation's prompt is what comes before it (a document's answer is
    everything after its first token). ``len()`` counts the items."""

    tokens: list[np.ndarray]
    supervised: list[np.ndarray]
    ids: list[str]
    answers: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.tokens)


# ----------------------------------------------------------------------------------------------
# Reading.


def _parse_record(record: Any, where: str, config: DataConfig) -> dict:
    """The example's fields from one JSON value, or a one-sentence error naming ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON object is needed, found {type(record).__name__}; write one object per line.")
    if config.format == "prompt_completion":
        fields = {}
        for key in (config.prompt_field, config.completion_field):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: no string field {key!r} (found {sorted(record)}); set "
                                 "data.prompt_field / data.completion_field to the keys that hold them.")
        if not record[config.completion_field].strip():
            raise ValueError(f"{where}: the completion is empty; give it text or delete that line.")
        fields["prompt"], fields["completion"] = record[config.prompt_field], record[config.completion_field]
        return fields
    return {"messages": _parse_messages(record.get(config.messages_field), where, config.messages_field)}


def _parse_messages(messages: Any, where: str, field: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: no non-empty list field {field!r}; set data.messages_field to the key "
                         "that holds the [{role, content}] turns.")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"{where}: turn {n} is not a {{role, content}} object with string content; fix that line.")
        if m["role"] not in chat.ROLES:
            raise ValueError(f"{where}: turn {n} has unknown role {m['role']!r}; use one of {', '.join(chat.ROLES)}.")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError(f"{where}: no assistant turn with text, so nothing would be learned; add one or delete "
                         "that line.")
    return tuple(messages)


def read_examples(config: DataConfig) -> list[Example]:
    """The examples of ``data.path`` (a ``.jsonl`` file or folder), in order, at most ``max_documents``."""
    files, root = list_files(config.path, ".jsonl", "JSONL")
    examples = []
    for f in files:
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg}); fix or delete that line.") from None
                fields = _parse_record(record, where, config)
                if config.id_field is not None and config.id_field not in record:
                    raise ValueError(f"{where}: no id field {config.id_field!r}; set data.id_field to an existing "
                                     "key or to null.")
                ex_id = str(record[config.id_field]) if config.id_field is not None else f"{rel}:{line_no}"
                examples.append(Example(ex_id, _plain_text(fields), where, **fields))
    return check_records(examples[: config.max_documents] if config.max_documents else examples, config)


def _plain_text(fields: dict) -> str:
    if "messages" in fields:
        return "\n".join(m["content"] for m in fields["messages"])
    return fields["prompt"] + fields["completion"]


# ----------------------------------------------------------------------------------------------
# Tokens and supervision.


def special_tokens(tokenizer) -> dict[str, str]:
    """The special-token strings a chat template may use (``bos_token``, ``eos_token``, ...)."""
    out = {}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
        if i >= 0:
            out[name] = tokenizer.id_to_piece(i)
    return out


def _text_and_spans(example: Example, config: DataConfig, template: str | None, specials: dict
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The text the model reads and the character spans it is supervised on."""
    if example.messages is None:
        text = example.prompt + example.completion
        return text, [(len(example.prompt), len(text))]
    try:
        return chat.assistant_spans(template, example.messages, specials)
    except ValueError as e:
        raise ValueError(f"{example.where}: {e}") from None
    except Exception as e:  # jinja2 errors (raise_exception in the template, undefined names)
        raise ValueError(f"{example.where}: the chat template failed on this example ({e}); fix the example "
                         "or choose another data.chat_template.") from None


def encode_example(example: Example, tokenizer, config: DataConfig, template: str | None,
                   max_len: int | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(tokens int32, supervised bool, token span of the last answer) of one example, at most
    ``max_len`` tokens (``data.truncate``)."""
    text, spans = _text_and_spans(example, config, template, special_tokens(tokenizer))
    ids, starts_U = tokenizer.encode_offsets(text)
    starts_U = np.asarray(starts_U, np.int64)
    supervised_U = np.zeros(len(ids), bool)
    for lo, hi in spans:  # a token is supervised when it starts inside a supervised span
        supervised_U |= (starts_U >= lo) & (starts_U < hi)
    if config.protect:  # never supervised, answers included (gf_jax.data.protect)
        supervised_U &= ~covered(starts_U, len(text), pattern_spans(text, compile_patterns(config.protect)))
    if example.messages is None:  # plain concatenation: frame with BOS/EOS as documents are
        if config.add_bos:
            ids, supervised_U = [tokenizer.bos_id] + ids, np.concatenate([[False], supervised_U])
        if config.add_eos:  # the EOS after the completion is supervised: the model learns to stop
            ids, supervised_U = ids + [tokenizer.eos_id], np.concatenate([supervised_U, [True]])
    tokens_U = np.asarray(ids, np.int32)
    supervised_U[:1] = False  # the first token is never a target
    answer = last_run(supervised_U)
    if config.train_on_prompt:
        supervised_U = np.arange(len(tokens_U)) > 0
    if max_len is not None and len(tokens_U) > max_len:
        if not config.truncate:
            raise ValueError(f"{example.where}: the example has {len(tokens_U)} tokens, more than the {max_len} "
                             "a row holds (train.seq_len + 1); shorten it, raise train.seq_len or set "
                             "data.truncate=true.")
        tokens_U, supervised_U = tokens_U[:max_len], supervised_U[:max_len]
        answer = (answer[0], min(answer[1], max_len))
    if answer[0] >= answer[1] or not supervised_U.any():
        raise ValueError(f"{example.where}: no supervised token is left (the answer is empty or truncated away); "
                         "shorten the prompt or raise train.seq_len.")
    return tokens_U, supervised_U, answer


def last_run(mask_U: np.ndarray) -> tuple[int, int]:
    """[start, end) of the last run of True in ``mask_U`` ((n, n) when there is none)."""
    true_at = np.flatnonzero(mask_U)
    if not len(true_at):
        return len(mask_U), len(mask_U)
    gaps = np.flatnonzero(np.diff(true_at) > 1)
    start = true_at[gaps[-1] + 1] if len(gaps) else true_at[0]
    return int(start), int(true_at[-1]) + 1


def encode_examples(examples: Sequence[Example], tokenizer, config: DataConfig,
                    max_len: int | None = None) -> EncodedExamples:
    """Tokens and supervision of every example (``max_len``: train.seq_len + 1, the tokens of a row)."""
    template = chat.resolve_template(tokenizer, config.chat_template) if config.format == "chat" else None
    tokens, supervised, answers = [], [], []
    for example in examples:
        tokens_U, supervised_U, answer = encode_example(example, tokenizer, config, template, max_len)
        tokens.append(tokens_U)
        supervised.append(supervised_U)
        answers.append(answer)
    return EncodedExamples(tokens, supervised, [e.id for e in examples], answers)
