"""``RunConfig``: everything a run did, read from YAML with dotted command-line overrides.

    config = load_config("configs/tiny.yaml", ["train.steps=50", "goldfish.k=3"])

Every section checks itself when it is built; ``RunConfig`` then checks the sections against each
other (``__post_init__``), so a ``RunConfig`` that exists is valid, however it was made (from a
file, in Python, or with ``dataclasses.replace``). ``save_config`` writes the resolved config as
YAML so a run can be reproduced from its directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gf_jax.config.loader import (
    apply_overrides,
    dump_yaml,
    from_dict,
    migrate_moved_keys,
    migrate_overrides,
    read_yaml_mapping,
)
from gf_jax.config.sections import DistributedConfig, LossConfig, OptimizerConfig, TrainConfig
from gf_jax.data.config import DataConfig
from gf_jax.goldfish import GoldfishConfig
from gf_jax.model.config import ModelConfig
from gf_jax.model.sharding import MeshConfig
from gf_jax.util import paths


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

    def __post_init__(self):
        """The checks across sections (each section has checked itself); one-sentence ValueErrors."""
        t, d, g = self.train, self.data, self.goldfish
        if t.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                "lower train.seq_len or raise model.max_seq_len."
            )
        if t.eval_every > 0 and d.validation_fraction <= 0:
            raise ValueError(
                "train.eval_every > 0 needs a validation split; set data.validation_fraction > 0 "
                "(e.g. 0.05) or train.eval_every=0."
            )
        window = "goldfish.h" if g.h >= g.key_window else "goldfish.key_window"
        if g.strategy == "hash" and 0 < d.row_context < g.reach:
            # With C < h a row that starts mid-document cannot see its first targets' whole hash
            # windows, so it drops them all instead of getting its document's mask.
            raise ValueError(
                f"data.row_context ({d.row_context}) is shorter than the goldfish hash window {window} "
                f"({g.reach}); set data.row_context >= {g.reach} (or 0 for no row context)."
            )
        if g.strategy == "hash" and d.row_context == 0 and d.mode == "packed" and g.reach >= t.seq_len:
            # Without row context a row that continues a document drops the targets whose window
            # reaches before the row: with h >= T that is every one of them, most of the data.
            raise ValueError(
                f"{window} ({g.reach}) is not shorter than train.seq_len ({t.seq_len}) and data.row_context is 0, "
                f"so every row that continues a document would drop all its targets; set data.row_context >= "
                f"{g.reach} or a smaller {window}."
            )


def replace_sections(config: RunConfig, **sections) -> RunConfig:
    """``config`` with sections, or fields of sections, replaced at once (the result is checked as a
    whole, never half-replaced): ``replace_sections(c, data=my_data, train={"steps": 5})``."""
    return dataclasses.replace(config, **{
        name: dataclasses.replace(getattr(config, name), **value) if isinstance(value, dict) else value
        for name, value in sections.items()
    })


def config_from_dict(values: dict, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated RunConfig from a nested dict and dotted overrides."""
    values = migrate_moved_keys(values or {})
    return from_dict(RunConfig, apply_overrides(RunConfig, values, migrate_overrides(overrides)))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML file (None: all defaults) and dotted overrides."""
    values: dict = {}
    if path is not None:
        values = read_yaml_mapping(path, "config file", "pass e.g. --config configs/tiny.yaml")
    return config_from_dict(values, overrides)


def dump_config(config: RunConfig) -> str:
    """The config as YAML text (sections in declaration order)."""
    return dump_yaml(config)


def save_config(config: RunConfig, path: str) -> None:
    """Writes the resolved config as YAML (atomically: a crash never leaves half a file)."""
    paths.write_text(path, dump_config(config))
