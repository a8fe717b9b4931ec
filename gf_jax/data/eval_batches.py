"""``eval_batches``: one in-order pass over documents, dealt out to processes, every target once."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from gf_jax.batch import Batch
from gf_jax.data.config import MODES, check_choice
from gf_jax.data.iterator import default_process, token_arrays
from gf_jax.data.packing import RowLayout, assemble_rows
from gf_jax.data.shuffle import IdentityOrder


def eval_batches(tokens: Sequence[np.ndarray], *, global_batch: int, seq_len: int, pad_id: int = 0,
                 mode: str = "packed", context: int = 0, process_index: int | None = None,
                 process_count: int | None = None, with_doc_ids: bool = False) -> Iterator[Batch]:
    """One in-order pass over ``tokens`` (ALL documents: every process passes the same list).

    The global rows are dealt out to processes batch by batch; the last batch is padded with empty
    rows (weight 0), so every process yields the same number of batches and every real target is
    counted exactly once over all processes. Pass the training ``context`` (``data.row_context``)
    so that a loss over kept targets applies the same goldfish mask as training does.
    """
    check_choice("mode", mode, MODES)
    pi, pc = default_process(process_index, process_count)
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by the {pc} processes.")
    tokens, lengths = token_arrays(tokens)
    if not len(tokens):
        raise ValueError("there are no documents to evaluate; set data.validation_fraction > 0 or check the data.")
    layout = RowLayout(lengths, IdentityOrder(len(tokens)), seq_len, mode)
    local = global_batch // pc
    for b in range(math.ceil(layout.num_rows / global_batch)):
        first = b * global_batch + pi * local
        rows = [layout.row(r) if r < layout.num_rows else [] for r in range(first, first + local)]
        yield assemble_rows(tokens, rows, seq_len, pad_id, with_doc_ids, context)
