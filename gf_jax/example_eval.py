"""Evaluation of a model fine-tuned on instruction or chat examples (``data.format`` not ``text``).

The document protocol (gf_jax.evaluate) judged on the answers, which are all the model was
trained to produce:

* memorization: the prefix is the prompt plus the first part of the (last) answer, the suffix the
  last ``suffix_len`` tokens of that answer (a chat template's end-of-turn text included, a
  trailing EOS not);
  an example whose answer is shorter than ``suffix_len`` tokens is skipped and counted;
* membership inference: the mean NLL of each example's supervised tokens (members vs held out),
  the zlib attack on the decoded answer text;
* held-out loss: over the supervised tokens of the held-out examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gf_jax import data, metrics
from gf_jax.evaluate import evaluate_memorization
from gf_jax.generate import data_parallel_size
from gf_jax.scoring import decoded_texts, heldout_loss, round_up, row_xent


def answer_texts(tokenizer, encoded: data.EncodedExamples) -> list[str]:
    """The decoded supervised tokens of each example (what the zlib attack compresses)."""
    return decoded_texts(tokenizer, [t[s] for t, s in zip(encoded.tokens, encoded.supervised)])


def example_memorization(model, tokenizer, encoded: data.EncodedExamples, *, suffix_len: int, **kw
                         ) -> tuple[list[dict], dict]:
    """``evaluate_memorization`` with the suffix inside each example's last answer (see module doc)."""
    eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    tokens, usable, skipped = [], [], []
    for i, (t, (start, end)) in enumerate(zip(encoded.tokens, encoded.answers)):
        tokens.append(t[:end].tolist())  # cut after the answer: the suffix ends where the answer does
        answer_len = end - start - (1 if eos is not None and t[end - 1] == eos else 0)
        (usable if answer_len >= suffix_len else skipped).append(i)
    if not usable:
        raise ValueError(f"no example has an answer of at least --suffix-len={suffix_len} tokens; use a shorter "
                         "--suffix-len.")
    per_doc, aggregate = evaluate_memorization(model, tokenizer, [tokens[i] for i in usable],
                                               doc_ids=[encoded.ids[i] for i in usable], suffix_len=suffix_len,
                                               eos_id=eos, **kw)
    aggregate.update(metrics.aggregate_memorization(per_doc, n_skipped=len(skipped)))
    aggregate["skipped_ids"] = aggregate["skipped_ids"] + [encoded.ids[i] for i in skipped]
    return per_doc, aggregate


def answer_nll(model, encoded: data.EncodedExamples, *, seq_len: int, batch_size: int = 16, mesh=None,
               pad_id: int = 0) -> np.ndarray:
    """Mean NLL (nats) of each example's supervised tokens, one example per row."""
    if mesh is not None:
        batch_size = round_up(batch_size, data_parallel_size(mesh))
    nll = np.zeros(len(encoded.tokens), np.float64)
    for batch in data.example_eval_batches(encoded, global_batch=batch_size, seq_len=seq_len, pad_id=pad_id,
                                           mode="document", process_index=0, process_count=1, with_doc_ids=True):
        xent_B, n_B = (np.asarray(x, np.float64) for x in row_xent(model, batch, mesh))
        for row, example in enumerate(batch.doc_ids_BxT[:, 0]):
            if example >= 0:
                nll[example] = xent_B[row] / max(n_B[row], 1.0)
    return nll


def example_membership(model, tokenizer, members: data.EncodedExamples, nonmembers: data.EncodedExamples, *,
                       seq_len: int, fpr: float, batch_size: int = 16, mesh=None) -> dict:
    """Loss and zlib attacks on the answers, members vs non-members (as ``membership_inference``)."""
    scores = {}
    for role, encoded in (("members", members), ("non-members", nonmembers)):
        nll = answer_nll(model, encoded, seq_len=seq_len, batch_size=batch_size, mesh=mesh, pad_id=tokenizer.pad_id)
        lengths = [max(1, metrics.zlib_length(t)) for t in answer_texts(tokenizer, encoded)]
        scores[role] = (nll, metrics.loss_scores(nll), metrics.zlib_scores(nll, lengths))
    (nll_in, loss_in, zlib_in), (nll_out, loss_out, zlib_out) = scores["members"], scores["non-members"]
    return {
        "loss": metrics.mia_summary(loss_in, loss_out, fpr),
        "zlib": metrics.mia_summary(zlib_in, zlib_out, fpr),
        "fpr": fpr, "n_members": len(nll_in), "n_nonmembers": len(nll_out),
        "member_nll_mean": float(np.mean(nll_in)), "nonmember_nll_mean": float(np.mean(nll_out)),
    }


def evaluate_examples(model, config, tokenizer, examples: Sequence, heldout: Sequence | None, args, mesh,
                      name: str) -> dict[str, Any]:
    """The ``evaluate_run`` results (memorization, MIA, held-out loss) of a run trained on examples."""
    seq_len = min(config.train.seq_len, model.config.max_seq_len)
    members = data.encode_examples(examples, tokenizer, config.data, max_len=seq_len + 1)
    per_doc, aggregate = example_memorization(
        model, tokenizer, members, suffix_len=args.suffix_len, prefix_len=args.prefix_len,
        batch_size=args.batch_size, beam_width=args.beam_width, mesh=mesh, progress=f"{name}: memorization")
    result: dict[str, Any] = {"goldfish": dataclasses.asdict(config.goldfish),
                              "memorization": {"per_doc": per_doc, "aggregate": aggregate}}
    if heldout:
        held = data.encode_examples(heldout, tokenizer, config.data, max_len=seq_len + 1)
        result["mia"] = example_membership(model, tokenizer, members, held, seq_len=seq_len, fpr=args.fpr,
                                           batch_size=args.batch_size, mesh=mesh)
        global_batch = args.batch_size if mesh is None else round_up(args.batch_size, data_parallel_size(mesh))
        batches = data.example_eval_batches(held, global_batch=global_batch, seq_len=seq_len, pad_id=tokenizer.pad_id,
                                            mode=config.data.mode, process_index=0, process_count=1)
        loss, ppl = heldout_loss(model, batches, mesh=mesh, progress=f"{name}: held-out loss")
        result["heldout"] = {"loss": loss, "perplexity": ppl, "n_documents": len(heldout)}
    return result
