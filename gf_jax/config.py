"""The run configuration: typed dataclasses, loaded from YAML with dotted command-line overrides.

    config = load_config("configs/tiny.yaml", ["train.steps=50", "goldfish.k=3"])

Every key is checked against the dataclass fields at start-up: an unknown key fails with the list
of valid keys (and the closest match), a value of the wrong type fails with the type expected.
``save_config`` writes the resolved config as YAML so a run can be reproduced from its directory.

The sections are owned by the modules that use them: ``model`` (gf_jax.model.ModelConfig),
``mesh`` (gf_jax.sharding.MeshConfig), ``data`` (gf_jax.data.DataConfig), ``goldfish``
(gf_jax.goldfish.GoldfishConfig),
``loss`` (gf_jax.step.LossConfig), ``optimizer`` (gf_jax.optim.OptimizerConfig),
``distributed`` (gf_jax.distributed.DistributedConfig); ``train`` (TrainConfig, the host loop) is
defined here. Cross-section checks live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

from gf_jax.data import DataConfig
from gf_jax.distributed import DistributedConfig
from gf_jax.goldfish import GoldfishConfig
from gf_jax.model import ModelConfig
from gf_jax.optim import OptimizerConfig, validate_optimizer
from gf_jax.sharding import MeshConfig
from gf_jax.step import LossConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the host loop runs (what compiles is apart: model, goldfish, optimizer, loss).

    Attributes:
      steps: optimizer steps of the whole run (the lr schedule spans them).
      stop_at: stop (with a checkpoint) after this step without changing the schedule; 0 = run
        to ``steps``. Resuming the run directory continues to ``steps``.
      global_batch: sequences per optimizer step, over all devices and micro-batches.
      seq_len: tokens per sequence (<= model.max_seq_len).
      grad_accum: micro-batches per step; global_batch must be a multiple of it.
      log_every: steps between console / metrics.jsonl records.
      eval_every, eval_batches: held-out loss every N steps (0 = never) over the validation split
        (needs data.validation_fraction > 0), at most this many batches of it (0 = all).
      ckpt_every, keep_ckpts: checkpoint every N steps (0 = only at the end), keep the last K.
      async_checkpoint: write checkpoints in the background while training continues.
      run_dir: output directory (config.yaml, metrics.jsonl, checkpoints/); an existing one with
        checkpoints is resumed from its latest step.
      init_from: start a new run from the parameters of another run (``RUN_DIR`` or
        ``RUN_DIR@STEP``), with a fresh optimizer; "" = fresh parameters.
      init_adapters: LoRA: start the adapters from this PEFT adapter directory (its settings become
        ``model.lora``) instead of fresh ones; "" = fresh adapters.
      seed: parameter initialisation (and ``random`` goldfish strategy) seed.
      progress: show a progress bar on the console.
      tensorboard: also write TensorBoard events (tensorboardX) under RUN_DIR/tensorboard.
      wandb_project: also log to this Weights & Biases project (needs ``pip install wandb``).
    """

    steps: int = 200
    stop_at: int = 0
    global_batch: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 0
    ckpt_every: int = 100
    keep_ckpts: int = 3
    async_checkpoint: bool = True
    run_dir: str = "runs/default"
    init_from: str = ""
    init_adapters: str = ""
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    wandb_project: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run did: model, mesh, data, goldfish, loss, optimizer and train sections
    (+ how the processes of a multi-host run connect: ``distributed``)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    goldfish: GoldfishConfig = dataclasses.field(default_factory=GoldfishConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


# Keys that moved to another section: configs written before the move still load, with a note.
MOVED_KEYS = {
    **{f"train.{name}": f"optimizer.{name}" for name in (
        "lr", "warmup", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip")},
    "train.z_loss": "loss.z_loss",
    "train.loss_chunk_size": "loss.chunk_size",
}


def migrate_moved_keys(values: dict, note=None) -> dict:
    """``values`` with keys of ``MOVED_KEYS`` moved to their new sections (a note for each)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        section = values.get(old_section)
        if isinstance(section, dict) and old_key in section:
            new_section, new_key = new.split(".")
            target = values.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, section.pop(old_key))
                (note or _stderr_note)(f"config key {old} is now {new}; read as such (rename it in the file).")
    return values


def _stderr_note(line: str) -> None:
    import sys

    print(f"note: {line}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Typed conversion of plain (YAML) values into dataclasses.


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value, tp, key: str):
    """``value`` as type ``tp``, or a ValueError naming ``key`` and the type expected."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is not None and not isinstance(value, dict):
            raise _mismatch(value, tp, key)
        return from_dict(tp, value or {}, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(value, tp, key)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {key} must be one of {list(typing.get_args(tp))}, got {value!r}.")
        return value
    return _convert_scalar(value, tp, key)


def _mismatch(value, tp, key: str) -> ValueError:
    return ValueError(f"config key {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def _convert_union(value, tp, key: str):
    """The first member type of ``tp`` (``X | None``, ``int | str``) that takes ``value``."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(value, tp, key)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ValueError:
            pass
    raise _mismatch(value, tp, key)


def _convert_scalar(value, tp, key: str):
    """bool, int, float and str are checked strictly (True is not an int); other types pass."""
    if tp is float:
        # PyYAML reads "3e-4" (no dot) as a string: accept any string float() accepts.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise _mismatch(value, tp, key)
    if tp in (bool, str) and not isinstance(value, tp):
        raise _mismatch(value, tp, key)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _mismatch(value, tp, key)
    return value


def _unknown_key(cls, key: str, prefix: str):
    names = [f.name for f in dataclasses.fields(cls)]
    # Keys that moved out of this section are suggested at their new place.
    moved = {old[len(prefix):]: new for old, new in MOVED_KEYS.items() if prefix and old.startswith(prefix)}
    close = difflib.get_close_matches(key, names + list(moved), n=1)
    hint = f" (did you mean {moved.get(close[0], prefix + close[0])}?)" if close else ""
    where = f"under {prefix[:-1]}" if prefix else "at the top level"
    raise ValueError(
        f"unknown config key {prefix}{key}{hint}; valid keys {where} are: {', '.join(names)}."
    )


def from_dict(cls, values: dict, *, prefix: str = ""):
    """An instance of dataclass ``cls`` from a nested dict, every key and type checked."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix[:-1] or '(top)'} must be a mapping, got {values!r}.")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            _unknown_key(cls, str(key), prefix)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"config section {prefix[:-1] or '(top)'}: {e}.") from None


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) of a dataclass, suitable for YAML or JSON."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


# ---------------------------------------------------------------------------------------------
# Dotted overrides.


def _field_type(cls, path: list[str]):
    """Type of the field at ``path`` below dataclass ``cls``; unknown keys fail with the choices."""
    tp = cls
    for i, name in enumerate(path):
        prefix = "".join(p + "." for p in path[:i])
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"config key {prefix[:-1]} is not a section; it has no key {name}.")
        hints = _hints(tp)
        if name not in hints or name not in {f.name for f in dataclasses.fields(tp)}:
            _unknown_key(tp, name, prefix)
        tp = hints[name]
    return tp


def _is_str_type(tp) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def apply_overrides(cls, values: dict, overrides: Sequence[str]) -> dict:
    """``values`` (a nested dict for dataclass ``cls``) with ``key.sub=value`` overrides applied.

    Values are read as YAML (``true``, ``null``, ``[1, 2]``, numbers); a value for a string field
    stays the literal text (so ``train.run_dir=2024`` is the string "2024").
    """
    import yaml

    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.steps=100).")
        dotted, raw = item.split("=", 1)
        path = dotted.strip().split(".")
        tp = _field_type(cls, path)
        if _is_str_type(tp) and raw.strip() not in ("null", "~", "None"):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
        node = values
        for name in path[:-1]:
            child = node.get(name)
            child = dict(child) if isinstance(child, dict) else {}
            node[name] = child
            node = child
        node[path[-1]] = value
    return values


# ---------------------------------------------------------------------------------------------
# Loading, validation, saving.


def validate(config) -> None:
    """Cross-field checks that a single dataclass cannot make; raises a one-sentence ValueError."""
    t = config.train
    positive = ("steps", "global_batch", "seq_len", "grad_accum", "log_every", "keep_ckpts")
    for name in positive:
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}.")
    for name in ("stop_at", "eval_every", "eval_batches", "ckpt_every"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}.")
    if t.global_batch % t.grad_accum:
        raise ValueError(
            f"train.global_batch ({t.global_batch}) must be a multiple of train.grad_accum ({t.grad_accum})."
        )
    validate_optimizer(config.optimizer)
    if config.loss.z_loss < 0:
        raise ValueError(f"loss.z_loss must be >= 0, got {config.loss.z_loss}.")
    if config.loss.chunk_size < 0:
        raise ValueError(f"loss.chunk_size must be >= 0, got {config.loss.chunk_size}.")
    if t.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({config.model.max_seq_len}); "
            "lower train.seq_len or raise model.max_seq_len."
        )
    if not t.run_dir:
        raise ValueError("train.run_dir must name an output directory.")
    _validate_data(config)


def config_from_dict(values: dict, overrides: Sequence[str] = ()):
    """A validated RunConfig from a nested dict and dotted overrides."""
    values = migrate_moved_keys(values or {})
    config = from_dict(RunConfig, apply_overrides(RunConfig, values, _migrate_overrides(overrides)))
    validate(config)
    return config


def _migrate_overrides(overrides: Sequence[str]) -> list[str]:
    out = []
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if sep and dotted.strip() in MOVED_KEYS:
            new = MOVED_KEYS[dotted.strip()]
            _stderr_note(f"config key {dotted.strip()} is now {new}; read as such.")
            item = f"{new}={raw}"
        out.append(item)
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()):
    """A validated RunConfig from a YAML file (None: all defaults) and dotted overrides."""
    values: dict = {}
    if path is not None:
        values = read_yaml_mapping(path, "config file", "pass e.g. --config configs/tiny.yaml")
    return config_from_dict(values, overrides)


def read_yaml_mapping(path: str, what: str, hint: str) -> dict:
    """The mapping of sections in a YAML file; a missing file or a non-mapping is one sentence."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist; {hint}.")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ValueError(f"{what} {path} is not valid YAML{where} ({problem}); fix the file there.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of sections (model, data, train, ...).")
    return values


def dump_config(config) -> str:
    """The config as YAML text (sections in declaration order)."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_config(config, path: str) -> None:
    """Writes the resolved config as YAML (atomically: a crash never leaves half a file)."""
    from gf_jax import rundir

    rundir.write_text(path, dump_config(config))


# ---------------------------------------------------------------------------------------------
# Cross-section checks of the data section (data x train, data x goldfish): the one place for
# them, so no module re-checks a combination when it starts.


def _validate_data(config) -> None:
    """Checks that ``data`` fits ``train`` and ``goldfish``; raises a one-sentence ValueError."""
    d, t, g = config.data, config.train, config.goldfish
    if t.eval_every > 0 and d.validation_fraction <= 0:
        raise ValueError(
            "train.eval_every > 0 needs a validation split; set data.validation_fraction > 0 "
            "(e.g. 0.05) or train.eval_every=0."
        )
    if g.strategy == "hash" and 0 < d.row_context < g.h:
        # With C < h a row that starts mid-document cannot see its first targets' whole hash
        # windows, so it drops them all instead of getting its document's mask.
        raise ValueError(
            f"data.row_context ({d.row_context}) is shorter than the goldfish hash window goldfish.h "
            f"({g.h}); set data.row_context >= {g.h} (or 0 for no row context)."
        )
