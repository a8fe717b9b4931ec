"""Batches of examples: whole examples packed into rows, weights only on supervised targets.

An example is never cut across rows (a continuation without its prompt would teach the answer out
of context), so a row holds whole examples of at most T+1 tokens together. Positions count from
each example's start, so the goldfish mask of an example, a hash of its own preceding targets, is
the same in whatever row and column it lands; prompt targets get weight 0 and are therefore
neither kept nor dropped (``gf_jax.goldfish``: weight 0 = not a target).

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from gf_jax.batch import Batch
from gf_jax.data.config import DataConfig
from gf_jax.data.examples import EncodedExamples, encode_examples
from gf_jax.data.iterator import BatchIterator, default_process
from gf_jax.data.packing import RowLayout, assemble_rows
from gf_jax.data.splits import process_share


class ExampleLayout:
    """Rows of one epoch: examples in ``order``, greedily packed whole into rows of T+1 tokens."""

    def __init__(self, lengths: np.ndarray, order: np.ndarray, seq_len: int):
        self.order, self.lengths = order, lengths
        firsts, fill = [0], 0
        for i, n in enumerate(lengths[order].tolist()):
            if fill and fill + n > seq_len + 1:  # the next example does not fit: start a new row
                firsts.append(i)
                fill = 0
            fill += n
        self.row_firsts = np.asarray(firsts + [len(order)], np.int64)
        self.num_rows = len(firsts)
        self.has_targets = bool(len(lengths)) and int(np.max(lengths)) >= 2  # targets stay inside an example

    def row(self, r: int) -> list[tuple[int, int, int]]:
        """Pieces of row r: (example index, 0, its length) for each example in it."""
        picked = self.order[self.row_firsts[r]:self.row_firsts[r + 1]]
        return [(int(d), 0, int(self.lengths[d])) for d in picked]

    def rows(self, r_J) -> list[list[tuple[int, int, int]]]:
        return [self.row(int(r)) for r in r_J]


def layout_of(lengths: np.ndarray, order: np.ndarray, seq_len: int, mode: str):
    """``packed``: several whole examples per row; ``document``: one example per row."""
    return ExampleLayout(lengths, order, seq_len) if mode == "packed" else RowLayout(lengths, order, seq_len, mode)


def supervise(batch: Batch, supervised: Sequence[np.ndarray]) -> Batch:
    """``batch`` with weight 0 on targets that are not supervised (needs ``doc_ids_BxT``).

    The target of input column t is token ``positions_BxT + 1`` of example ``doc_ids_BxT``.
    """
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in supervised])])
    flat = np.concatenate(supervised)
    real_BxT = (batch.doc_ids_BxT >= 0) & (batch.weights_BxT > 0)
    index_BxT = np.where(real_BxT, offsets[np.maximum(batch.doc_ids_BxT, 0)] + batch.positions_BxT + 1, 0)
    keep_BxT = real_BxT & flat[index_BxT]
    return batch._replace(weights_BxT=batch.weights_BxT * keep_BxT.astype(np.float32))


class ExampleIterator(BatchIterator):
    """``BatchIterator`` over examples: whole examples per row, only supervised targets weighted.

    Args as ``BatchIterator``, plus ``supervised`` (one bool array per token array, see
    ``EncodedExamples``). Every token array must fit a row (at most T+1 tokens).
    """

    def __init__(self, tokens: Sequence[np.ndarray], supervised: Sequence[np.ndarray], *, with_doc_ids=False, **kw):
        self.supervised = [np.asarray(s, bool) for s in supervised]
        self.keep_doc_ids = with_doc_ids
        super().__init__(tokens, with_doc_ids=True, **kw)  # supervise() looks targets up by example id

    def _layout(self, epoch: int):
        # Greedy packing gives another number of rows for another example order, but a step's
        # epoch and row come from one fixed rows_per_epoch; so examples are packed once, in epoch
        # 0's order, and every epoch shuffles those rows (tag 2 in BatchIterator._epoch). Each
        # example is still seen once per epoch, and in a new position and batch.
        order = self._order(len(self.tokens), 0 if self.mode == "packed" else epoch, 1)[:]
        return layout_of(self.lengths, order, self.seq_len, self.mode)

    def batch(self, step: int) -> Batch:
        batch = supervise(super().batch(step), self.supervised)
        return batch if self.keep_doc_ids else batch._replace(doc_ids_BxT=None)


def make_example_iterator(config: DataConfig, tokenizer, examples: Sequence, *, global_batch: int, seq_len: int,
                          split: str = "train", process_index: int | None = None, process_count: int | None = None,
                          prefetch: int = 2, with_doc_ids: bool = False) -> ExampleIterator:
    """Training batches of ``examples`` (one split's, split by id hash as documents are) for this
    process (its contiguous share)."""
    pi, pc = default_process(process_index, process_count)
    mine = [examples[i] for i in process_share(len(examples), pi, pc)]
    if not mine:
        raise ValueError(f"process {pi} of {pc} got no {split} examples out of {len(examples)}; use more examples "
                         "or fewer processes.")
    encoded = encode_examples(mine, tokenizer, config, max_len=seq_len + 1)
    return ExampleIterator(encoded.tokens, encoded.supervised, global_batch=global_batch, seq_len=seq_len,
                           seed=config.seed, process_index=pi, process_count=pc, mode=config.mode,
                           pad_id=tokenizer.pad_id, shuffle=config.shuffle, prefetch=prefetch,
                           with_doc_ids=with_doc_ids, context=config.row_context, documents=mine,
                           shuffle_algorithm=config.shuffle_algorithm)


def example_eval_batches(encoded: EncodedExamples, *, global_batch: int, seq_len: int, pad_id: int = 0,
                         mode: str = "packed", context: int = 0, process_index: int | None = None,
                         process_count: int | None = None, with_doc_ids: bool = False) -> Iterator[Batch]:
    """One in-order pass over ALL examples (as ``gf_jax.data.eval_batches``): every supervised
    target counted once over all processes, the last batch padded with empty rows."""
    pi, pc = default_process(process_index, process_count)
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by the {pc} processes.")
    if not encoded.tokens:
        raise ValueError("there are no examples to evaluate; set data.validation_fraction > 0 or check the data.")
    lengths = np.array([len(t) for t in encoded.tokens], np.int64)
    layout = layout_of(lengths, np.arange(len(lengths)), seq_len, mode)
    local = global_batch // pc
    for b in range(math.ceil(layout.num_rows / global_batch)):
        first = b * global_batch + pi * local
        rows = [layout.row(r) if r < layout.num_rows else [] for r in range(first, first + local)]
        batch = supervise(assemble_rows(encoded.tokens, rows, seq_len, pad_id, True, context), encoded.supervised)
        yield batch if with_doc_ids else batch._replace(doc_ids_BxT=None)
