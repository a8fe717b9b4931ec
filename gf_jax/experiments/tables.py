"""Result files of an experiment: a table with one row per arm (columns chosen by the protocol),
``results.json``, ``results.md``, ``rougeL_hist.png`` and ``report/`` (``gf_jax.evaluate.report``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from gf_jax.evaluate import report
from gf_jax.experiments.io import write_json
from gf_jax.util import paths

# A column: its header and how to write one arm's result (``runner.record_arm``'s dict) in it.
Column = tuple[str, Callable[[dict], str]]


def _aggregate(r: dict) -> dict:
    return r["memorization"]["aggregate"]


ARM = ("arm", lambda r: r["label"])
TRAINS_ON = ("trains on", lambda r: r["trains_on"])
MEMORIZED = ("memorized", lambda r: f"{_aggregate(r)['n_memorized']}/{_aggregate(r)['n_documents']}")
ROUGE_MEAN = ("RougeL mean", lambda r: report.format_value(_aggregate(r)["rougeL_mean"], ".3f"))
ROUGE_MEDIAN = ("RougeL median", lambda r: report.format_value(_aggregate(r)["rougeL_median"], ".3f"))
EXACT_MATCH = ("exact match", lambda r: report.format_value(_aggregate(r)["exact_match_mean"], ".3f"))
LONGEST_RUN = ("longest run", lambda r: report.format_value(_aggregate(r)["longest_run_mean"], ".1f"))
HELDOUT_LOSS = ("held-out loss", lambda r: report.format_value(r.get("heldout", {}).get("loss"), ".3f"))
MIA_LOSS_AUC = ("MIA loss AUC", lambda r: report.format_value(r.get("mia", {}).get("loss", {}).get("auc"), ".2f"))
MIA_ZLIB_AUC = ("MIA zlib AUC", lambda r: report.format_value(r.get("mia", {}).get("zlib", {}).get("auc"), ".2f"))
FINAL_TRAIN_LOSS = ("final train loss (all tokens)",
                    lambda r: report.format_value(r["train"].get("final_loss_all"), ".3f"))
TRAIN_TIME = ("train time", lambda r: f"{r['train']['seconds']:.0f} s")


def results_table(results: dict[str, dict], columns: list[Column]) -> str:
    """A Markdown table with one row per arm."""
    rows = [[header for header, _ in columns]]
    rows += [[cell(r) for _, cell in columns] for r in results.values()]
    return report.markdown_rows(rows)


def write_results(out: str, results: dict[str, dict], table: str, *, record: dict, heading: str,
                  description: str, paper_note: str, plot_title: str) -> None:
    """Writes results.json (``record`` + the arms), results.md, rougeL_hist.png and report/.

    ``record`` holds the provenance (``date``, ``machine``, ``command``) and whatever else the
    protocol saves; ``description`` and ``paper_note`` are the paragraphs around the table.
    """
    write_json({**record, "arms": results}, os.path.join(out, "results.json"))
    by_label = {r["label"]: r for r in results.values()}
    report.plot_histogram_panels(
        {label: [d["rougeL"] for d in r["memorization"]["per_doc"]] for label, r in by_label.items()},
        os.path.join(out, "rougeL_hist.png"), title=plot_title)
    report.write_report(by_label, os.path.join(out, "report"), title=f"{heading} ({record.get('preset')})")
    markdown = (f"# {heading}: {record.get('preset')}\n\n{record['date']}, {record['machine']}\n\n"
                f"`{record['command']}`\n\n{description}\n\n{table}\n{paper_note}\n\n"
                "![RougeL per arm](rougeL_hist.png)\n")
    paths.write_text(os.path.join(out, "results.md"), markdown)


def print_summary(table: str, out: str) -> None:
    """The last thing an experiment prints: its table and where the outputs went."""
    print()
    print(table)
    print(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')}, "
          f"{os.path.join(out, 'rougeL_hist.png')}, report/")
