"""Canary experiment settings: arm names, including the near-duplicate defence's."""

import pytest

from gf_jax.config import RunConfig
from gf_jax.experiments import canary
from gf_jax.experiments.arms import arm_config


def test_an_arm_name_sets_k_h_and_the_passage_key():
    exp = canary.CanaryExperiment(arms=("standard", "k4", "k4-h2", "k8-h3-w64", "k4-w32", "control"))
    arms = canary.make_arms(exp, never_drop_ids=(2,))
    got = {name: (a.goldfish.strategy, a.goldfish.k, a.goldfish.h, a.goldfish.key_window) for name, a in arms.items()}
    assert got == {"standard": ("none", 4, 13, 0), "k4": ("hash", 4, 13, 0), "k4-h2": ("hash", 4, 2, 0),
                   "k8-h3-w64": ("hash", 8, 3, 64), "k4-w32": ("hash", 4, 13, 32), "control": ("none", 4, 13, 0)}
    assert arms["k8-h3-w64"].goldfish.never_drop_ids == (2,)
    labels = {name: canary.arm_label(a) for name, a in arms.items()}
    assert labels["k4"] == "4-GL (hash)" and labels["k8-h3-w64"] == "8-GL (hash, h=3, key 64)"
    assert labels["k4-h2"] == "4-GL (hash, h=2)"


@pytest.mark.parametrize("bad", ["k1", "k4-w", "k4-h0", "k4-w64-h2", "kfour"])
def test_a_bad_arm_name_names_the_accepted_forms(bad):
    with pytest.raises(ValueError, match=r"k<N> with N >= 2 \(e\.g\. k4\), optionally -h<H> and -w<W>"):
        canary.CanaryExperiment(arms=("standard", bad))


def test_an_arm_with_a_long_passage_key_gets_the_row_context_it_needs():
    base = RunConfig()
    arms = canary.make_arms(canary.CanaryExperiment(arms=("k4", "k4-h2-w64")), ())
    configs = {name: arm_config(base, arm, data=base.data, steps=10, run_dir=f"/tmp/{name}", init_from=None)
               for name, arm in arms.items()}
    assert base.data.row_context == 32
    assert configs["k4"].data.row_context == 32 and configs["k4-h2-w64"].data.row_context == 64
