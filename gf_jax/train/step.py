"""The pure training and evaluation steps, and their jitted, sharded forms.

The step. Parameters and optimizer state are created by a jitted initialiser straight into their
shardings (never materialised on one device). The jitted step takes the state (donated) and a
global ``Batch``, splits it into ``grad_accum`` micro-batches, and for each computes the goldfish
mask from the batch's targets and positions, the *sums* of the loss (``LossSums``) and the
gradient of the summed objective; sums and gradients add over micro-batches and are divided once
by the kept targets of the whole batch (micro-batches keep different numbers of targets, so
averaging per-micro-batch means would weight them wrongly). Then the optimizer (gf_jax.train.optim).

Everything here depends only on ``StepConfig`` (what compiles) and the mesh, which is also the
key of the compile cache: runs that differ only in host-loop settings share compiled steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gf_jax import loss as loss_lib
from gf_jax.batch import Batch
from gf_jax.config.sections import LossConfig, OptimizerConfig
from gf_jax.goldfish import GoldfishConfig
from gf_jax.loss import LossSums
from gf_jax.model import lora as lora_lib
from gf_jax.model import sharding as sharding_lib
from gf_jax.model.config import ModelConfig
from gf_jax.model.transformer import Transformer
from gf_jax.train.optim import learning_rate, make_optimizer


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the compiled step depends on (hashable: the compile cache's key)."""

    model: ModelConfig
    goldfish: GoldfishConfig
    optimizer: OptimizerConfig
    loss: LossConfig
    grad_accum: int = 1
    total_steps: int = 1   # the learning-rate schedule spans them
    seed: int = 0          # parameter initialisation and the ``random`` goldfish strategy

    @classmethod
    def of(cls, config) -> StepConfig:
        """The StepConfig of a RunConfig."""
        t = config.train
        return cls(
            model=config.model, goldfish=config.goldfish, optimizer=config.optimizer, loss=config.loss,
            grad_accum=t.grad_accum, total_steps=t.steps, seed=t.seed,
        )


def build(sc: StepConfig):
    """The model and its optimizer (call under ``jax.jit`` or ``nnx.eval_shape``). With
    ``model.lora`` the optimizer holds state for the adapters only (``lora.trainable``)."""
    model = Transformer(sc.model, rngs=nnx.Rngs(sc.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(sc.optimizer, sc.total_steps),
                              wrt=lora_lib.trainable(sc.model))
    return model, optimizer


def batch_loss_sums(model, batch: Batch, sc: StepConfig, rng, dropout_key=None) -> LossSums:
    """Goldfish-loss sums of one (micro-)batch. The mask is computed here, from the batch's
    targets and positions, so it is part of the jitted step; ``rng`` serves the ``random`` strategy,
    ``dropout_key`` the LoRA adapters' dropout (training steps only; None: no dropout)."""
    mask_kwargs = dict(
        weights_BxT=batch.weights_BxT,
        positions_BxT=batch.positions_BxT,
        context_BxC=batch.context_BxC,  # a mid-document row's preceding targets, or None
        rng=rng,
    )
    model_kwargs = dict(positions_BxT=batch.positions_BxT, segment_ids_BxT=batch.segment_ids_BxT,
                        dropout_key=dropout_key)
    if sc.loss.chunk_size > 0:
        hidden_BxTxD = model.hidden(batch.inputs_BxT, **model_kwargs)
        return loss_lib.chunked_goldfish_sums(
            hidden_BxTxD, model.output_weights(), batch.targets_BxT, sc.goldfish,
            chunk_size=sc.loss.chunk_size, **mask_kwargs,
        )
    logits_BxTxV = model(batch.inputs_BxT, **model_kwargs)
    return loss_lib.goldfish_sums(logits_BxTxV, batch.targets_BxT, sc.goldfish, **mask_kwargs)


def split_micro_batches(batch: Batch, n: int) -> Batch:
    """B x ... arrays -> n x (B/n) x ...; micro-batch i takes rows i, i+n, i+2n, ...

    Strided rows keep every micro-batch spread over all batch shards (row blocks stay on their
    device), so splitting moves no data between devices.
    """

    def split(x):
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate(grad_fn: Callable, params, batch: Batch, n: int, rng):
    """Gradients and LossSums of ``batch`` added over ``n`` micro-batches (a scan: one compiled
    micro-step, memory of one micro-batch). ``grad_fn(params, micro_batch, rng) -> (grads, sums)``."""
    if n == 1:
        return grad_fn(params, batch, rng)

    def body(carry, xs):
        index, micro_batch = xs
        grads_and_sums = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, grads_and_sums), None

    init = (jax.tree.map(jnp.zeros_like, params), LossSums.zeros())
    (grads, sums), _ = jax.lax.scan(body, init, (jnp.arange(n), split_micro_batches(batch, n)))
    return grads, sums


_LORA_DROPOUT_STREAM = 1  # folded into a micro-batch's key for adapter dropout masks


def make_train_step(model_graphdef, opt_graphdef, sc: StepConfig) -> Callable:
    """``step(model_state, opt_state, batch) -> (model_state, opt_state, metrics)``, unjitted.

    ``metrics`` holds the batch's LossSums fields and ratios (``LossSums.summary``), ``loss``,
    ``grad_norm`` and ``lr``.
    """

    def objective(params, rest, graphdef, batch, rng):
        # Adapter dropout (model.lora.dropout) in training steps only; its own stream of the step's key.
        # copy=True: the Variables of ``rest`` (the frozen base, with model.lora) were made outside
        # this trace, and nnx.remat writes every Variable of a block back after it runs.
        model = nnx.merge(graphdef, params, rest, copy=True)
        dropout_key = jax.random.fold_in(rng, _LORA_DROPOUT_STREAM) if lora_lib.dropout_active(sc.model) else None
        sums = batch_loss_sums(model, batch, sc, rng, dropout_key)
        return sums.objective(sc.loss.z_loss), sums

    grad_of_objective = jax.grad(objective, has_aux=True)

    def step_fn(model_state, opt_state, batch):
        model = nnx.merge(model_graphdef, model_state)
        optimizer = nnx.merge(opt_graphdef, opt_state)
        step = optimizer.step[...]
        # Gradients only for what trains: every parameter, or with model.lora only the adapters (the
        # frozen base gets no gradient buffers at all).
        graphdef, params, rest = nnx.split(model, lora_lib.trainable(sc.model), ...)
        # The random strategy draws a fresh mask each step (and micro-batch); the others ignore it.
        rng = jax.random.fold_in(jax.random.key(sc.seed), step)

        def grad_fn(p, micro_batch, micro_rng):
            return grad_of_objective(p, rest, graphdef, micro_batch, micro_rng)

        grads, sums = accumulate(grad_fn, params, batch, sc.grad_accum, rng)
        # One division by the kept targets of the whole batch: the gradient of the global mean.
        n_kept = jnp.maximum(1, sums.n_kept).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / n_kept.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        metrics = {
            **sums.summary(),
            "loss": sums.loss(sc.loss.z_loss),
            "grad_norm": grad_norm,
            "lr": learning_rate(step, sc.optimizer, sc.total_steps),
        }
        return nnx.state(model), nnx.state(optimizer), metrics

    return step_fn


def make_eval_step(model_graphdef, sc: StepConfig) -> Callable:
    """``eval(model_state, batch) -> LossSums`` (validation loss = loss over all targets)."""

    def eval_fn(model_state, batch):
        model = nnx.merge(model_graphdef, model_state)
        return batch_loss_sums(model, batch, sc, jax.random.key(sc.seed))

    return eval_fn


@dataclasses.dataclass
class StepFunctions:
    """The jitted initialiser, train step and eval step of a config on a mesh, with shardings."""

    init: Callable            # () -> (model_state, opt_state), created on their shardings
    train_step: Callable      # (model_state, opt_state, batch) -> (model_state, opt_state, metrics)
    eval_step: Callable       # (model_state, batch) -> LossSums
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

    call.jitted = fn  # the jax.jit object itself, for ahead-of-time lowering (gf_jax.train.aot)
    return call


def make_step_functions(config, mesh) -> StepFunctions:
    """The step functions of a RunConfig (or StepConfig) on ``mesh``.

    Memoised on the StepConfig and the mesh, so a run resumed in the same process (or a second run
    in a test, or an experiment's next arm) reuses the compilations.
    """
    sc = config if isinstance(config, StepConfig) else StepConfig.of(config)
    return _make_step_functions(sc, mesh)


@functools.lru_cache(maxsize=4)
def _make_step_functions(sc: StepConfig, mesh) -> StepFunctions:
    # Abstract state (shapes and logical axis names, no memory) -> shardings.
    abstract_model, abstract_opt = nnx.eval_shape(lambda: build(sc))
    model_graphdef, abstract_model_state = nnx.split(abstract_model)
    opt_graphdef, abstract_opt_state = nnx.split(abstract_opt)
    model_shardings = sharding_lib.model_shardings(abstract_model_state, mesh)
    opt_shardings = sharding_lib.model_shardings(abstract_opt_state, mesh)
    # Batch rows over (data, fsdp); metrics are scalars, replicated.
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    # The state is created on its shardings by XLA; no device ever holds all of it.
    def init_state():
        model, optimizer = build(sc)
        return nnx.state(model), nnx.state(optimizer)

    init = jax.jit(init_state, out_shardings=(model_shardings, opt_shardings))
    # State in and out on its own shardings and donated (updated in place: one copy in memory);
    # the batch arrives already sharded by rows.
    train_step = jax.jit(
        make_train_step(model_graphdef, opt_graphdef, sc),
        in_shardings=(model_shardings, opt_shardings, batch_sharding),
        out_shardings=(model_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        make_eval_step(model_graphdef, sc),
        in_shardings=(model_shardings, batch_sharding),
        out_shardings=replicated,
    )
    return StepFunctions(
        init=_under_mesh(init, mesh), train_step=_under_mesh(train_step, mesh),
        eval_step=_under_mesh(eval_step, mesh), model_graphdef=model_graphdef,
        abstract_model_state=abstract_model_state, abstract_opt_state=abstract_opt_state,
        model_shardings=model_shardings, opt_shardings=opt_shardings, batch_sharding=batch_sharding,
    )
