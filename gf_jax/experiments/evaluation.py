"""Evaluating one trained arm in memory: extraction of the members' suffixes, membership
inference, held-out loss, and how many suffix targets its goldfish mask never supervised."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from gf_jax import data, evaluate
from gf_jax.evaluate.extraction import offset_extraction
from gf_jax.goldfish import goldfish_mask


@dataclasses.dataclass(frozen=True)
class EvalDocuments:
    """What every arm of an experiment is evaluated on (token ids as the pipeline frames them).

    Attributes:
      member_ids, member_tokens: documents trained on; their suffixes are extracted and they are
        the membership-inference members.
      nonmember_tokens: documents never trained on (membership-inference non-members; may be empty).
      heldout_tokens: documents for the held-out loss (may be empty).
    """

    member_ids: list[str]
    member_tokens: list[list[int]]
    nonmember_tokens: list[list[int]]
    heldout_tokens: list[list[int]]


def eval_mesh(mesh):
    """The mesh to evaluate on: None for a single device (plain jit), else the training mesh."""
    return None if mesh.devices.size == 1 else mesh


def eval_batch_size(batch: int, mesh) -> int:
    """``batch`` rounded up to whole rows per data-parallel shard of ``mesh`` (None: unchanged)."""
    if mesh is None:
        return batch
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-batch // n_shards) * n_shards


def evaluate_arm(model, mesh, tokenizer, config, docs: EvalDocuments, exp, name: str) -> dict:
    """``{"memorization": {"per_doc", "aggregate"}, "mia"?, "heldout"?}`` of one trained arm.

    ``exp`` gives ``suffix_len``, ``prefix_len``, ``eval_batch`` and ``offsets`` /
    ``offset_prefix_len`` (extraction at prefix offsets, ``gf_jax.evaluate.extraction``); ``config`` is the arm's run
    config (sequence length and row mode of the held-out batches).
    """
    mesh = eval_mesh(mesh)
    batch = eval_batch_size(exp.eval_batch, mesh)
    per_doc, aggregate = evaluate.evaluate_memorization(
        model, tokenizer, docs.member_tokens, doc_ids=docs.member_ids, suffix_len=exp.suffix_len,
        prefix_len=exp.prefix_len, batch_size=batch, mesh=mesh, progress=f"{name}: extraction",
    )
    result = {"memorization": {"per_doc": per_doc, "aggregate": aggregate}}
    if getattr(exp, "offsets", ()):  # extraction with the prompt inside the documents
        result["offsets"] = offset_extraction(
            model, tokenizer, docs.member_tokens, doc_ids=docs.member_ids, offsets=exp.offsets,
            prefix_len=exp.offset_prefix_len, suffix_len=exp.suffix_len, batch_size=batch, mesh=mesh,
            progress=f"{name}: offsets")
    if docs.nonmember_tokens:
        result["mia"] = evaluate.membership_inference(
            model, tokenizer, docs.member_tokens, docs.nonmember_tokens, batch_size=batch, mesh=mesh,
            progress=f"{name}: MIA")
    if docs.heldout_tokens:
        batches = data.eval_batches([np.asarray(t, np.int32) for t in docs.heldout_tokens], global_batch=batch,
                                    seq_len=config.train.seq_len, pad_id=tokenizer.pad_id, mode=config.data.mode,
                                    process_index=0, process_count=1)
        loss, perplexity = evaluate.heldout_loss(model, batches, mesh=mesh)
        result["heldout"] = {"loss": loss, "perplexity": perplexity, "n_documents": len(docs.heldout_tokens)}
    return result


def suffix_drop_counts(docs_tokens, goldfish_config, suffix_len: int, eos_id: int) -> list[int | None]:
    """How many of each document's suffix targets the arm's goldfish mask leaves out of training
    (None for ``random``, whose mask changes every step). Rows start at the document's first
    token, as in document mode, so the mask is the one training used."""

    if goldfish_config.strategy == "random":
        return [None] * len(docs_tokens)
    counts = []
    for tokens in docs_tokens:
        tokens = list(tokens)
        end = len(tokens) - 1 if tokens and tokens[-1] == eos_id else len(tokens)
        targets_1xT = jnp.asarray(tokens[1:], jnp.int32)[None]
        positions_1xT = jnp.arange(targets_1xT.shape[1])[None]
        dropped_T = np.asarray(goldfish_mask(targets_1xT, goldfish_config, positions_BxT=positions_1xT))[0]
        # Token j of the document is target j - 1.
        counts.append(int(dropped_T[end - suffix_len - 1:end - 1].sum()))
    return counts
