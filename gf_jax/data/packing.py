"""Packing arithmetic: which document tokens go into which row, and rows into a ``Batch``.

A row holds T+1 tokens (T inputs and their T next tokens); consecutive rows of a document
overlap by one token so every transition is a target exactly once per epoch. A row that starts
mid-document keeps the document's true positions, and (with ``context`` > 0) carries the
targets before its first column, so the goldfish mask does not depend on where rows cut.

Shapes: B rows, T tokens per row, C row-context width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gf_jax.batch import Batch

# A piece of a row: (document index, first token, end token) in document coordinates.
Piece = tuple[int, int, int]


class RowLayout:
    """Rows of one epoch: documents in ``order``, cut into rows of T+1 tokens with stride T.

    ``packed``: the documents form one stream; ``document``: each document is cut on its own.
    """

    def __init__(self, lengths: np.ndarray, order: np.ndarray, seq_len: int, mode: str):
        self.order, self.T, self.mode = order, seq_len, mode
        lens = lengths[order].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)])  # stream offset of each doc, + total
        if mode == "packed":
            total = int(self.starts[-1])
            self.num_rows = max(1, -(-(total - 1) // seq_len))
        else:
            chunks = np.maximum(0, -(-(lens - 1) // seq_len))
            self.row_starts = np.concatenate([[0], np.cumsum(chunks)])  # first row of each doc
            self.num_rows = int(self.row_starts[-1])

    def row(self, r: int) -> list[Piece]:
        """Pieces of row r: (document index, first token, end token) in document coordinates."""
        T = self.T
        if self.mode == "document":
            k = int(np.searchsorted(self.row_starts, r, "right")) - 1
            c = r - int(self.row_starts[k])
            doc_len = int(self.starts[k + 1] - self.starts[k])
            return [(int(self.order[k]), c * T, min(c * T + T + 1, doc_len))]
        a = r * T
        b = min(a + T + 1, int(self.starts[-1]))
        k0 = int(np.searchsorted(self.starts, a, "right")) - 1
        k1 = int(np.searchsorted(self.starts, b - 1, "right")) - 1
        pieces = []
        for k in range(k0, k1 + 1):
            s = int(self.starts[k])
            lo, hi = max(a, s) - s, min(b, int(self.starts[k + 1])) - s
            if hi > lo:
                pieces.append((int(self.order[k]), lo, hi))
        return pieces


def rows_per_epoch(lengths: Sequence[int], seq_len: int, mode: str) -> int:
    """Rows of T+1 tokens (T = ``seq_len``) that one pass over documents of these token counts
    makes in ``mode`` (the same in every epoch: the order does not change the count)."""
    lengths = np.asarray(lengths, np.int64)
    return RowLayout(lengths, np.arange(len(lengths)), seq_len, mode).num_rows


def assemble_rows(tokens: Sequence[np.ndarray], rows: Sequence[Sequence[Piece]], seq_len: int, pad_id: int,
                  with_doc_ids: bool = False, context: int = 0) -> Batch:
    """A host ``Batch`` (numpy, B = len(rows)) from row pieces; an empty row is all padding (weight 0).

    With ``context`` > 0 it also holds ``context_BxC`` (see ``row_context``); else that field is
    None. ``doc_ids_BxT`` (index into ``tokens`` of each input, -1 = padding) only ``with_doc_ids``.
    """
    B, T = len(rows), seq_len
    tok_BxT1 = np.full((B, T + 1), pad_id, np.int32)
    pos_BxT1 = np.zeros((B, T + 1), np.int32)
    seg_BxT1 = np.zeros((B, T + 1), np.int32)
    doc_BxT1 = np.full((B, T + 1), -1, np.int32)
    for b, pieces in enumerate(rows):
        col = 0
        for s, (d, lo, hi) in enumerate(pieces, 1):
            n = hi - lo
            tok_BxT1[b, col:col + n] = tokens[d][lo:hi]
            pos_BxT1[b, col:col + n] = np.arange(lo, hi, dtype=np.int32)
            seg_BxT1[b, col:col + n] = s
            doc_BxT1[b, col:col + n] = d
            col += n
    # A target is real when it sits in the same document as its input (not padding, not across).
    weights_BxT = ((seg_BxT1[:, :-1] == seg_BxT1[:, 1:]) & (seg_BxT1[:, :-1] > 0)).astype(np.float32)
    batch = Batch(
        inputs_BxT=tok_BxT1[:, :-1],
        targets_BxT=tok_BxT1[:, 1:],
        positions_BxT=pos_BxT1[:, :-1],
        segment_ids_BxT=seg_BxT1[:, :-1],
        weights_BxT=weights_BxT,
        context_BxC=row_context(tokens, rows, context, pad_id) if context > 0 else None,
        doc_ids_BxT=doc_BxT1[:, :-1] if with_doc_ids else None,
    )
    return Batch(*(None if v is None else np.ascontiguousarray(v) for v in batch))


def row_context(tokens: Sequence[np.ndarray], rows: Sequence[Sequence[Piece]], context: int,
                pad_id: int) -> np.ndarray:
    """``context_BxC``: the C targets of each row's first document that precede column 0, oldest
    first, right-aligned (``pad_id`` where the document has fewer): the goldfish mask's view of a
    row that starts mid-document (``gf_jax.goldfish.goldfish_mask``)."""
    ctx_BxC = np.full((len(rows), context), pad_id, np.int32)
    for b, pieces in enumerate(rows):
        if pieces and pieces[0][1] > 0:  # the row starts at token lo > 0 of document d
            d, lo, _ = pieces[0]
            # Column 0's target is token lo + 1; the targets before it are tokens 1 .. lo.
            before = tokens[d][max(1, lo - context + 1): lo + 1]
            ctx_BxC[b, context - len(before):] = before
    return ctx_BxC


def unpack_batch(batch: Batch) -> list[list[tuple[int, np.ndarray]]]:
    """Inverse of packing, per row: [(first position, tokens of that piece incl. its last target)].

    Used by tests and debugging: concatenating a document's pieces in position order (overlaps
    removed) gives back its tokens.
    """
    out = []
    for b in range(batch.num_rows):
        seg_T, pos_T = batch.segment_ids_BxT[b], batch.positions_BxT[b]
        inp_T, tgt_T, w_T = batch.inputs_BxT[b], batch.targets_BxT[b], batch.weights_BxT[b]
        pieces = []
        for s in np.unique(seg_T[seg_T > 0]):
            cols = np.flatnonzero(seg_T == s)
            toks = inp_T[cols]
            if w_T[cols[-1]] > 0:  # the piece's last target belongs to it too
                toks = np.append(toks, tgt_T[cols[-1]])
            pieces.append((int(pos_T[cols[0]]), toks))
        out.append(pieces)
    return out
