"""The evaluation report renders: JSON round-trips, the Markdown table has a row per model, PNGs exist."""

import json
import math
import os

import numpy as np
import pytest

from gf_jax.evaluate import attacks, extraction, metrics, report

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = ("gf_jax.evaluate.audit_report", "gf_jax.evaluate.report_format")


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


def test_the_audit_sections_and_plots_render(tmp_path):
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1, 1, 40), rng.normal(0, 1, 60)
    fpr, tpr = attacks.roc_curve(members, nonmembers)
    attack = {**metrics.mia_summary(members, nonmembers), **attacks.tpr_table(members, nonmembers),
              "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    result = _result([1.0, 0.5, 0.2], [True, False, False])
    result["memorization"]["aggregate"]["discoverable"] = extraction.discoverable_rates(np.log([0.9, 1e-2, 1e-6]))
    result["mia"].update(min_k=attack, min_k_pp=attack)
    result["offsets"] = {"prefix_len": 32, "suffix_len": 50, "offsets": {
        "0": {"n_documents": 3, "aggregate": result["memorization"]["aggregate"],
              "discoverable": result["memorization"]["aggregate"]["discoverable"]},
        "512": {"n_documents": 0}}}
    written = report.write_report({"standard": result}, str(tmp_path))
    md = open(written["markdown"]).read()
    assert "## Extraction under sampling" in md and "| standard | 0.333 | 0.333 | 0.667 | 0.667 |" in md
    assert "| standard | Min-K%++ |" in md
    assert "*" in md.split("## Membership inference")[1]  # 60 non-members: TPR at 0.1% FPR is flagged
    assert "| standard | 512 | 0 | - | - | - |" in md
    names = sorted(os.path.basename(p) for p in written["plots"])
    assert names == ["exact_match_hist.png", "extraction_vs_n.png", "roc.png", "rougeL_hist.png"]
