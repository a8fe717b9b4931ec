"""Where a model comes from, parsed once: a run directory, ``RUN_DIR@STEP``, a Hugging Face
directory, a GGUF file (read through the HF directory it converts to, ``gf_jax.hf.gguf``) or a
PEFT adapter directory.

    source = ModelSource.parse("runs/tiny@200")     # kind "run", step 200
    config = architecture(source)                    # its ModelConfig, no weights read

Every consumer (``gf_jax.run.load.load_model``, ``train.init_from``, ``python -m gf_jax.hf export``,
``python -m gf_jax.evaluate --run``) takes a ``ModelSource`` or the string it parses from, so the
questions "which kind?" and "which step?" are answered here and in ``Checkpointer.step_for``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from gf_jax.config import RunConfig, TrainConfig, config_from_dict, load_config
from gf_jax.data.config import DataConfig
from gf_jax.hf import gguf, is_hf_dir
from gf_jax.hf import load as hf_load
from gf_jax.hf.config import model_config_from_hf, read_config
from gf_jax.hf.peft import is_peft_dir
from gf_jax.model.config import ModelConfig
from gf_jax.model.sharding import abstract_with_shardings
from gf_jax.run.checkpoint import Checkpointer
from gf_jax.run.rundir import TOKENIZER_FILE, RunDir
from gf_jax.tokenizer import load_tokenizer
from gf_jax.util import paths

SourceKind = Literal["run", "hf", "peft"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model's origin. ``kind``: ``run`` (a gf_jax run directory, local or a URL; ``step`` None =
    its newest checkpoint), ``hf`` (a local Hugging Face model directory) or ``peft`` (a local PEFT
    adapter directory, applied to a base model)."""

    kind: SourceKind
    path: str
    step: int | None = None

    @classmethod
    def parse(cls, spec: str | ModelSource) -> ModelSource:
        """``"RUN_DIR"``, ``"RUN_DIR@STEP"``, an HF directory or a PEFT directory (a ModelSource as is)."""
        if isinstance(spec, ModelSource):
            return spec
        path, step = _split_step(str(spec))
        if gguf.is_gguf_file(path):  # a llama.cpp file: read through its converted HF directory
            if step is not None:
                raise ValueError(f"{spec} names step {step} of a GGUF file, which holds one set of weights; drop "
                                 f"the @{step}.")
            return cls("hf", gguf.converted(path))
        if is_hf_dir(path) or is_peft_dir(path):
            if step is not None:
                raise ValueError(f"{spec} names step {step} of a Hugging Face or PEFT directory, which holds one "
                                 f"set of weights; drop the @{step}.")
            return cls("hf" if is_hf_dir(path) else "peft", path)
        return cls("run", path, step)

    def __str__(self) -> str:
        return self.path if self.step is None else f"{self.path}@{self.step}"

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.path)

    def metadata_dir(self) -> str | None:
        """The HF metadata (config.json, tokenizer files) of this source: the HF directory itself, or
        ``RUN/hf`` of a run made from an HF model; None for anything else."""
        if self.kind == "hf":
            return self.path
        return self.run_dir.hf_metadata() if self.kind == "run" else None

    def checkpoint_step(self, checkpointer: Checkpointer) -> int:
        """The step of a run source: its ``@STEP``, or the newest checkpoint."""
        if not checkpointer.all_steps():
            raise FileNotFoundError(f"{self.path} is neither a Hugging Face model directory nor a run with "
                                    "checkpoints; point it at one of them.")
        return checkpointer.step_for(self.step)


def _split_step(spec: str) -> tuple[str, int | None]:
    """``"RUN_DIR@STEP"`` -> ``(RUN_DIR, STEP)``; a path without ``@N`` -> ``(path, None)``."""
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit():
        return head, int(tail)
    return spec, None


# ---- what a source is, without its weights ---------------------------------------------------------


def saved_run_config(source: ModelSource) -> RunConfig:
    """The run config saved with a run source's checkpoint (its ``@STEP``, else the newest)."""
    ckpt = Checkpointer(source.path, async_save=False)
    try:
        # A junk or damaged checkpoint is one sentence naming its step, not Orbax's KeyError.
        return config_from_dict(ckpt.restore_step(source.checkpoint_step(ckpt), ckpt.saved_config))
    finally:
        ckpt.close()


def architecture(source: str | ModelSource) -> ModelConfig:
    """The ModelConfig of a run or HF source; the caller may replace non-architecture fields
    (dtypes, remat, max_seq_len) and must keep ``ARCHITECTURE_FIELDS``."""
    source = ModelSource.parse(source)
    if source.kind == "hf":
        return model_config_from_hf(read_config(source.path))
    if source.kind == "peft":
        raise ValueError(f"{source} is a PEFT adapter directory; start from its base model and pass the adapters "
                         "as train.init_adapters.")
    model = saved_run_config(source).model
    if model.lora.enabled:  # its checkpoints hold adapters only, which are not a model to start from
        raise ValueError(
            f"{source.path} is a LoRA run (adapters on another model); export it merged (python -m gf_jax.hf export "
            f"{source.path} OUT --merge-lora) and start from OUT."
        )
    return model


def run_tokenizer(run_dir: RunDir, config: RunConfig) -> str:
    """The tokenizer of a trained run: its copy in the run directory (``tokenizer.model``, or ``hf/``
    of a run with an HF tokenizer), else the path its config records."""
    copy = run_dir.tokenizer_copy()
    if copy is not None:
        return copy
    if config.data.tokenizer and paths.exists(config.data.tokenizer):
        return config.data.tokenizer
    raise FileNotFoundError(
        f"no tokenizer found for run {run_dir.path} (neither {run_dir.file(TOKENIZER_FILE)} nor data.tokenizer="
        f"{config.data.tokenizer!r} exists); copy the run's tokenizer.model into the run directory."
    )


def tokenizer_path(source: str | ModelSource) -> str:
    """The tokenizer that comes with a run or HF source."""
    source = ModelSource.parse(source)
    if source.kind == "hf":
        return source.path
    return run_tokenizer(source.run_dir, RunConfig())


def hf_run_config(hf_dir: str, tokenizer, **model_overrides) -> RunConfig:
    """The ``RunConfig`` an HF model is evaluated or trained under: its architecture, its
    tokenizer directory, BOS framing when the tokenizer has a BOS (LLaMA: yes, Qwen: no)."""
    model = model_config_from_hf(read_config(hf_dir), **model_overrides)
    data = DataConfig(tokenizer=os.path.abspath(hf_dir), add_bos=tokenizer.bos_id >= 0,
                      add_eos=tokenizer.eos_id >= 0)
    train = TrainConfig(seq_len=min(TrainConfig().seq_len, model.max_seq_len))
    return RunConfig(model=model, data=data, train=train)


def run_config(source: str | ModelSource) -> RunConfig:
    """The config a run or HF source is evaluated under: a run's ``config.yaml``, or for an HF
    directory :func:`hf_run_config`."""
    source = ModelSource.parse(source)
    if source.kind == "hf":
        return hf_run_config(source.path, load_tokenizer(source.path))
    if source.kind == "peft":
        raise ValueError(f"{source} is a PEFT adapter directory; evaluate it on its base with load_model(..., "
                         "base=PATH), or export it merged first.")
    if not source.run_dir.has_config():
        raise FileNotFoundError(f"{source.path!r} has no config.yaml; pass a run directory written by gf_jax.train "
                                "or a Hugging Face model directory.")
    return load_config(source.run_dir.config)


# ---- weights ---------------------------------------------------------------------------------------


def load_params(source: str | ModelSource, abstract_state, shardings, model_config: ModelConfig):
    """The parameters of a run or HF source as an ``nnx.State`` like ``abstract_state``, each array
    placed straight onto its ``shardings`` leaf and cast to its abstract dtype. HF weights are read
    shard by shard from memory-mapped safetensors; run checkpoints are restored by Orbax
    (parameters only, no optimizer state). ``model_config``: what ``abstract_state`` was built from."""
    source = ModelSource.parse(source)
    if source.kind == "peft":
        raise ValueError(f"{source} is a PEFT adapter directory, not a model; load it on its base with "
                         "gf_jax.run.load.load_model.")
    if source.kind == "hf":
        return hf_load.load_params(source.path, abstract_state, shardings, model_config)
    ckpt = Checkpointer(source.path, async_save=False)
    try:
        step = source.checkpoint_step(ckpt)
        return ckpt.restore(step, abstract_model=abstract_with_shardings(abstract_state, shardings))["model"]
    finally:
        ckpt.close()
