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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gf_jax.batch import Batch
from gf_jax.data.examples import EncodedExamples
from gf_jax.evaluate import attacks, metrics
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


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "mesh"))
def _token_stats_jit(graphdef, state, batch: Batch, *, chunk, mesh=None):
    """Per token: (log p(target), mu, sigma) with mu, sigma the mean and standard deviation of log p
    over the vocabulary under the model's own distribution; ``chunk`` positions at a time, so the
    B x T x V logits are never held whole."""
    model = nnx.merge(graphdef, state)
    hidden_BxTxD = model.hidden(batch.inputs_BxT, positions_BxT=batch.positions_BxT,
                                segment_ids_BxT=batch.segment_ids_BxT)
    w_DxV = model.output_weights()
    B, T, D = hidden_BxTxD.shape
    hidden_NxBxCxD = hidden_BxTxD.reshape(B, T // chunk, chunk, D).swapaxes(0, 1)
    targets_NxBxC = batch.targets_BxT.reshape(B, T // chunk, chunk).swapaxes(0, 1)

    def one_chunk(args):
        hidden_BxCxD, targets_BxC = args
        logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, w_DxV.astype(hidden_BxCxD.dtype)).astype(jnp.float32)
        logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
        target_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
        p_BxCxV = jnp.exp(logp_BxCxV)
        mu_BxC = jnp.sum(p_BxCxV * logp_BxCxV, axis=-1)
        var_BxC = jnp.maximum(jnp.sum(p_BxCxV * logp_BxCxV * logp_BxCxV, axis=-1) - mu_BxC * mu_BxC, 0.0)
        return target_BxC, mu_BxC, jnp.sqrt(var_BxC)

    out = jax.lax.map(one_chunk, (hidden_NxBxCxD, targets_NxBxC))
    return replicate_outputs(tuple(x.swapaxes(0, 1).reshape(B, T) for x in out), mesh)


def token_statistics(model, docs_tokens, *, batch_size: int = 16, mesh=None, pad_id: int = 0,
                     start_positions: Sequence[int] | None = None, progress: bool | str = False) -> list[dict]:
    """For each document (token lists: every target; ``EncodedExamples``: the supervised ones; a
    ``(tokens, scored_mask)`` pair list also works), numpy arrays over its scored targets:
    ``logprob`` (log p of the true next token), ``mu`` and ``sigma`` (mean and standard deviation
    of log p over the vocabulary at that position). ``start_positions``: the RoPE position of each
    document's first token (default 0). Scored on the first ``max_seq_len + 1`` tokens."""
    max_len = model.config.max_seq_len
    tokens, supervised = _tokens_and_targets(docs_tokens)
    docs = [np.asarray(d, np.int32)[: max_len + 1] for d in tokens]
    targets = [np.ones(len(d), bool) if supervised is None else np.asarray(s, bool)[: max_len + 1]
               for d, s in zip(docs, supervised or docs)]
    starts = np.zeros(len(docs), np.int64) if start_positions is None else np.asarray(start_positions, np.int64)
    if any(len(d) < 2 for d in docs):
        raise ValueError("every document needs at least 2 tokens to have a next-token loss.")
    batch_size = rows_for_mesh(batch_size, mesh)
    graphdef, state = nnx.split(place_on_mesh(model, mesh))
    order = np.argsort([-len(d) for d in docs], kind="stable")
    out: list[dict] = [{} for _ in docs]
    bar = progress_bar(progress, len(docs), "token statistics")
    for begin in range(0, len(docs), batch_size):
        idx = order[begin : begin + batch_size]
        width = min(_round_up(len(docs[idx[0]]) - 1, 64), max_len)
        rows = _document_rows([docs[i] for i in idx], [targets[i] for i in idx], batch_size, width, pad_id)
        rows.positions_BxT[: idx.size] += starts[idx, None].astype(np.int32)
        rows = jax.tree.map(np.asarray, rows._replace(context_BxC=None, doc_ids_BxT=None))
        chunk = math.gcd(width, 64)
        if mesh is None:
            stats = _token_stats_jit(graphdef, state, rows, chunk=chunk)
        else:
            with jax.set_mesh(mesh):
                stats = _token_stats_jit(graphdef, state, jax.device_put(rows, batch_sharding(mesh)), chunk=chunk,
                                         mesh=mesh)
        logprob_BxT, mu_BxT, sigma_BxT = (np.asarray(x, np.float64) for x in stats)
        for row, i in enumerate(idx):
            scored = rows.weights_BxT[row] > 0
            out[i] = {"logprob": logprob_BxT[row][scored], "mu": mu_BxT[row][scored], "sigma": sigma_BxT[row][scored]}
        if bar is not None:
            bar.update(idx.size)
    if bar is not None:
        bar.close()
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ScoredRows:
    """Token arrays with the targets to score in each (``scored[i][j]``: token j is scored), the
    interface of ``EncodedExamples`` that ``token_statistics`` reads: e.g. a suffix after its prompt,
    a choice after its context."""

    def __init__(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.tokens = [np.asarray(r[0], np.int32) for r in rows]
        self.supervised = [np.asarray(r[1], bool) for r in rows]

    def __len__(self) -> int:
        return len(self.tokens)


def _tokens_and_targets(docs) -> tuple[list, list | None]:
    """(token lists, supervised masks or None = every target) of documents, or of ``EncodedExamples``
    (or anything with their ``tokens`` and ``supervised`` lists)."""
    if isinstance(docs, EncodedExamples) or (hasattr(docs, "tokens") and hasattr(docs, "supervised")):
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
    k: float = 0.2,
    batch_size: int = 16,
    mesh=None,
    progress: bool | str = False,
) -> dict:
    """Membership-inference attacks, members (trained on) vs non-members: loss, zlib, Min-K% and
    Min-K%++ (``gf_jax.evaluate.attacks``), each with its AUROC, TPR at 1% and 0.1% false positives
    (with the counts and whether they suffice) and its ROC curve.

    Goldfish loss is not a defence against these: it changes them only marginally.

    Args:
      member_docs, nonmember_docs: token ids as trained (BOS/EOS included), or ``EncodedExamples``
        (their supervised targets are scored). Each is scored on its first ``max_seq_len + 1``
        tokens; the zlib attack compresses the decoded text of those same scored tokens (ids as
        words without a tokenizer).
      fpr: the false-positive rate of ``tpr_at_fpr`` (0.1% as in the paper).
      k: the share of lowest-scoring tokens of Min-K% and Min-K%++ (0.2, as their authors use).

    Returns:
      ``{attack: {"auc", "tpr_at_fpr", "tpr_at": {"0.01": {...}, "0.001": {...}}, "n_members",
      "n_nonmembers", "roc": {"fpr", "tpr"}} for attack in loss, zlib, min_k, min_k_pp}`` plus
      ``fpr``, ``k``, ``n_members``, ``n_nonmembers``, ``member_nll_mean``, ``nonmember_nll_mean``.
    """
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    window = model.config.max_seq_len + 1
    scores, nll = {}, {}
    for role, docs in (("members", member_docs), ("non-members", nonmember_docs)):
        desc = f"{progress}: {role}" if isinstance(progress, str) else progress
        stats = token_statistics(model, docs, batch_size=batch_size, mesh=mesh, pad_id=pad_id, progress=desc)
        nll[role] = np.array([-np.mean(s["logprob"]) if s["logprob"].size else 0.0 for s in stats])
        lengths = [max(1, metrics.zlib_length(t)) for t in decoded_texts(tokenizer, scored_tokens(docs, window))]
        logprobs = [s["logprob"] if s["logprob"].size else np.zeros(1) for s in stats]
        scores[role] = {
            "loss": metrics.loss_scores(nll[role]),
            "zlib": metrics.zlib_scores(nll[role], lengths),
            "min_k": attacks.min_k_scores(logprobs, k),
            "min_k_pp": attacks.min_k_plus_plus_scores(
                logprobs, [s["mu"] if s["mu"].size else np.zeros(1) for s in stats],
                [s["sigma"] if s["sigma"].size else np.ones(1) for s in stats], k),
        }
    result: dict = {"fpr": fpr, "k": k, "n_members": len(member_docs), "n_nonmembers": len(nonmember_docs),
                    "member_nll_mean": float(np.mean(nll["members"])),
                    "nonmember_nll_mean": float(np.mean(nll["non-members"]))}
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        inside, outside = scores["members"][attack], scores["non-members"][attack]
        roc_fpr, roc_tpr = attacks.roc_curve(inside, outside)
        result[attack] = {**metrics.mia_summary(inside, outside, fpr), **attacks.tpr_table(inside, outside),
                          "roc": {"fpr": roc_fpr.tolist(), "tpr": roc_tpr.tolist()}}
    return result


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
