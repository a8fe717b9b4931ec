"""Training: the pure, jitted step and the trainer that wires a run around it.

    python -m gf_jax.train --config configs/tiny.yaml [section.key=value ...]

    from gf_jax.train import Trainer
    Trainer(config).run()

Modules: ``step`` (the jitted initialiser, train and eval steps on a mesh), ``optim`` (AdamW and
its schedule), ``trainer`` (set-up, resume and the loop), ``hooks`` (periodic work, the stop
signal), ``tracker`` (metrics, throughput, MFU and their writers), ``aot`` (ahead-of-time TPU
compiles on a CPU host), ``cli``. Imports run, config, data, model and the core below it.
"""

from gf_jax.train.cli import main, train
from gf_jax.train.trainer import NonFiniteLossError, Trainer

__all__ = ["Trainer", "NonFiniteLossError", "train", "main"]
