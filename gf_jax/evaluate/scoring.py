"""Scoring documents without generating: per-document loss, membership inference (loss and zlib
attacks) and held-out loss. No goldfish mask: these measure the model, not its training objective.
Every target of a document counts; an instruction or chat example counts its supervised targets
(its answers), given as ``EncodedExamples``. ``gf_jax.evaluate`` re-exports the public functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from gf_jax.batch import Batch
from gf_jax.data.examples import EncodedExamples
from gf_jax.evaluate import metrics
from gf_jax.goldfish import GoldfishConfig
from gf_jax.loss import chunked_loss_fn
from gf_jax.model.sharding import batch_sharding, place_on_mesh, replicate_outputs, rows_for_mesh
from gf_jax.util.progress import progress_bar

_ALL_TARGETS = GoldfishConfig(strategy="none")  # scoring counts every token, no goldfish mask


def decoded_texts(tokenizer, id_lists: Sequence[Sequence[int]]) -> list[str]:
    """Decoded texts; without a tokenizer, ids as space-separated words (RougeL then works on ids)."""
    if tokenizer is None:
        return [" ".join(str(int(i)) for i in ids) for ids in id_lists]
    return tokenizer.decode([[int(i) for i in ids] for ids in id_lists])


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "mesh"))
def _row_xent_jit(graphdef, state, batch: Batch, *, chunk_size, mesh=None):
    """Per-row (sum of target NLL in nats, number of real targets); logits never fully materialised."""
    model = nnx.merge(graphdef, state)
    hidden_BxTxD = model.hidden(batch.inputs_BxT, positions_BxT=batch.positions_BxT,
                           segment_ids_BxT=batch.segment_ids_BxT)
    w_DxV = model.output_weights()

    def one_row(hidden_TxD, targets_T, weights_T):
        _, aux = chunked_loss_fn(hidden_TxD[None], w_DxV, targets_T[None], _ALL_TARGETS,
                                 weights_BxT=weights_T[None], chunk_size=chunk_size)
        return aux["xent_all_sum"], aux["n_valid"]

    return replicate_outputs(jax.vmap(one_row)(hidden_BxTxD, batch.targets_BxT, batch.weights_BxT), mesh)


def row_xent(model, batch: Batch, mesh=None, chunk_size: int = 128):
    """Per-row ``(xent_B, n_B)``: summed target NLL (nats) and number of real targets of ``batch``."""
    graphdef, state = nnx.split(model)
    # Every target counts here (no goldfish mask), so the row context is not read: leaving it out
    # (and the host-only document ids) keeps one compiled program for batches with and without it.
    batch = jax.tree.map(np.asarray, batch._replace(context_BxC=None, doc_ids_BxT=None))
    if mesh is None:
        return _row_xent_jit(graphdef, state, batch, chunk_size=chunk_size)
    with jax.set_mesh(mesh):
        return _row_xent_jit(graphdef, state, jax.device_put(batch, batch_sharding(mesh)), chunk_size=chunk_size,
                             mesh=mesh)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tokens_and_targets(docs) -> tuple[list, list | None]:
    """(token lists, supervised masks or None = every target) of documents or ``EncodedExamples``."""
    if isinstance(docs, EncodedExamples):
        return docs.tokens, docs.supervised
    return list(docs), None


def document_nll(model, docs_tokens, *, batch_size: int = 16, mesh=None, pad_id: int = 0,
                 progress: bool | str = False) -> np.ndarray:
    """Mean next-token NLL (nats) of each document (token lists: every target counts) or example
    (``EncodedExamples``: its supervised targets count), no goldfish mask.

    A document longer than the model's context is scored on its first ``max_seq_len + 1``
    tokens. Documents need at least 2 tokens. Returns a float64 array, one value per document.
    """
    max_len = model.config.max_seq_len
    tokens, supervised = _tokens_and_targets(docs_tokens)
    docs = [np.asarray(d, np.int32)[: max_len + 1] for d in tokens]
    targets = [np.ones(len(d), bool) if supervised is None else np.asarray(s, bool)[: max_len + 1]
               for d, s in zip(docs, supervised or docs)]
    if any(len(d) < 2 for d in docs):
        raise ValueError("every document needs at least 2 tokens to have a next-token loss.")
    batch_size = rows_for_mesh(batch_size, mesh)
    model = place_on_mesh(model, mesh)
    order = np.argsort([-len(d) for d in docs], kind="stable")
    nll = np.zeros(len(docs), np.float64)
    bar = progress_bar(progress, len(docs), "document loss")
    for begin in range(0, len(docs), batch_size):
        idx = order[begin : begin + batch_size]
        width = min(_round_up(len(docs[idx[0]]) - 1, 64), max_len)  # few distinct shapes to compile
        rows = _document_rows([docs[i] for i in idx], [targets[i] for i in idx], batch_size, width, pad_id)
        xent_B, n_B = row_xent(model, rows, mesh)
        nll[idx] = np.asarray(xent_B, np.float64)[: idx.size] / np.maximum(np.asarray(n_B)[: idx.size], 1.0)
        if bar is not None:
            bar.update(idx.size)
    if bar is not None:
        bar.close()
    return nll


def _document_rows(docs: Sequence[np.ndarray], targets: Sequence[np.ndarray], batch_size: int, width: int,
                   pad_id: int) -> Batch:
    """One document per row from column 0, padded to ``batch_size`` rows of ``width`` (every doc fits);
    a target has weight 1 where ``targets`` marks its token (``targets[j]``: token j is scored)."""
    shape = (batch_size, width)
    batch = Batch(inputs_BxT=np.full(shape, pad_id, np.int32), targets_BxT=np.zeros(shape, np.int32),
                  positions_BxT=np.broadcast_to(np.arange(width, dtype=np.int32), shape).copy(),
                  segment_ids_BxT=np.zeros(shape, np.int32), weights_BxT=np.zeros(shape, np.float32))
    for row, doc in enumerate(docs):
        n = len(doc) - 1
        batch.inputs_BxT[row, :n] = doc[:-1]
        batch.targets_BxT[row, :n] = doc[1:]
        batch.segment_ids_BxT[row, :n] = 1
        batch.weights_BxT[row, :n] = targets[row][1:]
    return batch


def membership_inference(
    model,
    tokenizer,
    member_docs,
    nonmember_docs,
    *,
    fpr: float = 0.001,
    batch_size: int = 16,
    mesh=None,
    progress: bool | str = False,
) -> dict:
    """Loss and zlib membership-inference attacks, members (trained on) vs non-members.

    Goldfish loss is not a defence against these: it changes them only marginally.

    Args:
      member_docs, nonmember_docs: token ids as trained (BOS/EOS included), or ``EncodedExamples``
        (their supervised targets are scored). Each is scored on its first ``max_seq_len + 1``
        tokens; the zlib attack compresses the decoded text of those same scored tokens (ids as
        words without a tokenizer).
      fpr: the false-positive rate of the reported TPR (0.1% as in the paper).

    Returns:
      ``{"loss": {"auc", "tpr_at_fpr"}, "zlib": {...}, "fpr", "n_members", "n_nonmembers",
      "member_nll_mean", "nonmember_nll_mean"}``.
    """
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    window = model.config.max_seq_len + 1
    scores = {}
    for role, docs in (("members", member_docs), ("non-members", nonmember_docs)):
        desc = f"{progress}: {role}" if isinstance(progress, str) else progress
        nll = document_nll(model, docs, batch_size=batch_size, mesh=mesh, pad_id=pad_id, progress=desc)
        lengths = [max(1, metrics.zlib_length(t)) for t in decoded_texts(tokenizer, scored_tokens(docs, window))]
        scores[role] = (nll, metrics.loss_scores(nll), metrics.zlib_scores(nll, lengths))
    (nll_in, loss_in, zlib_in), (nll_out, loss_out, zlib_out) = scores["members"], scores["non-members"]
    return {
        "loss": metrics.mia_summary(loss_in, loss_out, fpr),
        "zlib": metrics.mia_summary(zlib_in, zlib_out, fpr),
        "fpr": fpr,
        "n_members": len(member_docs),
        "n_nonmembers": len(nonmember_docs),
        "member_nll_mean": float(np.mean(nll_in)),
        "nonmember_nll_mean": float(np.mean(nll_out)),
    }


def scored_tokens(docs, window: int) -> list[list[int]]:
    """The tokens whose loss is scored, in each document's first ``window`` tokens: all of them for a
    token list, the supervised targets of an example (what the zlib attack compresses)."""
    tokens, supervised = _tokens_and_targets(docs)
    if supervised is None:
        return [list(d[:window]) for d in tokens]
    return [list(np.asarray(t)[:window][np.asarray(s, bool)[:window]]) for t, s in zip(tokens, supervised)]


def heldout_loss(model, batches: Iterable[Batch], *, mesh=None, progress: bool | str = False) -> tuple[float, float]:
    """(mean next-token loss in nats, perplexity) over every real target of the batches.

    ``batches`` are ``gf_jax.batch.Batch`` (e.g. ``gf_jax.data.eval_batches``): ``weights_BxT`` marks
    real targets; all of them count (no goldfish mask): this is the model's quality on unseen text.
    """
    total, count = 0.0, 0
    model = place_on_mesh(model, mesh)
    bar = progress_bar(progress, None, "held-out loss", unit="batch")
    for batch in batches:
        xent_B, n_B = row_xent(model, batch, mesh)
        total += float(np.sum(np.asarray(xent_B, np.float64)))
        count += int(np.sum(np.asarray(n_B)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if count == 0:
        raise ValueError("the held-out batches contain no real targets; give documents of at least 2 tokens.")
    loss = total / count
    return loss, math.exp(min(loss, 700.0))
