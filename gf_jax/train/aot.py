"""Ahead-of-time compiles for a TPU topology on a host without one: does a config fit the chip?

``jax.experimental.topologies.get_topology_desc`` (with ``libtpu`` installed) describes a TPU
slice's devices without owning them; the trainer's own jitted step is lowered on a mesh of those
devices from abstract arguments (shapes, dtypes, shardings; nothing is allocated) and compiled by
the TPU compiler, which reports the per-chip memory the step needs. Run with
``JAX_PLATFORMS=cpu`` so the host never tries to initialise a TPU (scripts/aot_tpu.py sets it).

Inside the compile the mesh's platform is ``tpu``, so ``attention: auto`` resolves to splash
attention exactly as on a TPU; ``dtype: auto`` is resolved to bfloat16 here (it would otherwise
follow the CPU host).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from gf_jax.batch import Batch
from gf_jax.model import generate
from gf_jax.model.sharding import abstract_with_shardings, batch_sharding, make_mesh
from gf_jax.train.step import make_step_functions

GIB = 1024**3
# HBM per chip in GiB by device kind (first match wins; "TPU v5 lite" is v5e, "TPU v6 lite" v6e).
HBM_GIB = (("v6 lite", 32), ("v6e", 32), ("v5 lite", 16), ("v5e", 16), ("v5p", 95), ("v5", 95), ("v4", 32))
# A recommended setting must leave this share of HBM unused (fragmentation, runtime buffers).
FIT_FRACTION = 0.9


def hbm_gib(device_kind: str) -> float | None:
    """Nominal HBM of one chip of ``device_kind`` in GiB, or None when unknown."""
    for needle, gib in HBM_GIB:
        if needle in device_kind.lower():
            return float(gib)
    return None


def topology_devices(topology: str):
    """The devices of a TPU slice named like ``v5e:2x4`` or ``v5p:2x2x2`` (needs ``libtpu``)."""
    # libtpu takes a host-wide lock file when it starts; a compile-only client must not fail (or
    # block a real TPU job) because another process on the host has libtpu loaded.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A v4 chip's two TensorCores run as one JAX device (megacore) on a real slice; the topology
    # description lists each core as a device unless told so (v4:2x2x4 would be 32 devices).
    options = {"chip_config_name": "megacore"} if topology.lower().startswith("v4") else {}
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
    except Exception as e:  # libtpu missing or a topology it does not know: one sentence says which
        raise ValueError(
            f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "install libtpu (requirements.txt) and name a topology like v5e:2x4 or v5p:2x2x1."
        ) from None


def for_tpu(config):
    """``config`` with ``model.dtype: auto`` resolved to bfloat16 (what ``auto`` means on TPU)."""
    if config.model.dtype != "auto":
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))


def abstract_batch(config) -> Batch:
    """Shapes and dtypes of one global training batch of ``config`` (what gf_jax.data yields)."""
    b, t, c = config.train.global_batch, config.train.seq_len, config.data.row_context
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    context = jax.ShapeDtypeStruct((b, c), jnp.int32) if c > 0 else None
    return Batch(tokens, tokens, tokens, tokens, jax.ShapeDtypeStruct((b, t), jnp.float32), context)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-chip memory of a compiled program (bytes) and its compile time (seconds)."""

    device_kind: str
    chips: int
    arguments: int
    outputs: int
    aliased: int        # outputs that reuse donated argument buffers
    temporaries: int
    generated_code: int
    compile_s: float
    error: str | None = None  # the compiler's refusal (e.g. out of HBM): the program does not fit
    compile_cpu_s: float | None = None  # CPU seconds of all compiler threads (stable on a busy host)


    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def hbm(self) -> float | None:
        gib = hbm_gib(self.device_kind)
        return None if gib is None else gib * GIB

    @property
    def fits(self) -> bool | None:
        """Whether the total stays within ``FIT_FRACTION`` of HBM (None: HBM unknown)."""
        if self.error is not None:
            return False
        return None if self.hbm is None else self.total <= FIT_FRACTION * self.hbm

    def format(self) -> str:
        if self.error is not None:
            return (f"{self.device_kind} x{self.chips}: does NOT compile: {self.error} "
                    f"({self.compile_s:.1f} s{self._cpu()})")
        hbm = "unknown HBM" if self.hbm is None else (
            f"of {self.hbm / GIB:.2f} GiB HBM = {100 * self.total / self.hbm:.0f}% "
            f"({'fits' if self.fits else 'does NOT fit'} within {FIT_FRACTION:.0%})"
        )
        return (
            f"{self.device_kind} x{self.chips}, per chip: arguments {self.arguments / GIB:.2f} GiB, "
            f"outputs {self.outputs / GIB:.2f} GiB (aliased {self.aliased / GIB:.2f}), "
            f"temporaries {self.temporaries / GIB:.2f} GiB, code {self.generated_code / GIB:.3f} GiB; "
            f"total {self.total / GIB:.2f} GiB {hbm}; compiled in {self.compile_s:.1f} s{self._cpu()}"
        )

    def _cpu(self) -> str:
        return "" if self.compile_cpu_s is None else f" ({self.compile_cpu_s:.1f} CPU s)"


def _compile(lowered, devices):
    """``(compiled or None, MemoryReport)``; running out of HBM is a result, not an exception."""
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
        return None, MemoryReport(devices[0].device_kind, len(devices), 0, 0, 0, 0, 0,
                                  time.perf_counter() - start, error=message,
                                  compile_cpu_s=time.process_time() - start_cpu)
    report = memory_report(compiled, devices, time.perf_counter() - start)
    return compiled, dataclasses.replace(report, compile_cpu_s=time.process_time() - start_cpu)


def memory_report(compiled, devices, compile_s: float) -> MemoryReport:
    stats = compiled.memory_analysis()
    return MemoryReport(
        device_kind=devices[0].device_kind, chips=len(devices),
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes, compile_s=compile_s,
    )


def compile_train_step(config, devices):
    """The trainer's train step of ``config`` compiled for ``devices``: ``(compiled, MemoryReport)``
    (``compiled`` is None when the compiler finds that it does not fit; the report says why)."""
    config = for_tpu(config)
    mesh = make_mesh(config.mesh, devices)
    steps = make_step_functions(config, mesh)
    with jax.set_mesh(mesh):
        lowered = steps.train_step.jitted.lower(
            steps.abstract_model_state, steps.abstract_opt_state, abstract_batch(config)
        )
    return _compile(lowered, devices)


def compile_decode(config, devices, *, batch: int, prompt_len: int, new_tokens: int):
    """Greedy KV-cache decoding (gf_jax.model.generate) of ``config``'s model compiled for ``devices``:
    ``(compiled, MemoryReport)``; ``batch`` rows of ``prompt_len`` prompt tokens, ``new_tokens`` more."""
    config = for_tpu(config)
    mesh = make_mesh(config.mesh, devices)
    steps = make_step_functions(config, mesh)
    # _decode_jit has no in_shardings: the abstract parameters carry the training placement.
    state = abstract_with_shardings(steps.abstract_model_state, steps.model_shardings)
    rows = batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    per_row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh):
        lowered = generate._decode_jit.lower(
            steps.model_graphdef, state, tokens, per_row, per_row, n_new=new_tokens, beam_width=1, mesh=mesh
        )
    return _compile(lowered, devices)
