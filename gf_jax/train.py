"""Training: a sharded LLaMA-style model with goldfish loss, resumable, on any mesh.

    python -m gf_jax.train --config configs/tiny.yaml [section.key=value ...]

The run directory (``train.run_dir``) receives ``config.yaml`` (the resolved config),
``tokenizer.model``, ``metrics.jsonl`` and ``checkpoints/<step>/``. A run directory that holds
checkpoints is resumed from the latest one. SIGTERM (TPU preemption) saves a checkpoint and exits
with status 0; a non-finite loss stops the run (status 1) without writing a checkpoint.

The step. Parameters and optimizer state are created by a jitted initialiser straight into their
shardings (never materialised on one device). The jitted step takes the state (donated) and a
global batch, splits the batch into ``grad_accum`` micro-batches, and for each computes the
goldfish mask from the batch's targets and positions, the *sum* of cross-entropy over kept
targets and its gradient; sums and gradients are added over micro-batches and divided once by
the total number of kept targets (micro-batches keep different numbers of targets, so averaging
per-micro-batch means would weight them wrongly). Then AdamW with warm-up + cosine and global
norm clipping.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gf_jax import distributed, goldfish, rundir
from gf_jax.checkpoint import TOKENIZER_FILE, Checkpointer, abstract_with_shardings, check_compatible
from gf_jax.config import RunConfig, TrainConfig, load_config, save_config, to_dict
from gf_jax.model import Transformer, flops_per_token

# Sums that add over micro-batches and steps (see gf_jax.goldfish.reduce_loss).
SUM_KEYS = ("xent_sum", "z_sum", "xent_all_sum", "xent_dropped_sum", "n_kept", "n_dropped", "n_valid")
BATCH_KEYS = ("inputs_BxT", "targets_BxT", "positions_BxT", "segment_ids_BxT", "weights_BxT")

# Peak dense bf16 TFLOP/s per chip, matched as substrings of `device.device_kind` (first match).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),
    ("v4", 275.0),
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and the config; every process takes part in saves."""
    return jax.process_index() == 0


def peak_tflops(device) -> float | None:
    """Peak dense bf16 TFLOP/s of one chip, or None when unknown (CPU has no peak)."""
    kind = getattr(device, "device_kind", "")
    if device.platform == "cpu":
        return None
    for needle, tflops in PEAK_TFLOPS:
        if needle.lower() in kind.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate(step, t: TrainConfig):
    """LR of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup`` steps
    (step 0 already uses lr / warmup), then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    step = jnp.asarray(step, jnp.float32)
    warm = t.lr * (step + 1.0) / max(1, t.warmup)
    progress = jnp.clip((step - t.warmup) / max(1, t.steps - t.warmup), 0.0, 1.0)
    floor = t.lr * t.min_lr_ratio
    cosine = floor + (t.lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < t.warmup, warm, cosine)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; no weight decay on vectors (norms)."""
    adamw = optax.adamw(
        lambda step: learning_rate(step, t),
        b1=t.b1,
        b2=t.b2,
        eps=t.eps,
        weight_decay=t.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if t.clip > 0:
        return optax.chain(optax.clip_by_global_norm(t.clip), adamw)
    return adamw


def build(config: RunConfig):
    """The model and its optimizer (call under ``jax.jit`` or ``nnx.eval_shape``)."""
    model = Transformer(config.model, rngs=nnx.Rngs(config.train.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)
    return model, optimizer


# ---------------------------------------------------------------------------------------------
# Loss and step (pure functions of the split state).


def batch_loss_sums(model, batch: dict, config: RunConfig, rng) -> dict:
    """Goldfish-loss sums of one (micro-)batch: kept / all / dropped cross-entropy and counts.

    The mask is computed here, from the batch's targets and positions, so it is part of the
    jitted step. ``rng`` is used by the ``random`` strategy only.
    """
    t = config.train
    kwargs = dict(
        weights_BxT=batch["weights_BxT"],
        positions_BxT=batch["positions_BxT"],
        context_BxC=batch.get("context_BxC"),  # a mid-document row's preceding targets
        z_loss=t.z_loss,
        rng=rng,
    )
    model_kwargs = dict(positions_BxT=batch["positions_BxT"], segment_ids_BxT=batch["segment_ids_BxT"])
    if t.loss_chunk_size > 0:
        h_BxTxD = model.hidden(batch["inputs_BxT"], **model_kwargs)
        _, aux = goldfish.chunked_loss_fn(
            h_BxTxD, model.output_weights(), batch["targets_BxT"], config.goldfish,
            chunk_size=t.loss_chunk_size, **kwargs,
        )
    else:
        logits_BxTxV = model(batch["inputs_BxT"], **model_kwargs)
        _, aux = goldfish.loss_fn(logits_BxTxV, batch["targets_BxT"], config.goldfish, **kwargs)
    return {k: aux[k] for k in SUM_KEYS}


def split_micro_batches(batch: dict, n: int) -> dict:
    """B x ... arrays -> n x (B/n) x ...; micro-batch i takes rows i, i+n, i+2n, ...

    Strided rows keep every micro-batch spread over all batch shards (row blocks stay on their
    device), so splitting moves no data between devices.
    """
    def split(x):
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(model_graphdef, opt_graphdef, config: RunConfig) -> Callable:
    """``step(model_state, opt_state, batch) -> (model_state, opt_state, metrics)``, unjitted."""
    t = config.train

    def sum_loss(params, rest, graphdef, batch, rng):
        model = nnx.merge(graphdef, params, rest)
        sums = batch_loss_sums(model, batch, config, rng)
        return sums["xent_sum"] + t.z_loss * sums["z_sum"], sums

    grad_fn = jax.grad(sum_loss, has_aux=True)

    def step_fn(model_state, opt_state, batch):
        model = nnx.merge(model_graphdef, model_state)
        optimizer = nnx.merge(opt_graphdef, opt_state)
        step = optimizer.step[...]
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # The random strategy draws a fresh mask each step (and micro-batch); the others ignore it.
        rng = jax.random.fold_in(jax.random.key(t.seed), step)

        if t.grad_accum == 1:
            grads, sums = grad_fn(params, rest, graphdef, batch, rng)
        else:
            micro = split_micro_batches(batch, t.grad_accum)

            def accumulate(carry, xs):
                index, micro_batch = xs
                g, s = grad_fn(params, rest, graphdef, micro_batch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_sums = {k: jnp.zeros((), jnp.int32 if k.startswith("n_") else jnp.float32) for k in SUM_KEYS}
            init = (jax.tree.map(jnp.zeros_like, params), zero_sums)
            (grads, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(t.grad_accum), micro))

        # One division by the kept targets of the whole batch: the gradient of the global mean.
        n_kept = jnp.maximum(1, sums["n_kept"]).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / n_kept.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        metrics = goldfish.summarize(sums)
        metrics["loss"] = (sums["xent_sum"] + t.z_loss * sums["z_sum"]) / n_kept
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = learning_rate(step, t)
        return nnx.state(model), nnx.state(optimizer), metrics

    return step_fn


def make_eval_step(model_graphdef, config: RunConfig) -> Callable:
    """``eval(model_state, batch) -> sums`` of the goldfish loss (val loss = loss over all)."""

    def eval_fn(model_state, batch):
        model = nnx.merge(model_graphdef, model_state)
        return batch_loss_sums(model, batch, config, jax.random.key(config.train.seed))

    return eval_fn


@dataclasses.dataclass
class StepFunctions:
    """The jitted initialiser, train step and eval step of a config on a mesh, with shardings."""

    init: Callable            # () -> (model_state, opt_state), created on their shardings
    train_step: Callable      # (model_state, opt_state, batch) -> (model_state, opt_state, metrics)
    eval_step: Callable       # (model_state, batch) -> loss sums
    model_graphdef: Any
    abstract_model_state: Any
    abstract_opt_state: Any
    model_shardings: Any
    opt_shardings: Any
    batch_sharding: NamedSharding


def _under_mesh(fn: Callable, mesh) -> Callable:
    """``fn`` called with ``mesh`` set, so the model's activation sharding hints apply when traced."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    return call


# Train fields that only the host loop reads: runs differing only in these share compiled steps.
_HOST_ONLY_FIELDS = dict(
    stop_at=0, global_batch=1, seq_len=1, log_every=1, eval_every=0, eval_batches=0, ckpt_every=0,
    keep_ckpts=1, async_checkpoint=True, run_dir="-", progress=True, tensorboard=True,
)


def make_step_functions(config: RunConfig, mesh) -> StepFunctions:
    """Shardings from the parameters' logical axis names, and the jitted functions using them.

    Memoised on what the compiled code depends on (model, goldfish and optimizer settings, mesh),
    so a run resumed in the same process (or a second run in a test) reuses the compilations.
    """
    key = RunConfig(
        model=config.model, mesh=config.mesh, goldfish=config.goldfish,
        train=dataclasses.replace(config.train, **_HOST_ONLY_FIELDS),
    )
    return _make_step_functions(key, mesh)


@functools.lru_cache(maxsize=4)
def _make_step_functions(config: RunConfig, mesh) -> StepFunctions:
    from gf_jax import sharding as sharding_lib

    # Abstract state (shapes and logical axis names, no memory) -> shardings.
    abstract_model, abstract_opt = nnx.eval_shape(lambda: build(config))
    model_graphdef, abstract_model_state = nnx.split(abstract_model)
    opt_graphdef, abstract_opt_state = nnx.split(abstract_opt)
    model_shardings = sharding_lib.model_shardings(abstract_model_state, mesh)
    opt_shardings = sharding_lib.model_shardings(abstract_opt_state, mesh)
    # Batch rows over (data, fsdp); metrics are scalars, replicated.
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    # The state is created on its shardings by XLA; no device ever holds all of it.
    def init_state():
        model, optimizer = build(config)
        return nnx.state(model), nnx.state(optimizer)

    init = jax.jit(init_state, out_shardings=(model_shardings, opt_shardings))
    # State in and out on its own shardings and donated (updated in place: one copy in memory);
    # the batch arrives already sharded by rows.
    train_step = jax.jit(
        make_train_step(model_graphdef, opt_graphdef, config),
        in_shardings=(model_shardings, opt_shardings, batch_sharding),
        out_shardings=(model_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        make_eval_step(model_graphdef, config),
        in_shardings=(model_shardings, batch_sharding),
        out_shardings=replicated,
    )
    return StepFunctions(
        init=_under_mesh(init, mesh), train_step=_under_mesh(train_step, mesh),
        eval_step=_under_mesh(eval_step, mesh), model_graphdef=model_graphdef,
        abstract_model_state=abstract_model_state, abstract_opt_state=abstract_opt_state,
        model_shardings=model_shardings, opt_shardings=opt_shardings, batch_sharding=batch_sharding,
    )


# ---------------------------------------------------------------------------------------------
# Host side: tokenizer, logging.


def resolve_tokenizer(config: RunConfig, run_dir: str):
    """The run's tokenizer: ``data.tokenizer``, else the run directory's copy (resume), else one
    trained on the corpus (cached). Copied to ``RUN_DIR/tokenizer.model`` so evaluation reloads
    the same one; returns (tokenizer, path of the copy)."""
    from gf_jax import data as data_lib
    from gf_jax.tokenizer import Tokenizer

    local = rundir.join(run_dir, TOKENIZER_FILE)
    if config.data.tokenizer:
        tokenizer = Tokenizer.load(config.data.tokenizer)
        if rundir.exists(local) and not rundir.same_content(local, tokenizer.path):
            if rundir.absolute(local) != rundir.absolute(config.data.tokenizer):
                raise ValueError(
                    f"{run_dir} was trained with a different tokenizer ({local}) than data.tokenizer="
                    f"{config.data.tokenizer}; drop the data.tokenizer setting or choose a new train.run_dir."
                )
    elif rundir.exists(local):
        tokenizer = Tokenizer.load(local)
    else:
        tokenizer = data_lib.load_tokenizer(config.data)
    if is_main_process() and not rundir.exists(local):
        rundir.makedirs(run_dir)
        rundir.copy_file(tokenizer.path, local)
    data_lib.check_vocab_fits(tokenizer, config.model.vocab_size)
    return tokenizer, local


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` (and TensorBoard when available).

    Only the main process writes. On resume, records after the resumed step are dropped first,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str, *, resume_step: int | None, tensorboard: bool):
        self.enabled = is_main_process()
        self.path = rundir.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        if rundir.exists(self.path):
            lines = [ln + "\n" for ln in rundir.read_text(self.path).splitlines() if ln.strip()]
            keep = [ln for ln in lines if resume_step is not None and json.loads(ln).get("step", 0) <= resume_step]
            rundir.write_text(self.path, "".join(keep))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional; not a dependency

                self._tb = SummaryWriter(rundir.join(run_dir, "tensorboard"))
            except ImportError:
                self._tb = None

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rundir.append_text(self.path, json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(tree))


# ---------------------------------------------------------------------------------------------
# The trainer.


class Trainer:
    """Sets a run up (config checks, mesh, tokenizer, data, state, resume) on construction, so
    user errors surface before anything compiles; ``run()`` trains.

    Args:
      config: a RunConfig (``gf_jax.config.load_config``).
      devices: the devices of the mesh (default: all).
      log: where console lines go (default: the progress bar's ``write``).
    """

    def __init__(self, config: RunConfig, *, devices=None, log: Callable[[str], None] | None = None):
        self.checkpointer = None
        self.train_iter = None
        try:
            self._setup(config, devices, log)
        except BaseException:
            if self.checkpointer is not None:
                self.checkpointer.close()
            if self.train_iter is not None:
                self.train_iter.close()
            raise

    def _setup(self, config: RunConfig, devices, log) -> None:
        from gf_jax import data as data_lib
        from gf_jax import sharding as sharding_lib

        self._data_lib = data_lib
        t = config.train
        self.run_dir = t.run_dir
        self._log_fn = log
        self._pbar = None
        if t.eval_every > 0 and config.data.validation_fraction <= 0:
            raise ValueError(
                "train.eval_every > 0 needs a validation split; set data.validation_fraction > 0 "
                "(e.g. 0.05) or train.eval_every=0."
            )

        # Resume check first: a wrong model config fails before anything is built or compiled.
        self.checkpointer = Checkpointer(self.run_dir, keep=t.keep_ckpts, async_save=t.async_checkpoint)
        self.resume_step = self.checkpointer.latest_step()
        if self.resume_step is not None:
            saved = self.checkpointer.saved_config(self.resume_step)
            check_compatible(saved["model"], config.model, self.run_dir)

        self.mesh = sharding_lib.make_mesh(config.mesh, devices)
        n_batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        micro = t.global_batch // t.grad_accum
        if micro % n_batch_shards:
            raise ValueError(
                f"a micro-batch of {micro} sequences (train.global_batch / train.grad_accum) cannot "
                f"be split over {n_batch_shards} data x fsdp shards; make it a multiple of {n_batch_shards}."
            )

        self.tokenizer, tokenizer_path = resolve_tokenizer(config, self.run_dir)
        with open(self.tokenizer.path, "rb") as f:  # every process must cut text into the same ids
            distributed.check_same_on_all_processes(
                hashlib.sha256(f.read()).hexdigest(),
                "tokenizer (set data.tokenizer to one .model file that every host can read)",
            )
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer_path))
        self.config = config
        if is_main_process():
            save_config(config, rundir.join(self.run_dir, "config.yaml"))

        self.train_iter = data_lib.make_train_iterator(
            config.data, self.tokenizer, global_batch=t.global_batch, seq_len=t.seq_len, split="train"
        )
        # The loop state is written by process 0 only; each process's data stream differs, so it
        # carries every process's fingerprint and each one resumes checking its own.
        self.data_fingerprints = distributed.allgather_str(str(self.train_iter.get_state().get("fingerprint", "")))
        self.val_tokens = None
        if t.eval_every > 0:  # tokenized once; every evaluation passes over the same documents
            self.val_tokens = data_lib.tokenize_documents(
                data_lib.load_documents(config.data, "validation"), self.tokenizer,
                config.data.add_bos, config.data.add_eos,
            )

        fns = make_step_functions(config, self.mesh)
        self.fns = fns
        self.batch_sharding = fns.batch_sharding
        self.train_step, self.eval_step = fns.train_step, fns.eval_step

        self.supervised_tokens = 0
        self.input_tokens = 0
        if self.resume_step is None:
            self.step = 0
            self.model_state, self.opt_state = fns.init()
        else:
            restored = self.checkpointer.restore(
                self.resume_step,
                abstract_model=abstract_with_shardings(fns.abstract_model_state, fns.model_shardings),
                abstract_opt=abstract_with_shardings(fns.abstract_opt_state, fns.opt_shardings),
            )
            self.model_state, self.opt_state = restored["model"], restored["optimizer"]
            loop = restored["loop"]
            self.train_iter.set_state(self._own_data_state(loop))
            self.supervised_tokens = int(loop["supervised_tokens"])
            self.input_tokens = int(loop["input_tokens"])
            self.step = self.resume_step
        self.metrics_writer = MetricsWriter(
            self.run_dir, resume_step=self.resume_step, tensorboard=t.tensorboard
        )
        self.flops_per_token = flops_per_token(config.model, t.seq_len)
        self.peak = peak_tflops(self.mesh.devices.flat[0])
        self._preempted: int | None = None

    # ---- helpers ------------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if not is_main_process():
            return
        if self._log_fn is not None:
            self._log_fn(line)
        elif self._pbar is not None:
            self._pbar.write(line)
        else:
            print(line, flush=True)

    def global_batch(self, local_batch: dict) -> dict:
        keys = [k for k in (*BATCH_KEYS, "context_BxC") if k in local_batch]
        return self._data_lib.to_global_batch({k: local_batch[k] for k in keys}, self.batch_sharding)

    def evaluate(self) -> dict:
        """Held-out loss: one in-order pass over the validation documents (at most
        ``train.eval_batches`` batches; 0 = all), the same batches every time."""
        t = self.config.train
        batches = self._data_lib.eval_batches(
            self.val_tokens, global_batch=t.global_batch // t.grad_accum, seq_len=t.seq_len,
            pad_id=self.tokenizer.pad_id, mode=self.config.data.mode,
        )
        totals = None
        for i, batch in enumerate(batches):
            if t.eval_batches and i >= t.eval_batches:
                break
            sums = self.eval_step(self.model_state, self.global_batch(batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        host = _to_host(totals)
        return {
            "val_loss": host["xent_all_sum"] / max(1, host["n_valid"]),
            "val_loss_kept": host["xent_sum"] / max(1, host["n_kept"]),
            "val_tokens": host["n_valid"],
        }

    def save(self, step: int) -> None:
        self.checkpointer.save(
            step,
            model_state=self.model_state,
            opt_state=self.opt_state,
            loop_state={
                "data": self.train_iter.get_state(),
                "data_fingerprints": self.data_fingerprints,
                "supervised_tokens": self.supervised_tokens,
                "input_tokens": self.input_tokens,
            },
            config_dict=to_dict(self.config),
        )

    def _should_stop(self) -> bool:
        """A stop signal arrived (multi-process: on any process, agreed at this same step)."""
        if self._preempted is not None:
            return True
        if distributed.is_multiprocess():
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(self.step):
                self._preempted = signal.SIGTERM
                return True
        return False

    def _own_data_state(self, loop: dict) -> dict:
        """This process's data-iterator state from a checkpoint's loop state."""
        state = dict(loop["data"])
        fingerprints = loop.get("data_fingerprints")
        if fingerprints is not None and "fingerprint" in state:
            if len(fingerprints) != jax.process_count():
                raise ValueError(
                    f"{self.run_dir} was trained by {len(fingerprints)} processes and this run has "
                    f"{jax.process_count()}; resume it with {len(fingerprints)} processes (each one's data "
                    "stream depends on it), or read its parameters anywhere with gf_jax.checkpoint.load_model."
                )
            state["fingerprint"] = fingerprints[jax.process_index()]
        return state

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self._preempted is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._preempted = signum

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to ``train.steps`` (or ``train.stop_at``); returns a summary dict.

        Raises NonFiniteLossError (after closing the checkpointer, with no new checkpoint) when
        a loss is NaN or infinite.
        """
        from tqdm.auto import tqdm

        t = self.config.train
        end = t.stop_at if 0 < t.stop_at < t.steps else t.steps
        start = self.step
        tokens_per_step = t.global_batch * t.seq_len
        n_devices = self.mesh.devices.size
        if start >= end:
            self.log(f"[gf_jax.train] {self.run_dir} is already at step {start} (target {end}); nothing to do.")
            self.close()
            return {"status": "done", "step": start, "run_dir": self.run_dir}

        self.log(
            f"[gf_jax.train] {'resuming from step ' + str(start) if start else 'starting'}: "
            f"{t.steps} steps of {t.global_batch} x {t.seq_len} tokens on mesh "
            f"{dict(self.mesh.shape)} ({self.mesh.devices.flat[0].device_kind}); run dir {self.run_dir}"
        )
        if self.peak is None:
            self.log(
                f"[gf_jax.train] no peak FLOP/s known for device kind "
                f"{self.mesh.devices.flat[0].device_kind!r}: MFU is not reported (TFLOP/s/device is)."
            )

        previous_handlers = {}
        # Multi-process: SIGTERM is left to JAX's preemption service, which makes every process
        # stop after the same step (see _should_stop); a process stopping alone would hang the rest.
        for sig in () if distributed.is_multiprocess() else (signal.SIGTERM, signal.SIGINT):
            try:
                previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no preemption handling
                pass

        self._pbar = tqdm(
            total=end, initial=start, unit="step", dynamic_ncols=True,
            disable=not (t.progress and is_main_process()), desc="train",
        )
        pending: list = []                  # per-step device metrics not yet read back
        window: dict[str, Any] = {}          # host sums over the current log window
        window_steps, window_start, excluded = 0, time.perf_counter(), 0.0
        compile_s, first_record = None, True
        status = "done"
        last_saved = self.resume_step
        try:
            while self.step < end:
                t0 = time.perf_counter()
                batch = self.global_batch(next(self.train_iter))
                self.model_state, self.opt_state, metrics = self.train_step(
                    self.model_state, self.opt_state, batch
                )
                self.step += 1
                pending.append(metrics)
                if compile_s is None:  # the first step compiles; time the others
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t0
                    window_start, window_steps, excluded = time.perf_counter(), 0, 0.0
                else:
                    window_steps += 1
                self._pbar.update(1)

                log_due = self.step % t.log_every == 0 or self.step == end
                ckpt_due = (t.ckpt_every > 0 and self.step % t.ckpt_every == 0) or self.step == end
                eval_due = t.eval_every > 0 and (self.step % t.eval_every == 0 or self.step == end)
                stop = self._should_stop()
                if log_due or ckpt_due or eval_due or stop:
                    # Reading the metrics back waits for the steps; done only here so that the
                    # host runs ahead of the devices between records.
                    for host in _to_host(pending):
                        if not math.isfinite(host["loss"]):
                            raise NonFiniteLossError(
                                f"the loss became {host['loss']} by step {self.step}; stopped without "
                                f"saving (last good checkpoint: step {last_saved}); lower train.lr or "
                                "raise train.warmup, then resume."
                            )
                        self.supervised_tokens += int(host["n_kept"])
                        self.input_tokens += tokens_per_step
                        for k in SUM_KEYS:
                            window[k] = window.get(k, 0) + host[k]
                        window["grad_norm"], window["lr"] = host["grad_norm"], host["lr"]
                    pending = []
                if log_due:
                    elapsed = time.perf_counter() - window_start - excluded
                    record = self._record(window, window_steps, elapsed, tokens_per_step, n_devices)
                    if first_record:  # the first step's time is mostly compilation
                        record["compile_s"] = compile_s
                        first_record = False
                    self.metrics_writer.write(record)
                    self.log(self._line(record))
                    self._pbar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window = {}
                    window_steps, window_start, excluded = 0, time.perf_counter(), 0.0
                if eval_due:
                    e0 = time.perf_counter()
                    record = {"step": self.step, **self.evaluate()}
                    self.metrics_writer.write(record)
                    self.log(f"step {self.step:>6}  val_loss {record['val_loss']:.4f} ({record['val_tokens']} tokens)")
                    excluded += time.perf_counter() - e0
                if ckpt_due or stop:
                    c0 = time.perf_counter()
                    self.save(self.step)
                    last_saved = self.step
                    excluded += time.perf_counter() - c0
                if stop:
                    status = "preempted"
                    self.log(
                        f"[gf_jax.train] received signal {self._preempted}: saved step {self.step} to "
                        f"{self.checkpointer.directory}; run the same command to resume."
                    )
                    break
        finally:
            self._pbar.close()
            self._pbar = None
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self.close()
        if status == "done":
            self.log(
                f"[gf_jax.train] done at step {self.step}: checkpoints in {self.checkpointer.directory}, "
                f"metrics in {self.metrics_writer.path}"
            )
        return {"status": status, "step": self.step, "run_dir": self.run_dir}

    def _record(self, window: dict, steps: int, elapsed: float, tokens_per_step: int, n_devices: int) -> dict:
        sums = {k: np.asarray(window.get(k, 0)) for k in SUM_KEYS}
        ratios = _to_host(goldfish.summarize({k: jnp.asarray(v) for k, v in sums.items()}))
        z = self.config.train.z_loss
        record = {
            "step": self.step,
            "loss": (float(sums["xent_sum"]) + z * float(sums["z_sum"])) / max(1, int(sums["n_kept"])),
            "loss_kept": ratios["loss_kept"],
            "loss_all": ratios["loss_all"],
            "loss_dropped": ratios["loss_dropped"],
            "drop_fraction": ratios["drop_fraction"],
            "supervised_tokens": self.supervised_tokens,
            "input_tokens": self.input_tokens,
            "grad_norm": window.get("grad_norm"),
            "lr": window.get("lr"),
        }
        if steps > 0 and elapsed > 0:
            step_time = elapsed / steps
            tokens_per_s = tokens_per_step / step_time
            tflops = self.flops_per_token * tokens_per_s / n_devices / 1e12
            record.update(
                step_time_s=step_time,
                tokens_per_s=tokens_per_s,
                tflops_per_device=tflops,
                mfu=None if self.peak is None else tflops / self.peak,
            )
        else:
            record.update(step_time_s=None, tokens_per_s=0.0, tflops_per_device=None, mfu=None)
        return record

    @staticmethod
    def _line(r: dict) -> str:
        line = (
            f"step {r['step']:>6}  loss {r['loss']:.4f}  all {r['loss_all']:.4f}  "
            f"dropped {r['loss_dropped']:.4f}  drop {r['drop_fraction']:.3f}  "
            f"gnorm {r['grad_norm']:.3f}  lr {r['lr']:.2e}"
        )
        if r.get("step_time_s"):
            line += f"  {r['step_time_s'] * 1e3:.0f} ms/step  {r['tokens_per_s']:,.0f} tok/s  {r['tflops_per_device']:.3f} TFLOP/s/dev"
            if r.get("mfu") is not None:
                line += f"  MFU {100 * r['mfu']:.1f}%"
        return line

    def close(self) -> None:
        """Waits for pending checkpoint writes, stops the data prefetch thread, closes files."""
        self.checkpointer.close()
        self.train_iter.close()
        self.metrics_writer.close()


def train(config: RunConfig, *, devices=None) -> dict:
    """Sets up and runs one training run (see ``Trainer``); returns its summary."""
    return Trainer(config, devices=devices).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gf_jax.train",
        description="Train a LLaMA-style model with goldfish loss (resumes an existing run directory).",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 goldfish.k=3")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        # Before anything touches a device: joins the other processes of a multi-host run.
        distributed.maybe_initialize(config.distributed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # An error in one process of a multi-host run ends that process at once (after printing it),
    # so the others are stopped instead of waiting for it in a collective.
    distributed.exit_on_error(lambda: _train_main(config))


def _train_main(config: RunConfig) -> None:
    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        trainer.run()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
