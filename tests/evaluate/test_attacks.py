"""Min-K%, Min-K%++, low-FPR reporting and the ROC curve against plain-numpy references."""

import numpy as np
import pytest

from gf_jax.evaluate import attacks


def _reference_min_k(logprobs, k):
    """Shi et al.: the mean log-prob of the ceil(k n) least likely tokens, by a full sort."""
    out = []
    for lp in logprobs:
        worst = sorted(lp)[: max(1, int(np.ceil(k * len(lp))))]
        out.append(sum(worst) / len(worst))
    return np.array(out)


@pytest.mark.parametrize("k", [0.1, 0.2, 1.0])
def test_min_k_matches_a_sort_and_min_k_plus_plus_standardizes_by_the_model(k):
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(n, 11)) * 2 for n in (5, 17, 40)]
    tokens = [rng.integers(0, 11, size=len(x)) for x in logits]
    logp = [x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in logits]
    target = [lp[np.arange(len(t)), t] for lp, t in zip(logp, tokens)]
    np.testing.assert_allclose(attacks.min_k_scores(target, k), _reference_min_k(target, k))
    # Min-K%++ by its definition, the vocabulary expectation written as a loop.
    mu = [np.array([sum(np.exp(v) * v for v in row) for row in lp]) for lp in logp]
    sigma = [np.sqrt(np.array([sum(np.exp(v) * v * v for v in row) for row in lp]) - m ** 2) for lp, m in zip(logp, mu)]
    z = [(t - m) / s for t, m, s in zip(target, mu, sigma)]
    np.testing.assert_allclose(attacks.min_k_plus_plus_scores(target, mu, sigma, k), _reference_min_k(z, k))


def test_low_fpr_rates_come_with_counts_and_say_when_they_mean_nothing():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 500)
    table = attacks.tpr_table(members, nonmembers)
    assert table["n_members"] == 300 and table["n_nonmembers"] == 500
    assert table["tpr_at"]["0.01"]["reliable"] and not table["tpr_at"]["0.001"]["reliable"]
    assert "500 non-members: a 0.001 FPR needs at least 1000" in table["tpr_at"]["0.001"]["note"]
    # TPR at 1% FPR: the share of members above the 6th highest non-member (5 false positives allowed).
    cutoff = np.sort(nonmembers)[::-1][5]
    assert table["tpr_at"]["0.01"]["tpr"] == pytest.approx(np.mean(members > cutoff))


def test_roc_curve_runs_from_0_to_1_and_its_area_is_the_auc():
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(0.5, 1.0, 80), rng.normal(0.0, 1.0, 120)
    fpr, tpr = attacks.roc_curve(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    brute = np.mean(members[:, None] > nonmembers[None, :]) + 0.5 * np.mean(members[:, None] == nonmembers[None, :])
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute)
