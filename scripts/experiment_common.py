"""Shared machinery of the paper-reproduction scripts (memorization_experiment.py, canary_experiment.py).

An experiment file is a run config (``model``, ``mesh``, ``data``, ``goldfish``, ``train``: see
``gf_jax.config``) plus an ``experiment`` section owned by the script. Every arm is that run
config with its own goldfish settings, documents and run directory; arms are trained one after
the other in this process (the tokenizer and documents are prepared once) with
``gf_jax.train.Trainer`` and evaluated in memory with ``gf_jax.evaluate``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIR = os.path.join(REPO, "configs", "experiments")


# ---------------------------------------------------------------------------------------------
# Experiment files: run config + ``experiment`` section, presets, overrides.


def preset_path(kind: str, preset: str, aliases: dict[str, str]) -> str:
    """``configs/experiments/<kind>_<preset>.yaml`` (after aliases); raises with the choices."""
    name = aliases.get(preset, preset)
    path = os.path.join(PRESET_DIR, f"{kind}_{name}.yaml")
    if not os.path.isfile(path):
        found = sorted(f[len(kind) + 1:-5] for f in os.listdir(PRESET_DIR) if f.startswith(kind + "_") and f.endswith(".yaml"))
        raise ValueError(f"no preset {preset!r} for the {kind} experiment; use one of "
                         f"{', '.join(sorted(set(found) | set(aliases)))} or --config FILE.")
    return path


def load_experiment(path: str, overrides: Sequence[str], experiment_cls):
    """(experiment settings, validated base RunConfig) from an experiment YAML and overrides.

    Overrides starting with ``experiment.`` go to the experiment section, the others to the run
    config; both are checked key by key (unknown keys fail with the valid ones listed).
    """
    from gf_jax.config import apply_overrides, config_from_dict, from_dict, read_yaml_mapping

    values = read_yaml_mapping(path, "experiment config", "pass --preset NAME or an existing --config")
    # The section inside a one-field dataclass, so that error messages name ``experiment.<key>``.
    holder = dataclasses.make_dataclass(
        "ExperimentFile", [("experiment", experiment_cls, dataclasses.field(default_factory=experiment_cls))])
    exp_values = {"experiment": values.pop("experiment", None) or {}}
    exp_overrides = [o for o in overrides if o.startswith("experiment.")]
    run_overrides = [o for o in overrides if not o.startswith("experiment.")]
    experiment = from_dict(holder, apply_overrides(holder, exp_values, exp_overrides)).experiment
    return experiment, config_from_dict(values, run_overrides)


def replace(config, **sections):
    """``config`` with fields of its sections replaced: ``replace(c, train={"steps": 5})``."""
    return dataclasses.replace(config, **{
        name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()
    })


# ---------------------------------------------------------------------------------------------
# Documents.


def write_jsonl(docs, path: str, *, id_key: str = "id", text_key: str = "text") -> str:
    """Writes ``gf_jax.data.Document``s as JSONL, atomically (every host of a pod may write the
    same file); read back with ``data.id_field=id_key``, ``data.text_field=text_key``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({id_key: d.id, text_key: d.text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def truncate_to_tokens(text: str, tokenizer, n_tokens: int) -> str | None:
    """The longest prefix of ``text`` made of whole tokens that encodes to exactly ``n_tokens``
    tokens (None if the text is shorter). The tokenizer round-trips exactly, so the prefix is
    the original text cut at a token boundary."""
    ids = tokenizer.encode([text])[0]
    if len(ids) < n_tokens:
        return None
    # Re-encoding a cut text can segment its end differently (one token more or less): try the
    # cuts nearest n_tokens until one re-encodes to exactly n_tokens.
    for delta in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8):
        cut = n_tokens + delta
        if 0 < cut <= len(ids):
            prefix = tokenizer.decode([ids[:cut]])[0]
            if len(tokenizer.encode([prefix])[0]) == n_tokens:
                return prefix
    raise ValueError(f"no cut of a {len(ids)}-token document re-encodes to exactly {n_tokens} tokens; "
                     "choose another experiment.doc_tokens / canary_tokens.")


def corpus_tokenizer(data_config, texts: Sequence[str]):
    """``data.tokenizer`` if set, else a sentencepiece model of ``data.vocab_size`` pieces trained on
    ``texts`` (cached in ``data.tokenizer_cache_dir``, keyed by content)."""
    from gf_jax.tokenizer import Tokenizer, cached_tokenizer

    if data_config.tokenizer:
        return Tokenizer.load(data_config.tokenizer)
    return cached_tokenizer(list(texts), data_config.vocab_size, data_config.tokenizer_cache_dir)


def sample_texts(data_config, *, max_chars: int) -> list[str]:
    """Texts of the training split of a source, in order, until ``max_chars`` characters (the
    tokenizer's training text; canaries excluded)."""
    from gf_jax import data

    docs = data.read_background(data_config)
    texts, n_chars = [], 0
    for start in range(0, len(docs), 4096):
        indices = range(start, min(start + 4096, len(docs)))
        chunk = docs.get_many(indices) if hasattr(docs, "get_many") else [docs[i] for i in indices]
        for d in chunk:
            if data.split_of(d.id, data_config.validation_fraction) == "train":
                texts.append(d.text)
                n_chars += len(d.text)
        if n_chars >= max_chars:
            break
    return texts


def document_tokens(docs, tokenizer, data_config) -> list[list[int]]:
    """Token ids of each document exactly as the data pipeline frames them (BOS/EOS)."""
    from gf_jax import data

    return [t.tolist() for t in data.tokenize_documents(docs, tokenizer, data_config.add_bos, data_config.add_eos)]


def rows_per_epoch(lengths: Sequence[int], seq_len: int, mode: str) -> int:
    """Rows of T+1 tokens the pipeline cuts one pass over documents of these lengths into."""
    lengths = np.asarray(lengths, np.int64)
    if mode == "packed":
        return max(1, -(-(int(lengths.sum()) - 1) // seq_len))
    return int(np.maximum(0, -(-(lengths - 1) // seq_len)).sum())


# ---------------------------------------------------------------------------------------------
# Training and evaluating one arm.


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model of an experiment: a name, its goldfish settings and what it trains on."""

    name: str
    goldfish: Any                  # gf_jax.goldfish.GoldfishConfig
    trains_on: str                 # human-readable, for the table
    data: dict = dataclasses.field(default_factory=dict)  # DataConfig fields of this arm


def is_main() -> bool:
    """Only process 0 of a multi-host run writes the results and prints."""
    import jax

    return jax.process_index() == 0


def say(line: str) -> None:
    if is_main():
        print(line, flush=True)


def select_devices(n: int):
    """The first ``n`` devices (0 = all)."""
    import jax

    devices = jax.devices()
    if n < 0 or n > len(devices):
        raise ValueError(f"--devices {n} but {len(devices)} devices are visible; use 0 (all) or 1..{len(devices)}.")
    return devices[:n] if n else devices


def train_arm(config, *, devices, init_from: str | None = None, fresh: bool = False):
    """Trains one arm (resuming its run directory if it has checkpoints); returns
    (model, mesh, summary) with the trained model in memory on the training mesh."""
    from flax import nnx

    from gf_jax.train import Trainer

    run_dir = config.train.run_dir
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    trainer = Trainer(config, devices=devices)
    if init_from and trainer.resume_step is None:
        _load_initial_weights(trainer, init_from)
    summary = trainer.run()
    model = nnx.merge(trainer.fns.model_graphdef, trainer.model_state)
    summary = dict(summary, seconds=time.perf_counter() - t0, resumed_from=trainer.resume_step)
    summary.update(last_metrics(run_dir))
    mesh = trainer.mesh
    # Keep only the parameters: the optimizer state (2x the model) is not needed to evaluate.
    trainer.opt_state = None
    return model, mesh, summary


def _load_initial_weights(trainer, run_dir: str) -> None:
    """Starts ``trainer`` from the parameters of another run's latest checkpoint (fresh optimizer)."""
    import jax
    from flax import nnx

    from gf_jax.checkpoint import load_model

    model, _, _ = load_model(run_dir, mesh=trainer.mesh)
    state = nnx.state(model)
    want = jax.tree.structure(trainer.model_state)
    if jax.tree.structure(state) != want:
        raise ValueError(f"--init-from {run_dir} holds a model of another shape than model.*; use the same model settings.")
    trainer.model_state = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), state, trainer.model_state)
    trainer.log(f"[experiment] initial weights from {run_dir}")


def last_metrics(run_dir: str) -> dict:
    """The final training record of a run (loss over all / kept targets, drop rate, speed)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    last: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line) if line.strip() else {}
                if "loss_all" in record:
                    last = record
    keys = ("loss", "loss_all", "loss_dropped", "drop_fraction", "supervised_tokens", "input_tokens", "tokens_per_s")
    return {f"final_{k}" if k.startswith("loss") else k: last.get(k) for k in keys}


def eval_mesh(mesh):
    """The mesh to evaluate on: None for a single device (plain jit), else the training mesh."""
    return None if mesh.devices.size == 1 else mesh


def suffix_drop_counts(docs_tokens, goldfish_config, suffix_len: int, eos_id: int) -> list[int | None]:
    """How many of each document's suffix targets the arm's goldfish mask leaves out of training
    (None for ``random``, whose mask changes every step). Rows start at the document's first
    token, as in document mode, so the mask is the one training used."""
    import jax.numpy as jnp

    from gf_jax.goldfish import goldfish_mask

    if goldfish_config.strategy == "random":
        return [None] * len(docs_tokens)
    out = []
    for tokens in docs_tokens:
        tokens = list(tokens)
        end = len(tokens) - 1 if tokens and tokens[-1] == eos_id else len(tokens)
        targets = jnp.asarray(tokens[1:], jnp.int32)[None]
        drop = np.asarray(goldfish_mask(targets, goldfish_config, positions_BxT=jnp.arange(targets.shape[1])[None]))[0]
        # Token j of the document is target j - 1.
        out.append(int(drop[end - suffix_len - 1:end - 1].sum()))
    return out


# ---------------------------------------------------------------------------------------------
# Tables, plots, provenance.


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def markdown(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def plot_rouge_panels(per_arm: dict[str, list[float]], path: str, *, title: str, xlabel: str = "RougeL") -> str:
    """One histogram panel per arm on a shared [0, 1] axis (the paper's Figure 2 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(per_arm)
    cols = n if n <= 5 else -(-n // 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows + 0.5), dpi=100,
                             sharex=True, sharey=True, squeeze=False)
    bins = np.linspace(0.0, 1.0, 21)
    for i, (name, values) in enumerate(per_arm.items()):
        ax = axes[i // cols][i % cols]
        ax.hist(values, bins=bins, color=f"C{i % 10}", alpha=0.8)
        ax.set_title(f"{name}\nmean {np.mean(values):.2f}", fontsize=9)
        ax.set_xlim(0, 1)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    for i in range(n):  # every panel gets its own x axis labels (a short last row leaves gaps)
        ax = axes[i // cols][i % cols]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel(xlabel, fontsize=8)
    for row in axes:
        row[0].set_ylabel("documents", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def provenance(argv: Sequence[str]) -> dict:
    """Date, machine and command of a run, for the results file."""
    import jax

    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "?"]
                            + list(argv)),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {jax.device_count()} x {device.device_kind} "
                   f"({device.platform}), jax {jax.__version__}",
    }


def _plain(value):
    # JSON has no NaN and no numpy types: NaN -> null, numpy -> Python.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def special_ids(tokenizer) -> tuple[int, ...]:
    """BOS/EOS/PAD ids the tokenizer has: the goldfish arms never drop them."""
    return tuple(i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i >= 0)


def record_arm(tag: str, name: str, arm, label: str, config, summary: dict, result: dict) -> dict:
    """Annotates an arm's evaluation with how it was trained and logs its memorization line."""
    result.update(label=label, trains_on=arm.trains_on, run_dir=config.train.run_dir,
                  goldfish=dataclasses.asdict(arm.goldfish), train=summary)
    agg = result["memorization"]["aggregate"]
    say(f"[{tag}] arm {name}: memorized {agg['n_memorized']}/{agg['n_documents']}, "
        f"RougeL {agg['rougeL_mean']:.3f}, exact match {agg['exact_match_mean']:.3f}")
    return result


def print_summary(table: str, out: str) -> None:
    """The last thing an experiment prints: its table and where the outputs went."""
    print()
    print(table)
    print(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')}, "
          f"{os.path.join(out, 'rougeL_hist.png')}, report/")


def cli_main(run, argv: Sequence[str] | None = None) -> None:
    """Runs an experiment; a user error (bad preset, key, path) is one line and exit status 2."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_json(obj, path: str) -> str:
    with open(path, "w") as f:
        json.dump(_plain(obj), f, indent=1)
    return path
