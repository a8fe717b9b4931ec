"""The two layouts of the decoder's blocks in a state tree, and conversion between them.

``model.scan_layers: false`` keeps one module per layer: variables at paths ``(..., "blocks", l,
*rest)``, each of the layer's own shape. ``scan_layers: true`` keeps one stacked module: a variable
at ``(..., "layers", *rest)`` with a leading ``L`` axis whose slice ``l`` is layer ``l``'s. The
rewrite applies wherever the paths occur, so a model state and the optimizer state built on it
(AdamW's ``mu`` and ``nu`` mirror the parameters) convert the same way, and the conversion is
exact (a stack or a slice; AdamW is elementwise).

Checkpoints record which layout they hold (``model.scan_layers`` of their saved config, false when
absent): ``gf_jax.run.checkpoint.Checkpointer.restore`` reads a checkpoint in its own layout and
converts it here to the layout asked for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

UNROLLED = "blocks"  # Transformer attribute of the per-layer blocks (an nnx.List)
STACKED = "layers"   # Transformer attribute of the stacked block (model.scan_layers)


def _unrolled_at(path: tuple) -> int | None:
    """Index in ``path`` of an ``("blocks", l)`` pair, or None."""
    for i in range(len(path) - 1):
        if path[i] == UNROLLED and isinstance(path[i + 1], int):
            return i
    return None


def is_stacked(path: tuple) -> bool:
    """Whether the state path names a stacked (``L x ...``) variable."""
    return STACKED in path


def stacked_path(path: tuple) -> tuple[tuple, int] | None:
    """``(..., "blocks", l, *rest)`` -> ``((..., "layers", *rest), l)``; None for other paths."""
    i = _unrolled_at(path)
    if i is None:
        return None
    return (*path[:i], STACKED, *path[i + 2:]), path[i + 1]


def unrolled_path(path: tuple, layer: int) -> tuple:
    """``(..., "layers", *rest)`` -> ``(..., "blocks", layer, *rest)``."""
    i = path.index(STACKED)
    return (*path[:i], UNROLLED, layer, *path[i + 1:])


def layout(state) -> str | None:
    """``"stacked"``, ``"unrolled"`` or None (no blocks at all) for an ``nnx.State``."""
    paths = [path for path, _ in nnx.to_flat_state(state)]
    if any(is_stacked(p) for p in paths):
        return "stacked"
    if any(_unrolled_at(p) is not None for p in paths):
        return "unrolled"
    return None


def stacked_ndim(key_path, array) -> int:
    """``array.ndim`` of one layer's slice: one less for a stacked leaf (``key_path`` from
    ``jax.tree_util``), so rules by rank (e.g. no weight decay on vectors) treat both layouts alike."""
    names = {getattr(k, "key", getattr(k, "name", None)) for k in key_path}
    return array.ndim - (1 if STACKED in names else 0)


# ---- abstract trees (what Orbax restores into) --------------------------------------------------


def _slice_sharding(sharding):
    """The sharding of one layer's slice of a stacked array of ``sharding`` (the layer axis is never sharded)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _stack_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *tuple(sharding.spec)))
    return sharding


def _struct(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def other_layout(abstract_state):
    """``abstract_state`` (an ``nnx.State`` of ``jax.ShapeDtypeStruct`` with shardings) in the other
    layout: each stacked leaf becomes ``L`` per-layer leaves, or each layer's leaves one stacked leaf."""
    flat = nnx.to_flat_state(abstract_state)
    target = "unrolled" if layout(abstract_state) == "stacked" else "stacked"
    leaves, stacks = [], {}
    for path, variable in flat:
        x = variable.get_value()
        if target == "unrolled" and is_stacked(path):
            for layer in range(x.shape[0]):
                leaves.append((unrolled_path(path, layer),
                               variable.replace(_struct(x.shape[1:], x.dtype, _slice_sharding(x.sharding)))))
        elif target == "stacked" and stacked_path(path) is not None:
            new_path, _ = stacked_path(path)
            stacks.setdefault(new_path, []).append((variable, x))
        else:
            leaves.append((path, variable))
    for new_path, members in stacks.items():
        variable, x = members[0]
        stacked = _struct((len(members), *x.shape), x.dtype, _stack_sharding(x.sharding))
        leaves.append((new_path, variable.replace(stacked)))
    return nnx.from_flat_state(leaves)


# ---- concrete arrays ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _stacker(sharding, dtype):
    return jax.jit(lambda *xs: jnp.stack(xs).astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _slicer(sharding, dtype):
    return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False).astype(dtype),
                   out_shardings=sharding)


def convert(state, abstract_target, *, consume: bool = False):
    """``state`` in the layout of ``abstract_target`` (an ``nnx.State`` of ShapeDtypeStructs with
    shardings, e.g. what Orbax restores into); each converted array is placed on its target leaf's
    sharding and cast to its dtype. ``consume``: delete each source array once it is converted, so
    a large state is never held twice (``state`` is unusable afterwards)."""
    source = dict(nnx.to_flat_state(state))
    targets = nnx.to_flat_state(abstract_target)
    # How many target leaves still need each source array (a stacked one feeds L slices).
    uses = {}
    for path, target in targets:
        if path not in source:
            for needed in _sources(path, target.get_value()):
                uses[needed] = uses.get(needed, 0) + 1
    leaves = []
    for path, target in targets:
        want = target.get_value()
        if path in source:
            leaves.append((path, source[path]))
            continue
        needed = _sources(path, want)
        parts = [source[p].get_value() for p in needed]
        if is_stacked(path):  # per-layer sources -> one stacked array
            value = _stacker(want.sharding, want.dtype)(*parts)
        else:  # one layer's slice of a stacked source
            value = _slicer(want.sharding, want.dtype)(parts[0], stacked_path(path)[1])
        leaves.append((path, target.replace(value)))
        for p, array in zip(needed, parts):
            uses[p] -= 1
            if consume and uses[p] == 0:
                array.delete()
    return nnx.from_flat_state(leaves)


def _sources(path: tuple, want) -> list[tuple]:
    """The source paths a target leaf of the other layout is made from."""
    if is_stacked(path):
        return [unrolled_path(path, layer) for layer in range(want.shape[0])]
    return [stacked_path(path)[0]]
