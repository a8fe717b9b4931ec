"""The audit part of an evaluation report: extraction under sampling, the newer membership
attacks at low false-positive rates, prefix offsets, downstream multiple-choice accuracy; tables
for report.md and two plots
(extraction rate against the number of samples n, and ROC curves on a log FPR axis).

Each function reads what ``gf_jax.evaluate.runs.evaluate_run`` (or an experiment) stored per model
and returns nothing for models without it, so older reports still render.
"""

from __future__ import annotations

from gf_jax.evaluate.extraction import NS
from gf_jax.evaluate.report_format import format_value, markdown_rows, pyplot, save_figure
from gf_jax.util import paths

ATTACKS = (("loss", "loss"), ("zlib", "zlib"), ("min_k", "Min-K%"), ("min_k_pp", "Min-K%++"))
P_SHOWN = "0.5"


def sampling_table(results_by_model: dict[str, dict]) -> str:
    """Share of documents (n, 0.5)-discoverable for each n, with the mean log p_z of the suffix."""
    rows = [["model", *(f"n={n}" for n in NS), "mean log p(suffix)"]]
    for name, result in results_by_model.items():
        disc = result.get("memorization", {}).get("aggregate", {}).get("discoverable")
        if disc:
            rows.append([name, *(format_value(disc["n"][str(n)][P_SHOWN], ".3f") for n in NS),
                         format_value(disc["mean_log_p"], ".2f")])
    return markdown_rows(rows) if len(rows) > 1 else ""


def attack_table(results_by_model: dict[str, dict]) -> str:
    """AUROC and TPR at 1% / 0.1% FPR of every attack; a rate marked * has too few non-members."""
    rows = [["model", "attack", "AUROC", "TPR@1%FPR", "TPR@0.1%FPR", "members / non-members"]]
    for name, result in results_by_model.items():
        mia = result.get("mia", {})
        for key, label in ATTACKS:
            attack = mia.get(key)
            if not attack or "tpr_at" not in attack:
                continue
            rates = [format_value(attack["tpr_at"][f]["tpr"], ".3f") + ("" if attack["tpr_at"][f]["reliable"] else "*")
                     for f in ("0.01", "0.001")]
            rows.append([name, label, format_value(attack["auc"], ".3f"), *rates,
                         f"{attack['n_members']} / {attack['n_nonmembers']}"])
    return markdown_rows(rows) if len(rows) > 1 else ""


def offsets_table(results_by_model: dict[str, dict]) -> str:
    """Greedy exact match and (1000, 0.5)-discoverable share per prefix offset."""
    rows = [["model", "offset", "documents", "memorized", "exact match", "(1000, 0.5)-discoverable"]]
    for name, result in results_by_model.items():
        for offset, entry in result.get("offsets", {}).get("offsets", {}).items():
            if not entry.get("n_documents"):
                rows.append([name, offset, "0", "-", "-", "-"])
                continue
            agg = entry["aggregate"]
            rows.append([name, offset, str(entry["n_documents"]), f"{agg['n_memorized']}/{agg['n_documents']}",
                         format_value(agg["exact_match_mean"], ".3f"),
                         format_value(entry["discoverable"]["n"]["1000"][P_SHOWN], ".3f")])
    return markdown_rows(rows) if len(rows) > 1 else ""


def downstream_table(results_by_model: dict[str, dict]) -> str:
    """acc and acc_norm of every multiple-choice task (``gf_jax.evaluate.choice``)."""
    rows = [["model", "task", "items", "acc", "acc_norm"]]
    for name, result in results_by_model.items():
        for task, scores in result.get("downstream", {}).items():
            rows.append([name, task, str(scores["n_items"]),
                         f"{scores['acc']:.3f} ± {scores['acc_stderr']:.3f}", format_value(scores["acc_norm"], ".3f")])
    return markdown_rows(rows) if len(rows) > 1 else ""


def plot_extraction_vs_n(results_by_model: dict[str, dict], path: str) -> bool:
    """Share of documents extracted by at least one of n samples, 1 <= n <= 1000 (p = 0.5), per model."""
    curves = {name: r["memorization"]["aggregate"]["discoverable"] for name, r in results_by_model.items()
              if r.get("memorization", {}).get("aggregate", {}).get("discoverable")}
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, disc in curves.items():
        ax.plot(NS, [disc["n"][str(n)][P_SHOWN] for n in NS], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("samples n")
    ax.set_ylabel("documents (n, 0.5)-discoverable")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_roc(results_by_model: dict[str, dict], path: str) -> bool:
    """ROC curves of every attack and model, log-scaled FPR (the low-FPR regime is what matters)."""
    curves = [(f"{name} {label}", r["mia"][key]["roc"]) for name, r in results_by_model.items()
              for key, label in ATTACKS if r.get("mia", {}).get(key, {}).get("roc")]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for label, roc in curves:
        ax.plot([max(f, 1e-4) for f in roc["fpr"]], roc["tpr"], label=label, linewidth=1.0)
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def audit_sections(results_by_model: dict[str, dict], out_dir: str) -> tuple[list[str], list[str]]:
    """(markdown sections, plot paths) of the audit, for ``write_report``."""
    sections = []
    for title, table, note in (
        ("Extraction under sampling", sampling_table(results_by_model),
         "share of documents whose exact suffix one of n samples reproduces with probability >= 0.5, "
         "1 - (1 - p_z)^n >= 0.5, p_z by teacher forcing (Hayes et al. 2024)."),
        ("Membership inference", attack_table(results_by_model),
         "* too few non-members for that rate (fewer than 1 / FPR): it is the rate of zero false positives."),
        ("Prefix offsets", offsets_table(results_by_model), "prompt starting at that token offset inside each "
                                                            "document; documents too short for it are left out."),
        ("Downstream utility", downstream_table(results_by_model),
         "multiple choice by log-likelihood, as lm-evaluation-harness: acc (± standard error) and acc_norm "
         "(per byte of the answer)."),
    ):
        if table:
            sections.append(f"\n## {title}\n\n{table}\n{note}\n")
    plots = []
    for name, plot in (("extraction_vs_n.png", plot_extraction_vs_n), ("roc.png", plot_roc)):
        path = paths.join(out_dir, name)
        if plot(results_by_model, path):
            plots.append(path)
    return sections, plots
