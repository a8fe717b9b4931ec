"""The paper's extreme setting in one command: train on a few documents for many epochs, then try
to extract them, with standard loss, goldfish loss (hash and static), random 1/k dropping, and a
control model that never saw them.

    python scripts/memorization_experiment.py --preset cpu            # ~20 min on 2 CPU cores
    python scripts/memorization_experiment.py --preset smoke          # seconds (CI)
    python scripts/memorization_experiment.py --preset tpu --corpus wiki.jsonl --format jsonl
    python scripts/memorization_experiment.py --config my.yaml train.lr=1e-3 experiment.epochs=50

Protocol (Hans et al. 2024, section 4.1, in miniature): the first ``docs`` documents of the corpus
that have at least ``doc_tokens`` tokens are cut to exactly that many tokens (BOS/EOS included)
and are the training set of every arm; the next ``docs`` are the control arm's training set; the
next ``heldout_docs`` are never trained on (held-out loss, membership-inference non-members).
Each arm trains ``epochs`` passes over its documents from the same initialisation, then
``gf_jax.evaluate`` greedily decodes the last ``suffix_len`` tokens of every evaluated document
from everything before it. A document is *memorized* when the whole suffix comes back exactly.

Outputs in ``--out`` (default ``runs/memorization_<preset>``): ``results.json``, ``results.md``,
``rougeL_hist.png`` (one panel per arm), ``report/`` (gf_jax.report: report.md/json and overlaid
histograms), ``corpus/`` (the documents, JSONL with their stable ids), ``arms/<arm>/`` (run
directories: config, metrics, checkpoint). Re-running with the same ``--out`` resumes or reuses
finished arms (``--fresh`` retrains them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import experiment_common as common  # noqa: E402

ARM_NAMES = ("standard", "goldfish-hash", "goldfish-static", "random-drop", "control")
PRESET_ALIASES = {"tpu": "llama2_7b"}
FORMATS = {  # --format -> data source fields
    "wikitext": dict(source="text", split_rule="wikitext"),
    "text": dict(source="text", split_rule="blank_line"),
    "files": dict(source="text", split_rule="file"),
    "jsonl": dict(source="jsonl"),
}
# The paper's extreme setting (LLaMA-2-7B, 100 Wikipedia articles of ~2000 tokens, 100 epochs).
PAPER = {"standard": "84/100", "goldfish-hash": "0/100 (4-GL, hash-table h=13)"}


@dataclasses.dataclass(frozen=True)
class MemorizationExperiment:
    """The ``experiment`` section.

    Attributes:
      docs: N, documents trained on and evaluated (the control arm trains on the next N).
      doc_tokens: every document is cut to exactly this many tokens, BOS/EOS included; shorter
        documents are skipped. With ``data.mode: document`` and ``doc_tokens <= train.seq_len + 1``
        each document is one row.
      heldout_docs: documents after those never trained on (held-out loss, MIA non-members).
      suffix_len: tokens to extract (the paper: 50); prefix_len: prompt tokens (null: all).
      epochs: passes over the documents; ``train.steps`` is derived from it.
      arms: which of standard, goldfish-hash, goldfish-static, random-drop, control to run.
      k, h: goldfish drop rate 1/k and hash context width.
      hash_strategy: the goldfish-hash arm's strategy, ``hash`` or the reference's ``hash-table``.
      eval_batch: prompts decoded (and documents scored) per batch.
    """

    docs: int = 16
    doc_tokens: int = 256
    heldout_docs: int = 16
    suffix_len: int = 32
    prefix_len: int | None = None
    epochs: int = 100
    arms: tuple[str, ...] = ARM_NAMES
    k: int = 4
    h: int = 13
    hash_strategy: str = "hash"
    eval_batch: int = 16

    def __post_init__(self):
        if self.hash_strategy not in ("hash", "hash-table"):
            raise ValueError(f"experiment.hash_strategy={self.hash_strategy!r}; use hash (gf_jax's) or hash-table "
                             "(the reference implementation's product hash).")
        for name in ("docs", "doc_tokens", "heldout_docs", "suffix_len", "epochs", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment.{name} must be >= 1, got {getattr(self, name)}.")
        unknown = [a for a in self.arms if a not in ARM_NAMES]
        if unknown or not self.arms:
            raise ValueError(f"experiment.arms has unknown arm {unknown[0] if unknown else '(none)'}; "
                             f"choose from {', '.join(ARM_NAMES)}.")
        if self.suffix_len + 3 > self.doc_tokens:
            raise ValueError(f"experiment.suffix_len={self.suffix_len} leaves no prompt in documents of "
                             f"{self.doc_tokens} tokens; raise experiment.doc_tokens or lower suffix_len.")


def make_arms(exp: MemorizationExperiment, special_ids: tuple[int, ...]) -> dict[str, common.Arm]:
    from gf_jax.goldfish import GoldfishConfig

    gl = dict(k=exp.k, h=exp.h, never_drop_ids=special_ids)
    arms = {
        "standard": common.Arm("standard", GoldfishConfig(strategy="none"), "the N documents"),
        "goldfish-hash": common.Arm("goldfish-hash", GoldfishConfig(strategy=exp.hash_strategy, **gl),
                                    "the N documents"),
        "goldfish-static": common.Arm("goldfish-static", GoldfishConfig(strategy="static", **gl), "the N documents"),
        "random-drop": common.Arm("random-drop", GoldfishConfig(strategy="random", **gl), "the N documents"),
        "control": common.Arm("control", GoldfishConfig(strategy="none"), "N other documents"),
    }
    return {name: arms[name] for name in exp.arms}


def arm_label(arm: common.Arm) -> str:
    g = arm.goldfish
    if g.strategy in ("hash", "hash-table"):
        return f"goldfish k={g.k} {g.strategy} h={g.h}"
    if g.strategy == "static":
        return f"goldfish k={g.k} static"
    if g.strategy == "random":
        return f"random drop 1/{g.k}"
    return "control (standard loss)" if arm.name == "control" else "standard loss"


# ---------------------------------------------------------------------------------------------
# Documents.


def select_documents(base, exp: MemorizationExperiment):
    """(tokenizer, members, control, heldout): the cut documents, in corpus order."""
    from gf_jax import data

    pool = data.read_background(base.data)
    need = 2 * exp.docs + exp.heldout_docs if "control" in exp.arms else exp.docs + exp.heldout_docs
    # A tokenizer trained on the whole corpus read (data.max_documents bounds it), unless given.
    texts = [] if base.data.tokenizer else [pool[i].text for i in range(len(pool))]
    tokenizer = common.corpus_tokenizer(base.data, texts)
    n_special = int(base.data.add_bos) + int(base.data.add_eos)
    chosen = []
    for doc in (pool[i] for i in range(len(pool))):
        text = common.truncate_to_tokens(doc.text, tokenizer, exp.doc_tokens - n_special)
        if text is not None:
            chosen.append(data.Document(doc.id, text))
        if len(chosen) == need:
            break
    if len(chosen) < need:
        raise ValueError(
            f"the corpus {base.data.path or base.data.tfds_name!r} has only {len(chosen)} documents of at least "
            f"{exp.doc_tokens} tokens but the experiment needs {need} ({exp.docs} trained, "
            f"{exp.docs if 'control' in exp.arms else 0} control, {exp.heldout_docs} held out); lower --docs, "
            "experiment.heldout_docs or experiment.doc_tokens, or use a larger corpus"
            + (f" or a larger data.max_documents (now {base.data.max_documents})." if base.data.max_documents else ".")
        )
    members = chosen[:exp.docs]
    if "control" in exp.arms:
        control, heldout = chosen[exp.docs:2 * exp.docs], chosen[2 * exp.docs:]
    else:
        control, heldout = [], chosen[exp.docs:]
    return tokenizer, members, control, heldout


def arm_config(base, arm: common.Arm, exp: MemorizationExperiment, docs_path: str, tokenizer, run_dir: str,
               n_rows: int):
    """The run config of one arm: its documents, goldfish settings, step count and run dir."""
    from gf_jax.config import validate

    t = base.train
    steps = max(1, math.ceil(exp.epochs * n_rows / t.global_batch))
    config = common.replace(
        base,
        data=dict(source="jsonl", path=docs_path, text_field="text", id_field="id", tokenizer=tokenizer.path,
                  validation_fraction=0.0, max_documents=None, canary_path=None, canary_repeats=0),
        train=dict(steps=steps, stop_at=0, run_dir=run_dir, eval_every=0,
                   warmup=min(t.warmup, steps - 1)),
    )
    config = dataclasses.replace(config, goldfish=arm.goldfish)
    validate(config)
    return config


# ---------------------------------------------------------------------------------------------
# Evaluation and output.


def evaluate_arm(model, mesh, tokenizer, config, arm, exp, member_docs, member_tokens, heldout_tokens) -> dict:
    from gf_jax import data, evaluate

    mesh = common.eval_mesh(mesh)
    batch = exp.eval_batch
    if mesh is not None:  # whole rows per data-parallel shard
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch = -(-batch // dp) * dp
    per_doc, aggregate = evaluate.evaluate_memorization(
        model, tokenizer, member_tokens, doc_ids=[d.id for d in member_docs], suffix_len=exp.suffix_len,
        prefix_len=exp.prefix_len, batch_size=batch, mesh=mesh, progress=f"{arm.name}: extraction",
    )
    dropped = common.suffix_drop_counts(member_tokens, arm.goldfish, exp.suffix_len, tokenizer.eos_id)
    by_id = {d.id: n for d, n in zip(member_docs, dropped)}
    for row in per_doc:
        row["suffix_never_supervised"] = by_id[row["id"]]
    result = {"memorization": {"per_doc": per_doc, "aggregate": aggregate}}
    if heldout_tokens:
        result["mia"] = evaluate.membership_inference(
            model, tokenizer, member_tokens, heldout_tokens, batch_size=batch, mesh=mesh, progress=f"{arm.name}: MIA")
        batches = data.eval_batches([np.asarray(t, np.int32) for t in heldout_tokens],
                                    global_batch=batch, seq_len=config.train.seq_len, pad_id=tokenizer.pad_id,
                                    mode=config.data.mode, process_index=0, process_count=1)
        loss, ppl = evaluate.heldout_loss(model, batches, mesh=mesh)
        result["heldout"] = {"loss": loss, "perplexity": ppl, "n_documents": len(heldout_tokens)}
    return result


def results_rows(results: dict, exp: MemorizationExperiment) -> list[list[str]]:
    rows = [["arm", "trains on", "memorized", "RougeL mean", "exact match", "longest run",
             "suffix tokens never supervised", "held-out loss", "MIA loss AUC", "final train loss (all tokens)",
             "train time"]]
    for name, r in results.items():
        agg = r["memorization"]["aggregate"]
        never = [d["suffix_never_supervised"] for d in r["memorization"]["per_doc"]]
        never_s = "-" if any(n is None for n in never) else f"{sum(never) / max(1, len(never)):.1f}/{exp.suffix_len}"
        t = r["train"]
        rows.append([
            r["label"], r["trains_on"], f"{agg['n_memorized']}/{agg['n_documents']}",
            common.fmt(agg["rougeL_mean"], ".3f"), common.fmt(agg["exact_match_mean"], ".3f"),
            common.fmt(agg["longest_run_mean"], ".1f"), never_s,
            common.fmt(r.get("heldout", {}).get("loss"), ".3f"), common.fmt(r.get("mia", {}).get("loss", {}).get("auc"), ".2f"),
            common.fmt(t.get("final_loss_all"), ".3f"), f"{t['seconds']:.0f} s",
        ])
    return rows


def write_outputs(out: str, results: dict, exp, base, meta: dict, docs: dict) -> str:
    """results.json, results.md, rougeL_hist.png and report/ (gf_jax.report); returns the table."""
    from gf_jax import evaluate

    table = common.markdown(results_rows(results, exp))
    common.write_json({**meta, "experiment": dataclasses.asdict(exp), "documents": docs, "arms": results},
                      os.path.join(out, "results.json"))
    common.plot_rouge_panels(
        {r["label"]: [d["rougeL"] for d in r["memorization"]["per_doc"]] for r in results.values()},
        os.path.join(out, "rougeL_hist.png"),
        title=f"RougeL of the extracted {exp.suffix_len}-token suffix, {exp.docs} documents x {exp.epochs} epochs",
    )
    evaluate.write_report({r["label"]: r for r in results.values()}, os.path.join(out, "report"),
                          title=f"Memorization experiment ({meta.get('preset')})")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Memorization experiment: {meta.get('preset')}\n\n")
        f.write(f"{meta['date']}, {meta['machine']}\n\n`{meta['command']}`\n\n")
        f.write(f"{exp.docs} documents of {exp.doc_tokens} tokens, {exp.epochs} epochs, model "
                f"d_model={base.model.d_model} x {base.model.n_layers} layers ({meta['parameters']:,} parameters), "
                f"tokenizer {meta['vocab_size']} pieces, suffix {exp.suffix_len} tokens, greedy decoding.\n\n")
        f.write(table)
        f.write("\nPaper (LLaMA-2-7B, 100 Wikipedia articles of ~2000 tokens, 100 epochs, 50-token suffix): "
                "standard loss memorized 84/100, 4-GL 0/100.\n\n![RougeL per arm](rougeL_hist.png)\n")
    return table


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu",
                   help="smoke | cpu | gpu | tpu (= llama2_7b): configs/experiments/memorization_<preset>.yaml")
    p.add_argument("--config", default=None, help="an experiment YAML instead of a preset")
    p.add_argument("--corpus", default=None, help="corpus file or folder (default: the preset's, WikiText-2 articles)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="wikitext (an article per ' = Title = '), text (blank-line separated), files (one per .txt), jsonl")
    p.add_argument("--text-field", default=None, help="JSONL key of the text (default: text)")
    p.add_argument("--id-field", default=None, help="JSONL key of a stable document id (default: file:line)")
    p.add_argument("--docs", type=int, default=None, help="documents trained on and evaluated (experiment.docs)")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARM_NAMES)}")
    p.add_argument("--out", default=None, help="output directory (default: runs/memorization_<preset>)")
    p.add_argument("--init-from", default=None, help="start every arm from this run directory's weights")
    p.add_argument("--devices", type=int, default=0, help="train on the first N devices (0 = all)")
    p.add_argument("--fresh", action="store_true", help="retrain arms whose run directories exist")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3 experiment.epochs=50")
    return p


def cli_overrides(args) -> list[str]:
    out = []
    if args.corpus:
        out.append(f"data.path={args.corpus}")
    if args.format:
        out += [f"data.{k}={v}" for k, v in FORMATS[args.format].items()]
    if args.text_field:
        out.append(f"data.text_field={args.text_field}")
    if args.id_field:
        out.append(f"data.id_field={args.id_field}")
    if args.docs is not None:
        out.append(f"experiment.docs={args.docs}")
    if args.arms:
        out.append(f"experiment.arms=[{args.arms}]")
    return out + list(args.overrides)


def run(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    path = args.config or common.preset_path("memorization", args.preset, PRESET_ALIASES)
    preset = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.preset
    exp, base = common.load_experiment(path, cli_overrides(args), MemorizationExperiment)
    out = args.out or os.path.join("runs", f"memorization_{preset}")
    os.makedirs(out, exist_ok=True)
    devices = common.select_devices(args.devices)

    from gf_jax import data
    from gf_jax.model import param_count

    tokenizer, members, control, heldout = select_documents(base, exp)
    data.check_vocab_fits(tokenizer, base.model.vocab_size)
    paths = {name: common.write_jsonl(docs, os.path.join(out, "corpus", f"{name}.jsonl"))
             for name, docs in (("members", members), ("control", control), ("heldout", heldout)) if docs}
    member_tokens = common.document_tokens(members, tokenizer, base.data)
    heldout_tokens = common.document_tokens(heldout, tokenizer, base.data)
    n_rows = common.rows_per_epoch([len(t) for t in member_tokens], base.train.seq_len, base.data.mode)
    meta = {**common.provenance(argv), "preset": preset, "config_file": os.path.relpath(path, common.REPO),
            "parameters": param_count(base.model), "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.path}
    docs = {"members": [d.id for d in members], "control": [d.id for d in control], "heldout": [d.id for d in heldout]}
    common.say(f"[memorization] {len(members)} documents of {exp.doc_tokens} tokens x {exp.epochs} epochs "
          f"({n_rows} rows/epoch, batch {base.train.global_batch}), arms: {', '.join(exp.arms)}; "
          f"model {meta['parameters']:,} parameters; output {out}")

    results: dict = {}
    for name, arm in make_arms(exp, common.special_ids(tokenizer)).items():
        docs_path = paths["control" if name == "control" else "members"]
        config = arm_config(base, arm, exp, docs_path, tokenizer, os.path.join(out, "arms", name), n_rows)
        trained_ids = [d.id for d in data.load_documents(config.data)]
        expected = docs["control" if name == "control" else "members"]
        assert trained_ids == expected, "the pipeline's documents differ from the selection"
        common.say(f"[memorization] arm {name}: {arm_label(arm)}, {config.train.steps} steps")
        model, mesh, summary = common.train_arm(config, devices=devices, init_from=args.init_from, fresh=args.fresh)
        result = evaluate_arm(model, mesh, tokenizer, config, arm, exp, members, member_tokens, heldout_tokens)
        results[name] = common.record_arm("memorization", name, arm, arm_label(arm), config, summary, result)
        del model
        if common.is_main():  # after every arm: partial results survive an interruption
            table = write_outputs(out, results, exp, base, meta, docs)
    if common.is_main():
        common.print_summary(table, out)
    return {"out": out, "arms": results, "meta": meta}


def main(argv: Sequence[str] | None = None) -> None:
    common.cli_main(run, argv)


if __name__ == "__main__":
    main()
