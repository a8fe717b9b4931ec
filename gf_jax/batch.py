"""The batch every part of gf_jax passes around: data builds it, train, evaluate and generate read it.

A ``NamedTuple`` of arrays, so it is a pytree: ``jax.tree.map`` over it, ``jax.jit`` takes it,
and fields that are ``None`` (no row context, no document ids) have no leaves. Shapes follow
docs/conventions.md: B rows, T tokens per row, C row-context width.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Batch(NamedTuple):
    """One (local or global) batch of rows of T input tokens and their next tokens.

    Attributes:
      inputs_BxT: input token ids.
      targets_BxT: the next token of each input (what the loss predicts).
      positions_BxT: index of each input token in its document; a row that starts mid-document
        carries the true positions, so the goldfish mask does not depend on packing.
      segment_ids_BxT: 1, 2, ... for the documents packed into a row, 0 = padding; attention
        never crosses a segment.
      weights_BxT: 1 where the target is real, 0 for padding and for targets that cross into
        the next document.
      context_BxC: optional, the C targets of the row's first document just before column 0
        (see ``gf_jax.goldfish.goldfish_mask``); None when the pipeline supplies no row context.
      doc_ids_BxT: optional, host-only: which document of the source each input came from
        (-1 = padding); never sent to devices (see ``for_device``).
    """

    inputs_BxT: Any
    targets_BxT: Any
    positions_BxT: Any
    segment_ids_BxT: Any
    weights_BxT: Any
    context_BxC: Any = None
    doc_ids_BxT: Any = None

    def for_device(self) -> Batch:
        """The fields the model and loss read (document ids stay on the host)."""
        return self._replace(doc_ids_BxT=None)

    @property
    def num_rows(self) -> int:
        return self.inputs_BxT.shape[0]
