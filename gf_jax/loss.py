"""Goldfish loss: float32 cross-entropy over the targets the goldfish mask keeps.

A drop-in for a codebase's own cross-entropy (docs/drop-in.md)::

    import gf_jax
    loss, aux = gf_jax.loss_fn(logits_BxTxV, targets_BxT, gf_jax.GoldfishConfig(), pad_id=0)

Layers, each usable on its own:

* ``goldfish_terms`` / ``chunked_goldfish_terms``: per-target cross-entropy, log-partition and the
  drop / valid masks (``TokenTerms``);
* ``LossSums`` (``TokenTerms.sums()``): sums that add over micro-batches, steps and devices, and
  the one place where the loss formula and its ratios are written;
* ``goldfish_sums`` / ``chunked_goldfish_sums``: both in one call (what a trainer accumulates);
* ``loss_fn`` / ``chunked_loss_fn``: ``(loss, aux)``, one mean over kept targets, or per-target
  losses with ``reduction="none"``.

Sharding: nothing here gathers the logits. The target logit is picked by a one-hot mask built in
the logits' own sharding and summed over V, and the log-partition is a reduction over V, so a
vocabulary split over a mesh axis (explicit or auto) costs all-reduces of B x T numbers
(tests/core/test_loss.py reads this in the compiled HLO).

Precision: logits of any dtype are cast to float32 before the log-softmax. A codebase that takes
its log-softmax in bfloat16 matches ``strategy="none"`` only to bf16 rounding; in float32 exactly.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gf_jax.goldfish import GoldfishConfig, check_like, goldfish_mask

REDUCTIONS = ("mean", "none")


def _check_label_smoothing(label_smoothing: float, V: int):
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if label_smoothing and V < 2:
        raise ValueError("label_smoothing needs a vocabulary of at least 2 ids.")


def token_cross_entropy(logits_BxTxV, targets_BxT, label_smoothing: float = 0.0):
    """Float32 per-target cross-entropy and log-partition: (xent_BxT, logz_BxT).

    The target logit is selected by comparing the target with a vocabulary iota laid out like the
    logits and summing over V: a sharded vocabulary is reduced where it lies (partial sums, then an
    all-reduce of B x T values), never gathered; ``take_along_axis`` would need the whole row.
    Targets outside [0, V) (an ignore index) select nothing and give finite garbage: mask them out.

    label_smoothing: s in [0, 1). The target distribution puts 1 - s on the target and s / (V - 1)
    on every other id, and that distribution's entropy is subtracted so a perfect prediction scores
    0, as in flax ``examples/lm1b`` (``compute_weighted_cross_entropy``).
    """
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    V = logits_BxTxV.shape[-1]
    _check_label_smoothing(label_smoothing, V)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    ids_BxTxV = jax.lax.broadcasted_iota(
        jnp.int32, logits_BxTxV.shape, logits_BxTxV.ndim - 1, out_sharding=jax.typeof(logits_BxTxV).sharding
    )
    is_target_BxTxV = ids_BxTxV == targets_BxT.astype(jnp.int32)[..., None]
    target_logit_BxT = jnp.sum(jnp.where(is_target_BxTxV, logits_BxTxV, 0.0), axis=-1)
    if not label_smoothing:
        return logz_BxT - target_logit_BxT, logz_BxT
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (V - 1)
    entropy = -(confidence * math.log(confidence) + (V - 1) * low * math.log(low + 1e-20))
    # -sum_v soft_v * log_softmax_v, with sum_v soft_v = 1, expanded so V is reduced only in sums.
    soft_xent_BxT = logz_BxT - (confidence - low) * target_logit_BxT - low * jnp.sum(logits_BxTxV, axis=-1)
    return soft_xent_BxT - entropy, logz_BxT


class LossSums(NamedTuple):
    """Sums of one batch's goldfish loss that add over micro-batches, steps and hosts.

    The one place where the loss formula and the reported ratios are written: a loss computed from
    sums added over micro-batches divides once, so micro-batches that keep different numbers of
    targets are weighted correctly. A pytree (scans, psums and ``jax.device_get`` take it whole).
    """

    xent_sum: Any           # float32: cross-entropy over kept targets (carries the gradient)
    z_sum: Any              # float32: logsumexp(logits)**2 over kept targets (carries the gradient)
    xent_all_sum: Any       # float32: cross-entropy over all valid targets (no gradient)
    xent_dropped_sum: Any   # float32: cross-entropy over dropped targets (no gradient)
    n_kept: Any             # int32: kept targets
    n_dropped: Any          # int32: dropped targets
    n_valid: Any            # int32: valid targets (kept + dropped)

    @classmethod
    def zeros(cls) -> LossSums:
        f32, i32 = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        return cls(f32, f32, f32, f32, i32, i32, i32)

    def add(self, other: LossSums) -> LossSums:
        return jax.tree.map(lambda a, b: a + b, self, other)

    def psum(self, axis_name) -> LossSums:
        """The sums over every device of a named axis (``pmap`` / ``shard_map``)."""
        return jax.tree.map(lambda x: jax.lax.psum(x, axis_name), self)

    def objective(self, z_loss: float = 0.0):
        """What training differentiates: the loss before its division by the kept count."""
        return self.xent_sum + z_loss * self.z_sum

    def loss(self, z_loss: float = 0.0):
        """The goldfish loss: one mean over every kept target of the batch, never per sequence."""
        return self.objective(z_loss) / _at_least_one(self.n_kept)

    def ratios(self) -> dict[str, Any]:
        """``loss_kept``, ``loss_all``, ``loss_dropped`` and ``drop_fraction`` (no gradient)."""

        def ratio(num, den):
            return jax.lax.stop_gradient(num) / _at_least_one(den)

        return {
            "loss_kept": ratio(self.xent_sum, self.n_kept),
            "loss_all": ratio(self.xent_all_sum, self.n_valid),
            "loss_dropped": ratio(self.xent_dropped_sum, self.n_dropped),
            "drop_fraction": ratio(jnp.asarray(self.n_dropped, jnp.float32), self.n_valid),
        }

    def summary(self) -> dict[str, Any]:
        """The sums and the ratios in one flat dict (``loss_fn``'s ``aux``)."""
        return {**self._asdict(), **self.ratios()}


def _at_least_one(count):
    return jnp.maximum(1, count).astype(jnp.float32)


def loss_sums(xent_BxT, logz_BxT, drop_BxT, valid_BxT) -> LossSums:
    """The LossSums of per-target cross-entropy and log-partition under a drop and a valid mask.

    Gradients are exactly zero at dropped and invalid targets.
    """
    drop_BxT = drop_BxT & valid_BxT
    kept_BxT = valid_BxT & ~drop_BxT
    zero = jnp.zeros((), jnp.float32)
    xent_stopped_BxT = jax.lax.stop_gradient(xent_BxT)
    return LossSums(
        xent_sum=jnp.sum(jnp.where(kept_BxT, xent_BxT, zero)),
        z_sum=jnp.sum(jnp.where(kept_BxT, jnp.square(logz_BxT), zero)),
        xent_all_sum=jnp.sum(jnp.where(valid_BxT, xent_stopped_BxT, zero)),
        xent_dropped_sum=jnp.sum(jnp.where(drop_BxT, xent_stopped_BxT, zero)),
        n_kept=jnp.sum(kept_BxT, dtype=jnp.int32),
        n_dropped=jnp.sum(drop_BxT, dtype=jnp.int32),
        n_valid=jnp.sum(valid_BxT, dtype=jnp.int32),
    )


class TokenTerms(NamedTuple):
    """Per-target pieces of the loss, before any reduction (all B x T)."""

    xent_BxT: Any   # float32 cross-entropy (label-smoothed if asked)
    logz_BxT: Any   # float32 log-partition
    drop_BxT: Any   # bool: the goldfish mask dropped it (whether valid or not)
    valid_BxT: Any  # bool: a real target (not padding, not an ignore index, weight > 0)

    @property
    def kept_BxT(self):
        return self.valid_BxT & ~self.drop_BxT

    def sums(self) -> LossSums:
        return loss_sums(self.xent_BxT, self.logz_BxT, self.drop_BxT, self.valid_BxT)

    def per_token(self, z_loss: float = 0.0):
        """float32 ``loss_BxT``: cross-entropy (+ z_loss * logz**2) at kept targets, 0 elsewhere."""
        loss_BxT = self.xent_BxT + z_loss * jnp.square(self.logz_BxT)
        return jnp.where(self.kept_BxT, loss_BxT, jnp.zeros((), jnp.float32))


def summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """Adds the ratios (``loss_kept``, ``loss_all``, ``loss_dropped``, ``drop_fraction``) to sums.

    Works on one batch's sums or on sums added over micro-batches / steps: the division happens
    once, so micro-batches that keep different numbers of targets are weighted correctly.
    """
    return {**sums, **LossSums(**{k: sums[k] for k in LossSums._fields}).ratios()}


# ---------------------------------------------------------------------------------------------
# Arguments.


def _targets(targets_BxT, leading_shape, what: str):
    targets_BxT = jnp.asarray(targets_BxT)
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise ValueError(f"targets_BxT must be integer token ids, got dtype {targets_BxT.dtype}.")
    if targets_BxT.shape != tuple(leading_shape):
        hint = ""
        if targets_BxT.shape[:-1] == tuple(leading_shape[:-1]) and targets_BxT.shape[-1] == leading_shape[-1] + 1:
            hint = (
                "; it has one column too many: targets are the next tokens, one column fewer than"
                " the token rows (inputs = tokens[:, :-1], targets = tokens[:, 1:])"
            )
        raise ValueError(f"targets_BxT shape {targets_BxT.shape} must equal {what} {tuple(leading_shape)}{hint}.")
    return targets_BxT


def _check_ids_below(targets_BxT, V: int) -> None:
    """Target ids >= V would select no logit and give a finite, meaningless loss. Checked when the
    values are known (an eager call); under ``jit`` they are not, and ids must be < V."""
    if isinstance(targets_BxT, jax.core.Tracer) or targets_BxT.size == 0:
        return
    largest = int(jnp.max(targets_BxT))
    if largest >= V:
        raise ValueError(f"targets_BxT holds id {largest} but the logits have V={V} ids; target ids must be < V "
                         "(negative ids mark targets to ignore).")


def _valid_mask(targets_BxT, weights_BxT, pad_id):
    """Valid targets: id >= 0, id != pad_id, weight > 0. Weights are a mask, not multipliers."""
    valid_BxT = targets_BxT >= 0
    if pad_id is not None:
        valid_BxT = valid_BxT & (targets_BxT != pad_id)
    if weights_BxT is not None:
        valid_BxT = valid_BxT & (check_like(weights_BxT, targets_BxT, "weights_BxT") > 0)
    return valid_BxT


def _mask_args(targets_BxT, config, weights_BxT, pad_id, positions_BxT, context_BxC, rng, table):
    drop_BxT = goldfish_mask(
        targets_BxT, config, positions_BxT=positions_BxT, context_BxC=context_BxC, rng=rng, table=table
    )
    return drop_BxT, _valid_mask(targets_BxT, weights_BxT, pad_id)


def _loss_and_aux(terms: TokenTerms, z_loss: float, reduction: str, axis_name):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}.")
    sums = terms.sums()
    if axis_name is None:
        loss = sums.loss(z_loss)
    else:
        # Divide by the kept count of every device. The value is the global mean on each device;
        # the gradient is this device's share times the device count, so the lax.pmean(grads)
        # that pmap steps already do gives the gradient of the global mean (whatever psum's
        # transpose is under pmap or shard_map: no gradient flows through a collective).
        total = sums.psum(axis_name)
        share = jax.lax.axis_size(axis_name) * sums.objective(z_loss) / _at_least_one(total.n_kept)
        loss = share + jax.lax.stop_gradient(total.loss(z_loss) - share)
        sums = total
    aux = sums.summary()
    if reduction == "none":
        loss = terms.per_token(z_loss)
        aux.update(kept_BxT=terms.kept_BxT, dropped_BxT=terms.drop_BxT & terms.valid_BxT)
    return loss, aux


# ---------------------------------------------------------------------------------------------
# From logits.


def goldfish_terms(
    logits_BxTxV, targets_BxT, config: GoldfishConfig, *, weights_BxT=None, pad_id=None, positions_BxT=None,
    context_BxC=None, rng=None, table=None, label_smoothing: float = 0.0,
) -> TokenTerms:
    """Per-target ``TokenTerms`` of a batch (arguments as in ``loss_fn``)."""
    targets_BxT = _targets(targets_BxT, logits_BxTxV.shape[:-1], "logits_BxTxV.shape[:-1]")
    _check_ids_below(targets_BxT, logits_BxTxV.shape[-1])
    drop_BxT, valid_BxT = _mask_args(targets_BxT, config, weights_BxT, pad_id, positions_BxT, context_BxC, rng, table)
    xent_BxT, logz_BxT = token_cross_entropy(logits_BxTxV, targets_BxT, label_smoothing)
    return TokenTerms(xent_BxT, logz_BxT, drop_BxT, valid_BxT)


def goldfish_sums(logits_BxTxV, targets_BxT, config: GoldfishConfig, *, axis_name=None, **kwargs) -> LossSums:
    """The ``LossSums`` of a batch under goldfish loss (arguments as in ``loss_fn``).

    With ``axis_name`` the sums are psummed over that axis (metrics of the global batch; to
    differentiate under ``pmap`` use ``loss_fn(..., axis_name=)``, which sets up the gradient).
    """
    sums = goldfish_terms(logits_BxTxV, targets_BxT, config, **kwargs).sums()
    return sums if axis_name is None else sums.psum(axis_name)


def loss_fn(
    logits_BxTxV, targets_BxT, config: GoldfishConfig, *, weights_BxT=None, pad_id=None, positions_BxT=None,
    context_BxC=None, z_loss: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
    axis_name=None, rng=None, table=None,
):
    """Goldfish next-token loss: mean float32 cross-entropy over kept, valid targets.

    Args:
      logits_BxTxV: logits of any float dtype and any sharding (log-softmax in float32).
      targets_BxT: the next tokens, ``logits_BxTxV.shape[:-1]`` (already shifted: target t is the
        token after input t). Negative ids are invalid (an ignore index); ids must be < V (an
        eager call checks it).
      config: GoldfishConfig (``GoldfishConfig(strategy="none")`` is the standard loss).
      weights_BxT: optional mask: a target is valid iff its weight > 0. Weights are *not*
        multipliers (weights 1 and 3 give the same loss): the loss is a mean over kept targets
        and the counts in ``aux`` count targets. For weighted losses use ``reduction="none"``.
      pad_id: optional token id that marks padding (``targets == pad_id`` is invalid; lm1b, nanodo
        and Gemma pad with 0). Invalid targets are neither kept nor dropped.
      positions_BxT: index of each target within its document (lm1b's / Gemma's ``inputs_position``;
        not segment ids: see ``positions_from_segment_ids``, and ``goldfish_mask``).
      context_BxC: targets preceding each row in its document (see ``goldfish_mask``).
      z_loss: coefficient of the auxiliary ``logsumexp(logits)**2`` term over kept targets.
      label_smoothing: lm1b-style smoothing of kept targets (see ``token_cross_entropy``).
      reduction: ``"mean"`` (one mean over kept targets) or ``"none"`` (per-target ``loss_BxT``,
        zero where not kept; ``aux`` adds ``kept_BxT`` and ``dropped_BxT``, so a per-example loss
        is ``loss_BxT.sum(-1) / max(1, aux["kept_BxT"].sum(-1))``).
      axis_name: under ``pmap`` / ``shard_map``, the mapped batch axis: sums are psummed before the
        division, so the loss is the mean over the kept targets of *all* devices, and
        ``lax.pmean(grads, axis_name)`` is its gradient. ``aux`` then holds global sums.
      rng, table: passed to ``goldfish_mask`` (``random`` and ``hash-table`` strategies).

    Returns:
      (loss, aux): loss = (sum of kept cross-entropy + z_loss * sum of logz**2) / max(1, n_kept),
      one mean over the whole batch, never per sequence (or ``loss_BxT``, see ``reduction``).
      ``aux`` holds the sums of ``LossSums`` (``xent_sum``, ``xent_all_sum``, ``xent_dropped_sum``,
      ``z_sum``, ``n_kept``, ``n_dropped``, ``n_valid``), which add over micro-batches, and the
      ratios ``loss_kept``, ``loss_all``, ``loss_dropped`` and ``drop_fraction`` computed from them
      (``summarize`` recomputes them from added sums). Gradients are exactly zero at dropped and
      invalid targets.
    """
    terms = goldfish_terms(
        logits_BxTxV, targets_BxT, config, weights_BxT=weights_BxT, pad_id=pad_id, positions_BxT=positions_BxT,
        context_BxC=context_BxC, rng=rng, table=table, label_smoothing=label_smoothing,
    )
    return _loss_and_aux(terms, z_loss, reduction, axis_name)


# ---------------------------------------------------------------------------------------------
# From hidden states, chunk by chunk.


def _unshard(x, axis: int):
    """``x`` with ``axis`` not split over an explicit mesh axis (a no-op for auto meshes).

    Explicit-axis meshes reject a contraction over inconsistently sharded dimensions instead of
    choosing a collective. Gathering the model dimension of the head is what FSDP does before any
    matmul; gathering it on the hidden states (sharded there only under sequence or tensor
    parallelism) moves B x T x D, far less than the B x T x V logits it avoids.
    """
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    if spec[axis] is None:
        return x
    return _reshard(x, sharding.mesh, PartitionSpec(*spec[:axis], None, *spec[axis + 1 :]))


def _reshard(x, mesh, spec):
    # The array's own (abstract) mesh: no jax.set_mesh context is needed.
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _matmul_head(w_DxV, D: int):
    w_DxV = jnp.asarray(w_DxV)
    if w_DxV.ndim != 2 or w_DxV.shape[0] != D:
        raise ValueError(
            f"w_DxV shape {w_DxV.shape} must be (D, V) with D = {D}, the hidden states' last axis "
            "(transpose an embedding table, or pass head_fn(hidden_BxExD) -> logits_BxExV)."
        )
    w_DxV = _unshard(w_DxV, 0)

    def head_fn(hidden_BxExD):
        return jnp.einsum("bed,dv->bev", hidden_BxExD, w_DxV.astype(hidden_BxExD.dtype))

    return head_fn


def chunked_goldfish_terms(
    hidden_BxTxD, head, targets_BxT, config: GoldfishConfig, *, weights_BxT=None, pad_id=None,
    positions_BxT=None, context_BxC=None, rng=None, table=None, label_smoothing: float = 0.0,
    chunk_size: int = 128,
) -> TokenTerms:
    """``goldfish_terms(head(hidden_BxTxD), ...)`` without ever holding the B x T x V logits.

    ``head`` is the output matrix ``w_DxV`` or a callable ``head_fn(hidden_BxExD) -> logits_BxExV``
    (output bias, tied / transposed / boxed embeddings, logit soft-capping: whatever the model's
    own head does). The sequence is cut into M chunks of E = ``chunk_size`` targets; each chunk's
    logits are made, reduced to per-target cross-entropy and discarded, under ``jax.checkpoint``
    so the backward pass recomputes them per chunk instead of storing them. The head runs in its
    inputs' dtype; the log-softmax in float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if hidden_BxTxD.ndim != 3:
        raise ValueError(f"hidden_BxTxD must be B x T x D, got shape {hidden_BxTxD.shape}.")
    B, T, D = hidden_BxTxD.shape
    targets_BxT = _targets(targets_BxT, (B, T), "hidden_BxTxD.shape[:-1]")
    drop_BxT, valid_BxT = _mask_args(targets_BxT, config, weights_BxT, pad_id, positions_BxT, context_BxC, rng, table)
    head_fn = head
    if not callable(head):
        head_fn = _matmul_head(head, D)
        hidden_BxTxD = _unshard(hidden_BxTxD, 2)  # contracted with w_DxV's gathered D axis

    E = min(chunk_size, T)
    M = -(-T // E)
    pad = M * E - T
    # Chunks are cut along T: gather T if an explicit mesh splits it (sequence parallelism).
    hidden_pad_BxTxD = jnp.pad(_unshard(hidden_BxTxD, 1), ((0, 0), (0, pad), (0, 0)))
    targets_pad_BxT = jnp.pad(_unshard(targets_BxT, 1), ((0, 0), (0, pad)))
    hidden_MxBxExD = hidden_pad_BxTxD.reshape(B, M, E, D).swapaxes(0, 1)
    targets_MxBxE = targets_pad_BxT.reshape(B, M, E).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_terms(hidden_BxExD, targets_BxE):
        logits_BxExV = head_fn(hidden_BxExD)
        if logits_BxExV.shape[:-1] != (B, E):
            raise ValueError(f"head_fn must map B x E x D to B x E x V logits, got shape {logits_BxExV.shape}.")
        return token_cross_entropy(logits_BxExV, targets_BxE, label_smoothing)

    def body(carry, xs):
        return carry, chunk_terms(*xs)

    _, (xent_MxBxE, logz_MxBxE) = jax.lax.scan(body, None, (hidden_MxBxExD, targets_MxBxE))
    xent_BxT = xent_MxBxE.swapaxes(0, 1).reshape(B, M * E)[:, :T]
    logz_BxT = logz_MxBxE.swapaxes(0, 1).reshape(B, M * E)[:, :T]
    like_targets = jax.typeof(targets_BxT).sharding
    if any(like_targets.spec):  # back to the masks' layout (explicit meshes do not mix layouts)
        xent_BxT = _reshard(xent_BxT, like_targets.mesh, like_targets.spec)
        logz_BxT = _reshard(logz_BxT, like_targets.mesh, like_targets.spec)
    return TokenTerms(xent_BxT, logz_BxT, drop_BxT, valid_BxT)


def chunked_goldfish_sums(
    hidden_BxTxD, head, targets_BxT, config: GoldfishConfig, *, axis_name=None, **kwargs
) -> LossSums:
    """``goldfish_sums`` from hidden states, chunk by chunk (see ``chunked_goldfish_terms``)."""
    sums = chunked_goldfish_terms(hidden_BxTxD, head, targets_BxT, config, **kwargs).sums()
    return sums if axis_name is None else sums.psum(axis_name)


def chunked_loss_fn(
    hidden_BxTxD, head, targets_BxT, config: GoldfishConfig, *, weights_BxT=None, pad_id=None,
    positions_BxT=None, context_BxC=None, z_loss: float = 0.0, label_smoothing: float = 0.0,
    reduction: str = "mean", axis_name=None, rng=None, table=None, chunk_size: int = 128,
):
    """``loss_fn(head(hidden_BxTxD), ...)`` without ever holding the B x T x V logits.

    ``head``: ``w_DxV`` (any sharding; its D axis is gathered on explicit meshes, as FSDP does),
    or ``head_fn(hidden_BxExD) -> logits_BxExV``. Same value and gradients as ``loss_fn`` to float
    tolerance; memory per chunk, not per sequence (see ``chunked_goldfish_terms``).
    """
    terms = chunked_goldfish_terms(
        hidden_BxTxD, head, targets_BxT, config, weights_BxT=weights_BxT, pad_id=pad_id,
        positions_BxT=positions_BxT, context_BxC=context_BxC, rng=rng, table=table,
        label_smoothing=label_smoothing, chunk_size=chunk_size,
    )
    return _loss_and_aux(terms, z_loss, reduction, axis_name)
