"""What every config section shares: choices checked from their ``Literal`` types, and the
field metadata that marks a model field as part of the architecture.

A section (a frozen dataclass such as ``ModelConfig``) calls ``check_choices(self, "model")`` in
its ``__post_init__``: a value outside a ``Literal`` field's choices is one sentence naming the key,
whether the section was built from YAML or in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

ARCHITECTURE = "architecture"  # field metadata key: the field fixes the parameters' shapes or meaning


def architecture_field(default):
    """A dataclass field that is part of the architecture: a checkpoint cannot be resumed, and a
    pretrained model cannot be started from, under another value."""
    return dataclasses.field(default=default, metadata={ARCHITECTURE: True})


def architecture_fields(cls) -> tuple[str, ...]:
    """Names of ``cls``'s fields marked with :func:`architecture_field`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(ARCHITECTURE))


@functools.cache
def _choices(cls) -> dict[str, tuple]:
    """Field name -> allowed values, for the ``Literal`` (or ``Literal | None``) fields of ``cls``."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        if literals:
            out[name] = tuple(typing.get_args(literals[0])) + ((None,) if type(None) in args else ())
    return out


def choices(cls, name: str) -> tuple:
    """The values a ``Literal`` field of ``cls`` allows."""
    return _choices(cls)[name]


def check_choices(section, prefix: str) -> None:
    """One-sentence ValueError when a ``Literal`` field of ``section`` holds another value."""
    for name, allowed in _choices(type(section)).items():
        value = getattr(section, name)
        if value not in allowed:
            shown = ", ".join(repr(a) if a is None else str(a) for a in allowed)
            raise ValueError(f"{prefix}.{name} must be one of {shown}, got {value!r}.")
