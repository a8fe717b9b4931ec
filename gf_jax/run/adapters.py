"""The one seam of a LoRA run: what its checkpoints hold, which base they belong to, and how adapters
are joined to that base, whether they come from a checkpoint, a PEFT directory or fresh.

A LoRA run (``model.lora.rank > 0``) trains adapters on the frozen base ``train.init_from``. Its
checkpoints hold the adapters alone (:func:`saved_part`) plus, in the loop state, the base's path
and fingerprint (:func:`base_record`). Resuming, loading and exporting rebuild the full model with
:func:`with_base`, after checking that the base is the one the adapters were trained on. The model
side of LoRA (adapters inside the modules, dropout, the state split) is ``gf_jax.model.lora``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import jax
from etils import epath

from gf_jax.hf.peft import load_adapters
from gf_jax.hf.safetensors_io import weight_files
from gf_jax.model import lora
from gf_jax.model.config import LoRAConfig
from gf_jax.run.checkpoint import Checkpointer
from gf_jax.run.source import ModelSource, load_params
from gf_jax.util import paths


def require_base(config) -> None:
    """A LoRA run trains adapters on ``train.init_from``; without one there is nothing to adapt."""
    if config.model.lora.enabled and not config.train.init_from:
        raise ValueError(
            "model.lora trains adapters on a pretrained model, and train.init_from is not set; set "
            "train.init_from to a Hugging Face directory or a run directory (or model.lora.rank=0 to train "
            "every weight)."
        )


def check_same_adapters(saved_model: dict, model_config, run_dir: str) -> None:
    """One-sentence ValueError when a run's checkpoints hold other adapters than ``model.lora`` asks for."""
    saved = dict(saved_model.get("lora") or {})
    now = dataclasses.asdict(model_config.lora)
    for name in ("rank", "alpha", "targets"):
        there = saved.get(name, getattr(LoRAConfig, name))
        there = tuple(there) if isinstance(there, list) else there
        here = tuple(now[name]) if isinstance(now[name], list) else now[name]
        if there != here:
            raise ValueError(
                f"{run_dir} holds checkpoints with model.lora.{name}={there!r}, but the config sets {here!r}; "
                "resume with the same model.lora settings or choose a new train.run_dir."
            )


# ---- what a checkpoint holds -------------------------------------------------------------------------


def saved_part(state, model_config):
    """The part of a model state (or of its abstract tree) a checkpoint holds: a LoRA run's
    adapters, else everything."""
    return lora.split(state)[1] if model_config.lora.enabled else state


def base_record(config) -> dict | None:
    """What a LoRA run's loop state records of its base (path and fingerprint); None without LoRA."""
    if not config.model.lora.enabled:
        return None
    return {"path": config.train.init_from, "fingerprint": fingerprint(config.train.init_from)}


def with_base(adapters, recorded: dict | None, base_spec: str, abstract_model, model_config, run_dir: str):
    """The full model state of a LoRA run: its ``adapters`` on the base ``base_spec`` (placed by the
    shardings of ``abstract_model``, an abstract full state), once the base's fingerprint is the one
    ``recorded`` with the adapters (a checkpoint's ``lora_base`` loop entry)."""
    source = ModelSource.parse(base_spec)
    if not paths.exists(source.path):
        raise FileNotFoundError(f"the base model {base_spec} of the LoRA run {run_dir} does not exist; pass "
                                "load_model(..., base=PATH) with where it is now.")
    check_fingerprint((recorded or {}).get("fingerprint"), fingerprint(source), base_spec, run_dir)
    abstract_base = lora.split(abstract_model)[0]
    shardings = jax.tree.map(lambda x: x.sharding, abstract_base)
    return lora.join(load_params(source, abstract_base, shardings, model_config), adapters)


def base_params(base_spec: str, abstract_model, shardings, model_config):
    """The parameters of ``base_spec`` for a model state like ``abstract_model`` on ``shardings``:
    with ``model.lora``, the base part only (the adapters come from elsewhere)."""
    if model_config.lora.enabled:
        abstract_model, shardings = lora.split(abstract_model)[0], lora.split(shardings)[0]
    return load_params(base_spec, abstract_model, shardings, model_config)


def peft_adapters(peft_dir: str, abstract_model, shardings):
    """The adapters of a PEFT directory, shaped and placed like the adapter part of ``abstract_model``."""
    return load_adapters(peft_dir, lora.split(abstract_model)[1], lora.split(shardings)[1])


def onto(state, current, model_config):
    """``state`` as a full model state of a LoRA model: a base without adapters keeps ``current``'s
    adapters (fresh ones, when a run starts from a pretrained base), adapters alone keep
    ``current``'s base (``train.init_adapters``). Without LoRA, ``state`` itself."""
    if not model_config.lora.enabled:
        return state
    base, adapters = lora.split(state)
    current_base, current_adapters = lora.split(current)
    return lora.join(base if jax.tree.leaves(base) else current_base,
                     adapters if jax.tree.leaves(adapters) else current_adapters)


# ---- the base's identity -----------------------------------------------------------------------------


def fingerprint(spec: str | ModelSource) -> dict:
    """A cheap identity of a base (HF directory, run directory or ``RUN_DIR@STEP``): the SHA-256 of
    every safetensors header with the file's size, or a run checkpoint's step with the names and
    sizes of its parameter files. Reads kilobytes, never the weights."""
    source = ModelSource.parse(spec)
    if source.kind == "hf":
        return {"kind": "hf", "files": _safetensors_identity(source.path)}
    return {"kind": "run", **_run_identity(source)}


def _safetensors_identity(hf_dir: str) -> dict:
    files = {}
    for path in sorted(set(weight_files(hf_dir).values())):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            digest = hashlib.sha256(f.read(n)).hexdigest()[:16]
        files[os.path.basename(path)] = f"{os.path.getsize(path)} bytes, header {digest}"
    return files


def _run_identity(source: ModelSource) -> dict:
    ckpt = Checkpointer(source.path, async_save=False)
    try:
        step = source.checkpoint_step(ckpt)
        root = epath.Path(ckpt.directory) / str(step) / "model"
    finally:
        ckpt.close()
    sizes = sorted((str(p.relative_to(root)), p.stat().length) for p in _files_under(root))
    digest = hashlib.sha256(json.dumps(sizes).encode()).hexdigest()[:16]
    return {"step": step, "files": f"{len(sizes)} files, names and sizes {digest}"}


def _files_under(root):
    """Every file below ``root`` (an epath), walked folder by folder: ``rglob`` is refused by
    etils' gfile backend, which it can pick for local paths too."""
    folders = [root]
    while folders:
        for child in folders.pop().iterdir():
            if child.is_dir():
                folders.append(child)
            else:
                yield child


def check_fingerprint(recorded: dict | None, current: dict, spec: str, run_dir: str) -> None:
    """One-sentence ValueError when the base ``spec`` (whose fingerprint is ``current``) is not the
    base ``run_dir``'s adapters were trained on (``recorded``: the fingerprint saved with them)."""
    if not recorded or recorded == current:
        return
    what = next((key for key in ("kind", "step", "files") if current.get(key) != recorded.get(key)), "kind")
    there, here = recorded.get(what), current.get(what)
    if isinstance(there, dict) and isinstance(here, dict):  # name the first file that differs
        name = next(k for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k))
        there, here, what = there.get(name, "absent"), here.get(name, "absent"), f"file {name}"
    raise ValueError(
        f"the base {spec} is not the model the adapters of {run_dir} were trained on ({what}: {there} "
        f"then, {here} now); point train.init_from (or base=) at the original base."
    )
