"""Config files into typed dataclasses: every key and value checked, dotted overrides, moved keys.

    values = read_yaml_mapping("configs/tiny.yaml", "config file", "pass --config FILE")
    config = from_dict(RunConfig, apply_overrides(RunConfig, values, ["train.steps=50"]))

Every key is checked against the dataclass fields: an unknown key fails with the list of valid
keys (and the closest match), a value of the wrong type with the type expected, a ``Literal``
field's value outside its choices with the choices. Nothing here knows the run's sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from gf_jax.util import paths

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


def read_yaml_mapping(path: str, what: str, hint: str) -> dict:
    """The mapping of sections in a YAML file (local or a URL); a missing file or a non-mapping is
    one sentence."""
    if not paths.is_file(path):
        raise FileNotFoundError(f"{what} {path} does not exist; {hint}.")
    try:
        values = yaml.safe_load(paths.read_text(path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ValueError(f"{what} {path} is not valid YAML{where} ({problem}); fix the file there.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of sections (model, data, train, ...).")
    return values


def migrate_overrides(overrides: Sequence[str]) -> list[str]:
    out = []
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if sep and dotted.strip() in MOVED_KEYS:
            new = MOVED_KEYS[dotted.strip()]
            _stderr_note(f"config key {dotted.strip()} is now {new}; read as such.")
            item = f"{new}={raw}"
        out.append(item)
    return out


def dump_yaml(config) -> str:
    """A dataclass as YAML text (sections in declaration order)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
