"""The data task: what ``data.format`` means, chosen once.

    task = task_for(config.data)        # TextTask (documents) or ExampleTask (instruction / chat)
    batches = task.train_iterator(tokenizer, global_batch=16, seq_len=128)

A task gives everything that differs between plain documents and instruction or chat examples:
the records a source holds, the tokenizer trained on them, the training iterator, the validation
set and its batches, and the evaluation set (tokens, which targets count, where the answer ends)
that ``gf_jax.evaluate`` measures memorization and membership on. ``task_for`` is the one place
that looks at ``data.format``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from gf_jax.batch import Batch
from gf_jax.data.config import DataConfig
from gf_jax.data.eval_batches import eval_batches
from gf_jax.data.example_batches import example_eval_batches, make_example_iterator
from gf_jax.data.examples import EncodedExamples, encode_examples, read_examples
from gf_jax.data.pipeline import make_train_iterator, validation_tokens
from gf_jax.data.sources import read_background
from gf_jax.data.splits import load_documents, select_split, train_texts
from gf_jax.data.tokens import tokenize_documents
from gf_jax.tokenizer import Tokenizer, cached_tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class TextTask:
    """``data.format=text``: documents, packed or one per row, every target supervised."""

    config: DataConfig

    def records(self) -> Sequence:
        """The source's documents (no canaries, all splits), in source order."""
        return read_background(self.config)

    def documents(self, split: str = "all") -> list:
        """The unique documents of ``split`` (each injected canary once)."""
        return load_documents(self.config, split)

    def documents_at(self, path: str, split_rule: str) -> list:
        """The documents of a ``.txt`` (split by ``split_rule``) or ``.jsonl`` file or folder."""
        kind = "jsonl" if path.endswith(".jsonl") else "text"
        return load_documents(DataConfig(source=kind, path=path, split_rule=split_rule), "all")

    def train_iterator(self, tokenizer, **kw):
        """This process's training batches (``gf_jax.data.pipeline.make_train_iterator``)."""
        return make_train_iterator(self.config, tokenizer, **kw)

    def validation_set(self, tokenizer, seq_len: int):
        """The validation documents' token arrays (read, or mapped from the tokenized store)."""
        del seq_len
        return validation_tokens(self.config, tokenizer)

    def eval_batches(self, eval_set, **kw) -> Iterator[Batch]:
        """One in-order pass over a validation set (token arrays, or an evaluation set's items):
        every target once over all processes."""
        tokens = eval_set.tokens if isinstance(eval_set, EncodedExamples) else eval_set
        return eval_batches(tokens, mode=self.config.mode, **kw)

    def evaluation_set(self, docs: Sequence, tokenizer, seq_len: int) -> EncodedExamples:
        """Documents as evaluation items: every target counts, the whole document after its first
        token is the "answer" whose end a suffix is extracted from."""
        del seq_len
        tokens = tokenize_documents(docs, tokenizer, self.config.add_bos, self.config.add_eos)
        supervised = [np.arange(len(t)) > 0 for t in tokens]
        return EncodedExamples(tokens, supervised, [d.id for d in docs], [(min(1, len(t)), len(t)) for t in tokens])


@dataclasses.dataclass(frozen=True)
class ExampleTask(TextTask):
    """``data.format=prompt_completion|chat``: JSONL examples, whole examples per row, only the answers
    supervised (``gf_jax.data.examples``)."""

    def records(self) -> Sequence:
        return read_examples(self.config)

    def documents(self, split: str = "all") -> list:
        return select_split(self.records(), self.config, split)

    def documents_at(self, path: str, split_rule: str) -> list:
        """The examples of a JSONL file or folder, read with this task's fields and template."""
        del split_rule
        return ExampleTask(dataclasses.replace(self.config, path=path, validation_fraction=0.0)).documents()

    def train_iterator(self, tokenizer, *, split: str = "train", **kw):
        return make_example_iterator(self.config, tokenizer, self.documents(split), split=split, **kw)

    def validation_set(self, tokenizer, seq_len: int) -> EncodedExamples:
        return self.evaluation_set(self.documents("validation"), tokenizer, seq_len)

    def eval_batches(self, eval_set, **kw) -> Iterator[Batch]:
        return example_eval_batches(eval_set, mode=self.config.mode, **kw)

    def evaluation_set(self, docs: Sequence, tokenizer, seq_len: int) -> EncodedExamples:
        return encode_examples(docs, tokenizer, self.config, max_len=seq_len + 1)


def task_for(config: DataConfig) -> TextTask:
    """The task of ``data.format``."""
    return TextTask(config) if config.format == "text" else ExampleTask(config)


def corpus_tokenizer(config: DataConfig, texts: Sequence[str] | None = None, *,
                     max_chars: int = 50_000_000) -> Tokenizer:
    """``config.tokenizer`` if set, else a ``config.vocab_size``-piece tokenizer trained on ``texts``
    (default: the train split of the task's records up to ``max_chars`` characters, canaries
    excluded), cached in ``config.tokenizer_cache_dir`` by content, so a changed corpus retrains."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    if texts is None:
        texts = train_texts(config, max_chars=max_chars, records=task_for(config).records())
    return cached_tokenizer(list(texts), config.vocab_size, config.tokenizer_cache_dir)

