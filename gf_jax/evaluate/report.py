"""Evaluation report: ``report.json``, a Markdown table (one row per model) and PNG histograms.

Input is ``results_by_model``: ``{model_name: result}`` where each result may hold any of

* ``"memorization"``: ``{"per_doc": [dict, ...], "aggregate": dict}`` (see ``gf_jax.evaluate``),
* ``"mia"``: ``{"loss": {"auc", "tpr_at_fpr"}, "zlib": {...}, "n_members", "n_nonmembers", "fpr"}``,
* ``"heldout"``: ``{"loss", "perplexity", "n_documents"}`` (mean token NLL in nats, its exp, documents),
* anything else (``run_dir``, ``step``, ...), kept in the JSON.

Missing parts show as "-" in the table; histograms are drawn only for models with memorization.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from gf_jax.evaluate.audit_report import audit_sections
from gf_jax.evaluate.report_format import format_value, markdown_rows, pyplot, save_figure
from gf_jax.util import paths

HIST_BINS = 20


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: NaN/inf become null, numpy scalars and arrays plain Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def markdown_table(results_by_model: dict[str, dict]) -> str:
    """One row per model: memorized x/N, RougeL, exact match, MIA AUC / TPR, held-out loss."""
    fpr = next((r["mia"].get("fpr", 0.001) for r in results_by_model.values() if "mia" in r), 0.001)
    tpr_name = f"TPR@{fpr * 100:g}%FPR"
    header = [
        "model", "memorized", "RougeL mean", "RougeL median", "exact match", "longest run",
        "loss AUC", f"loss {tpr_name}", "zlib AUC", f"zlib {tpr_name}", "held-out loss", "held-out ppl",
    ]
    rows = [header]
    for name, result in results_by_model.items():
        agg = result.get("memorization", {}).get("aggregate", {})
        mia = result.get("mia", {})
        held = result.get("heldout", {})
        if agg:
            memorized = f"{agg['n_memorized']}/{agg['n_documents']}"
            if agg.get("n_skipped"):
                memorized += f" ({agg['n_skipped']} skipped)"
        else:
            memorized = "-"
        rows.append([
            name.replace("|", "\\|"),
            memorized,
            format_value(agg.get("rougeL_mean"), ".3f"),
            format_value(agg.get("rougeL_median"), ".3f"),
            format_value(agg.get("exact_match_mean"), ".3f"),
            format_value(agg.get("longest_run_mean"), ".1f"),
            format_value(mia.get("loss", {}).get("auc"), ".3f"),
            format_value(mia.get("loss", {}).get("tpr_at_fpr"), ".3f"),
            format_value(mia.get("zlib", {}).get("auc"), ".3f"),
            format_value(mia.get("zlib", {}).get("tpr_at_fpr"), ".3f"),
            format_value(held.get("loss"), ".4f"),
            format_value(held.get("perplexity"), ".2f"),
        ])
    return markdown_rows(rows)


def plot_histograms(results_by_model: dict[str, dict], key: str, path: str, xlabel: str) -> bool:
    """Overlaid per-model histograms of ``per_doc[key]`` on [0, 1] (the paper's Figure 2 style).

    Returns False (and writes nothing) when no model has per-document memorization results.
    """
    series = {
        name: [d[key] for d in r["memorization"]["per_doc"]]
        for name, r in results_by_model.items()
        if r.get("memorization", {}).get("per_doc")
    }
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    bins = [i / HIST_BINS for i in range(HIST_BINS + 1)]
    for i, (name, values) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.3, color=color, label=name)
        ax.hist(values, bins=bins, histtype="step", linewidth=1.2, color=color)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_histogram_panels(series: dict[str, list[float]], path: str, *, title: str, xlabel: str = "RougeL") -> str:
    """One histogram panel per series on a shared [0, 1] axis (the paper's Figure 2 layout)."""
    plt = pyplot()
    n = len(series)
    cols = n if n <= 5 else -(-n // 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows + 0.5), dpi=100,
                             sharex=True, sharey=True, squeeze=False)
    bins = [i / HIST_BINS for i in range(HIST_BINS + 1)]
    for i, (name, values) in enumerate(series.items()):
        ax = axes[i // cols][i % cols]
        ax.hist(values, bins=bins, color=f"C{i % 10}", alpha=0.8)
        mean = sum(values) / len(values) if values else float("nan")
        ax.set_title(f"{name}\nmean {mean:.2f}", fontsize=9)
        ax.set_xlim(0, 1)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    for i in range(n):  # every panel labels its own x axis: a short last row would leave gaps
        ax = axes[i // cols][i % cols]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel(xlabel, fontsize=8)
    for row in axes:
        row[0].set_ylabel("documents", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def write_report(results_by_model: dict[str, dict], out_dir: str, *, title: str = "Evaluation") -> dict:
    """Writes report.json, report.md, rougeL_hist.png and exact_match_hist.png into ``out_dir``.

    Returns ``{"json": path, "markdown": path, "plots": [paths]}``.
    """
    if not results_by_model:
        raise ValueError("results_by_model is empty; evaluate at least one model before reporting.")
    paths.makedirs(out_dir)
    json_path = paths.join(out_dir, "report.json")
    paths.write_text(json_path, json.dumps(jsonable(results_by_model), indent=1))

    plots = []
    for key, xlabel, name in (
        ("rougeL", "RougeL of generated vs true suffix", "rougeL_hist.png"),
        ("exact_match", "share of suffix tokens reproduced (exact match)", "exact_match_hist.png"),
    ):
        path = paths.join(out_dir, name)
        if plot_histograms(results_by_model, key, path, xlabel):
            plots.append(path)

    md_path = paths.join(out_dir, "report.md")
    lines = [f"# {title}\n\n", markdown_table(results_by_model),
             "\nmemorized = documents whose whole suffix is reproduced by greedy decoding; exact match "
             "= mean share of suffix tokens reproduced at the same position; MIA scores: higher = "
             "attack flags the document as trained on (AUC 0.5 = chance).\n"]
    sections, audit_plots = audit_sections(results_by_model, out_dir)
    lines += sections
    plots += audit_plots
    lines += [f"\n![{os.path.basename(path)}]({os.path.basename(path)})\n" for path in plots]
    paths.write_text(md_path, "".join(lines))
    return {"json": json_path, "markdown": md_path, "plots": plots}
