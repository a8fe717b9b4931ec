"""Multi-process start-up: JAX's own multi-controller runtime (``jax.distributed``).

Every process of a multi-host run (each worker of a Cloud TPU VM slice, each task of a SLURM job,
each process started by hand on a GPU cluster) runs the same command; ``maybe_initialize`` then
connects them through JAX's coordination service *before* anything touches a device, after which
``jax.devices()`` lists the devices of every process and one mesh spans them all.

How the processes find each other (first match wins):

1. explicit: ``distributed.coordinator_address``, ``distributed.num_processes`` and
   ``distributed.process_id`` in the config (or on the command line as overrides);
2. environment variables ``GF_JAX_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS``,
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (any launcher that can set per-process variables);
3. a cluster JAX detects itself: a SLURM job step with ``SLURM_NTASKS`` > 1, Open MPI
   (``mpirun``), a Cloud TPU VM (the TPU metadata lists the workers of the slice; one host is fine);
4. otherwise the run is single-process and nothing is initialised.

Failure propagation: the coordination service expects a heartbeat from every process; a process
that dies (crash, OOM kill, ``os._exit``) misses them and after ``heartbeat_timeout`` seconds the
service tells the others, which then stop instead of waiting forever in a collective.
``exit_on_error`` makes a Python exception in one process end that process promptly (after
printing the message), so the others learn of it within the heartbeat timeout.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from gf_jax.config.sections import DistributedConfig

# Environment variables read when the config leaves a field unset (GF_JAX_* first).
ENV_COORDINATOR = ("GF_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("GF_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("GF_JAX_PROCESS_ID", "JAX_PROCESS_ID")


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``maybe_initialize`` decided: whether to initialise, and with which arguments
    (None fields are left to JAX's cluster auto-detection)."""

    initialize: bool
    source: str                     # "explicit" | "environment" | "slurm" | "mpi" | "tpu" | "single" | "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env(names: tuple[str, ...], environ) -> str | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            return value
    return None


def _env_int(names: tuple[str, ...], environ) -> int | None:
    value = _env(names, environ)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {names[0]} (or {'/'.join(names[1:])}) must be an integer, got {value!r}."
        ) from None


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (set by ``import jax``, which probes for TPU chips and libtpu)."""
    try:
        # JAX internals that may move: only probed here
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover - layout of a future JAX
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def plan(config: DistributedConfig, environ=None, *, on_tpu_vm: bool | None = None) -> Plan:
    """Decides, from the config and the environment only, whether and how to initialise.

    Pure apart from reading ``environ`` (default ``os.environ``); raises a one-sentence
    ValueError for an inconsistent explicit setting.
    """
    environ = os.environ if environ is None else environ
    if config.mode == "off":
        return Plan(False, "off")
    given = (config.coordinator_address, config.num_processes, config.process_id)
    source = "explicit" if any(v is not None for v in given) else "environment"
    address = config.coordinator_address if config.coordinator_address is not None else _env(ENV_COORDINATOR, environ)
    count = config.num_processes if config.num_processes is not None else _env_int(ENV_NUM_PROCESSES, environ)
    pid = config.process_id if config.process_id is not None else _env_int(ENV_PROCESS_ID, environ)
    if count is not None and count < 1:
        raise ValueError(f"distributed.num_processes must be >= 1, got {count}.")
    if count is not None and pid is not None and not 0 <= pid < count:
        raise ValueError(f"distributed.process_id must be in [0, {count}), got {pid}.")
    cluster = _detected_cluster(environ, on_tpu_vm)
    if address is not None or count is not None or pid is not None:
        if count == 1:
            return Plan(False, "single")
        missing = [n for n, v in (("coordinator_address", address), ("num_processes", count),
                                  ("process_id", pid)) if v is None]
        # A detected cluster fills the gaps (e.g. only the coordinator address is given).
        if missing and cluster is None:
            raise ValueError(
                f"a multi-process run needs distributed.coordinator_address, num_processes and "
                f"process_id; set {' and '.join('distributed.' + m for m in missing)} (or the "
                f"GF_JAX_COORDINATOR / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables)."
            )
        return Plan(True, source, address, count, pid)
    if cluster is not None:
        return Plan(True, cluster)
    return Plan(False, "single")


def _detected_cluster(environ, on_tpu_vm: bool | None) -> str | None:
    """A multi-process launcher JAX can read its settings from: slurm, mpi or tpu (or None)."""
    if _slurm_tasks(environ) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_or(environ.get("OMPI_COMM_WORLD_SIZE"), 1) > 1:
        return "mpi"
    if on_tpu_vm if on_tpu_vm is not None else _on_cloud_tpu_vm():
        return "tpu"
    return None


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _slurm_tasks(environ) -> int:
    # Tasks of a job step (srun sets SLURM_STEP_NODELIST); the batch script itself is one task.
    if "SLURM_STEP_NODELIST" not in environ:
        return 1
    return _int_or(environ.get("SLURM_NTASKS"), 1)


def _cpu_only() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().lower() == "cpu"


def maybe_initialize(config: DistributedConfig | None = None) -> Plan:
    """Initialises ``jax.distributed`` when the run is multi-process (see the module docstring).

    Must run before any JAX computation or device query (``jax.devices()``). Calling it again
    after a successful initialisation does nothing. Returns the decision taken.
    """
    config = DistributedConfig() if config is None else config
    decision = plan(config)
    if not decision.initialize:
        return decision
    if jax.distributed.is_initialized():
        return decision
    # JAX internals that may move: only probed here
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "gf_jax.run.distributed.maybe_initialize must be called before anything uses JAX devices "
            "(jax.devices(), an array, a jit call); move it to the top of the program."
        )
    collectives = config.cpu_collectives
    if collectives == "auto":
        collectives = "gloo" if _cpu_only() else "none"
    if collectives != "none":
        # Without it the CPU backend cannot run a computation spanning processes.
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    jax.distributed.initialize(
        coordinator_address=decision.coordinator_address,
        num_processes=decision.num_processes,
        process_id=decision.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids is not None else None,
        initialization_timeout=config.initialization_timeout,
        heartbeat_timeout_seconds=config.heartbeat_timeout,
        shutdown_timeout_seconds=config.shutdown_timeout,
    )
    return decision


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, configs and results; every process takes part in saves."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    """True once ``jax.distributed`` connects more than one process."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def exit_on_error(fn: Callable[[], T]) -> T:
    """Runs ``fn``; in a multi-process run an exception prints its message and ends this process
    at once (``os._exit``), so that the other processes are stopped too.

    A normal exit would first wait in JAX's shutdown barrier for processes that are themselves
    waiting for this one in a collective: the run would hang until a timeout. In a single-process
    run the exception propagates unchanged. ``SystemExit`` keeps its status (its message has been
    printed already); any other exception exits with status 1 after its traceback.
    """
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - every failure must end the whole run
        if not is_multiprocess():
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            code = 1
            traceback.print_exc()
            print(f"error (process {jax.process_index()} of {jax.process_count()}): {type(e).__name__}: {e}",
                  file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def allgather_str(value: str) -> list[str]:
    """Every process's ``value``, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(value.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def check_same_on_all_processes(value: str, what: str) -> None:
    """Raises a ValueError on every process when ``value`` (e.g. a file digest) differs between
    processes; ``what`` names it and what to change, e.g. "the tokenizer (set data.tokenizer ...)"."""
    values = allgather_str(value)
    differing = [i for i, v in enumerate(values) if v != values[0]]
    if differing:
        raise ValueError(
            f"processes {differing} see a different {what} than process 0; give every process the same one."
        )
