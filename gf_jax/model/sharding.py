"""Device mesh and the table that maps logical axis names to mesh axes.

The mesh has three axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp``
(data parallelism with parameters, gradients and optimizer state sharded, ZeRO-3 style) and
``tensor`` (Megatron-style model parallelism over heads, MLP width and vocabulary). The batch is
split over ``data`` x ``fsdp``. A parameter dimension is split only if the mesh axis size divides
it; otherwise that dimension stays replicated, so one config runs on 1 CPU device, 8 simulated ones,
a GPU or a TPU pod slice (e.g. 4 key/value heads on ``tensor=8`` are replicated, not an error).

Meshes use ``AxisType.Auto``: shardings are given at the ``jax.jit`` boundary and XLA's
propagation (GSPMD) places everything in between; :func:`constrain` adds hints on activations when
a mesh is set with ``jax.set_mesh``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of model.scan_layers: each device holds every layer's shard
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 axis of ``config`` against ``num_devices``; raises if they do not fit."""
    sizes = [config.data, config.fsdp, config.tensor]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}.")
    if sizes.count(-1) > 1:
        raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"the fixed mesh axes multiply to {fixed}, which does not divide the {num_devices} "
                "devices; change mesh.data/fsdp/tensor."
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh data*fsdp*tensor = {fixed} but there are {num_devices} devices; set one axis to -1 "
            "or make the product match."
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all devices, every host)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    # Auto axes: shardings are set at jit boundaries, GSPMD propagates the rest.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names, mesh=None, shape=None, rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose axes have logical ``names`` (None entries replicate).

    With ``mesh`` and ``shape`` given, a dimension whose size the mesh axes do not divide is
    replicated instead, and mesh axes that are absent from ``mesh`` are dropped.
    A mesh axis is used at most once per array (the first dimension asking for it wins).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape)
        axes = tuple(a for a in axes if a not in used)
        if axes and mesh is not None and shape is not None and shape[i] % _axis_size(mesh, axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(names, mesh: Mesh, shape=None, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on ``mesh`` for logical axis ``names`` (see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, mesh, shape, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp``; all other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def model_shardings(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """The NamedSharding of every leaf of a model / ``nnx.State`` / abstract state.

    Works on the output of ``nnx.eval_shape`` (nothing is materialised), so the result can be the
    ``out_shardings`` of a jitted initialiser. Variables read their logical names from their
    ``out_sharding`` metadata (set by ``nnx.with_partitioning``); anything without names (e.g. an
    optimizer step counter) is replicated. The result has the structure of ``nnx.state(tree)``
    (or of ``tree`` itself if it is not a module).
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)

    def leaf_sharding(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding")
            value = x.get_value()
            shape = getattr(value, "shape", None)
            if names and shape is not None:
                return x.replace(logical_to_sharding(names, mesh, shape, rules))
            return x.replace(replicated(mesh))
        return replicated(mesh)

    return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, names, rules=LOGICAL_RULES):
    """``with_sharding_constraint`` by logical names when a mesh is set (``jax.set_mesh``), else ``x``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(MESH_AXES) & set(mesh.axis_names):
        return x
    if any(t != AxisType.Auto for t in mesh.axis_types):
        return x  # explicit-sharding meshes carry shardings in types; no hints needed
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, x.shape, rules))


def abstract_with_shardings(state, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying the target shardings (what Orbax restores into, what
    a loader fills)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def single_device_shardings(tree):
    """Every leaf of ``tree`` on the first local device (a model loaded without a mesh)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, tree)


def shardings_on(tree, mesh: Mesh | None):
    """``model_shardings(tree, mesh)``, or the first local device when ``mesh`` is None."""
    return single_device_shardings(tree) if mesh is None else model_shardings(tree, mesh)


# ---- batches and results on a mesh (decoding, scoring) -------------------------------------------


def data_parallel_size(mesh) -> int:
    """Rows of a batch a mesh splits across (its ``data`` x ``fsdp`` axes); batches divide by it."""
    return int(np.prod([mesh.shape[a] for a in mesh.axis_names if a in ("data", "fsdp")]))


def rows_for_mesh(batch: int, mesh) -> int:
    """``batch`` rounded up to whole rows per data-parallel shard of ``mesh`` (None: unchanged)."""
    if mesh is None:
        return batch
    shards = data_parallel_size(mesh)
    return -(-batch // shards) * shards


def place_on_mesh(model, mesh):
    """The model with its parameters where training keeps them on ``mesh`` (``model_shardings``).

    A no-op copy for a model restored onto this mesh (``gf_jax.run.source.load_model(mesh=...)``).
    """
    if mesh is None:
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, model_shardings(state, mesh)))


def replicate_outputs(tree, mesh):
    """Small results replicated on every device, so every host of a pod can read all of them."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated(mesh)), tree)
