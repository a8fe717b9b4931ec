"""Memorization and membership-inference metrics against brute-force / closed-form references."""

import itertools
import zlib

import numpy as np
import pytest

from gf_jax.evaluate import metrics


def _brute_auc(pos, neg):
    # The definition: over all (member, non-member) pairs, 1 if the member scores higher, 1/2 if tied.
    total = 0.0
    for p, n in itertools.product(pos, neg):
        total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def _brute_tpr_at_fpr(pos, neg, fpr):
    # Every threshold that changes a decision (each score, and +inf), attack: member iff score >= t.
    best = 0.0
    for t in list(pos) + list(neg) + [np.inf]:
        if np.mean(np.asarray(neg) >= t) <= fpr + 1e-12:
            best = max(best, float(np.mean(np.asarray(pos) >= t)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_tpr_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 40, size=2)
    # Rounded scores so that ties (within and across groups) actually happen.
    pos = np.round(rng.normal(0.5 * seed, 1.0, n_pos), 1)
    neg = np.round(rng.normal(0.0, 1.0, n_neg), 1)
    assert metrics.roc_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
    for fpr in (0.0, 0.001, 0.05, 0.1, 0.5, 1.0):
        assert metrics.tpr_at_fpr(pos, neg, fpr) == pytest.approx(_brute_tpr_at_fpr(pos, neg, fpr))


def test_auc_extremes_and_tpr_with_many_nonmembers():
    assert metrics.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert metrics.roc_auc([1.0, 1.0], [1.0]) == 0.5
    # 2000 non-members at 0.1% FPR allow exactly 2 false positives.
    neg = np.arange(2000, dtype=float)
    pos = np.array([1996.5, 1998.5, 1999.5, 5000.0])
    assert metrics.tpr_at_fpr(pos, neg, 0.001) == 0.75  # t = 1997.5 flags non-members 1998, 1999
    assert metrics.tpr_at_fpr(pos, neg, 0.001) == _brute_tpr_at_fpr(pos, neg, 0.001)


def test_mia_rejects_empty_or_nan():
    with pytest.raises(ValueError, match="members and non-members"):
        metrics.roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        metrics.tpr_at_fpr([np.nan], [1.0])


def test_attack_scores():
    nll = np.array([1.0, 2.0])
    np.testing.assert_allclose(metrics.loss_scores(nll), [-1.0, -2.0])
    text = "to be or not to be " * 10
    assert metrics.zlib_length(text) == len(zlib.compress(text.encode()))
    np.testing.assert_allclose(metrics.zlib_scores(nll, [10, 40]), [-0.1, -0.05])


def test_suffix_match():
    ref = [5, 6, 7, 8, 9, 10]
    assert metrics.suffix_match(ref, ref) == {"exact_match": 1.0, "longest_run": 6, "memorized": True}
    out = metrics.suffix_match([5, 6, 0, 8, 9, 10], ref)
    assert out == {"exact_match": 5 / 6, "longest_run": 3, "memorized": False}
    # A shifted copy reproduces nothing "at the same position".
    assert metrics.suffix_match([0] + ref[:-1], ref)["exact_match"] == 0.0
    # A short generation counts the missing tail as wrong.
    assert metrics.suffix_match([5, 6], ref) == {"exact_match": 2 / 6, "longest_run": 2, "memorized": False}
    assert metrics.longest_true_run([]) == 0
    assert metrics.longest_true_run([1, 1, 0, 1, 1, 1, 0]) == 3


def _lcs(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
    return table[-1, -1]


def test_rouge_l_is_lcs_f_measure():
    # Independent reference: F1 of the longest common subsequence of the word sequences.
    rng = np.random.default_rng(0)
    gens, refs, expected = [], [], []
    for _ in range(20):
        ref = rng.integers(0, 6, rng.integers(1, 12)).tolist()
        gen = rng.integers(0, 6, rng.integers(1, 12)).tolist()
        lcs = _lcs(gen, ref)
        p, r = lcs / len(gen), lcs / len(ref)
        expected.append(0.0 if lcs == 0 else 2 * p * r / (p + r))
        gens.append(" ".join(f"w{t}" for t in gen))
        refs.append(" ".join(f"w{t}" for t in ref))
    np.testing.assert_allclose(metrics.rouge_l(gens, refs), expected, atol=1e-12)
    assert metrics.rouge_l(["The cat sat."], ["the cat sat"]) == [1.0]


def test_aggregate_memorization():
    per_doc = [
        {"rougeL": 1.0, "exact_match": 1.0, "longest_run": 50, "memorized": True},
        {"rougeL": 0.5, "exact_match": 0.2, "longest_run": 4, "memorized": False},
        {"rougeL": 0.0, "exact_match": 0.0, "longest_run": 0, "memorized": False},
    ]
    agg = metrics.aggregate_memorization(per_doc, n_skipped=2)
    assert agg["n_documents"] == 3 and agg["n_skipped"] == 2 and agg["n_memorized"] == 1
    assert agg["memorized_fraction"] == pytest.approx(1 / 3)
    assert agg["rougeL_mean"] == pytest.approx(0.5) and agg["rougeL_median"] == 0.5
    assert agg["exact_match_mean"] == pytest.approx(0.4)
    assert np.isnan(metrics.aggregate_memorization([])["rougeL_mean"])
