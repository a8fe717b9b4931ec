"""Did goldfish loss work? Memorization (extraction), membership inference and held-out loss.

Command line (one or several trained runs, the same documents for all)::

    python -m gf_jax.evaluate --run runs/standard --run runs/goldfish4 \\
        --docs canaries --heldout canaries-heldout --out runs/eval

writes ``report.json``, ``report.md`` (one row per model) and RougeL / exact-match histograms
(``gf_jax.report``). Python API, for models already in memory (the experiment scripts)::

    per_doc, aggregate = evaluate_memorization(model, tokenizer, docs_tokens, suffix_len=50)
    mia = membership_inference(model, tokenizer, member_tokens, nonmember_tokens)
    loss, ppl = heldout_loss(model, batches)
    write_report({"4-GL": {"memorization": {...}, "mia": mia, ...}}, out_dir)

Extraction protocol (the paper's): a document's token list is taken as trained (BOS/EOS
included). A trailing EOS is dropped first: it carries no text, and "the suffix" means the last
``suffix_len`` tokens of the document's text. The prompt is everything before the suffix, at most
``prefix_len`` tokens (default: all) and at most ``max_seq_len - suffix_len`` (the model's
context): when it is cut, the tokens right before the suffix are kept with their true positions,
as training saw them. ``suffix_len`` tokens are decoded greedily (or by beam search, the paper's
adaptive attack) and compared with the true suffix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gf_jax import metrics
from gf_jax.generate import data_parallel_size, generate
from gf_jax.report import markdown_table, write_report
from gf_jax.scoring import decoded_texts, document_nll, heldout_loss, membership_inference, round_up

__all__ = [
    "extraction_split",
    "evaluate_memorization",
    "document_nll",
    "membership_inference",
    "heldout_loss",
    "write_report",
    "main",
]

DOC_SOURCES = ("train", "validation", "canaries", "canaries-heldout")


# ---------------------------------------------------------------------------------------------
# Memorization.


def extraction_split(tokens: Sequence[int], *, suffix_len: int, max_prompt_len: int,
                     prefix_len: int | None = None, eos_id: int | None = None):
    """(prompt, suffix, start position of the prompt) of one document, or None if it is too short.

    The trailing ``eos_id`` (if any) is dropped; the suffix is the last ``suffix_len`` tokens; the
    prompt the (at most ``min(prefix_len, max_prompt_len)``) tokens right before it. A document
    needs ``suffix_len + 1`` tokens besides its trailing EOS (one prompt token at least).
    """
    tokens = [int(t) for t in tokens]
    if eos_id is not None and tokens and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    if len(tokens) < suffix_len + 1:
        return None
    cut = len(tokens) - suffix_len
    keep = max_prompt_len if prefix_len is None else min(prefix_len, max_prompt_len)
    start = max(0, cut - keep)
    return tokens[start:cut], tokens[cut:], start


def _check_lengths(suffix_len, prefix_len, max_seq_len):
    if isinstance(suffix_len, bool) or not isinstance(suffix_len, int) or suffix_len < 1:
        raise ValueError(f"suffix_len must be a positive integer, got {suffix_len!r}.")
    if prefix_len is not None and prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1 or None (all), got {prefix_len!r}.")
    if suffix_len >= max_seq_len:
        raise ValueError(
            f"suffix_len={suffix_len} leaves no room for a prompt in the model's context of "
            f"{max_seq_len} tokens; use a suffix shorter than model.max_seq_len."
        )


def evaluate_memorization(
    model,
    tokenizer,
    docs_tokens: Sequence[Sequence[int]],
    *,
    doc_ids: Sequence[str] | None = None,
    suffix_len: int = 50,
    prefix_len: int | None = None,
    batch_size: int = 16,
    beam_width: int = 1,
    eos_id: int | None = None,
    mesh=None,
    progress: bool | str = False,
) -> tuple[list[dict], dict]:
    """Suffix extraction on each document: does the model recite the end of it from the rest?

    Args:
      model: a ``gf_jax.model.Transformer``.
      tokenizer: a ``gf_jax.tokenizer.Tokenizer`` (decodes texts for RougeL), or None: RougeL
        is then computed on the ids written as words.
      docs_tokens: token ids of each document as trained (BOS/EOS included if training used them).
      doc_ids: names for the per-document results (default "0", "1", ...).
      suffix_len, prefix_len: see the module docstring.
      beam_width: 1 = greedy (the paper's metric); > 1 = beam search (adaptive attack).
      eos_id: trailing id to drop (default: the tokenizer's EOS).
      mesh: decode sharded over this mesh (batch over data/fsdp).

    Returns:
      (per_doc, aggregate). ``per_doc``: one dict per evaluated document with ``id``,
      ``prompt_len``, ``rougeL``, ``exact_match``, ``longest_run``, ``memorized``, ``generated``
      and ``reference`` (decoded texts of the generated and true suffix). ``aggregate``: see
      ``gf_jax.metrics.aggregate_memorization``, plus ``skipped_ids`` (documents shorter than
      ``suffix_len + 1`` tokens, counted in ``n_skipped`` rather than silently dropped).
    """
    _check_lengths(suffix_len, prefix_len, model.config.max_seq_len)
    if doc_ids is None:
        doc_ids = [str(i) for i in range(len(docs_tokens))]
    if len(doc_ids) != len(docs_tokens):
        raise ValueError(f"got {len(doc_ids)} doc_ids for {len(docs_tokens)} documents; pass one id per document.")
    if eos_id is None and tokenizer is not None and tokenizer.eos_id >= 0:
        eos_id = tokenizer.eos_id
    pad_id = tokenizer.pad_id if tokenizer is not None else 0

    kept, skipped = _extraction_splits(docs_tokens, doc_ids, suffix_len, prefix_len,
                                       model.config.max_seq_len - suffix_len, eos_id)
    out = generate(
        model, [k[1] for k in kept], suffix_len, start_positions=[k[3] for k in kept],
        beam_width=beam_width, batch_size=batch_size, mesh=mesh, pad_id=pad_id, progress=progress,
    )
    per_doc = _scored(kept, out.tokens, tokenizer)
    aggregate = metrics.aggregate_memorization(per_doc, n_skipped=len(skipped))
    aggregate.update(suffix_len=suffix_len, prefix_len=prefix_len, beam_width=beam_width, skipped_ids=skipped)
    return per_doc, aggregate


def _extraction_splits(docs_tokens, doc_ids, suffix_len: int, prefix_len: int | None, max_prompt_len: int,
                       eos_id: int | None) -> tuple[list[tuple], list[str]]:
    """([(id, prompt, suffix, prompt's start position)] of the documents long enough, skipped ids);
    the skipped ones are counted on stderr, not dropped silently."""
    kept, skipped = [], []
    for doc_id, tokens in zip(doc_ids, docs_tokens):
        split = extraction_split(tokens, suffix_len=suffix_len, prefix_len=prefix_len,
                                 max_prompt_len=max_prompt_len, eos_id=eos_id)
        (kept.append((doc_id, *split)) if split is not None else skipped.append(doc_id))
    if skipped:
        print(f"[gf_jax.evaluate] skipped {len(skipped)} of {len(docs_tokens)} documents shorter than "
              f"suffix_len + 1 = {suffix_len + 1} tokens (first: {skipped[0]!r}).", file=sys.stderr)
    return kept, skipped


def _scored(kept: list[tuple], generated_NxA: np.ndarray, tokenizer) -> list[dict]:
    """One result dict per kept document: RougeL and exact matches of its generated suffix."""
    generated_texts = decoded_texts(tokenizer, generated_NxA.tolist())
    reference_texts = decoded_texts(tokenizer, [k[2] for k in kept])
    rouges = metrics.rouge_l(generated_texts, reference_texts)
    per_doc = []
    for (doc_id, prompt, suffix, _), gen_ids, gen_text, ref_text, rouge in zip(
        kept, generated_NxA, generated_texts, reference_texts, rouges
    ):
        per_doc.append({
            "id": doc_id,
            "prompt_len": len(prompt),
            "rougeL": rouge,
            **metrics.suffix_match(gen_ids, suffix),
            "generated": gen_text,
            "reference": ref_text,
        })
    return per_doc


# ---------------------------------------------------------------------------------------------
# Command line.


def resolve_documents(source: str, data_config, *, split_rule: str = "blank_line") -> list:
    """The ``gf_jax.data.Document`` list a ``--docs`` / ``--heldout`` source names.

    ``train``: exactly the documents the run trained on (its split by id, injected canaries
    included); ``validation``: its held-out split; ``canaries`` / ``canaries-heldout``: the
    injected / held-out canaries; anything else: a ``.txt`` (split by ``split_rule``) or
    ``.jsonl`` file or folder.
    """
    from gf_jax import data

    if source in ("train", "validation"):
        if source == "validation" and data_config.validation_fraction <= 0:
            raise ValueError("--heldout/--docs validation needs a run trained with data.validation_fraction > 0; "
                             "pass a file of held-out documents instead.")
        docs = data.load_documents(data_config, source)
    elif source in ("canaries", "canaries-heldout"):
        if not data_config.canary_path:
            raise ValueError(f"--docs/--heldout {source} needs a run trained with data.canary_path set; "
                             "pass a file of documents instead.")
        injected, held_out = data.load_canaries(data_config)
        docs = injected if source == "canaries" else held_out
    elif os.path.exists(source) and data_config.format != "text":  # examples, read with the run's settings
        docs = data.load_documents(dataclasses.replace(data_config, path=source, validation_fraction=0.0), "all")
    elif os.path.exists(source):
        kind = "jsonl" if source.endswith(".jsonl") else "text"
        docs = data.load_documents(data.DataConfig(source=kind, path=source, split_rule=split_rule), "all")
    else:
        raise FileNotFoundError(f"document source {source!r} is neither one of {', '.join(DOC_SOURCES)} "
                                "nor an existing file or folder; fix --docs/--heldout.")
    if not docs:
        raise ValueError(f"document source {source!r} holds no documents; choose another --docs/--heldout.")
    return docs


def _select(docs: list, ids_file: str | None, max_docs: int | None) -> list:
    if ids_file:
        with open(ids_file) as f:
            wanted = [line.strip() for line in f if line.strip()]
        by_id = {d.id: d for d in docs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} ids of {ids_file} are not among the documents (first: "
                             f"{missing[0]!r}); check --doc-ids against --docs.")
        docs = [by_id[i] for i in wanted]
    return docs[:max_docs] if max_docs else docs


def _parse_mesh(spec: str | None):
    if not spec:
        return None
    from gf_jax.sharding import MeshConfig, make_mesh

    try:
        sizes = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
        return make_mesh(MeshConfig(**sizes))
    except (ValueError, TypeError) as e:
        raise ValueError(f"--mesh {spec!r} is not like 'data=1,fsdp=-1,tensor=1' ({e}).") from None


def _model_names(runs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(runs):
            raise ValueError(f"got {len(names)} --name for {len(runs)} --run; give one name per run or none.")
        return list(names)
    base = [os.path.basename(os.path.normpath(r)) or r for r in runs]
    return [b if base.count(b) == 1 else os.path.normpath(r) for b, r in zip(base, runs)]


def evaluate_run(run_dir: str, docs: list, heldout: list | None, args, mesh=None) -> dict:
    """Loads one run and evaluates it on ``docs`` (memorization, members) and ``heldout``."""
    from gf_jax import data
    from gf_jax.checkpoint import load_model

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist; pass a directory written by gf_jax.train.")
    model, config, tokenizer = load_model(run_dir, args.step, mesh=mesh)
    data.check_vocab_fits(tokenizer, model.config.vocab_size)
    name = os.path.basename(os.path.normpath(run_dir))
    if config.data.format != "text":  # instruction/chat examples: judged on their answers
        from gf_jax.example_eval import evaluate_examples

        return {"run_dir": os.path.abspath(run_dir),
                **evaluate_examples(model, config, tokenizer, docs, heldout, args, mesh, name)}

    def tokens_of(documents):
        return [t.tolist() for t in data.tokenize_documents(documents, tokenizer, config.data.add_bos,
                                                            config.data.add_eos)]

    doc_tokens = tokens_of(docs)
    per_doc, aggregate = evaluate_memorization(
        model, tokenizer, doc_tokens, doc_ids=[d.id for d in docs], suffix_len=args.suffix_len,
        prefix_len=args.prefix_len, batch_size=args.batch_size, beam_width=args.beam_width, mesh=mesh,
        progress=f"{name}: memorization",
    )
    result: dict[str, Any] = {
        "run_dir": os.path.abspath(run_dir),
        "goldfish": dataclasses.asdict(config.goldfish),
        "memorization": {"per_doc": per_doc, "aggregate": aggregate},
    }
    if heldout:
        held_tokens = tokens_of(heldout)
        result["mia"] = membership_inference(
            model, tokenizer, doc_tokens, held_tokens, fpr=args.fpr, batch_size=args.batch_size, mesh=mesh,
            progress=f"{name}: MIA",
        )
        seq_len = min(config.train.seq_len, model.config.max_seq_len)
        global_batch = args.batch_size if mesh is None else round_up(args.batch_size, data_parallel_size(mesh))
        batches = data.eval_batches([np.asarray(t, np.int32) for t in held_tokens], global_batch=global_batch,
                                    seq_len=seq_len, pad_id=tokenizer.pad_id, mode=config.data.mode,
                                    process_index=0, process_count=1)  # every host builds the global batch
        loss, ppl = heldout_loss(model, batches, mesh=mesh, progress=f"{name}: held-out loss")
        result["heldout"] = {"loss": loss, "perplexity": ppl, "n_documents": len(heldout)}
    return result


def _run_config(run: str):
    """A run's saved config, or for a Hugging Face directory the config it is evaluated under."""
    from gf_jax.config import load_config
    from gf_jax.hf import is_hf_dir

    if is_hf_dir(run):
        from gf_jax.hf.runs import run_config
        from gf_jax.tokenizer import Tokenizer

        return run_config(run, Tokenizer.load(run))
    return load_config(os.path.join(run, "config.yaml"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gf_jax.evaluate",
        description="Memorization (suffix extraction), membership inference and held-out loss of trained runs.",
    )
    p.add_argument("--run", action="append", required=True,
                   help="run directory or Hugging Face model directory (repeat for several models)")
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
    p.add_argument("--mesh", default=None, help="e.g. 'data=1,fsdp=-1,tensor=1' (default: one device)")
    p.add_argument("--out", default=None, help="report directory (default: RUN/eval for one run, else eval_report)")
    return p


def _check_writable_dir(path: str) -> None:
    """Fails now, not after the evaluation, when the report cannot be written to ``path`` (a test
    file is created in it, or in its nearest existing parent when it does not exist yet)."""
    import tempfile

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
    _check_writable_dir(_out_dir(args))


def _out_dir(args) -> str:
    return args.out or (os.path.join(args.run[0], "eval") if len(args.run) == 1 else "eval_report")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    from gf_jax.hf import is_hf_dir

    names = _model_names(args.run, args.name)
    for run in args.run:
        if not os.path.isfile(os.path.join(run, "config.yaml")) and not is_hf_dir(run):
            raise FileNotFoundError(f"{run!r} has no config.yaml; pass a run directory written by gf_jax.train "
                                    "or a Hugging Face model directory.")
    first_config = _run_config(args.run[0])
    docs = _select(resolve_documents(args.docs, first_config.data, split_rule=args.split_rule),
                   args.doc_ids, args.max_docs)
    heldout = None
    if args.heldout:
        heldout = _select(resolve_documents(args.heldout, first_config.data, split_rule=args.split_rule),
                          None, args.max_docs)
    mesh = _parse_mesh(args.mesh)
    results = {name: evaluate_run(run, docs, heldout, args, mesh) for name, run in zip(names, args.run)}
    out_dir = _out_dir(args)
    paths = write_report(results, out_dir, title=f"Evaluation on {args.docs}"
                         + (f" (held out: {args.heldout})" if args.heldout else ""))
    print(markdown_table(results))
    print(f"report: {paths['markdown']} (+ report.json, {len(paths['plots'])} plots)")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
