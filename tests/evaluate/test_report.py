"""The evaluation report renders: JSON round-trips, the Markdown table has a row per model, PNGs exist."""

import json
import math
import os

import pytest

from gf_jax.evaluate import metrics, report


def _result(rouges, memorized, mia=True, heldout=True):
    per_doc = [
        {"id": f"d{i}", "rougeL": r, "exact_match": r, "longest_run": int(50 * r), "memorized": m}
        for i, (r, m) in enumerate(zip(rouges, memorized))
    ]
    out = {"memorization": {"per_doc": per_doc, "aggregate": metrics.aggregate_memorization(per_doc, 1)}}
    if mia:
        out["mia"] = {"loss": {"auc": 0.61, "tpr_at_fpr": 0.02}, "zlib": {"auc": 0.58, "tpr_at_fpr": 0.0},
                      "fpr": 0.001, "n_members": 3, "n_nonmembers": 3}
    if heldout:
        out["heldout"] = {"loss": 3.25, "perplexity": math.exp(3.25), "n_tokens": 1000}
    return out


def test_report_renders(tmp_path):
    results = {
        "standard": _result([1.0, 1.0, 0.4], [True, True, False]),
        "4-GL": _result([0.3, 0.2, 0.25], [False, False, False], heldout=False),
        "control": {"heldout": {"loss": float("nan"), "perplexity": float("nan"), "n_tokens": 0}},
    }
    paths = report.write_report(results, str(tmp_path), title="demo")
    with open(paths["json"]) as f:
        loaded = json.load(f)  # strict JSON: NaN became null
    assert loaded["standard"]["memorization"]["aggregate"]["n_memorized"] == 2
    assert loaded["control"]["heldout"]["loss"] is None

    md = open(paths["markdown"]).read()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 3  # header, separator, one row per model
    standard = rows[2].split(" | ")
    assert standard[0] == "| standard" and standard[1] == "2/3 (1 skipped)"
    assert "0.800" in rows[2] and "0.610" in rows[2] and "3.2500" in rows[2]
    assert "0/3" in rows[3] and rows[3].rstrip().endswith("| - | - |")  # no held-out loss
    assert rows[4].split(" | ")[1] == "-"  # no memorization results

    assert sorted(os.path.basename(p) for p in paths["plots"]) == ["exact_match_hist.png", "rougeL_hist.png"]
    for p in paths["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"({os.path.basename(p)})" in md


def test_report_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="at least one model"):
        report.write_report({}, str(tmp_path))
