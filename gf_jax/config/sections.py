"""The config sections whose code sits above the run layer: ``train`` (the host loop), ``loss``,
``optimizer`` (what the train step compiles) and ``distributed`` (how processes connect).

They are declared here, apart from the trainer, optimizer and start-up code that read them, so
that a run directory's config can be read (``gf_jax.run``) without importing the trainer. The
other sections live with their code: ``model`` (gf_jax.model.config), ``mesh``
(gf_jax.model.sharding), ``data`` (gf_jax.data.config), ``goldfish`` (gf_jax.goldfish). Each
section checks itself when it is built; checks across sections are ``RunConfig``'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from gf_jax.util.settings import check_choices


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

    def __post_init__(self):
        for name in ("steps", "global_batch", "seq_len", "grad_accum", "log_every", "keep_ckpts"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("stop_at", "eval_every", "eval_batches", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if self.global_batch % self.grad_accum:
            raise ValueError(
                f"train.global_batch ({self.global_batch}) must be a multiple of train.grad_accum ({self.grad_accum})."
            )
        if not self.run_dir:
            raise ValueError("train.run_dir must name an output directory.")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the loss is computed (the ``loss:`` section; which targets count is ``goldfish:``).

    Attributes:
      z_loss: coefficient of the log-partition penalty over kept targets.
      chunk_size: > 0 computes the loss in chunks of this many targets without holding the
        B x T x V logits (gf_jax.loss.chunked_loss_fn); 0 = plain loss.
    """

    z_loss: float = 0.0
    chunk_size: int = 0

    def __post_init__(self):
        if not self.z_loss >= 0 or not math.isfinite(self.z_loss):
            raise ValueError(f"loss.z_loss must be a finite number >= 0, got {self.z_loss}.")
        if self.chunk_size < 0:
            raise ValueError(f"loss.chunk_size must be >= 0, got {self.chunk_size}.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (gf_jax.train.optim).

    Attributes:
      lr, warmup, min_lr_ratio: peak learning rate, linear warm-up steps, then cosine decay to
        lr * min_lr_ratio at the run's last step (``train.steps``).
      weight_decay, b1, b2, eps: AdamW (decay is applied to matrices only, not norms).
      clip: global gradient-norm clipping threshold; 0 disables clipping.
    """

    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0

    def __post_init__(self):
        for name in ("lr", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optimizer.{name} must be a finite number, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}.")
        if self.warmup < 0:
            raise ValueError(f"optimizer.warmup must be >= 0, got {self.warmup}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError("optimizer.clip and optimizer.weight_decay must be >= 0.")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {self.b1}, {self.b2}.")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps must be > 0, got {self.eps}.")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-host run connect (the ``distributed`` config section).

    Attributes:
      mode: ``auto`` initialises when the run is multi-process (explicit fields, environment
        variables or a detected cluster); ``off`` never does (single process, or a launcher
        that has already called ``jax.distributed.initialize``).
      coordinator_address: ``host:port`` of process 0's coordination service; every process
        passes the same one (process 0 listens on the port).
      num_processes: processes in the run.
      process_id: this process's index in ``[0, num_processes)``; usually set per process on the
        command line (``distributed.process_id=$RANK``) or through ``JAX_PROCESS_ID``.
      local_device_ids: restrict this process to these local accelerators (e.g. one GPU per
        process); None = all visible (TPU: always all of the host's chips).
      initialization_timeout: seconds to wait for all processes to connect.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and
        the whole run is stopped (the bound on how long the others wait after a crash).
      shutdown_timeout: seconds a finishing process waits for the others at exit.
      cpu_collectives: cross-process collectives of the CPU backend: ``auto`` (gloo when the
        run is CPU-only, e.g. ``JAX_PLATFORMS=cpu``), ``gloo``, ``mpi`` or ``none``.
    """

    mode: Literal["auto", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 60
    shutdown_timeout: int = 120
    cpu_collectives: Literal["auto", "gloo", "mpi", "none"] = "auto"

    def __post_init__(self):
        check_choices(self, "distributed")
        for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"distributed.{name} must be >= 1 second, got {getattr(self, name)}.")
