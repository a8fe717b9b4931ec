"""The paper's standard setting in one command: canary documents repeated M times inside a larger
corpus, trained with standard loss, goldfish loss at several k, and without canaries (control);
RougeL of the extracted canary suffixes per arm (the paper's Figure 2).

    python -m gf_jax.experiments canary --preset cpu             # < 20 min on 2 CPU cores
    python -m gf_jax.experiments canary --preset smoke           # seconds (CI)
    python -m gf_jax.experiments canary --preset tpu             # TinyLlama-1.1B, see the YAML
    python -m gf_jax.experiments canary --arms standard,k4,control experiment.repeats=20

(``python scripts/canary_experiment.py ...`` is the same command.)

Protocol (Hans et al. 2024, section 4.2, in miniature): the first ``canaries`` documents of the
canary corpus with at least ``canary_tokens`` tokens are cut to exactly that length and inserted
``repeats`` times each at random places of the background stream by the data pipeline
(``data.canary_*``); the next ``heldout_canaries`` are never inserted (membership-inference
non-members). Every arm trains the same number of steps (``epochs`` passes over the stream with
canaries) from the same initialisation; the control arm's stream has no canaries. Then
``gf_jax.evaluate`` greedily decodes the last ``suffix_len`` tokens of every inserted canary.

Outputs in ``--out`` (default ``runs/canary_<preset>``): ``results.json``, ``results.md``,
``rougeL_hist.png`` (one panel per arm), ``report/`` (gf_jax.evaluate.report), ``corpus/canaries.jsonl``,
``arms/<arm>/`` (run directories).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence

from gf_jax import data
from gf_jax.data.tasks import corpus_tokenizer
from gf_jax.experiments import cli, corpus, evaluation, tables
from gf_jax.experiments.arms import REPO, Arm, arm_config, special_ids
from gf_jax.experiments.io import provenance, say, select_devices, write_documents_jsonl
from gf_jax.experiments.runner import Protocol, run_arms
from gf_jax.goldfish import GoldfishConfig
from gf_jax.model import param_count

PRESET_ALIASES = {"tpu": "tinyllama_1b"}
DEFAULT_ARMS = ("standard", "k3", "k4", "k8", "k32", "k128", "control")
# k<N>, with optional -h<H> and -w<W> (passage key): k4, k4-h2-w64.
GOLDFISH_ARM = re.compile(r"k([2-9]|[1-9]\d+)(?:-h([1-9]\d*))?(?:-w([1-9]\d*))?")
CANARY_FORMATS = {"wikitext": ("text", "wikitext"), "text": ("text", "blank_line"), "jsonl": ("jsonl", "file")}
# Characters of background text the tokenizer trains on (besides the canary corpus).
TOKENIZER_BACKGROUND_CHARS = 50_000_000
PAPER_NOTE = ("Paper (TinyLlama-1.1B from scratch, 20B tokens of RedPajama, 2000 canaries x 50): at k = 3 and 4 "
              "the canaries' RougeL distribution nearly coincides with the control's; standard loss shows "
              "verbatim recall.")


@dataclasses.dataclass(frozen=True)
class CanaryExperiment:
    """The ``experiment`` section.

    Attributes:
      canary_corpus, canary_format: where the canaries come from (wikitext | text | jsonl);
        canary_text_field, canary_id_field: its JSONL keys.
      canaries: documents inserted; heldout_canaries: the next ones, never inserted.
      canary_tokens: every canary is cut to exactly this many tokens (BOS/EOS included).
      repeats: copies of each canary in the stream (the paper: 50).
      epochs: passes over the stream (background + canary copies); ``train.steps`` derives from it.
      arms: ``standard``, ``control`` and ``k<N>`` (goldfish with drop rate 1/N); ``k<N>-h<H>-w<W>``
        is a ``k<N>`` arm with its own h and a passage key of reach W (the near-duplicate defence,
        e.g. ``k4-h2-w64``; either part may be left out).
      strategy, h: goldfish strategy of the ``k<N>`` arms and its hash context width.
      offsets, offset_prefix_len: also extract with an ``offset_prefix_len``-token prompt at each of
        these token offsets inside the documents (e.g. [0, 32, 128]; empty: not measured).
      suffix_len, prefix_len: extraction (prefix null: all of the canary before the suffix).
      eval_batch: prompts decoded per batch.
      steps: > 0 sets ``train.steps`` directly, without reading the whole background to count
        its tokens (large corpora); 0 derives it from ``epochs``.
      val_docs: background documents of the validation split (``data.validation_fraction``) for
        the held-out loss, the first ones found.
      perturb_rate, perturb_noise: near-duplicate copies (``data.canary_perturb_*``): every copy
        differs from the canary by this many word edits per 100 words (and case / whitespace noise);
        extraction is measured on the original canaries.
    """

    canary_corpus: str = "data/wikitext2_valid.txt"
    canary_format: str = "wikitext"
    canary_text_field: str = "text"
    canary_id_field: str | None = None
    canaries: int = 16
    heldout_canaries: int = 16
    canary_tokens: int = 128
    repeats: int = 50
    epochs: float = 1.0
    arms: tuple[str, ...] = DEFAULT_ARMS
    strategy: str = "hash"
    h: int = 13
    suffix_len: int = 32
    prefix_len: int | None = None
    eval_batch: int = 16
    steps: int = 0
    val_docs: int = 64
    offsets: tuple[int, ...] = ()
    offset_prefix_len: int = 32
    perturb_rate: float = 0.0
    perturb_noise: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.val_docs < 0:
            raise ValueError("experiment.steps and experiment.val_docs must be >= 0.")
        for name in ("canaries", "heldout_canaries", "canary_tokens", "repeats", "suffix_len", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.epochs > 0:
            raise ValueError(f"experiment.epochs must be > 0, got {self.epochs}.")
        if self.canary_format not in CANARY_FORMATS:
            raise ValueError(f"experiment.canary_format={self.canary_format!r}; "
                             f"use one of {', '.join(CANARY_FORMATS)}.")
        bad = [a for a in self.arms if a not in ("standard", "control") and not GOLDFISH_ARM.fullmatch(a)]
        if bad or not self.arms:
            raise ValueError(f"experiment.arms has {bad[0] if bad else 'no arm'}; use standard, control or k<N> "
                             "with N >= 2 (e.g. k4), optionally -h<H> and -w<W> (e.g. k4-h2-w64).")
        if self.suffix_len + 3 > self.canary_tokens:
            raise ValueError(f"experiment.suffix_len={self.suffix_len} leaves no prompt in canaries of "
                             f"{self.canary_tokens} tokens; raise experiment.canary_tokens or lower suffix_len.")


def make_arms(exp: CanaryExperiment, never_drop_ids: tuple[int, ...]) -> dict[str, Arm]:
    arms = {}
    for name in exp.arms:
        if name in ("standard", "control"):
            trains_on = "background + canaries" if name == "standard" else "background only"
            arms[name] = Arm(name, GoldfishConfig(strategy="none"), trains_on)
        else:
            k, h, key_window = GOLDFISH_ARM.fullmatch(name).groups()
            goldfish = GoldfishConfig(strategy=exp.strategy, k=int(k), h=int(h or exp.h),
                                      key_window=int(key_window or 0), never_drop_ids=never_drop_ids)
            arms[name] = Arm(name, goldfish, "background + canaries")
    return arms


def arm_label(arm: Arm) -> str:
    if arm.name == "standard":
        return "standard loss"
    if arm.name == "control":
        return "control (no canaries)"
    g = arm.goldfish
    if g.key_window or g.h != GoldfishConfig.h:
        return f"{g.k}-GL ({g.strategy}, h={g.h}{f', key {g.key_window}' if g.key_window else ''})"
    return f"{g.k}-GL ({g.strategy})"


def prepare(base, exp: CanaryExperiment, out: str):
    """(tokenizer, canary-carrying data config): the canary file written, the tokenizer trained on
    the background's training documents plus the canary corpus (as a pre-trained tokenizer would
    cover both)."""
    source, rule = CANARY_FORMATS[exp.canary_format]
    if not os.path.exists(exp.canary_corpus):
        raise FileNotFoundError(f"the canary corpus {exp.canary_corpus!r} does not exist; set "
                                "experiment.canary_corpus to a WikiText-style .txt or a .jsonl of documents.")
    canary_pool = data.read_background(data.DataConfig(source=source, path=exp.canary_corpus, split_rule=rule,
                                                        text_field=exp.canary_text_field,
                                                        id_field=exp.canary_id_field))
    texts = []
    if not base.data.tokenizer:  # train one (a given tokenizer needs no reading)
        texts = data.train_texts(base.data, max_chars=TOKENIZER_BACKGROUND_CHARS) + [d.text for d in canary_pool]
    tokenizer = corpus_tokenizer(base.data, texts)
    need = exp.canaries + exp.heldout_canaries
    chosen = corpus.cut_documents(canary_pool, tokenizer, base.data, n_tokens=exp.canary_tokens, limit=need)
    if len(chosen) < need:
        raise ValueError(f"the canary corpus {exp.canary_corpus!r} has only {len(chosen)} documents of at least "
                         f"{exp.canary_tokens} tokens but {need} are needed; lower experiment.canaries, "
                         "experiment.heldout_canaries or experiment.canary_tokens.")
    # The pipeline reads canaries with the background's JSONL keys; a text background ignores
    # data.id_field, so the canaries can keep their corpus ids there.
    id_field = base.data.id_field or ("id" if base.data.source == "text" else None)
    path = write_documents_jsonl(chosen, os.path.join(out, "corpus", "canaries.jsonl"), id_key=id_field or "id",
                                 text_key=base.data.text_field)
    data_config = dataclasses.replace(
        base.data, tokenizer=tokenizer.path, canary_path=path, canary_count=exp.canaries,
        canary_repeats=exp.repeats, id_field=id_field, canary_perturb_rate=exp.perturb_rate,
        canary_perturb_noise=exp.perturb_noise,
    )
    return tokenizer, data_config


def stream_plan(exp: CanaryExperiment, base, data_config, tokenizer, canary_tokens) -> dict:
    """``steps`` of every arm and, when derived from ``epochs``, what one pass over the stream holds:
    ``background_documents`` and ``stream_tokens`` (None when ``experiment.steps`` is given, so
    that a large background is never read whole)."""
    canary_stream = exp.repeats * sum(len(t) for t in canary_tokens)
    if exp.steps:
        return dict(steps=exp.steps, background_documents=None, stream_tokens=None, canary_tokens=canary_stream)
    background = data.load_documents(dataclasses.replace(data_config, canary_repeats=0), "train")
    stream = data.tokenize_documents(background, tokenizer, data_config.add_bos, data_config.add_eos)
    stream += list(canary_tokens) * exp.repeats
    n_rows = data.rows_per_epoch([len(t) for t in stream], base.train.seq_len, data_config.mode)
    return dict(steps=max(1, math.ceil(exp.epochs * n_rows / base.train.global_batch)),
                background_documents=len(background), stream_tokens=int(sum(len(t) for t in stream)),
                canary_tokens=canary_stream)


def stream_description(meta: dict, exp: CanaryExperiment) -> str:
    """What the arms trained on, in words, for results.md."""
    if not meta["stream_tokens"]:
        return f"the background stream, {meta['steps']} steps"
    return (f"{meta['background_documents']:,} background documents ({meta['stream_tokens']:,} tokens per "
            f"epoch, {meta['canary_tokens'] / meta['stream_tokens']:.1%} canary tokens), {exp.epochs:g} "
            f"epoch(s) = {meta['steps']} steps")


RESULTS_COLUMNS = [tables.ARM, tables.TRAINS_ON, tables.MEMORIZED, tables.ROUGE_MEAN, tables.ROUGE_MEDIAN,
                   tables.EXACT_MATCH, tables.MIA_LOSS_AUC, tables.MIA_ZLIB_AUC, tables.HELDOUT_LOSS,
                   tables.FINAL_TRAIN_LOSS, tables.TRAIN_TIME]


def write_outputs(out: str, results: dict, exp: CanaryExperiment, base, meta: dict) -> str:
    """results.json, results.md, rougeL_hist.png and report/; returns the table."""
    table = tables.results_table(results, RESULTS_COLUMNS)
    copies = "times" if not exp.perturb_rate else (
        f"times as near-duplicates ({exp.perturb_rate:g} word edits per 100 words"
        f"{', case and whitespace noise' if exp.perturb_noise else ''})")
    description = (f"{exp.canaries} canaries of {exp.canary_tokens} tokens inserted {exp.repeats} {copies} into "
                   f"{stream_description(meta, exp)}; model d_model={base.model.d_model} x {base.model.n_layers} "
                   f"layers ({meta['parameters']:,} parameters), tokenizer {meta['vocab_size']} pieces.")
    tables.write_results(
        out, results, table, record={**meta, "experiment": dataclasses.asdict(exp)},
        heading="Canary experiment", description=description, paper_note=PAPER_NOTE,
        plot_title=(f"RougeL of {exp.canaries} canaries ({exp.canary_tokens} tokens, x{exp.repeats}), "
                    f"{exp.suffix_len}-token suffix"),
    )
    return table


def build_parser(prog: str | None = None):
    parser = cli.experiment_parser(prog, __doc__, "canary", "smoke | cpu | gpu | tpu (= tinyllama_1b)")
    parser.add_argument("--arms", default=None, help="comma-separated arms, e.g. standard,k3,k4,control")
    cli.add_run_arguments(parser, "canary", "experiment.repeats=20")
    return parser


def run(argv: Sequence[str] | None = None, *, command: str | None = None) -> dict:
    """Runs the experiment; returns ``{"out", "arms": {name: result}, "meta"}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command).parse_args(argv)
    overrides = ([f"experiment.arms=[{args.arms}]"] if args.arms else []) + list(args.overrides)
    path, preset, exp, base, out = cli.resolve_experiment(args, "canary", PRESET_ALIASES, overrides, CanaryExperiment)
    devices = select_devices(args.devices)
    tokenizer, data_config = prepare(base, exp, out)
    data.check_vocab_fits(tokenizer, base.model.vocab_size)
    injected, held_out = data.load_canaries(data_config)
    canary_tokens = corpus.document_tokens(injected, tokenizer, data_config)
    # Held-out canaries are the MIA non-members; background validation documents give the held-out loss.
    validation = corpus.validation_documents(data_config, exp.val_docs)
    eval_docs = evaluation.EvalDocuments(
        member_ids=[d.id for d in injected], member_tokens=canary_tokens,
        nonmember_tokens=corpus.document_tokens(held_out, tokenizer, data_config),
        heldout_tokens=corpus.document_tokens(validation, tokenizer, data_config))
    plan = stream_plan(exp, base, data_config, tokenizer, canary_tokens)
    meta = {**provenance(command or cli.script_command(), argv), "preset": preset,
            "config_file": os.path.relpath(path, REPO), "parameters": param_count(base.model),
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.path, **plan,
            "canary_ids": [d.id for d in injected], "heldout_canary_ids": [d.id for d in held_out]}
    where = (stream_description(meta, exp) if plan["stream_tokens"]
             else f"the background stream ({plan['steps']} steps given)")
    say(f"[canary] {len(injected)} canaries of {exp.canary_tokens} tokens x {exp.repeats} in {where}; "
        f"{plan['steps']} steps of {base.train.global_batch} x {base.train.seq_len}; arms: {', '.join(exp.arms)}; "
        f"model {meta['parameters']:,} parameters; output {out}")

    def configure(arm: Arm):
        arm_data = data_config if arm.name != "control" else dataclasses.replace(data_config, canary_repeats=0)
        return arm_config(base, arm, data=arm_data, steps=plan["steps"], run_dir=os.path.join(out, "arms", arm.name),
                          init_from=args.init_from)

    def evaluate(model, mesh, config, arm: Arm) -> dict:
        return evaluation.evaluate_arm(model, mesh, tokenizer, config, eval_docs, exp, arm.name)

    protocol = Protocol("canary", arm_label, configure, evaluate,
                        lambda results: write_outputs(out, results, exp, base, meta))
    results = run_arms(protocol, make_arms(exp, special_ids(tokenizer)), devices=devices, fresh=args.fresh, out=out)
    return {"out": out, "arms": results, "meta": meta}


def main(argv: Sequence[str] | None = None, *, command: str | None = None) -> None:
    cli.run_cli(run, argv, command)
