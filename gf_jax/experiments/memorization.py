"""The paper's extreme setting in one command: train on a few documents for many epochs, then try
to extract them, with standard loss, goldfish loss (hash and static), random 1/k dropping, and a
control model that never saw them.

    python -m gf_jax.experiments memorization --preset cpu     # ~20 min on 2 CPU cores
    python -m gf_jax.experiments memorization --preset smoke   # seconds (CI)
    python -m gf_jax.experiments memorization --preset tpu --corpus wiki.jsonl --format jsonl
    python -m gf_jax.experiments memorization --config my.yaml optimizer.lr=1e-3 experiment.epochs=50

(``python scripts/memorization_experiment.py ...`` is the same command.)

Protocol (Hans et al. 2024, section 4.1, in miniature): the first ``docs`` documents of the corpus
that have at least ``doc_tokens`` tokens are cut to exactly that many tokens (BOS/EOS included)
and are the training set of every arm; the next ``docs`` are the control arm's training set; the
next ``heldout_docs`` are never trained on (held-out loss, membership-inference non-members).
Each arm trains ``epochs`` passes over its documents from the same initialisation, then
``gf_jax.evaluate`` greedily decodes the last ``suffix_len`` tokens of every evaluated document
from everything before it. A document is *memorized* when the whole suffix comes back exactly.

Outputs in ``--out`` (default ``runs/memorization_<preset>``): ``results.json``, ``results.md``,
``rougeL_hist.png`` (one panel per arm), ``report/`` (gf_jax.evaluate.report: report.md/json and overlaid
histograms), ``corpus/`` (the documents, JSONL with their stable ids), ``arms/<arm>/`` (run
directories: config, metrics, checkpoint). Re-running with the same ``--out`` resumes or reuses
finished arms (``--fresh`` retrains them).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence

from gf_jax import data
from gf_jax.data.tasks import corpus_tokenizer
from gf_jax.experiments import base_model, cli, corpus, evaluation, tables
from gf_jax.experiments.arms import REPO, Arm, arm_config, special_ids
from gf_jax.experiments.io import provenance, say, select_devices, write_documents_jsonl
from gf_jax.experiments.runner import Protocol, run_arms
from gf_jax.goldfish import GoldfishConfig
from gf_jax.model import LoRAConfig, param_count

DEFAULT_ARMS = ("standard", "goldfish-hash", "goldfish-static", "random-drop", "control")
# LoRA arms fine-tune a pretrained base (experiment.base_corpus or --init-from): not by default.
LORA_ARMS = ("lora-standard", "lora-goldfish-hash")
ARM_NAMES = (*DEFAULT_ARMS, *LORA_ARMS)
PRESET_ALIASES = {"tpu": "llama2_7b"}
FORMATS = {  # --format -> data source fields
    "wikitext": dict(source="text", split_rule="wikitext"),
    "text": dict(source="text", split_rule="blank_line"),
    "files": dict(source="text", split_rule="file"),
    "jsonl": dict(source="jsonl"),
}
PAPER_NOTE = ("Paper (LLaMA-2-7B, 100 Wikipedia articles of ~2000 tokens, 100 epochs, 50-token suffix): "
              "standard loss memorized 84/100, 4-GL 0/100.")


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
      offsets, offset_prefix_len: also extract with an ``offset_prefix_len``-token prompt at each of
        these token offsets inside the documents (e.g. [0, 32, 128]; empty: not measured).
      epochs: passes over the documents; ``train.steps`` is derived from it.
      arms: which of standard, goldfish-hash, goldfish-static, random-drop, control,
        lora-standard, lora-goldfish-hash to run (the LoRA arms need a base model).
      k, h: goldfish drop rate 1/k and hash context width.
      hash_strategy: the goldfish-hash arm's strategy, ``hash`` or the reference's ``hash-table``.
      eval_batch: prompts decoded (and documents scored) per batch.
      base_corpus: fine-tuning mode: a corpus a base model is first pretrained on (standard loss,
        packed rows, ``base_steps`` steps at ``base_lr``, default ``optimizer.lr``); every arm then
        fine-tunes that base (``<out>/base``). ``base_format`` is one of the ``--format`` choices.
        Null: the arms start from ``--init-from`` if given, else from scratch.
      lora_rank, lora_alpha, lora_targets: the LoRA arms' adapters (``model.lora``; alpha null =
        rank); lora_lr: their learning rate (null: ``optimizer.lr``).
    """

    docs: int = 16
    doc_tokens: int = 256
    heldout_docs: int = 16
    suffix_len: int = 32
    prefix_len: int | None = None
    epochs: int = 100
    arms: tuple[str, ...] = DEFAULT_ARMS
    k: int = 4
    h: int = 13
    hash_strategy: str = "hash"
    eval_batch: int = 16
    base_corpus: str | None = None
    base_format: str = "text"
    base_steps: int = 0
    base_lr: float | None = None
    offsets: tuple[int, ...] = ()
    offset_prefix_len: int = 32
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    lora_lr: float | None = None

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
        if self.base_corpus and (self.base_steps < 1 or self.base_format not in FORMATS):
            raise ValueError(f"experiment.base_corpus needs experiment.base_steps >= 1 (got {self.base_steps}) and "
                             f"experiment.base_format in {', '.join(sorted(FORMATS))} (got {self.base_format!r}).")
        if self.suffix_len + 3 > self.doc_tokens:
            raise ValueError(f"experiment.suffix_len={self.suffix_len} leaves no prompt in documents of "
                             f"{self.doc_tokens} tokens; raise experiment.doc_tokens or lower suffix_len.")


def make_arms(exp: MemorizationExperiment, never_drop_ids: tuple[int, ...]) -> dict[str, Arm]:
    gl = dict(k=exp.k, h=exp.h, never_drop_ids=never_drop_ids)
    arms = {
        "standard": Arm("standard", GoldfishConfig(strategy="none"), "the N documents"),
        "goldfish-hash": Arm("goldfish-hash", GoldfishConfig(strategy=exp.hash_strategy, **gl), "the N documents"),
        "goldfish-static": Arm("goldfish-static", GoldfishConfig(strategy="static", **gl), "the N documents"),
        "random-drop": Arm("random-drop", GoldfishConfig(strategy="random", **gl), "the N documents"),
        "control": Arm("control", GoldfishConfig(strategy="none"), "N other documents"),
        "lora-standard": Arm("lora-standard", GoldfishConfig(strategy="none"), "the N documents", lora=True),
        "lora-goldfish-hash": Arm("lora-goldfish-hash", GoldfishConfig(strategy=exp.hash_strategy, **gl),
                                  "the N documents", lora=True),
    }
    return {name: arms[name] for name in exp.arms}


def arm_label(arm: Arm) -> str:
    return f"LoRA + {_loss_label(arm)}" if arm.lora else _loss_label(arm)


def _loss_label(arm: Arm) -> str:
    g = arm.goldfish
    if g.strategy in ("hash", "hash-table"):
        return f"goldfish k={g.k} {g.strategy} h={g.h}"
    if g.strategy == "static":
        return f"goldfish k={g.k} static"
    if g.strategy == "random":
        return f"random drop 1/{g.k}"
    return "control (standard loss)" if arm.name == "control" else "standard loss"


def select_documents(base, exp: MemorizationExperiment):
    """(tokenizer, members, control, heldout): the cut documents, in corpus order."""
    pool = data.read_background(base.data)
    n_control = exp.docs if "control" in exp.arms else 0
    need = exp.docs + n_control + exp.heldout_docs
    # A tokenizer trained on the whole corpus read (data.max_documents bounds it), unless given.
    texts = [] if base.data.tokenizer else [pool[i].text for i in range(len(pool))]
    tokenizer = corpus_tokenizer(base.data, texts)
    chosen = corpus.cut_documents((pool[i] for i in range(len(pool))), tokenizer, base.data,
                                  n_tokens=exp.doc_tokens, limit=need)
    if len(chosen) < need:
        raise ValueError(
            f"the corpus {base.data.path or base.data.tfds_name!r} has only {len(chosen)} documents of at least "
            f"{exp.doc_tokens} tokens but the experiment needs {need} ({exp.docs} trained, {n_control} control, "
            f"{exp.heldout_docs} held out); lower --docs, experiment.heldout_docs or experiment.doc_tokens, or use "
            "a larger corpus"
            + (f" or a larger data.max_documents (now {base.data.max_documents})." if base.data.max_documents else ".")
        )
    members = chosen[:exp.docs]
    control = chosen[exp.docs:exp.docs + n_control]
    heldout = chosen[exp.docs + n_control:]
    return tokenizer, members, control, heldout


def arm_data(base, docs_path: str, tokenizer):
    """The data section of an arm: exactly its documents file, every document trained on."""
    return dataclasses.replace(
        base.data, source="jsonl", path=docs_path, text_field="text", id_field="id", tokenizer=tokenizer.path,
        validation_fraction=0.0, max_documents=None, canary_path=None, canary_repeats=0)


def check_lora_arms(exp: MemorizationExperiment, init_from: str | None) -> None:
    """LoRA arms train adapters on a frozen base, so there must be one to start from."""
    lora_arms = [name for name in exp.arms if name in LORA_ARMS]
    if lora_arms and not (exp.base_corpus or init_from):
        raise ValueError(f"arm {lora_arms[0]} trains LoRA adapters on a pretrained base; set experiment.base_corpus "
                         "(and experiment.base_steps) or pass --init-from, or drop the LoRA arms.")


def lora_base(base, exp: MemorizationExperiment):
    """The run config a LoRA arm starts from: adapters on every targeted projection of a frozen
    base, at the LoRA learning rate."""
    adapters = LoRAConfig(rank=exp.lora_rank, alpha=exp.lora_alpha, targets=tuple(exp.lora_targets))
    lr = exp.lora_lr if exp.lora_lr is not None else base.optimizer.lr
    return dataclasses.replace(base, model=dataclasses.replace(base.model, lora=adapters),
                               optimizer=dataclasses.replace(base.optimizer, lr=lr))


def train_base(base, exp: MemorizationExperiment, tokenizer, out: str, init_from: str | None, *,
               devices, fresh: bool) -> dict:
    """Fine-tuning mode: pretrains (or reuses) ``<out>/base`` on ``experiment.base_corpus``."""
    fields = dict(FORMATS[exp.base_format], path=exp.base_corpus)
    config = base_model.base_config(base, corpus_fields=fields, tokenizer_path=tokenizer.path, steps=exp.base_steps,
                                    lr=exp.base_lr, run_dir=os.path.join(out, "base"), init_from=init_from)
    return base_model.pretrain_base(config, devices=devices, fresh=fresh, tag="memorization")


def results_columns(exp: MemorizationExperiment) -> list[tables.Column]:
    def never_supervised(r: dict) -> str:
        never = [d["suffix_never_supervised"] for d in r["memorization"]["per_doc"]]
        if any(n is None for n in never):
            return "-"
        return f"{sum(never) / max(1, len(never)):.1f}/{exp.suffix_len}"

    return [tables.ARM, tables.TRAINS_ON, tables.MEMORIZED, tables.ROUGE_MEAN, tables.EXACT_MATCH,
            tables.LONGEST_RUN, ("suffix tokens never supervised", never_supervised), tables.HELDOUT_LOSS,
            tables.MIA_LOSS_AUC, tables.FINAL_TRAIN_LOSS, tables.TRAIN_TIME]


def write_outputs(out: str, results: dict, exp: MemorizationExperiment, base, meta: dict, docs: dict) -> str:
    """results.json, results.md, rougeL_hist.png and report/; returns the table."""
    table = tables.results_table(results, results_columns(exp))
    description = (f"{exp.docs} documents of {exp.doc_tokens} tokens, {exp.epochs} epochs, model "
                   f"d_model={base.model.d_model} x {base.model.n_layers} layers ({meta['parameters']:,} "
                   f"parameters), tokenizer {meta['vocab_size']} pieces, suffix {exp.suffix_len} tokens, "
                   "greedy decoding.")
    if "base" in meta:
        b = meta["base"]
        description += (f" Every arm fine-tunes one base model, pretrained {b['steps']} steps with standard loss "
                        f"on {os.path.basename(b['corpus'])} (final loss {b.get('final_loss') or float('nan'):.3f}).")
    tables.write_results(
        out, results, table, record={**meta, "experiment": dataclasses.asdict(exp), "documents": docs},
        heading="Memorization experiment", description=description, paper_note=PAPER_NOTE,
        plot_title=f"RougeL of the extracted {exp.suffix_len}-token suffix, {exp.docs} documents x {exp.epochs} epochs",
    )
    return table


def build_parser(prog: str | None = None):
    parser = cli.experiment_parser(prog, __doc__, "memorization", "smoke | cpu | gpu | tpu (= llama2_7b)")
    parser.add_argument("--corpus", default=None,
                        help="corpus file or folder (default: the preset's, WikiText-2 articles)")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="wikitext (an article per ' = Title = '), text (blank-line separated), "
                             "files (one per .txt), jsonl")
    parser.add_argument("--text-field", default=None, help="JSONL key of the text (default: text)")
    parser.add_argument("--id-field", default=None, help="JSONL key of a stable document id (default: file:line)")
    parser.add_argument("--docs", type=int, default=None, help="documents trained on and evaluated (experiment.docs)")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARM_NAMES)}")
    cli.add_run_arguments(parser, "memorization", "optimizer.lr=1e-3 experiment.epochs=50")
    return parser


def flag_overrides(args) -> list[str]:
    """The flags as ``section.key=value`` overrides, before those given as such."""
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


def run(argv: Sequence[str] | None = None, *, command: str | None = None) -> dict:
    """Runs the experiment; returns ``{"out", "arms": {name: result}, "meta"}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command).parse_args(argv)
    path, preset, exp, base, out = cli.resolve_experiment(
        args, "memorization", PRESET_ALIASES, flag_overrides(args), MemorizationExperiment)
    check_lora_arms(exp, args.init_from or base.train.init_from)
    devices = select_devices(args.devices)
    tokenizer, members, control, heldout = select_documents(base, exp)
    data.check_vocab_fits(tokenizer, base.model.vocab_size)
    paths = {name: write_documents_jsonl(docs, os.path.join(out, "corpus", f"{name}.jsonl"))
             for name, docs in (("members", members), ("control", control), ("heldout", heldout)) if docs}
    docs = {"members": [d.id for d in members], "control": [d.id for d in control], "heldout": [d.id for d in heldout]}
    member_tokens = corpus.document_tokens(members, tokenizer, base.data)
    heldout_tokens = corpus.document_tokens(heldout, tokenizer, base.data)
    # The held-out documents are both the MIA non-members and the held-out loss's documents.
    eval_docs = evaluation.EvalDocuments(member_ids=docs["members"], member_tokens=member_tokens,
                                         nonmember_tokens=heldout_tokens, heldout_tokens=heldout_tokens)
    n_rows = data.rows_per_epoch([len(t) for t in member_tokens], base.train.seq_len, base.data.mode)
    steps = max(1, math.ceil(exp.epochs * n_rows / base.train.global_batch))
    meta = {**provenance(command or cli.script_command(), argv), "preset": preset,
            "config_file": os.path.relpath(path, REPO), "parameters": param_count(base.model),
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.path}
    init_from = args.init_from
    if exp.base_corpus:
        meta["base"] = train_base(base, exp, tokenizer, out, init_from, devices=devices, fresh=args.fresh)
        init_from = meta["base"]["run_dir"]
    say(f"[memorization] {len(members)} documents of {exp.doc_tokens} tokens x {exp.epochs} epochs "
        f"({n_rows} rows/epoch, batch {base.train.global_batch}), arms: {', '.join(exp.arms)}; "
        f"model {meta['parameters']:,} parameters; output {out}")

    def configure(arm: Arm):
        trains_on = "control" if arm.name == "control" else "members"
        config = arm_config(lora_base(base, exp) if arm.lora else base, arm, steps=steps,
                            data=arm_data(base, paths[trains_on], tokenizer),
                            run_dir=os.path.join(out, "arms", arm.name), init_from=init_from)
        if [d.id for d in data.load_documents(config.data)] != docs[trains_on]:
            raise RuntimeError(f"the pipeline reads other documents from {paths[trains_on]} than were selected.")
        return config

    def evaluate(model, mesh, config, arm: Arm) -> dict:
        result = evaluation.evaluate_arm(model, mesh, tokenizer, config, eval_docs, exp, arm.name)
        dropped = evaluation.suffix_drop_counts(member_tokens, arm.goldfish, exp.suffix_len, tokenizer.eos_id)
        dropped_by_id = dict(zip(docs["members"], dropped))  # by id: extraction may skip a document
        for row in result["memorization"]["per_doc"]:
            row["suffix_never_supervised"] = dropped_by_id[row["id"]]
        return result

    protocol = Protocol("memorization", arm_label, configure, evaluate,
                        lambda results: write_outputs(out, results, exp, base, meta, docs))
    results = run_arms(protocol, make_arms(exp, special_ids(tokenizer)), devices=devices, fresh=args.fresh, out=out)
    return {"out": out, "arms": results, "meta": meta}


def main(argv: Sequence[str] | None = None, *, command: str | None = None) -> None:
    cli.run_cli(run, argv, command)
