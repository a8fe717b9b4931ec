"""LoRA: low-rank adapters on the projection weights, trained while the base model stays frozen.

``model.lora: {rank, alpha, targets, dropout}`` (:class:`LoRAConfig`; ``rank: 0``, the default,
means no adapters). Each targeted projection ``W`` (``q k v o`` of attention, ``gate up down`` of
the MLP) gets an ``nnx.LoRA`` adapter ``A`` (``I x r``) and ``B`` (``r x O``, zeros at the start, so
step 0 computes exactly the base model), and computes ``x W + (alpha / r) * dropout(x) A B`` with
``x`` flattened to the projection's input features ``I`` (``D``, or ``N * H`` for ``o``) and the
result reshaped to its output (``N x H`` for ``q``). Adapters are ``nnx.LoRAParam`` (a subclass of
``nnx.Param``) in float32 whatever ``model.param_dtype`` the base has; the train step takes
gradients and optimizer state for them only (:func:`trainable`).

This module also holds what a LoRA run needs around the model: splitting a state into base and
adapters, merging adapters into the base weights, and the fingerprint of the base a run was
trained on (checked at resume and by ``gf_jax.checkpoint.load_model``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
from flax import nnx

# Projections an adapter can target, and the base weight (of Attention or MLP) each one updates.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
BASE_WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
ADAPTERS = "lora"  # attribute of Attention / MLP holding the adapters (an nnx.Dict by target)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``model.lora`` section.

    Attributes:
      rank: r, the adapters' inner width; 0 = no adapters (the whole model is trained).
      alpha: the update is scaled by ``alpha / rank``; null = ``rank`` (scale 1).
      targets: projections that get an adapter, among q, k, v, o, gate, up, down.
      dropout: dropout rate on each adapter's input, in training steps only.
    """

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be > 0 to train adapters (0 turns LoRA off), got {self.rank}.")
        if self.rank == 0:
            changed = [f.name for f in dataclasses.fields(self) if f.name != "rank"
                       and getattr(self, f.name) != getattr(LoRAConfig, f.name)]
            if changed:
                raise ValueError(f"model.lora.{changed[0]} is set but model.lora.rank is 0 (no adapters); "
                                 "set model.lora.rank > 0 (e.g. 16) or remove the model.lora section.")
            return
        self._check_targets()
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0 (or null for alpha = rank), got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")

    def _check_targets(self) -> None:
        if not self.targets:
            raise ValueError(f"model.lora.targets is empty; list at least one of {', '.join(TARGETS)}.")
        for target in self.targets:
            if target not in TARGETS:
                raise ValueError(f"model.lora.targets has {target!r}, which is not a projection; choose among "
                                 f"{', '.join(TARGETS)} (q_proj is q, gate_proj is gate, ...).")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"model.lora.targets lists a projection twice ({list(self.targets)}); list each once.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of every adapter's update."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


# ---- adapters in the model ---------------------------------------------------------------------


def _a_init(in_name):
    # PEFT's kaiming_uniform_(a=sqrt(5)) on the A matrix: uniform(-1/sqrt(I), 1/sqrt(I)).
    init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)
    return nnx.with_partitioning(init, (in_name, None), eager_sharding=False)


def _b_init(out_name):
    return nnx.with_partitioning(nnx.initializers.zeros, (None, out_name), eager_sharding=False)


def _in_input_dtype(arrays, dtype=None):
    """``promote_dtype`` of the adapters: compute in the input's dtype (the model's compute dtype),
    as the base weights do, instead of promoting bfloat16 activations to the adapters' float32."""
    del dtype
    return tuple(a.astype(arrays[0].dtype) for a in arrays)


def make_adapters(config, shapes: dict, rngs: nnx.Rngs) -> nnx.Dict | None:
    """The adapters of one module: ``nnx.Dict`` target -> ``nnx.LoRA``, or None when none applies.

    ``config``: the ModelConfig; ``shapes``: target -> ``(in_features, out_features, in_name,
    out_name)`` for this module's projections (logical axis names of the flattened input and
    output, so gf_jax.sharding places A and B like the base weight's matching dimensions).
    """
    lora = config.lora
    chosen = [t for t in TARGETS if t in shapes and lora.enabled and t in lora.targets]
    if not chosen:
        return None  # no attribute at all: a model without adapters keeps its state unchanged
    return nnx.Dict({
        target: nnx.LoRA(
            shapes[target][0], lora.rank, shapes[target][1], param_dtype=jnp.float32,
            a_initializer=_a_init(shapes[target][2]), b_initializer=_b_init(shapes[target][3]),
            promote_dtype=_in_input_dtype, rngs=rngs,
        )
        for target in chosen
    })


def add_update(module, target: str, y_BxTx_, x_BxTx_, config):
    """``y + (alpha / r) * dropout(x) A B`` when ``module`` has an adapter for ``target``, else ``y``.

    ``x_BxTx_`` is the projection's input (trailing axes flattened to the adapter's input features),
    ``y_BxTx_`` its output (the update is reshaped to it); both in the compute dtype.
    """
    adapters = getattr(module, ADAPTERS, None)
    if adapters is None or target not in adapters:
        return y_BxTx_
    adapter = adapters[target]
    x_BxTxI = x_BxTx_.reshape(*x_BxTx_.shape[:2], adapter.in_features)
    x_BxTxI = _dropout(x_BxTxI, config.lora.dropout)
    update_BxTxO = adapter(x_BxTxI) * jnp.asarray(config.lora.scale, x_BxTxI.dtype)
    return y_BxTx_ + update_BxTxO.reshape(y_BxTx_.shape)


# ---- dropout: training steps only --------------------------------------------------------------

# The key of the current training step, set by gf_jax.step around the loss (never in evaluation or
# decoding), and a count of the adapter calls traced so far, so every call gets its own mask.
_DROPOUT = contextvars.ContextVar("gf_jax_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_key(key):
    """Adapter dropout is active, with masks drawn from ``key``, while this context is open.

    The masks are drawn while the step is traced: each adapter call of an unrolled model folds its
    own index into ``key``. Layers run by one traced body (a scan over layers) share their masks.
    """
    token = _DROPOUT.set([key, 0])
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def _dropout(x, rate: float):
    state = _DROPOUT.get()
    if state is None or rate == 0.0:
        return x
    key = jax.random.fold_in(state[0], state[1])
    state[1] += 1
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ---- what trains, and the state split ----------------------------------------------------------


def trainable(model_config):
    """The nnx filter of the parameters the optimizer updates: the adapters of a LoRA model, else
    every parameter."""
    return nnx.LoRAParam if model_config.lora.enabled else nnx.Param


def split(state) -> tuple[nnx.State, nnx.State]:
    """``(base, adapters)`` of a model state (or of a tree of shardings / abstract leaves like it)."""
    adapters, base = nnx.split_state(state, nnx.LoRAParam, ...)
    return base, adapters


def join(base, adapters) -> nnx.State:
    """The full model state of :func:`split`'s two parts."""
    return nnx.merge_state(base, adapters)


def merged(model, param_dtype: str | None = None):
    """``model`` (a Transformer with adapters) as a Transformer without them whose weights are
    ``W + (alpha / r) A B``, computed in float32 and stored in ``param_dtype`` (default: the base's)."""
    from gf_jax.model import Transformer

    config = model.config
    plain = dataclasses.replace(config, lora=LoRAConfig(), param_dtype=param_dtype or config.param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(plain, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    updates = adapter_updates(flat, config.lora.scale)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        value = flat[path].get_value()
        if path in updates:
            value = value.astype(jnp.float32) + updates[path].reshape(value.shape)
        leaves.append((path, variable.replace(value.astype(variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def adapter_updates(flat_state: dict, scale: float) -> dict:
    """Base weight path -> ``scale * A @ B`` in float32, flattened ``... x I x O`` (leading axes,
    e.g. stacked layers, kept), for every adapter in a flat state (path -> Variable or array)."""
    def value(x):
        return x.get_value() if isinstance(x, nnx.Variable) else x

    updates = {}
    for path in flat_state:
        if path[-1] != "lora_a":
            continue
        module_path, target = path[:-3], path[-2]  # (..., "attn", "lora", "q", "lora_a")
        a = jnp.asarray(value(flat_state[path]), jnp.float32)
        b = jnp.asarray(value(flat_state[(*path[:-1], "lora_b")]), jnp.float32)
        updates[(*module_path, BASE_WEIGHTS[target])] = scale * jnp.einsum("...ir,...ro->...io", a, b)
    return updates


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token (``gf_jax.model.flops_per_token``'s count) of a model whose
    adapters alone train: the frozen weights get no weight gradient (2 of their 6 FLOPs per
    parameter are skipped) and every adapter costs ``6 (I + O) r``. Without adapters, the full count."""
    from gf_jax.model import flops_per_token as full_flops

    full = full_flops(model_config, seq_len)
    if not model_config.lora.enabled:
        return full
    c = model_config
    attention = 12 * c.n_layers * c.n_heads * c.resolved_head_dim * seq_len
    frozen = (full - attention) / 6  # the parameters that take part in matmuls
    h, f, d = c.resolved_head_dim, c.d_ff, c.d_model
    sizes = {"q": d + c.n_heads * h, "k": d + c.n_kv_heads * h, "v": d + c.n_kv_heads * h,
             "o": c.n_heads * h + d, "gate": d + f, "up": d + f, "down": f + d}
    adapters = c.n_layers * c.lora.rank * sum(sizes[t] for t in c.lora.targets)
    return full - 2 * frozen + 6 * adapters


# ---- the base a run's adapters belong to -------------------------------------------------------


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


def fingerprint(spec: str) -> dict:
    """A cheap identity of the base ``spec`` (HF directory, run directory or ``RUN_DIR@STEP``): the
    SHA-256 of every safetensors header with the file's size, or a run checkpoint's step with the
    names and sizes of its parameter files. Reads kilobytes, never the weights."""
    from gf_jax.checkpoint import split_step
    from gf_jax.hf import is_hf_dir

    path, step = split_step(spec)
    if is_hf_dir(path):
        return {"kind": "hf", "files": _safetensors_identity(path)}
    return {"kind": "run", **_run_identity(path, step)}


def _safetensors_identity(hf_dir: str) -> dict:
    import os
    import struct

    from gf_jax.hf.safetensors_io import weight_files

    files = {}
    for path in sorted(set(weight_files(hf_dir).values())):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            digest = hashlib.sha256(f.read(n)).hexdigest()[:16]
        files[os.path.basename(path)] = f"{os.path.getsize(path)} bytes, header {digest}"
    return files


def _run_identity(run_dir: str, step: int | None) -> dict:
    from etils import epath

    from gf_jax.checkpoint import Checkpointer, pretrained_step

    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        step = pretrained_step(ckpt, run_dir, step)
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
