"""Arms and experiment files.

An experiment file is a run config (``model``, ``mesh``, ``data``, ``goldfish``, ``train``: see
``gf_jax.config``) plus an ``experiment`` section owned by the protocol. Every arm is that run
config with its own goldfish settings, documents and run directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from gf_jax.config import apply_overrides, config_from_dict, from_dict, read_yaml_mapping, replace_sections
from gf_jax.goldfish import GoldfishConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Presets live in the source checkout, next to the other configs; --config takes any file.
PRESET_DIR = os.path.join(REPO, "configs", "experiments")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model of an experiment: a name, its goldfish settings and what it trains on."""

    name: str
    goldfish: GoldfishConfig
    trains_on: str  # human-readable, for the table
    lora: bool = False  # trains LoRA adapters on a frozen base (the protocol supplies the settings)


def special_ids(tokenizer) -> tuple[int, ...]:
    """BOS/EOS/PAD ids the tokenizer has: the goldfish arms never drop them."""
    return tuple(i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i >= 0)


def preset_path(kind: str, preset: str, aliases: dict[str, str]) -> str:
    """``configs/experiments/<kind>_<preset>.yaml`` (after aliases); raises with the choices."""
    name = aliases.get(preset, preset)
    path = os.path.join(PRESET_DIR, f"{kind}_{name}.yaml")
    if not os.path.isfile(path):
        found = sorted(f[len(kind) + 1:-5] for f in os.listdir(PRESET_DIR)
                       if f.startswith(kind + "_") and f.endswith(".yaml"))
        raise ValueError(f"no preset {preset!r} for the {kind} experiment; use one of "
                         f"{', '.join(sorted(set(found) | set(aliases)))} or --config FILE.")
    return path


def load_experiment(path: str, overrides: Sequence[str], experiment_cls):
    """(experiment settings, validated base RunConfig) from an experiment YAML and overrides.

    Overrides starting with ``experiment.`` go to the experiment section, the others to the run
    config; both are checked key by key (unknown keys fail with the valid ones listed).
    """
    values = read_yaml_mapping(path, "experiment config", "pass --preset NAME or an existing --config")
    # The section inside a one-field dataclass, so that error messages name ``experiment.<key>``.
    holder = dataclasses.make_dataclass(
        "ExperimentFile", [("experiment", experiment_cls, dataclasses.field(default_factory=experiment_cls))])
    exp_values = {"experiment": values.pop("experiment", None) or {}}
    exp_overrides = [o for o in overrides if o.startswith("experiment.")]
    run_overrides = [o for o in overrides if not o.startswith("experiment.")]
    experiment = from_dict(holder, apply_overrides(holder, exp_values, exp_overrides)).experiment
    return experiment, config_from_dict(values, run_overrides)


def arm_config(base, arm: Arm, *, data, steps: int, run_dir: str, init_from: str | None):
    """The validated run config of one arm: its data, goldfish settings, step count and run dir.

    ``init_from`` (a run directory, or ``RUN_DIR@STEP``) starts the arm from that run's parameters
    with a fresh optimizer; the trainer honours ``train.init_from`` itself.
    """
    train = dict(steps=steps, stop_at=0, run_dir=run_dir, eval_every=0)
    if init_from:
        train["init_from"] = init_from
    # A warm-up longer than the run would never reach the peak learning rate.
    optimizer = dict(warmup=min(base.optimizer.warmup, steps - 1))
    if arm.goldfish.strategy == "hash" and 0 < data.row_context < arm.goldfish.reach:
        # A row that starts mid-document needs its arm's whole hash reach as context.
        data = dataclasses.replace(data, row_context=arm.goldfish.reach)
    return replace_sections(base, data=data, goldfish=arm.goldfish, train=train, optimizer=optimizer)
