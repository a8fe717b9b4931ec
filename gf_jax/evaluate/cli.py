"""``python -m gf_jax.evaluate``: did goldfish loss work? Memorization, membership inference and
held-out loss of one or several models on the same documents.

    python -m gf_jax.evaluate --run runs/standard --run runs/goldfish4 \\
        --docs canaries --heldout canaries-heldout --out runs/eval

writes ``report.json``, ``report.md`` (one row per model) and RougeL / exact-match histograms
(``gf_jax.evaluate.report``). ``--run`` takes any model source: a run directory (local or
``gs://``), ``RUN@STEP``, or a Hugging Face directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

from gf_jax.evaluate.report import markdown_table, write_report
from gf_jax.evaluate.runs import DOC_SOURCES, EvalSettings, evaluate_run, resolve_documents, select_documents
from gf_jax.model.sharding import MeshConfig, make_mesh
from gf_jax.run.rundir import RunDir
from gf_jax.run.source import ModelSource, run_config
from gf_jax.util import paths
from gf_jax.util.commands import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gf_jax.evaluate",
        description="Memorization (suffix extraction), membership inference and held-out loss of trained runs.",
    )
    p.add_argument("--run", action="append", required=True,
                   help="run directory (RUN@STEP for a step) or Hugging Face model directory (repeat for several)")
    p.add_argument("--name", action="append", help="model name in the report, one per --run (default: dir name)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--docs", required=True,
                   help=f"documents to extract from / MIA members: {' | '.join(DOC_SOURCES)} | a .txt/.jsonl path "
                        "(named sources are resolved with the first run's data config)")
    p.add_argument("--heldout", default=None,
                   help="held-out documents (MIA non-members and held-out loss), same choices as --docs")
    p.add_argument("--split-rule", default="blank_line", help="how a .txt source is split into documents")
    p.add_argument("--doc-ids", default=None, help="file with one document id per line: evaluate only these")
    p.add_argument("--max-docs", type=int, default=None, help="at most this many documents per source")
    p.add_argument("--suffix-len", type=int, default=50)
    p.add_argument("--prefix-len", type=int, default=None, help="prompt tokens (default: all, capped by context)")
    p.add_argument("--beam-width", type=int, default=1, help="1 = greedy; > 1 = beam search (adaptive attack)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fpr", type=float, default=0.001, help="false-positive rate of the reported MIA TPR")
    p.add_argument("--offsets", type=int, nargs="*", default=[],
                   help="also extract with the prompt at these token offsets inside each document (e.g. 0 32 "
                        "128 512): --offset-prefix-len prompt tokens, then --suffix-len tokens")
    p.add_argument("--offset-prefix-len", type=int, default=32, help="prompt tokens of the offset extraction")
    p.add_argument("--choices", action="append", default=[],
                   help="a multiple-choice task (JSONL of context / choices / gold) scored for downstream "
                        "utility: acc and acc_norm, as lm-evaluation-harness; repeatable")
    p.add_argument("--mesh", default=None, help="e.g. 'data=1,fsdp=-1,tensor=1' (default: one device)")
    p.add_argument("--out", default=None, help="report directory (default: RUN/eval for one run, else eval_report)")
    return p


def settings_of(args) -> EvalSettings:
    return EvalSettings(step=args.step, suffix_len=args.suffix_len, prefix_len=args.prefix_len,
                        beam_width=args.beam_width, batch_size=args.batch_size, fpr=args.fpr,
                        offsets=tuple(args.offsets), offset_prefix_len=args.offset_prefix_len,
                        choices=tuple(args.choices))


def parse_mesh(spec: str | None):
    """The mesh of ``--mesh data=1,fsdp=-1,tensor=1`` (None: one device)."""
    if not spec:
        return None
    try:
        sizes = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
        return make_mesh(MeshConfig(**sizes))
    except (ValueError, TypeError) as e:
        raise ValueError(f"--mesh {spec!r} is not like 'data=1,fsdp=-1,tensor=1' ({e}).") from None


def model_names(runs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """The report's name of each ``--run``: its ``--name``, else its folder's name (a longer path
    when two folders share one)."""
    if names:
        if len(names) != len(runs):
            raise ValueError(f"got {len(names)} --name for {len(runs)} --run; give one name per run or none.")
        return list(names)
    base = [os.path.basename(os.path.normpath(str(r))) or str(r) for r in runs]
    return [b if base.count(b) == 1 else os.path.normpath(str(r)) for b, r in zip(base, runs)]


def _check_writable_dir(path: str) -> None:
    """Fails now, not after the evaluation, when the report cannot be written to ``path`` (a test
    file is created in it, or in its nearest existing parent when it does not exist yet)."""
    if paths.is_url(path):
        return  # a bucket: written through paths, refused by the store itself if it must be
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--out {path} cannot be a report directory: {probe} is a file; pass a directory.")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ValueError(
            f"--out {path} cannot be written ({probe}: {e.strerror or e}); pass a writable directory."
        ) from None


def check_args(args) -> None:
    """Argument checks that argparse cannot make, before any model is loaded."""
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max-docs must be >= 1 (omit it to use every document), got {args.max_docs}.")
    if args.suffix_len < 1:
        raise ValueError(f"--suffix-len must be >= 1, got {args.suffix_len}.")
    _check_writable_dir(out_dir_of(args))


def out_dir_of(args) -> str:
    if args.out:
        return args.out
    return RunDir(ModelSource.parse(args.run[0]).path).eval if len(args.run) == 1 else "eval_report"


def main(argv: Sequence[str] | None = None) -> dict:
    """The command: a user error ends it with one sentence and exit status 2."""
    return run_command(lambda: run(argv))


def run(argv: Sequence[str] | None = None) -> dict:
    """The whole command (checks, documents, one evaluation per ``--run``, the report) as a
    function: a user error raises; returns the results by model name."""
    args = build_parser().parse_args(argv)
    check_args(args)
    sources = [ModelSource.parse(run) for run in args.run]
    configs = [run_config(source) for source in sources]  # every run's config.yaml is there, before any loads
    names = model_names(args.run, args.name)
    data_config = configs[0].data
    docs = select_documents(resolve_documents(args.docs, data_config, split_rule=args.split_rule),
                            args.doc_ids, args.max_docs)
    heldout = None
    if args.heldout:
        heldout = select_documents(resolve_documents(args.heldout, data_config, split_rule=args.split_rule),
                                   None, args.max_docs)
    mesh, settings = parse_mesh(args.mesh), settings_of(args)
    results = {name: evaluate_run(source, docs, heldout, settings, mesh, name=name)
               for name, source in zip(names, sources)}
    written = write_report(results, out_dir_of(args), title=f"Evaluation on {args.docs}"
                           + (f" (held out: {args.heldout})" if args.heldout else ""))
    print(markdown_table(results))
    print(f"report: {written['markdown']} (+ report.json, {len(written['plots'])} plots)")
    return results
