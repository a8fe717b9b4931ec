"""The run configuration: typed sections, read from YAML with dotted overrides, checked at build.

    from gf_jax.config import load_config
    config = load_config("configs/tiny.yaml", ["train.steps=50", "goldfish.k=3"])

Modules: ``loader`` (file -> typed dataclasses, overrides, moved keys), ``sections`` (train, loss,
optimizer, distributed), ``run`` (``RunConfig`` and its cross-section checks, load and save).
"""

from gf_jax.config.loader import apply_overrides, from_dict, read_yaml_mapping, to_dict
from gf_jax.config.run import RunConfig, config_from_dict, dump_config, load_config, replace_sections, save_config
from gf_jax.config.sections import DistributedConfig, LossConfig, OptimizerConfig, TrainConfig

__all__ = [
    "RunConfig", "TrainConfig", "LossConfig", "OptimizerConfig", "DistributedConfig", "load_config",
    "config_from_dict", "save_config", "dump_config", "replace_sections", "from_dict", "to_dict",
    "apply_overrides", "read_yaml_mapping",
]
