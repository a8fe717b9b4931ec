"""The paper's standard setting in one command: canary documents repeated M times inside a larger
corpus, trained with standard loss, goldfish loss at several k, and without canaries (control);
RougeL of the extracted canary suffixes per arm (the paper's Figure 2).

    python scripts/canary_experiment.py --preset cpu                   # < 20 min on 2 CPU cores
    python scripts/canary_experiment.py --preset smoke                 # seconds (CI)
    python scripts/canary_experiment.py --preset tpu                   # TinyLlama-1.1B, see the YAML
    python scripts/canary_experiment.py --arms standard,k4,control experiment.repeats=20

Protocol (Hans et al. 2024, section 4.2, in miniature): the first ``canaries`` documents of the
canary corpus with at least ``canary_tokens`` tokens are cut to exactly that length and inserted
``repeats`` times each at random places of the background stream by the data pipeline
(``data.canary_*``); the next ``heldout_canaries`` are never inserted (membership-inference
non-members). Every arm trains the same number of steps (``epochs`` passes over the stream with
canaries) from the same initialisation; the control arm's stream has no canaries. Then
``gf_jax.evaluate`` greedily decodes the last ``suffix_len`` tokens of every inserted canary.

Outputs in ``--out`` (default ``runs/canary_<preset>``): ``results.json``, ``results.md``,
``rougeL_hist.png`` (one panel per arm), ``report/`` (gf_jax.report), ``corpus/canaries.jsonl``,
``arms/<arm>/`` (run directories).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import experiment_common as common  # noqa: E402

PRESET_ALIASES = {"tpu": "tinyllama_1b"}
DEFAULT_ARMS = ("standard", "k3", "k4", "k8", "k32", "k128", "control")
CANARY_FORMATS = {"wikitext": ("text", "wikitext"), "text": ("text", "blank_line"), "jsonl": ("jsonl", "file")}


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
      arms: ``standard``, ``control`` and ``k<N>`` (goldfish with drop rate 1/N).
      strategy, h: goldfish strategy of the ``k<N>`` arms and its hash context width.
      suffix_len, prefix_len: extraction (prefix null: all of the canary before the suffix).
      eval_batch: prompts decoded per batch.
      steps: > 0 sets ``train.steps`` directly, without reading the whole background to count
        its tokens (large corpora); 0 derives it from ``epochs``.
      val_docs: background documents of the validation split (``data.validation_fraction``) for
        the held-out loss, the first ones found.
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

    def __post_init__(self):
        if self.steps < 0 or self.val_docs < 0:
            raise ValueError("experiment.steps and experiment.val_docs must be >= 0.")
        for name in ("canaries", "heldout_canaries", "canary_tokens", "repeats", "suffix_len", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.epochs > 0:
            raise ValueError(f"experiment.epochs must be > 0, got {self.epochs}.")
        if self.canary_format not in CANARY_FORMATS:
            raise ValueError(f"experiment.canary_format={self.canary_format!r}; use one of {', '.join(CANARY_FORMATS)}.")
        bad = [a for a in self.arms if a not in ("standard", "control") and not re.fullmatch(r"k([2-9]|[1-9]\d+)", a)]
        if bad or not self.arms:
            raise ValueError(f"experiment.arms has {bad[0] if bad else 'no arm'}; use standard, control or k<N> "
                             "with N >= 2 (e.g. k4).")
        if self.suffix_len + 3 > self.canary_tokens:
            raise ValueError(f"experiment.suffix_len={self.suffix_len} leaves no prompt in canaries of "
                             f"{self.canary_tokens} tokens; raise experiment.canary_tokens or lower suffix_len.")


def make_arms(exp: CanaryExperiment, special_ids: tuple[int, ...]) -> dict[str, common.Arm]:
    from gf_jax.goldfish import GoldfishConfig

    arms = {}
    for name in exp.arms:
        if name in ("standard", "control"):
            trains_on = "background + canaries" if name == "standard" else "background only"
            arms[name] = common.Arm(name, GoldfishConfig(strategy="none"), trains_on)
        else:
            g = GoldfishConfig(strategy=exp.strategy, k=int(name[1:]), h=exp.h, never_drop_ids=special_ids)
            arms[name] = common.Arm(name, g, "background + canaries")
    return arms


def arm_label(arm: common.Arm) -> str:
    if arm.name == "standard":
        return "standard loss"
    if arm.name == "control":
        return "control (no canaries)"
    return f"{arm.goldfish.k}-GL ({arm.goldfish.strategy})"


# ---------------------------------------------------------------------------------------------


def prepare(base, exp: CanaryExperiment, out: str):
    """(tokenizer, canary-carrying data config): the canary file written, the tokenizer trained on
    the background's training documents plus the canary corpus (as a pre-trained tokenizer would
    cover both)."""
    from gf_jax import data

    source, rule = CANARY_FORMATS[exp.canary_format]
    if not os.path.exists(exp.canary_corpus):
        raise FileNotFoundError(f"the canary corpus {exp.canary_corpus!r} does not exist; set "
                                "experiment.canary_corpus to a WikiText-style .txt or a .jsonl of documents.")
    canary_pool = data.read_background(data.DataConfig(source=source, path=exp.canary_corpus, split_rule=rule,
                                                        text_field=exp.canary_text_field,
                                                        id_field=exp.canary_id_field))
    texts = []
    if not base.data.tokenizer:  # train one (a given tokenizer needs no reading)
        texts = common.sample_texts(base.data, max_chars=50_000_000) + [d.text for d in canary_pool]
    tokenizer = common.corpus_tokenizer(base.data, texts)
    n_special = int(base.data.add_bos) + int(base.data.add_eos)
    need = exp.canaries + exp.heldout_canaries
    chosen = []
    for doc in canary_pool:
        text = common.truncate_to_tokens(doc.text, tokenizer, exp.canary_tokens - n_special)
        if text is not None:
            chosen.append(data.Document(doc.id, text))
        if len(chosen) == need:
            break
    if len(chosen) < need:
        raise ValueError(f"the canary corpus {exp.canary_corpus!r} has only {len(chosen)} documents of at least "
                         f"{exp.canary_tokens} tokens but {need} are needed; lower experiment.canaries, "
                         "experiment.heldout_canaries or experiment.canary_tokens.")
    # The pipeline reads canaries with the background's JSONL keys; a text background ignores
    # data.id_field, so the canaries can keep their corpus ids there.
    id_field = base.data.id_field or ("id" if base.data.source == "text" else None)
    path = common.write_jsonl(chosen, os.path.join(out, "corpus", "canaries.jsonl"), id_key=id_field or "id",
                              text_key=base.data.text_field)
    data_config = dataclasses.replace(
        base.data, tokenizer=tokenizer.path, canary_path=path, canary_count=exp.canaries,
        canary_repeats=exp.repeats, id_field=id_field,
    )
    return tokenizer, data_config


def validation_documents(data_config, limit: int, scan: int = 200_000) -> list:
    """The first ``limit`` background documents of the validation split (scanning at most ``scan``)."""
    from gf_jax import data

    if limit == 0 or data_config.validation_fraction <= 0:
        return []
    background = data.read_background(data_config)
    found = []
    for start in range(0, min(len(background), scan), 1024):
        indices = range(start, min(start + 1024, len(background)))
        chunk = background.get_many(indices) if hasattr(background, "get_many") else [background[i] for i in indices]
        found += [d for d in chunk if data.split_of(d.id, data_config.validation_fraction) == "validation"]
        if len(found) >= limit:
            break
    return found[:limit]


def arm_config(base, arm: common.Arm, data_config, steps: int, run_dir: str):
    from gf_jax.config import validate

    config = dataclasses.replace(
        base,
        data=data_config if arm.name != "control" else dataclasses.replace(data_config, canary_repeats=0),
        goldfish=arm.goldfish,
    )
    config = common.replace(config, train=dict(steps=steps, stop_at=0, run_dir=run_dir, eval_every=0,
                                               warmup=min(base.train.warmup, steps - 1)))
    validate(config)
    return config


def evaluate_arm(model, mesh, tokenizer, config, exp, canary_docs, canary_tokens, heldout_tokens, val_tokens):
    from gf_jax import data, evaluate

    mesh = common.eval_mesh(mesh)
    batch = exp.eval_batch
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch = -(-batch // dp) * dp
    per_doc, aggregate = evaluate.evaluate_memorization(
        model, tokenizer, canary_tokens, doc_ids=[d.id for d in canary_docs], suffix_len=exp.suffix_len,
        prefix_len=exp.prefix_len, batch_size=batch, mesh=mesh, progress="extraction",
    )
    result = {"memorization": {"per_doc": per_doc, "aggregate": aggregate},
              "mia": evaluate.membership_inference(model, tokenizer, canary_tokens, heldout_tokens, batch_size=batch,
                                                   mesh=mesh, progress="MIA")}
    if val_tokens:
        batches = data.eval_batches([np.asarray(t, np.int32) for t in val_tokens], global_batch=batch,
                                    seq_len=config.train.seq_len, pad_id=tokenizer.pad_id, mode=config.data.mode,
                                    process_index=0, process_count=1)
        loss, ppl = evaluate.heldout_loss(model, batches, mesh=mesh)
        result["heldout"] = {"loss": loss, "perplexity": ppl, "n_documents": len(val_tokens)}
    return result


def results_rows(results: dict) -> list[list[str]]:
    rows = [["arm", "trains on", "memorized", "RougeL mean", "RougeL median", "exact match", "MIA loss AUC",
             "MIA zlib AUC", "held-out loss", "final train loss (all tokens)", "train time"]]
    for r in results.values():
        agg, mia, t = r["memorization"]["aggregate"], r["mia"], r["train"]
        rows.append([
            r["label"], r["trains_on"], f"{agg['n_memorized']}/{agg['n_documents']}",
            common.fmt(agg["rougeL_mean"], ".3f"), common.fmt(agg["rougeL_median"], ".3f"),
            common.fmt(agg["exact_match_mean"], ".3f"), common.fmt(mia["loss"]["auc"], ".2f"),
            common.fmt(mia["zlib"]["auc"], ".2f"), common.fmt(r.get("heldout", {}).get("loss"), ".3f"),
            common.fmt(t.get("final_loss_all"), ".3f"), f"{t['seconds']:.0f} s",
        ])
    return rows


def write_outputs(out: str, results: dict, exp, base, meta: dict) -> str:
    from gf_jax import evaluate

    table = common.markdown(results_rows(results))
    common.write_json({**meta, "experiment": dataclasses.asdict(exp), "arms": results},
                      os.path.join(out, "results.json"))
    common.plot_rouge_panels(
        {r["label"]: [d["rougeL"] for d in r["memorization"]["per_doc"]] for r in results.values()},
        os.path.join(out, "rougeL_hist.png"),
        title=f"RougeL of {exp.canaries} canaries ({exp.canary_tokens} tokens, x{exp.repeats}), {exp.suffix_len}-token suffix",
    )
    evaluate.write_report({r["label"]: r for r in results.values()}, os.path.join(out, "report"),
                          title=f"Canary experiment ({meta.get('preset')})")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Canary experiment: {meta.get('preset')}\n\n{meta['date']}, {meta['machine']}\n\n`{meta['command']}`\n\n")
        if meta["stream_tokens"]:
            stream = (f"{meta['background_documents']:,} background documents ({meta['stream_tokens']:,} tokens per "
                      f"epoch, {meta['canary_tokens'] / meta['stream_tokens']:.1%} canary tokens), {exp.epochs:g} "
                      f"epoch(s) = {meta['steps']} steps")
        else:
            stream = f"the background stream, {meta['steps']} steps"
        f.write(f"{exp.canaries} canaries of {exp.canary_tokens} tokens inserted {exp.repeats} times into {stream}; "
                f"model d_model={base.model.d_model} x {base.model.n_layers} layers ({meta['parameters']:,} "
                f"parameters), tokenizer {meta['vocab_size']} pieces.\n\n")
        f.write(table)
        f.write("\nPaper (TinyLlama-1.1B from scratch, 20B tokens of RedPajama, 2000 canaries x 50): at k = 3 and 4 "
                "the canaries' RougeL distribution nearly coincides with the control's; standard loss shows "
                "verbatim recall.\n\n![RougeL per arm](rougeL_hist.png)\n")
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="smoke | cpu | gpu | tpu (= tinyllama_1b): "
                   "configs/experiments/canary_<preset>.yaml")
    p.add_argument("--config", default=None, help="an experiment YAML instead of a preset")
    p.add_argument("--arms", default=None, help="comma-separated arms, e.g. standard,k3,k4,control")
    p.add_argument("--out", default=None, help="output directory (default: runs/canary_<preset>)")
    p.add_argument("--init-from", default=None, help="start every arm from this run directory's weights")
    p.add_argument("--devices", type=int, default=0, help="train on the first N devices (0 = all)")
    p.add_argument("--fresh", action="store_true", help="retrain arms whose run directories exist")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. experiment.repeats=20")
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    path = args.config or common.preset_path("canary", args.preset, PRESET_ALIASES)
    preset = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.preset
    overrides = ([f"experiment.arms=[{args.arms}]"] if args.arms else []) + list(args.overrides)
    exp, base = common.load_experiment(path, overrides, CanaryExperiment)
    out = args.out or os.path.join("runs", f"canary_{preset}")
    os.makedirs(out, exist_ok=True)
    devices = common.select_devices(args.devices)

    from gf_jax import data
    from gf_jax.model import param_count

    tokenizer, data_config = prepare(base, exp, out)
    data.check_vocab_fits(tokenizer, base.model.vocab_size)
    injected, held_out = data.load_canaries(data_config)
    canary_tokens = common.document_tokens(injected, tokenizer, data_config)
    heldout_tokens = common.document_tokens(held_out, tokenizer, data_config)
    val_tokens = common.document_tokens(validation_documents(data_config, exp.val_docs), tokenizer, data_config)
    canary_stream = exp.repeats * sum(len(t) for t in canary_tokens)
    if exp.steps:  # given: the background is never read whole
        steps, n_background, stream_tokens = exp.steps, None, None
        where = f"the background stream ({steps} steps given)"
    else:
        background = data.load_documents(dataclasses.replace(data_config, canary_repeats=0), "train")
        lengths = [len(t) for t in common.document_tokens(background, tokenizer, data_config)]
        lengths += [len(t) for t in canary_tokens] * exp.repeats
        n_rows = common.rows_per_epoch(lengths, base.train.seq_len, data_config.mode)
        steps = max(1, math.ceil(exp.epochs * n_rows / base.train.global_batch))
        n_background, stream_tokens = len(background), int(sum(lengths))
        where = (f"{n_background:,} background documents ({stream_tokens:,} tokens/epoch, "
                 f"{canary_stream / stream_tokens:.1%} canaries)")
    meta = {**common.provenance(argv), "preset": preset, "config_file": os.path.relpath(path, common.REPO),
            "parameters": param_count(base.model), "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.path,
            "background_documents": n_background, "stream_tokens": stream_tokens, "canary_tokens": canary_stream,
            "steps": steps, "canary_ids": [d.id for d in injected], "heldout_canary_ids": [d.id for d in held_out]}
    common.say(f"[canary] {len(injected)} canaries of {exp.canary_tokens} tokens x {exp.repeats} in {where}; "
          f"{steps} steps of {base.train.global_batch} x {base.train.seq_len}; arms: {', '.join(exp.arms)}; "
          f"model {meta['parameters']:,} parameters; output {out}")

    results: dict = {}
    for name, arm in make_arms(exp, common.special_ids(tokenizer)).items():
        config = arm_config(base, arm, data_config, steps, os.path.join(out, "arms", name))
        common.say(f"[canary] arm {name}: {arm_label(arm)}")
        model, mesh, summary = common.train_arm(config, devices=devices, init_from=args.init_from, fresh=args.fresh)
        result = evaluate_arm(model, mesh, tokenizer, config, exp, injected, canary_tokens, heldout_tokens, val_tokens)
        results[name] = common.record_arm("canary", name, arm, arm_label(arm), config, summary, result)
        del model
        if common.is_main():  # after every arm: partial results survive an interruption
            table = write_outputs(out, results, exp, base, meta)
    if common.is_main():
        common.print_summary(table, out)
    return {"out": out, "arms": results, "meta": meta}


def main(argv: Sequence[str] | None = None) -> None:
    common.cli_main(run, argv)


if __name__ == "__main__":
    main()
