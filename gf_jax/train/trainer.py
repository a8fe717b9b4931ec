"""The trainer: wires a run together (config, mesh, tokenizer, data, state, resume) and loops.

    trainer = Trainer(config)          # every check runs here, before anything compiles
    trainer.add_hook(my_fn, every=50)  # optional: my_fn(step) every 50 steps
    trainer.run()

The numeric work is in ``gf_jax.train.step`` (pure, jitted); what is reported in ``gf_jax.train.tracker``;
periodic work (log, checkpoint, evaluation, user hooks) runs as ``gf_jax.train.hooks.Hook``\\ s. The run
directory (``train.run_dir``) receives ``config.yaml``, ``tokenizer.model``, ``metrics.jsonl`` and
``checkpoints/<step>/``; one that holds checkpoints is resumed from the newest that restores (one
that does not is moved to ``corrupt_checkpoints/``). ``run.lock`` keeps a second trainer out
(``gf_jax.run.lock``); nothing else is written before every check has passed. SIGTERM saves a
checkpoint and returns status "preempted"; a non-finite loss raises ``NonFiniteLossError``
without writing a checkpoint. Guarantees: docs/failures.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from gf_jax.batch import Batch
from gf_jax.config import RunConfig, save_config, to_dict
from gf_jax.data import task_for, to_global_batch
from gf_jax.loss import LossSums
from gf_jax.model import sharding as sharding_lib
from gf_jax.model.counting import flops_per_token
from gf_jax.model.sharding import abstract_with_shardings
from gf_jax.run import adapters, distributed, init_from
from gf_jax.run.checkpoint import Checkpointer, check_compatible
from gf_jax.run.distributed import is_main_process
from gf_jax.run.lock import RunDirInUse, RunLock
from gf_jax.run.rundir import RunDir, write_tokenizer_copy
from gf_jax.run.source import ModelSource
from gf_jax.train import setup
from gf_jax.train.hooks import Hook, StopSignal
from gf_jax.train.step import make_step_functions
from gf_jax.train.tracker import NonFiniteLossError, Tracker, format_record, make_writers, peak_tflops
from gf_jax.util import paths

__all__ = ["Trainer", "NonFiniteLossError"]


class Trainer:
    """Sets a run up on construction, so user errors surface before anything compiles;
    ``run()`` trains.

    Args:
      config: a RunConfig (``gf_jax.config.load_config``).
      devices: the devices of the mesh (default: all).
      log: where console lines go (default: the progress bar's ``write``).
      fresh: start over in a run directory that holds an earlier run (its checkpoints, metrics and
        reports are removed once the lock is held and every check has passed).
    """

    def __init__(self, config: RunConfig, *, devices=None, log: Callable[[str], None] | None = None,
                 fresh: bool = False):
        self.lock = None
        self.fresh = fresh
        self.checkpointer = None
        self.train_iter = None
        self.tracker = None
        self._log_fn = log
        self._pbar = None
        self.hooks: list[Hook] = []
        try:
            self._setup(config, devices)
        except BaseException:
            self.close()
            raise

    # ---- set-up ------------------------------------------------------------------------------

    def _setup(self, config: RunConfig, devices) -> None:
        self.run_dir = config.train.run_dir
        self._take_lock()  # before anything is read or written: one trainer per run directory
        config = init_from.apply_init_from(config)  # the architecture (and tokenizer) of train.init_from
        config = init_from.apply_init_adapters(config)  # model.lora of train.init_adapters
        adapters.require_base(config)
        # A LoRA run records its base's identity with every checkpoint (and checks it at resume).
        self.base_record = adapters.base_record(config)
        self.resume_step = self._check_resume(config)
        self.mesh = sharding_lib.make_mesh(config.mesh, devices)
        setup.check_batch_fits_mesh(config, self.mesh)
        # A run adopts the tokenizer in its directory only when it continues its own checkpoints.
        self.tokenizer, tokenizer_copy = setup.resolve_tokenizer(config, self.run_dir, adopt=bool(self._all_steps))
        with open(self.tokenizer.path, "rb") as f:  # every process must cut text into the same ids
            distributed.check_same_on_all_processes(
                hashlib.sha256(f.read()).hexdigest(),
                "tokenizer (set data.tokenizer to one .model file that every host can read)",
            )
        self.config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer_copy))
        self.task = task_for(self.config.data)  # what data.format means, chosen once
        self._setup_data()
        self.fns = make_step_functions(self.config, self.mesh)
        self._setup_state()
        self._write_run_files(tokenizer_copy)
        self._setup_tracker()
        self._add_builtin_hooks()

    def _take_lock(self) -> None:
        """Process 0 takes the run directory's lock; every process stops with its sentence if that fails."""
        error = ""
        if is_main_process():
            try:
                self.lock = RunLock.acquire(self.run_dir, log=self.log)
            except RunDirInUse as e:
                error = str(e)
        error = distributed.allgather_str(error)[0]  # the other processes never touch the lock
        if error:
            raise RunDirInUse(error)

    def _check_resume(self, config: RunConfig) -> int | None:
        """The step to resume from (None: a new run); a different model fails before anything compiles.
        A checkpoint whose config does not read is skipped (see ``_setup_state``). A new run lists
        what an earlier one left here (replaced once every check has passed; somebody else's files
        are refused); a checkpoint of parameters only (``hf import``) is a start, not a resume."""
        t = config.train
        self.checkpointer = Checkpointer(self.run_dir, keep=t.keep_ckpts, async_save=t.async_checkpoint,
                                         clean_up=True)  # this process holds the run's lock
        self.params_step, self._replaced = None, []
        if self.fresh:  # the checkpoints are not even opened: they are removed before the first save
            self._all_steps = []
            self._replaced = RunDir(self.run_dir).replaceable(fresh=True)
            return None
        self._all_steps = self.checkpointer.all_steps()
        if not self._all_steps:
            self._replaced = RunDir(self.run_dir).replaceable(fresh=False)
            return None
        step, saved = self.checkpointer.restore_newest_good(self.checkpointer.saved_config, self._all_steps,
                                                            log=self.log)
        check_compatible(saved["model"], config.model, self.run_dir)
        adapters.check_same_adapters(saved["model"], config.model, self.run_dir)
        if not self.checkpointer.has_optimizer(step):
            self.params_step = step
            return None
        return step

    def _setup_data(self) -> None:
        t = self.config.train
        self.train_iter = self.task.train_iterator(self.tokenizer, global_batch=t.global_batch, seq_len=t.seq_len)
        warning = setup.corpus_warning(self.train_iter)
        if warning:
            self.log(warning)
        # The loop state is written by process 0 only; each process's data stream differs, so it
        # carries every process's fingerprint and each one resumes checking its own.
        self.data_fingerprints = distributed.allgather_str(str(self.train_iter.get_state().get("fingerprint", "")))
        self.val_tokens = None
        if t.eval_every > 0:  # tokenized (or mapped from the store) once; every evaluation reuses them
            self.val_tokens = self._validation_tokens()

    def _validation_tokens(self):
        """The validation documents (or examples) as tokens, checked now, not after the last step."""
        c = self.config
        tokens = self.task.validation_set(self.tokenizer, c.train.seq_len)
        if not len(tokens):
            raise ValueError(
                f"data.validation_fraction={c.data.validation_fraction} leaves no validation documents in "
                f"{c.data.path if c.data.source != 'tfds' else c.data.tfds_name}; raise it, use more "
                "documents, or set train.eval_every=0."
            )
        return tokens

    def _setup_state(self) -> None:
        """Fresh, fresh with ``train.init_from``'s parameters (and ``train.init_adapters``' adapters),
        or restored from the newest checkpoint that restores."""
        self.supervised_tokens_at_start, self.input_tokens_at_start = 0, 0
        if self.resume_step is not None:
            self._restore_state()
            return
        self.step = 0
        self.model_state, self.opt_state = self.fns.init()
        fns, t = self.fns, self.config.train
        if self.params_step is not None:  # a run made by ``hf import``: its parameters, a fresh optimizer
            self.start_from(self._restore_params(self.params_step))
            self.log(f"[gf_jax.train] parameters from checkpoint step {self.params_step} of {self.run_dir} "
                     "(imported; fresh optimizer)")
        if t.init_from:
            self.start_from(adapters.base_params(t.init_from, fns.abstract_model_state, fns.model_shardings,
                                                 self.config.model))
            self.log(f"[gf_jax.train] parameters from {t.init_from} (fresh optimizer)")
        if t.init_adapters:
            self.start_from(adapters.peft_adapters(t.init_adapters, fns.abstract_model_state, fns.model_shardings))
            self.log(f"[gf_jax.train] LoRA adapters from {t.init_adapters}")

    def _restore_params(self, step: int):
        """The parameters of checkpoint ``step`` (one saved without optimizer state)."""
        abstract_model = abstract_with_shardings(self.fns.abstract_model_state, self.fns.model_shardings)
        saved = adapters.saved_part(abstract_model, self.config.model)
        return self.checkpointer.restore_step(
            step, lambda s: self.checkpointer.restore(s, abstract_model=saved))["model"]

    def _restore_state(self) -> None:
        """The newest checkpoint at or below the resume step that restores (a LoRA run's adapters
        joined to their base), the loop counters and this process's data position."""
        fns = self.fns
        abstract_model = abstract_with_shardings(fns.abstract_model_state, fns.model_shardings)
        abstract_opt = abstract_with_shardings(fns.abstract_opt_state, fns.opt_shardings)
        saved = adapters.saved_part(abstract_model, self.config.model)  # a LoRA run saves its adapters only
        self.resume_step, restored = self.checkpointer.restore_newest_good(
            lambda step: self.checkpointer.restore(step, abstract_model=saved, abstract_opt=abstract_opt),
            [s for s in self._all_steps if s <= self.resume_step], log=self.log,
        )
        # Every process must resume from the same step (a file one host cannot read is not enough).
        distributed.check_same_on_all_processes(str(self.resume_step), "newest restorable checkpoint")
        loop = restored["loop"]
        self.model_state, self.opt_state = restored["model"], restored["optimizer"]
        if self.config.model.lora.enabled:
            self.model_state = adapters.with_base(self.model_state, loop.get("lora_base"), self.config.train.init_from,
                                                  abstract_model, self.config.model, self.run_dir)
        self.train_iter.set_state(setup.own_data_state(loop, self.run_dir))
        self.supervised_tokens_at_start = int(loop["supervised_tokens"])
        self.input_tokens_at_start = int(loop["input_tokens"])
        self.step = self.resume_step

    def _write_run_files(self, tokenizer_copy: str) -> None:
        """The run directory's config and tokenizer, written only once every check has passed; then
        checkpoints newer than the resumed one (they did not restore) are moved aside, kept."""
        skipped = [s for s in self._all_steps if self.resume_step is not None and s > self.resume_step]
        if skipped and is_main_process():
            for path in self.checkpointer.set_aside(skipped):
                self.log(f"[gf_jax.train] moved the checkpoint that did not restore to {path}")
        if skipped:
            distributed.allgather_str("")  # the others re-read the steps once process 0 has moved them
            self.checkpointer.reload()
        if not is_main_process():
            return
        run = RunDir(self.run_dir)
        for name in self._replaced:  # an earlier run's files (listed by _check_resume): never adopted
            run.remove(name)
        if self._replaced:
            self.log(f"[gf_jax.train] {'--fresh: ' if self.fresh else ''}replaced what an earlier run left in "
                     f"{self.run_dir}: {', '.join(self._replaced)}")
        paths.makedirs(self.run_dir)
        if not paths.exists(tokenizer_copy):
            init = self.config.train.init_from
            metadata = ModelSource.parse(init).metadata_dir() if init else None
            write_tokenizer_copy(self.tokenizer, tokenizer_copy, [metadata] if metadata else [])
        save_config(self.config, RunDir(self.run_dir).config)

    def _setup_tracker(self) -> None:
        t = self.config.train
        writers = make_writers(
            self.run_dir, resume_step=self.resume_step, tensorboard=t.tensorboard,
            wandb_project=t.wandb_project, config_dict=to_dict(self.config),
        )
        self.tracker = Tracker(
            writers, tokens_per_step=t.global_batch * t.seq_len,
            flops_per_token=flops_per_token(self.config.model, t.seq_len), n_devices=self.mesh.devices.size,
            peak=peak_tflops(self.mesh.devices.flat[0]),
            supervised_tokens=self.supervised_tokens_at_start, input_tokens=self.input_tokens_at_start,
        )

    def _add_builtin_hooks(self) -> None:
        t = self.config.train
        # Order matters: the log hook's read-back (and NaN check) has run before any hook, the
        # checkpoint is written before an evaluation can fail.
        self.add_hook(self._log_hook, every=t.log_every, name="log")
        self.add_hook(self._checkpoint_hook, every=t.ckpt_every, name="checkpoint")
        if t.eval_every > 0:
            self.add_hook(self._eval_hook, every=t.eval_every, name="eval")

    # ---- public API ----------------------------------------------------------------------------

    @property
    def model(self):
        """The current model (an nnx.Module with its parameters on the training mesh)."""
        return nnx.merge(self.fns.model_graphdef, self.model_state)

    def start_from(self, model) -> None:
        """Starts training from ``model``'s parameters (an nnx.Module or nnx.State of this run's
        architecture) instead of fresh ones; the optimizer starts fresh. Only before the first step."""
        if self.step != 0 or self.resume_step is not None:
            raise ValueError(
                f"{self.run_dir} resumes from step {self.resume_step}; start from other parameters only in "
                "a new train.run_dir."
            )
        state = model if isinstance(model, nnx.State) else nnx.state(model)
        # LoRA: a base without adapters keeps the current adapters; adapters alone keep the current base.
        state = adapters.onto(state, self.model_state, self.config.model)
        if jax.tree.structure(state) != jax.tree.structure(self.model_state):
            raise ValueError(
                "the starting parameters belong to another architecture than model.*; use the same model settings."
            )
        self.model_state = jax.tree.map(
            lambda x, s: jax.device_put(jnp.asarray(x, s.dtype), s.sharding), state, self.model_state
        )

    def add_hook(self, fn: Callable[[int], None], every: int, *, name: str | None = None, at_end: bool = True) -> None:
        """Runs ``fn(step)`` every ``every`` steps (and at the last step unless ``at_end=False``),
        after the built-in log, checkpoint and evaluation hooks."""
        self.hooks.append(Hook(name or getattr(fn, "__name__", "hook"), fn, every, at_end))

    def log(self, line: str) -> None:
        if not is_main_process():
            return
        if self._log_fn is not None:
            self._log_fn(line)
        elif self._pbar is not None:
            self._pbar.write(line)
        else:
            print(line, flush=True)

    def global_batch(self, local_batch) -> Batch:
        """This process's rows as one global, row-sharded batch on the mesh."""
        return to_global_batch(local_batch, self.fns.batch_sharding)

    def evaluate(self) -> dict:
        """Held-out loss: one in-order pass over the validation documents (at most
        ``train.eval_batches`` batches; 0 = all), the same batches every time."""
        t = self.config.train
        batches = self.task.eval_batches(
            self.val_tokens, global_batch=t.global_batch // t.grad_accum, seq_len=t.seq_len,
            pad_id=self.tokenizer.pad_id,
            context=self.config.data.row_context,  # validation targets get training's mask rule
        )
        totals = LossSums.zeros()
        for i, batch in enumerate(batches):
            if t.eval_batches and i >= t.eval_batches:
                break
            totals = totals.add(self.fns.eval_step(self.model_state, self.global_batch(batch)))
        ratios = jax.device_get(totals.ratios())
        return {
            "val_loss": float(ratios["loss_all"]),
            "val_loss_kept": float(ratios["loss_kept"]),
            "val_tokens": int(totals.n_valid),
        }

    def save(self, step: int) -> None:
        loop_state = {
            "data": self.train_iter.get_state(),
            "data_fingerprints": self.data_fingerprints,
            "supervised_tokens": self.tracker.supervised_tokens,
            "input_tokens": self.tracker.input_tokens,
        }
        if self.base_record is not None:  # LoRA: which base the adapters belong to
            loop_state["lora_base"] = self.base_record
        self.checkpointer.save(step, model_state=adapters.saved_part(self.model_state, self.config.model),
                               opt_state=self.opt_state, loop_state=loop_state, config_dict=to_dict(self.config))
        self._last_saved = step

    # ---- built-in hooks ------------------------------------------------------------------------

    def _log_hook(self, step: int) -> None:
        record = self.tracker.log_record(step, self.config.loss.z_loss)
        self.tracker.write(record)
        self.log(format_record(record))
        if self._pbar is not None:
            self._pbar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def _checkpoint_hook(self, step: int) -> None:
        started = time.perf_counter()
        self.save(step)
        self.tracker.exclude(time.perf_counter() - started)

    def _eval_hook(self, step: int) -> None:
        started = time.perf_counter()
        record = {"step": step, **self.evaluate()}
        self.tracker.write(record)
        self.log(f"step {step:>6}  val_loss {record['val_loss']:.4f} ({record['val_tokens']} tokens)")
        self.tracker.exclude(time.perf_counter() - started)

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to ``train.steps`` (or ``train.stop_at``); returns ``{status, step, run_dir}``.

        Raises NonFiniteLossError (after closing the checkpointer, with no new checkpoint) when
        a loss is NaN or infinite.
        """
        t = self.config.train
        end = t.stop_at if 0 < t.stop_at < t.steps else t.steps
        if self.step >= end:
            self.log(f"[gf_jax.train] {self.run_dir} is already at step {self.step} (target {end}); nothing to do.")
            self.close()
            return {"status": "done", "step": self.step, "run_dir": self.run_dir}
        self._announce()
        self._last_saved = self.resume_step
        status = "done"
        try:
            with StopSignal() as stop, self._progress_bar(end):
                while self.step < end:
                    self._train_one_step()
                    if self._after_step(end, stop):
                        status = "preempted"
                        break
        finally:
            self.close()
        if status == "done":
            self.log(
                f"[gf_jax.train] done at step {self.step}: checkpoints in {self.checkpointer.directory}, "
                f"metrics in {RunDir(self.run_dir).metrics}"
            )
        return {"status": status, "step": self.step, "run_dir": self.run_dir}

    def _train_one_step(self) -> None:
        started = time.perf_counter()
        batch = self.global_batch(next(self.train_iter))
        self.model_state, self.opt_state, metrics = self.fns.train_step(self.model_state, self.opt_state, batch)
        self.step += 1
        self.tracker.step_done(metrics, started)
        if self._pbar is not None:
            self._pbar.update(1)

    def _after_step(self, end: int, stop: StopSignal) -> bool:
        """Runs the hooks that are due; True when a stop signal ended the run (after a checkpoint)."""
        if self.lock is not None:
            self.lock.check()
        stopping = stop.requested(self.step)
        due = [hook for hook in self.hooks if hook.due(self.step, end)]
        if stopping:  # the steps since the last log line are logged, and the step is saved, before stopping
            due += [hook for hook in self.hooks if hook.name in ("log", "checkpoint") and hook not in due]
            due.sort(key=self.hooks.index)
        if not (due or stopping):
            return False  # the host runs ahead of the devices; metrics are read back only when needed
        try:
            self.tracker.read_back(self.step)
        except NonFiniteLossError as e:
            if self._last_saved is None:  # nothing to resume: the same command starts over
                raise NonFiniteLossError(
                    f"{e}; stopped before the first checkpoint was saved; lower optimizer.lr or raise "
                    "optimizer.warmup, then run the same command again (it starts over)."
                ) from None
            raise NonFiniteLossError(
                f"{e}; stopped without saving (last good checkpoint: step {self._last_saved}); lower "
                "optimizer.lr or raise optimizer.warmup, then run the same command again to resume from it."
            ) from None
        for hook in due:
            hook.fn(self.step)
        if stopping:
            self.log(
                f"[gf_jax.train] received signal {stop.received}: saved step {self.step} to "
                f"{self.checkpointer.directory}; run the same command to resume."
            )
        return stopping

    def _announce(self) -> None:
        t, kind = self.config.train, self.mesh.devices.flat[0].device_kind
        self.log(
            f"[gf_jax.train] {'resuming from step ' + str(self.step) if self.step else 'starting'}: "
            f"{t.steps} steps of {t.global_batch} x {t.seq_len} tokens on mesh "
            f"{dict(self.mesh.shape)} ({kind}); run dir {self.run_dir}"
        )
        if self.tracker.peak is None:
            self.log(
                f"[gf_jax.train] no peak FLOP/s known for device kind {kind!r}: MFU is not reported "
                "(TFLOP/s/device is)."
            )

    @contextlib.contextmanager
    def _progress_bar(self, end: int):
        self._pbar = tqdm(
            total=end, initial=self.step, unit="step", dynamic_ncols=True,
            disable=not (self.config.train.progress and is_main_process()), desc="train",
        )
        try:
            yield self._pbar
        finally:
            self._pbar.close()
            self._pbar = None

    def close(self) -> None:
        """Waits for pending checkpoint writes, stops the data prefetch thread, closes the writers,
        then releases the run directory."""
        try:
            for part in (self.checkpointer, self.train_iter, self.tracker):
                if part is not None:
                    part.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
