"""Memorization and membership-inference metrics: plain numpy on host, no model involved.

Memorization compares a generated suffix with the true one, token by token (``suffix_match``) and
as text (``rouge_l``, the rouge-score package's ROUGE-L F-measure, as in the paper). Membership
inference turns per-document losses into attack scores (``loss_scores``, ``zlib_scores``) and
scores the attack (``roc_auc``, ``tpr_at_fpr``). Convention: a higher attack score means "more
likely a member"; members are the documents trained on. Arrays suffixed ``_A`` hold one entry per
suffix token (shape letters: docs/conventions.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Memorization.


def suffix_match(generated: Sequence[int], reference: Sequence[int]) -> dict:
    """Token-level agreement of a generated suffix with the true one, position by position.

    Args:
      generated: generated token ids (length A; shorter counts the missing tail as wrong).
      reference: true suffix token ids (length A >= 1).

    Returns:
      dict with ``exact_match`` (share of the A positions whose token is reproduced, in [0, 1]),
      ``longest_run`` (longest stretch of consecutive reproduced positions, in tokens) and
      ``memorized`` (True iff all A tokens are reproduced).
    """
    ref_A = np.asarray(reference, dtype=np.int64)
    if ref_A.size == 0:
        raise ValueError("the reference suffix is empty; use a suffix of at least one token.")
    gen_A = np.full(ref_A.shape, -1, dtype=np.int64)
    gen = np.asarray(generated, dtype=np.int64)[: ref_A.size]
    gen_A[: gen.size] = gen
    hit_A = gen_A == ref_A
    return {
        "exact_match": float(hit_A.mean()),
        "longest_run": longest_true_run(hit_A),
        "memorized": bool(hit_A.all()),
    }


def longest_true_run(flags) -> int:
    """Length of the longest stretch of consecutive True values in a 1-D boolean array."""
    flags = np.asarray(flags, dtype=bool)
    # Pad with False on both sides: runs start at a False->True edge and end at True->False.
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max()) if starts.size else 0


def rouge_l(generated_texts: Sequence[str], reference_texts: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each generated text against its reference (rouge-score, no stemmer).

    rouge-score lower-cases and splits on non-alphanumerics, as in the authors' evaluation.
    1.0 = the same word sequence; two empty texts score 0.0 (rouge-score's convention).
    """
    from rouge_score import rouge_scorer  # heavy optional dependency, only needed here

    if len(generated_texts) != len(reference_texts):
        raise ValueError(
            f"got {len(generated_texts)} generated texts but {len(reference_texts)} references; "
            "pass one reference per generated text."
        )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [
        float(scorer.score(ref, gen)["rougeL"].fmeasure)
        for gen, ref in zip(generated_texts, reference_texts)
    ]


def aggregate_memorization(per_doc: Sequence[dict], n_skipped: int = 0) -> dict:
    """Summary over documents of ``suffix_match`` results (with a ``rougeL`` key each).

    Returns: ``n_documents`` (evaluated), ``n_skipped`` (too short to evaluate), ``n_memorized``,
    ``memorized_fraction``, ``rougeL_mean``, ``rougeL_median``, ``exact_match_mean``,
    ``longest_run_mean``. Means of an empty set are NaN.
    """
    n = len(per_doc)

    def stat(fn, key):
        return float(fn([d[key] for d in per_doc])) if n else float("nan")

    n_memorized = sum(bool(d["memorized"]) for d in per_doc)
    return {
        "n_documents": n,
        "n_skipped": int(n_skipped),
        "n_memorized": n_memorized,
        "memorized_fraction": n_memorized / n if n else float("nan"),
        "rougeL_mean": stat(np.mean, "rougeL"),
        "rougeL_median": stat(np.median, "rougeL"),
        "exact_match_mean": stat(np.mean, "exact_match"),
        "longest_run_mean": stat(np.mean, "longest_run"),
    }


# ---------------------------------------------------------------------------------------------
# Membership inference.


def zlib_length(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (default level): the zlib attack's norm."""
    return len(zlib.compress(text.encode("utf-8")))


def loss_scores(mean_nll) -> np.ndarray:
    """Loss attack: score = -mean token NLL (nats); a lower loss looks more like a member."""
    return -np.asarray(mean_nll, dtype=np.float64)


def zlib_scores(mean_nll, zlib_lengths) -> np.ndarray:
    """zlib attack: score = -(mean token NLL / zlib-compressed length in bytes) of each text.

    Dividing by the text's compressibility discounts texts that are easy for any model
    (repetitive, boilerplate), which the plain loss attack mistakes for members.
    """
    nll = np.asarray(mean_nll, dtype=np.float64)
    lengths = np.asarray(zlib_lengths, dtype=np.float64)
    if np.any(lengths <= 0):
        raise ValueError("zlib lengths must be positive byte counts.")
    return -nll / lengths


def _check_scores(member_scores, nonmember_scores):
    pos = np.asarray(member_scores, dtype=np.float64).ravel()
    neg = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"membership inference needs members and non-members, got {pos.size} and {neg.size}."
        )
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("membership-inference scores must be finite numbers.")
    return pos, neg


def roc_auc(member_scores, nonmember_scores) -> float:
    """Area under the ROC curve: P(member score > non-member score) + 0.5 P(tie).

    Computed from average ranks (the Mann-Whitney U statistic) in O(n log n); 0.5 is chance.
    """
    pos, neg = _check_scores(member_scores, nonmember_scores)
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average 1-based rank of each group of tied scores, so ties count half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    group_mean = first + (counts + 1) / 2.0
    ranks_sorted = np.repeat(group_mean, counts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = 0.001) -> float:
    """Highest true-positive rate of a threshold attack whose false-positive rate is <= ``fpr``.

    The attack flags a document as a member iff its score >= t. Over all thresholds t with
    (#non-members >= t) / #non-members <= fpr, return the largest (#members >= t) / #members.
    With fewer than 1/fpr non-members no false positive is allowed, so this is the share of
    members scoring strictly above every non-member.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}.")
    pos, neg = _check_scores(member_scores, nonmember_scores)
    allowed_fp = int(np.floor(fpr * neg.size + 1e-9))
    if allowed_fp >= neg.size:
        return 1.0
    # The lowest admissible threshold sits just above the (allowed_fp+1)-th largest non-member
    # score: every non-member tied with it would be flagged too, which would be one too many.
    cutoff = np.sort(neg)[::-1][allowed_fp]
    return float(np.mean(pos > cutoff))


def mia_summary(member_scores, nonmember_scores, fpr: float = 0.001) -> dict:
    """``{"auc": ..., "tpr_at_fpr": ...}`` for one attack."""
    return {
        "auc": roc_auc(member_scores, nonmember_scores),
        "tpr_at_fpr": tpr_at_fpr(member_scores, nonmember_scores, fpr),
    }
