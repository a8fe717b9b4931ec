"""Checkpoints of a run: model, optimizer, data-iterator state and config, saved together.

Layout: ``RUN_DIR/checkpoints/<step>/{model,optimizer,loop,config}`` written by an Orbax
``CheckpointManager`` (asynchronously: the arrays are copied off the devices before ``save``
returns, the files are written in the background), keeping the last ``keep`` steps.

This module is Orbax only: it saves and restores state trees, and knows nothing of where a model
comes from (``gf_jax.run.source``) or what a LoRA run saves (``gf_jax.run.adapters``).
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orbax.checkpoint as ocp

from gf_jax.model import layers
from gf_jax.model.config import ARCHITECTURE_FIELDS, ModelConfig
from gf_jax.run.rundir import RunDir
from gf_jax.util import paths

T = TypeVar("T")


class Checkpointer:
    """An Orbax CheckpointManager for one run directory.

    Every process of a multi-host run must create it and call ``save`` (Orbax writes each
    process's shards); only the main process writes the JSON items.
    """

    def __init__(self, run_dir: str, *, keep: int = 3, async_save: bool = True, clean_up: bool = False):
        """``clean_up``: remove half-written checkpoints (``<step>.orbax-checkpoint-tmp``) a crash left;
        only for the one writer of the run (the trainer, holding the run's lock), never for a
        reader, which could remove a save in flight."""
        self.run_dir = run_dir
        self.directory = RunDir(run_dir).checkpoints
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=clean_up,
        )
        self._manager_or_none = None
        self._in_flight: int | None = None  # the step whose background write has not been waited for
        self._last_intact: int | None = None  # the newest step known to be completely on disk
        self.failed: CheckpointSaveError | None = None

    def _manager_if_any(self):
        """The CheckpointManager, opened only once ``checkpoints/`` exists or a save needs it: Orbax
        creates the directory when it opens, and a run that fails its checks must leave nothing."""
        if self._manager_or_none is None and paths.exists(self.directory):
            self._open()
        return self._manager_or_none

    def _open(self):
        if self._manager_or_none is None:
            self._manager_or_none = ocp.CheckpointManager(
                self.directory, options=self._options, item_names=("model", "optimizer", "loop", "config")
            )
        return self._manager_or_none

    @property
    def _manager(self):
        return self._open()

    def latest_step(self) -> int | None:
        manager = self._manager_if_any()
        return None if manager is None else manager.latest_step()

    def all_steps(self) -> list[int]:
        manager = self._manager_if_any()
        return [] if manager is None else sorted(manager.all_steps())

    def step_for(self, step: int | None) -> int:
        """The checkpoint step ``step`` means: itself (when saved), or the newest when None. The one
        answer to "which step?"; a run without checkpoints, or without that step, is one sentence."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"{self.run_dir} has no checkpoints (looked in {self.directory}); train first with "
                f"python -m gf_jax.train --config configs/tiny.yaml train.run_dir={self.run_dir}."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint of step {step}; it has steps {steps}.")
        return step

    def save(self, step: int, *, model_state, opt_state, loop_state: dict, config_dict: dict) -> None:
        """Saves (asynchronously unless disabled) and returns once the arrays are off the devices.

        ``loop_state`` is JSON: the data iterator's state and the training counters;
        ``opt_state`` may be None to save parameters only. A save that fails (here, or in the
        background and found by the next save, ``wait`` or ``close``) raises CheckpointSaveError:
        one sentence naming the run, the step and the newest intact checkpoint.
        """
        items = dict(
            model=ocp.args.StandardSave(model_state),
            loop=ocp.args.JsonSave(loop_state),
            config=ocp.args.JsonSave(config_dict),
        )
        if opt_state is not None:  # None: parameters only (e.g. an exported model)
            items["optimizer"] = ocp.args.StandardSave(opt_state)
        self.wait()  # the previous save's background write: its failure is named by its own step
        if self._last_intact is None:
            self._last_intact = self.latest_step()
        self._in_flight = step
        with self._naming_failures():
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, abstract_model, abstract_opt=None) -> dict[str, Any]:
        """Restores ``step``: model (and optimizer, when its abstract state is given), loop and
        config, each array placed by the sharding of its abstract leaf.

        A checkpoint saved in the other block layout (``model.scan_layers``) is read in its own
        layout and converted (gf_jax.model.layers), layer by layer, into the one asked for."""
        saved_stacked = bool(self.saved_config(step).get("model", {}).get("scan_layers", False))
        convert = (layers.layout(abstract_model) == "stacked") != saved_stacked
        targets = {"model": abstract_model, "optimizer": abstract_opt}
        items = dict(loop=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
        for name, abstract in targets.items():
            if abstract is not None:
                items[name] = ocp.args.StandardRestore(layers.other_layout(abstract) if convert else abstract)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        out = {name: restored[name] for name in items}
        if convert:
            for name, abstract in targets.items():
                if abstract is not None:
                    out[name] = layers.convert(out[name], abstract, consume=True)
        return out

    def has_optimizer(self, step: int) -> bool:
        """Whether checkpoint ``step`` holds optimizer state (``hf import`` saves parameters only)."""
        return paths.exists(paths.join(self.directory, str(step), "optimizer"))

    def saved_config(self, step: int) -> dict:
        """The run config (a plain dict) saved with ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_newest_good(self, restore_fn: Callable[[int], T], steps: list[int] | None = None, *,
                            log: Callable[[str], None] | None = None) -> tuple[int, T]:
        """``(step, restore_fn(step))`` for the newest of ``steps`` (default: all) that restores.

        ``restore_fn(step)`` reads one checkpoint (e.g. ``lambda s: ckpt.restore(s, ...)``). One that
        fails (a truncated array file, a missing item, bad JSON) is skipped with a line naming the
        step and why; it is never deleted. Raises CorruptCheckpointError (one sentence) when none
        restores.
        """
        steps = sorted(self.all_steps() if steps is None else steps)
        failures = []
        for step in reversed(steps):
            try:
                return step, restore_fn(step)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint makes it unusable
                failures.append(f"step {step} ({_why(e)})")
                (log or _warn)(f"[gf_jax.run.checkpoint] skipping checkpoint step {step} of {self.run_dir}: it does "
                               f"not restore ({_why(e)}); it is left on disk for inspection.")
        raise CorruptCheckpointError(
            f"no checkpoint of {self.run_dir} restores: {'; '.join(failures)}; restore a copy of the "
            "checkpoints directory, or move it away to start the run afresh."
        )

    def restore_step(self, step: int, restore_fn: Callable[[int], T]) -> T:
        """``restore_fn(step)``; a checkpoint that does not restore is one sentence (CorruptCheckpointError)."""
        try:
            return restore_fn(step)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"checkpoint step {step} of {self.run_dir} does not restore ({_why(e)}); choose another of the "
                f"steps {self.all_steps()}, or omit the step to use the newest one that restores."
            ) from None

    def set_aside(self, steps: list[int]) -> list[str]:
        """Moves the checkpoints of ``steps`` (ones that did not restore) to ``RUN/corrupt_checkpoints/``,
        out of the way of the saves that reach those steps again; returns where they went. Call
        on the main process only, before any save."""
        moved = []
        for step in steps:
            src = paths.join(self.directory, str(step))
            corrupt = RunDir(self.run_dir).corrupt_checkpoints
            dst = paths.join(corrupt, str(step))
            if paths.exists(dst):
                dst = f"{dst}-{int(time.time())}"
            paths.makedirs(corrupt)
            paths.move(src, dst)
            moved.append(dst)
        self.reload()
        return moved

    def reload(self) -> None:
        """Re-reads the list of steps (after another process changed the directory)."""
        if self._manager_or_none is not None:
            self._manager_or_none.reload()

    def wait(self) -> None:
        """Blocks until every pending background save is on disk (CheckpointSaveError if one failed)."""
        if self._manager_or_none is not None and self.failed is None:
            with self._naming_failures():
                self._manager_or_none.wait_until_finished()
            if self._in_flight is not None:
                self._last_intact, self._in_flight = self._in_flight, None

    def close(self) -> None:
        """Waits for the pending save and closes; after a failed save it closes quietly (the failure
        has been raised once already)."""
        if self._manager_or_none is None:
            return
        try:
            self.wait()
        finally:
            try:
                self._manager_or_none.close()
            except Exception:  # noqa: BLE001 - only after a failed save, which was raised already
                if self.failed is None:
                    raise

    def newest_intact_text(self) -> str:
        """``"the newest intact checkpoint is step N"`` (or that there is none yet), for messages."""
        last = self._last_intact if self._last_intact is not None or self.failed else self.latest_step()
        return _newest_text(last)

    @contextlib.contextmanager
    def _naming_failures(self):
        """Turns any failure of Orbax's save into one CheckpointSaveError (raised once)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
            if self.failed is not None:
                raise self.failed from None
            self.failed = CheckpointSaveError(_save_failure(self.run_dir, self._in_flight, self._last_intact, e))
            raise self.failed from None


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost bucket); the message is one sentence."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or its cause) is a full disk: ENOSPC, or TensorStore's message for it."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _save_failure(run_dir: str, step: int | None, last_intact: int | None, e: BaseException) -> str:
    if is_disk_full(e):
        why, fix = "the disk is full", "free some space"
    else:
        why, fix = _why(e), "fix that"
    return (f"saving checkpoint step {step} of {run_dir} failed ({why}); {_newest_text(last_intact)}: {fix}, "
            "then run the same command again to continue from there.")


def _newest_text(step: int | None) -> str:
    return f"the newest intact checkpoint is step {step}" if step is not None else "no checkpoint of it is intact yet"


class CorruptCheckpointError(ValueError):
    """A checkpoint exists but cannot be read back (truncated file, missing item, bad JSON)."""


def _why(e: BaseException) -> str:
    """An exception in a few words (Orbax and TensorStore messages run to many lines)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_compatible(saved_model: dict, model_config, run_dir: str) -> None:
    """Raises a one-sentence ValueError when ``model_config`` cannot resume ``saved_model``."""
    defaults = ModelConfig()
    for name in ARCHITECTURE_FIELDS:
        # A field missing from an older checkpoint had its default (the field did not exist yet).
        saved, now = saved_model.get(name, getattr(defaults, name)), getattr(model_config, name)
        if saved != now:
            raise ValueError(
                f"{run_dir} holds checkpoints of a different model (model.{name} is {saved!r} there, "
                f"{now!r} now); resume with the same model settings or choose a new train.run_dir."
            )
