"""Membership-inference attacks beyond loss and zlib, and how to report them at low false-positive
rates. Plain numpy on per-token statistics (``gf_jax.evaluate.scoring.token_statistics``).

- **Min-K%** (Shi et al. 2023, "Detecting pretraining data from large language models"): the mean
  of the k% lowest token log-probabilities of a text; a member has few very unlikely tokens.
- **Min-K%++** (Zhang et al. 2024): each token's log-probability is first standardized by the
  model's own distribution at that position, ``z_t = (log p(x_t) - mu_t) / sigma_t`` with
  ``mu_t = E_{v~p}[log p(v)]`` and ``sigma_t`` its standard deviation; the score is the mean of
  the k% lowest ``z_t``. Members sit at local maxima of the likelihood, where ``z`` is high.

A higher score means "more likely a member" for both. ``tpr_table`` reports the true-positive rate
at 1% and 0.1% false positives with the member / non-member counts behind it and says when there
are too few non-members for a rate to mean anything (below ``1 / fpr`` no false positive at all is
allowed, so the rate is an upper bound of nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gf_jax.evaluate.metrics import roc_auc, tpr_at_fpr

LOW_FPRS = (0.01, 0.001)


def _lowest_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ``ceil(k * n)`` lowest values (at least one)."""
    values = np.sort(np.asarray(values, np.float64))
    n = max(1, math.ceil(k * values.size))
    return float(values[:n].mean())


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1] (a share of the tokens), got {k}.")


def min_k_scores(token_logprobs: Sequence[np.ndarray], k: float = 0.2) -> np.ndarray:
    """Min-K% score of each text: the mean of its ``k`` share of lowest token log-probabilities."""
    _check_k(k)
    return np.array([_lowest_mean(lp, k) for lp in token_logprobs], np.float64)


def min_k_plus_plus_scores(token_logprobs: Sequence[np.ndarray], mu: Sequence[np.ndarray],
                           sigma: Sequence[np.ndarray], k: float = 0.2) -> np.ndarray:
    """Min-K%++ score of each text: the mean of the ``k`` lowest standardized log-probabilities
    ``(log p(x_t) - mu_t) / sigma_t`` (``sigma_t`` floored at 1e-6: a one-hot distribution)."""
    _check_k(k)
    out = []
    for lp, m, s in zip(token_logprobs, mu, sigma):
        z = (np.asarray(lp, np.float64) - np.asarray(m, np.float64)) / np.maximum(np.asarray(s, np.float64), 1e-6)
        out.append(_lowest_mean(z, k))
    return np.array(out, np.float64)


def tpr_table(member_scores, nonmember_scores, fprs: Sequence[float] = LOW_FPRS) -> dict:
    """``{"auc", "n_members", "n_nonmembers", "tpr_at": {fpr: {"tpr", "reliable", "note"}}}``: a rate
    at ``fpr`` is reliable only with at least ``1 / fpr`` non-members (one allowed false positive)."""
    n_in, n_out = len(np.ravel(member_scores)), len(np.ravel(nonmember_scores))
    table = {"auc": roc_auc(member_scores, nonmember_scores), "n_members": n_in, "n_nonmembers": n_out, "tpr_at": {}}
    for fpr in fprs:
        needed = math.ceil(1.0 / fpr)
        reliable = n_out >= needed
        table["tpr_at"][str(fpr)] = {
            "tpr": tpr_at_fpr(member_scores, nonmember_scores, fpr), "reliable": reliable,
            "note": None if reliable else f"{n_out} non-members: a {fpr:g} FPR needs at least {needed}; the rate "
                                          "is that of zero false positives",
        }
    return table


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the threshold attack at every distinct score,
    from (0, 0) to (1, 1): what the report plots (log-scaled FPR shows the low-FPR regime)."""
    pos = np.asarray(member_scores, np.float64).ravel()
    neg = np.asarray(nonmember_scores, np.float64).ravel()
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = np.array([0.0] + [np.mean(pos >= t) for t in thresholds])
    fpr = np.array([0.0] + [np.mean(neg >= t) for t in thresholds])
    return fpr, tpr
