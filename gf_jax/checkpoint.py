"""Checkpoints of a run: model, optimizer, data-iterator state and config, saved together.

Layout: ``RUN_DIR/checkpoints/<step>/{model,optimizer,loop,config}`` written by an Orbax
``CheckpointManager`` (asynchronously: the arrays are copied off the devices before ``save``
returns, the files are written in the background), keeping the last ``keep`` steps.

``load_model(run_dir)`` restores a trained model (parameters only) with its run config and
tokenizer, for evaluation:

    model, config, tokenizer = load_model("runs/tiny")
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import orbax.checkpoint as ocp

from gf_jax import rundir

if TYPE_CHECKING:
    from gf_jax.model import ModelConfig

# Fields that fix the parameters' shapes or meaning: a checkpoint cannot be resumed under others.
# dtype, remat, attention kernel, max_seq_len and scan_layers (converted on restore) may change between runs.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
    "qkv_bias",
    "qk_norm",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"  # checkpoints that did not restore, moved aside by a resume
TOKENIZER_FILE = "tokenizer.model"

T = TypeVar("T")


def checkpoint_dir(run_dir: str) -> str:
    return rundir.join(rundir.absolute(run_dir), CHECKPOINT_SUBDIR)  # a gs:// URL stays a URL


def abstract_with_shardings(state, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying the target shardings (what Orbax restores into)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


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
        self.directory = checkpoint_dir(run_dir)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=clean_up,
        )
        self._manager_or_none = None

    def _manager_if_any(self):
        """The CheckpointManager, opened only once ``checkpoints/`` exists or a save needs it: Orbax
        creates the directory when it opens, and a run that fails its checks must leave nothing."""
        if self._manager_or_none is None and rundir.exists(self.directory):
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

    def save(self, step: int, *, model_state, opt_state, loop_state: dict, config_dict: dict) -> None:
        """Saves (asynchronously unless disabled) and returns once the arrays are off the devices.

        ``loop_state`` is JSON: the data iterator's state and the training counters;
        ``opt_state`` may be None to save parameters only.
        """
        items = dict(
            model=ocp.args.StandardSave(model_state),
            loop=ocp.args.JsonSave(loop_state),
            config=ocp.args.JsonSave(config_dict),
        )
        if opt_state is not None:  # None: parameters only (e.g. an exported model)
            items["optimizer"] = ocp.args.StandardSave(opt_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, abstract_model, abstract_opt=None) -> dict[str, Any]:
        """Restores ``step``: model (and optimizer, when its abstract state is given), loop and
        config, each array placed by the sharding of its abstract leaf.

        A checkpoint saved in the other block layout (``model.scan_layers``) is read in its own
        layout and converted (gf_jax.layers), layer by layer, into the one asked for."""
        from gf_jax import layers

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
                (log or _warn)(f"[gf_jax.checkpoint] skipping checkpoint step {step} of {self.run_dir}: it does "
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
            src = rundir.join(self.directory, str(step))
            dst = rundir.join(rundir.absolute(self.run_dir), CORRUPT_SUBDIR, str(step))
            if rundir.exists(dst):
                dst = f"{dst}-{int(time.time())}"
            rundir.makedirs(rundir.join(rundir.absolute(self.run_dir), CORRUPT_SUBDIR))
            rundir.move(src, dst)
            moved.append(dst)
        self.reload()
        return moved

    def reload(self) -> None:
        """Re-reads the list of steps (after another process changed the directory)."""
        if self._manager_or_none is not None:
            self._manager_or_none.reload()

    def wait(self) -> None:
        """Blocks until every pending background save is on disk."""
        if self._manager_or_none is not None:
            self._manager_or_none.wait_until_finished()

    def close(self) -> None:
        if self._manager_or_none is not None:
            self._manager_or_none.wait_until_finished()
            self._manager_or_none.close()


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
    from gf_jax.model import ModelConfig

    defaults = ModelConfig()
    for name in ARCHITECTURE_FIELDS:
        # A field missing from an older checkpoint had its default (the field did not exist yet).
        saved, now = saved_model.get(name, getattr(defaults, name)), getattr(model_config, name)
        if saved != now:
            raise ValueError(
                f"{run_dir} holds checkpoints of a different model (model.{name} is {saved!r} there, "
                f"{now!r} now); resume with the same model settings or choose a new train.run_dir."
            )


def find_tokenizer(run_dir: str, config) -> str:
    """The tokenizer of a run: its copy in the run directory, else the Hugging Face tokenizer of a
    run made from an HF model (``RUN_DIR/hf``), else the path its config records."""
    local = rundir.join(run_dir, TOKENIZER_FILE)
    if rundir.exists(local):
        return local
    hf_copy = rundir.join(run_dir, "hf")
    if not rundir.is_url(run_dir) and os.path.isdir(hf_copy):
        return hf_copy
    if config.data.tokenizer and rundir.exists(config.data.tokenizer):
        return config.data.tokenizer
    raise FileNotFoundError(
        f"no tokenizer found for run {run_dir} (neither {local} nor data.tokenizer="
        f"{config.data.tokenizer!r} exists); copy the run's tokenizer.model into the run directory."
    )


def load_model(run_dir: str, step: int | None = None, *, mesh=None, param_dtype: str | None = None,
               base: str | None = None, scan_layers: bool | None = None):
    """Restores a trained model from a run directory or a Hugging Face model directory.

    Args:
      run_dir: a directory written by ``gf_jax.train`` (``checkpoints/<step>/``), a local
        Hugging Face directory (``config.json`` + safetensors; see ``gf_jax.hf``), or a PEFT LoRA
        adapter directory (``adapter_config.json``; ``gf_jax.hf.peft``) on ``base``.
      step: which checkpoint (default: the latest; an HF directory has only one).
      mesh: where to place the parameters (default: replicated on the first local device).
      param_dtype: HF directories (and the HF base of a PEFT directory) only: the parameters' dtype
        (default: the checkpoint's).
      base: LoRA runs and PEFT directories only: the base model (default: the run's
        ``train.init_from``; a PEFT directory's ``base_model_name_or_path``); a run's base must be
        the model its adapters were trained on (its fingerprint is checked).
      scan_layers: the block layout of the returned model (``model.scan_layers``; default: the
        run's own, unrolled for an HF directory); a checkpoint in the other layout is converted.

    Returns:
      (model: gf_jax.model.Transformer, run_config: gf_jax.config.RunConfig, tokenizer).
      Only the parameters are read; the optimizer state stays on disk. A LoRA run's model is its
      base with the adapters applied (``gf_jax.lora.merged`` folds them into the weights).
    """
    from gf_jax.hf import is_hf_dir
    from gf_jax.hf.peft import is_peft_dir, load_peft

    if is_hf_dir(run_dir):
        return _load_hf_model(run_dir, mesh=mesh, param_dtype=param_dtype, scan_layers=scan_layers)
    if is_peft_dir(run_dir):
        return load_peft(run_dir, base, mesh=mesh, param_dtype=param_dtype)
    return _load_run_model(run_dir, step, mesh=mesh, base=base, scan_layers=scan_layers)


def _load_hf_model(hf_dir: str, *, mesh=None, param_dtype: str | None = None, scan_layers: bool | None = None):
    from gf_jax.hf.load import load_model as load_hf
    from gf_jax.hf.runs import run_config
    from gf_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(hf_dir)
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    if scan_layers is not None:
        overrides["scan_layers"] = scan_layers
    config = run_config(hf_dir, tokenizer, **overrides)
    return load_hf(hf_dir, config.model, mesh=mesh), config, tokenizer


def _load_run_model(run_dir: str, step: int | None, *, mesh=None, base: str | None = None,
                    scan_layers: bool | None = None):
    from flax import nnx

    from gf_jax import lora
    from gf_jax.config import config_from_dict
    from gf_jax.model import Transformer
    from gf_jax.tokenizer import Tokenizer

    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"{run_dir} has no checkpoints (looked in {ckpt.directory}); train first with "
                f"python -m gf_jax.train --config configs/tiny.yaml train.run_dir={run_dir}."
            )
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step}; it has steps {steps}.")

        def restore(step):
            config = config_from_dict(ckpt.saved_config(step))
            if scan_layers is not None:  # the layout asked for; Checkpointer.restore converts
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=scan_layers))
            abstract = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
            graphdef, abstract_state = nnx.split(abstract)
            if mesh is None:
                shardings = jax.tree.map(
                    lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract_state
                )
            else:
                from gf_jax.sharding import model_shardings

                shardings = model_shardings(abstract_state, mesh)
            abstract_model = abstract_with_shardings(abstract_state, shardings)
            # A LoRA run's checkpoints hold the adapters only.
            saved = lora.split(abstract_model)[1] if config.model.lora.enabled else abstract_model
            return config, graphdef, abstract_model, ckpt.restore(step, abstract_model=saved)

        if step is None:  # the newest checkpoint that restores; a corrupt one is skipped with a line why
            step, (config, graphdef, abstract_model, restored) = ckpt.restore_newest_good(restore, steps)
        else:
            config, graphdef, abstract_model, restored = ckpt.restore_step(step, restore)
    finally:
        ckpt.close()
    state = restored["model"]
    if config.model.lora.enabled:
        state = _with_lora_base(run_dir, config, restored["loop"], state, abstract_model, base)
    model = nnx.merge(graphdef, state)
    tokenizer = Tokenizer.load(find_tokenizer(run_dir, config))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer.path))
    return model, config, tokenizer


def _with_lora_base(run_dir: str, config, loop: dict, adapters, abstract_model, base: str | None):
    """The full state of a LoRA run: its ``adapters`` on its base (``base`` or the run's
    ``train.init_from``) placed by ``abstract_model``'s shardings, once the base's fingerprint
    is the one recorded with the adapters."""
    from gf_jax import lora

    spec = base or config.train.init_from
    if not rundir.exists(split_step(spec)[0]):
        raise FileNotFoundError(f"the base model {spec} of the LoRA run {run_dir} does not exist; pass "
                                "load_model(..., base=PATH) with where it is now.")
    recorded = (loop.get("lora_base") or {}).get("fingerprint")
    lora.check_fingerprint(recorded, lora.fingerprint(spec), spec, run_dir)
    abstract_base = lora.split(abstract_model)[0]
    shardings = jax.tree.map(lambda x: x.sharding, abstract_base)
    return lora.join(load_pretrained_params(spec, abstract_base, shardings, config.model), adapters)


# ---- starting from a pretrained model (train.init_from) ---------------------------------------


def split_step(path: str) -> tuple[str, int | None]:
    """``"RUN_DIR@STEP"`` -> ``(RUN_DIR, STEP)``; a path without ``@N`` -> ``(path, None)``."""
    head, sep, tail = str(path).rpartition("@")
    if sep and tail.isdigit():
        return head, int(tail)
    return str(path), None


def pretrained_step(ckpt: Checkpointer, path: str, step: int | None) -> int:
    """The step of run ``path`` that ``train.init_from`` means: ``step``, or the newest."""
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"{path} is neither a Hugging Face model directory nor a run with checkpoints; "
                                "set train.init_from to one of them.")
    return steps[-1] if step is None else step


def pretrained_model_config(path: str) -> ModelConfig:
    """The architecture of ``path`` (an HF directory, a run directory, or ``RUN_DIR@STEP``) as a
    ModelConfig; the caller may replace non-architecture fields (dtypes, remat, max_seq_len) and
    must keep ``ARCHITECTURE_FIELDS`` (compare with :func:`check_compatible`)."""
    from gf_jax.hf import is_hf_dir

    path, step = split_step(path)
    if is_hf_dir(path):
        from gf_jax.hf.config import model_config_from_hf, read_config

        return model_config_from_hf(read_config(path))
    from gf_jax.config import config_from_dict

    ckpt = Checkpointer(path, async_save=False)
    try:
        model = config_from_dict(ckpt.saved_config(pretrained_step(ckpt, path, step))).model
    finally:
        ckpt.close()
    if model.lora.enabled:  # its checkpoints hold adapters only, which are not a model to start from
        raise ValueError(
            f"{path} is a LoRA run (adapters on another model); export it merged (python -m gf_jax.hf export "
            f"{path} OUT --merge-lora) and start from OUT."
        )
    return model


def load_pretrained_params(path: str, abstract_state, shardings, model_config):
    """The parameters of ``path`` (HF directory, run directory or ``RUN_DIR@STEP``) as an
    ``nnx.State`` like ``abstract_state``, each array placed straight onto its ``shardings`` leaf
    and cast to its abstract dtype. HF weights are read shard by shard from memory-mapped
    safetensors; run checkpoints are restored by Orbax (parameters only, no optimizer state).
    ``model_config`` is the config ``abstract_state`` was built from (architecture of ``path``)."""
    from gf_jax.hf import is_hf_dir

    path, step = split_step(path)
    if is_hf_dir(path):
        from gf_jax.hf.load import load_params

        return load_params(path, abstract_state, shardings, model_config)
    ckpt = Checkpointer(path, async_save=False)
    try:
        steps = ckpt.all_steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise FileNotFoundError(f"{path} has no checkpoint of step {step}; it has steps {steps}.")
        return ckpt.restore(step, abstract_model=abstract_with_shardings(abstract_state, shardings))["model"]
    finally:
        ckpt.close()


def load_pretrained(path: str, *, mesh=None, param_dtype: str | None = None, scan_layers: bool | None = None):
    """``(model, ModelConfig, tokenizer)`` of an HF directory, run directory or ``RUN_DIR@STEP``
    (parameters on ``mesh`` by the logical-axis rules, or on the first local device)."""
    run_path, step = split_step(path)
    model, config, tokenizer = load_model(run_path, step, mesh=mesh, param_dtype=param_dtype,
                                          scan_layers=scan_layers)
    return model, config.model, tokenizer
