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
from gf_jax.data.shuffle import IdentityOrder, gather_chunks

# A piece of a row: (document index, first token, end token) in document coordinates.
Piece = tuple[int, int, int]


def index_dtype(max_value: int):
    """int32 when every value fits (half the memory of int64), else int64."""
    return np.int32 if max_value < 2**31 else np.int64


def prefix_sums(chunks, n: int, total: int) -> np.ndarray:
    """``[0, cumsum(concatenate(chunks))]`` (n + 1 entries, the last ``total``), built chunk by
    chunk in the smallest dtype that holds ``total``: no int64 temporary of the whole length."""
    out_U1 = np.zeros(n + 1, index_dtype(total))
    at, carry = 1, 0
    for values in chunks:
        sums = np.cumsum(values, dtype=np.int64) + carry
        out_U1[at:at + len(sums)] = sums
        at += len(sums)
        carry = int(sums[-1]) if len(sums) else carry
    return out_U1


def layout_sums(lengths: np.ndarray, order, seq_len: int, mode: str) -> np.ndarray:
    """The prefix sums a ``RowLayout`` keeps (n + 1 entries): ``packed``, each document's first
    token in the epoch's stream; ``document``, each document's first row."""
    total = int(np.sum(lengths, dtype=np.int64))
    if mode == "packed":
        return prefix_sums(gather_chunks(order, lengths), len(order), total)
    pieces = (np.maximum(0, -(-(n.astype(np.int64) - 1) // seq_len)) for n in gather_chunks(order, lengths))
    return prefix_sums(pieces, len(order), total)


class RowLayout:
    """Rows of one epoch: documents in ``order``, cut into rows of T+1 tokens with stride T.

    ``packed``: the documents form one stream; ``document``: each document is cut on its own.
    ``order`` is anything indexable like an int array (an array, or a lazy
    ``gf_jax.data.shuffle`` order); the layout keeps one prefix-sum array (int32 where it fits),
    4-8 bytes per document (``sums_U1``: ``layout_sums``, computed unless given, e.g. memory-mapped
    from the store's index files), and reads the order only where a row needs it.
    """

    def __init__(self, lengths: np.ndarray, order, seq_len: int, mode: str, sums_U1: np.ndarray | None = None):
        self.lengths, self.order, self.T, self.mode = lengths, order, seq_len, mode
        if sums_U1 is None:
            sums_U1 = layout_sums(lengths, order, seq_len, mode)
        if mode == "packed":
            self.starts = sums_U1  # stream offset of each document in this order, the total at the end
            self.num_tokens = int(sums_U1[-1])
            self.num_rows = max(1, -(-(self.num_tokens - 1) // seq_len))
        else:
            self.row_starts = sums_U1  # first row of each document
            self.num_rows = int(sums_U1[-1])

    @property
    def has_targets(self) -> bool:
        """Whether some row holds a target (a document of at least 2 tokens in ``document`` mode,
        2 tokens in all in ``packed`` mode)."""
        return self.num_tokens >= 2 if self.mode == "packed" else self.num_rows > 0

    def row(self, r: int) -> list[Piece]:
        """Pieces of row r: (document index, first token, end token) in document coordinates."""
        return self.rows([r])[0]

    def rows(self, r_J) -> list[list[Piece]]:
        """Pieces of each row in ``r_J``, looking the order up once for all of them."""
        r_J = np.asarray(r_J, np.int64)
        T = self.T
        # The needles take the prefix sums' dtype: searchsorted would otherwise cast the whole array.
        if self.mode == "document":
            k_J = np.searchsorted(self.row_starts, r_J.astype(self.row_starts.dtype), "right") - 1
            piece_J = r_J - self.row_starts[k_J]
            doc_J = np.asarray(self.order[k_J], np.int64)
            return [[(d, c * T, min(c * T + T + 1, n))]
                    for d, c, n in zip(doc_J.tolist(), piece_J.tolist(), self.lengths[doc_J].tolist())]
        total = self.num_tokens
        a_J = r_J * T
        b_J = np.minimum(a_J + T + 1, total)
        k0_J = np.searchsorted(self.starts, a_J.astype(self.starts.dtype), "right") - 1
        k1_J = np.searchsorted(self.starts, (b_J - 1).astype(self.starts.dtype), "right") - 1
        k_Z = np.concatenate([np.arange(k0, k1 + 1) for k0, k1 in zip(k0_J.tolist(), k1_J.tolist())] or [[]])
        k_Z = k_Z.astype(np.int64)
        doc_of = dict(zip(k_Z.tolist(), np.asarray(self.order[k_Z], np.int64).tolist()))
        out = []
        for a, b, k0, k1 in zip(a_J.tolist(), b_J.tolist(), k0_J.tolist(), k1_J.tolist()):
            pieces = []
            for k in range(k0, k1 + 1):
                s, e = int(self.starts[k]), int(self.starts[k + 1])
                lo, hi = max(a, s) - s, min(b, e) - s
                if hi > lo:
                    pieces.append((doc_of[k], lo, hi))
            out.append(pieces)
        return out


def rows_per_epoch(lengths: Sequence[int], seq_len: int, mode: str) -> int:
    """Rows of T+1 tokens (T = ``seq_len``) that one pass over documents of these token counts
    makes in ``mode`` (the same in every epoch: the order does not change the count)."""
    lengths = np.asarray(lengths, np.int64)
    return RowLayout(lengths, IdentityOrder(len(lengths)), seq_len, mode).num_rows


def assemble_rows(tokens: Sequence[np.ndarray], rows: Sequence[Sequence[Piece]], seq_len: int, pad_id: int,
                  with_doc_ids: bool = False, context: int = 0,
                  protected: Sequence[np.ndarray] | None = None) -> Batch:
    """A host ``Batch`` (numpy, B = len(rows)) from row pieces; an empty row is all padding (weight 0).
    ``protected``: per document, True at tokens never to be predicted (``gf_jax.data.protect``):
    their targets get weight 0 but stay in the inputs.

    With ``context`` > 0 it also holds ``context_BxC`` (see ``row_context``); else that field is
    None. ``doc_ids_BxT`` (index into ``tokens`` of each input, -1 = padding) only ``with_doc_ids``.
    """
    B, T = len(rows), seq_len
    tok_BxT1 = np.full((B, T + 1), pad_id, np.int32)
    pos_BxT1 = np.zeros((B, T + 1), np.int32)
    seg_BxT1 = np.zeros((B, T + 1), np.int32)
    doc_BxT1 = np.full((B, T + 1), -1, np.int32)
    prot_BxT1 = np.zeros((B, T + 1), bool)
    for b, pieces in enumerate(rows):
        col = 0
        for s, (d, lo, hi) in enumerate(pieces, 1):
            n = hi - lo
            tok_BxT1[b, col:col + n] = tokens[d][lo:hi]
            if protected is not None:
                prot_BxT1[b, col:col + n] = protected[d][lo:hi]
            pos_BxT1[b, col:col + n] = np.arange(lo, hi, dtype=np.int32)
            seg_BxT1[b, col:col + n] = s
            doc_BxT1[b, col:col + n] = d
            col += n
    # A target is real when it sits in the same document as its input (not padding, not across).
    real_BxT = (seg_BxT1[:, :-1] == seg_BxT1[:, 1:]) & (seg_BxT1[:, :-1] > 0)
    weights_BxT = (real_BxT & ~prot_BxT1[:, 1:]).astype(np.float32)  # a protected token is never a target
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
