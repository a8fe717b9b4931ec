"""What a run reports: metric windows, throughput and MFU, and the writers they go to.

The trainer hands each step's device metrics to a ``Tracker``; the tracker reads them back only
when a record is due (so the host runs ahead of the devices in between), checks the loss is
finite, adds the ``LossSums`` over the log window and turns them into one record:
losses, drop fraction, supervised/input tokens, step time, tokens/s, TFLOP/s/device and MFU.
Records go to every writer: ``metrics.jsonl`` (always; ``read_metrics`` reads it back),
TensorBoard (tensorboardX) and Weights & Biases (when installed and ``train.wandb_project`` is set).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Protocol

import jax
import numpy as np

from gf_jax.loss import LossSums
from gf_jax.run.distributed import is_main_process
from gf_jax.util import paths

METRICS_FILE = "metrics.jsonl"

# Peak dense bf16 TFLOP/s per chip, matched as substrings of `device.device_kind` (first match).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),
    ("v4", 275.0),
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def peak_tflops(device) -> float | None:
    """Peak dense bf16 TFLOP/s of one chip, or None when unknown (CPU has no peak)."""
    kind = getattr(device, "device_kind", "")
    if device.platform == "cpu":
        return None
    for needle, tflops in PEAK_TFLOPS:
        if needle.lower() in kind.lower():
            return tflops
    return None


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of a run's ``metrics.jsonl``, in order ([] when there is none). A last line
    cut short (a crash or a full disk in the middle of an append) is left out."""
    path = paths.join(run_dir, METRICS_FILE)
    if not paths.exists(path):
        return []
    lines = [line for line in paths.read_text(path).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records.extend(json.loads(line) for line in lines[-1:])
    except ValueError:
        pass
    return records


# ---------------------------------------------------------------------------------------------
# Writers.


class Writer(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """Appends one JSON object per record to ``metrics.jsonl``. On resume, records after the
    resumed step are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: str, resume_step: int | None):
        self.path = paths.join(run_dir, METRICS_FILE)
        if paths.exists(self.path):
            keep = [r for r in read_metrics(run_dir) if resume_step is not None and r.get("step", 0) <= resume_step]
            paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        paths.append_text(self.path, json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def _scalars(record: dict):
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


class TensorBoardWriter:
    """TensorBoard event files under ``RUN_DIR/tensorboard`` (tensorboardX: no TensorFlow needed)."""

    def __init__(self, run_dir: str):
        # only when train.tensorboard is on
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(paths.join(run_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in _scalars(record):
            self._writer.add_scalar(key, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Weights & Biases (an optional extra: ``pip install wandb``); resumes the run's own wandb run."""

    def __init__(self, project: str, run_dir: str, config: dict):
        try:
            # optional extra: only with train.wandb_project
            import wandb
        except ImportError:
            raise ValueError(
                f"train.wandb_project={project} needs the wandb package; pip install wandb or unset it."
            ) from None
        run_id = "gf-" + paths.absolute(run_dir).strip("/").replace("/", "-")[-100:]
        self._run = wandb.init(project=project, id=run_id, resume="allow", config=config, dir=None)

    def write(self, record: dict) -> None:
        self._run.log(dict(_scalars(record)), step=record["step"])

    def close(self) -> None:
        self._run.finish()


def make_writers(run_dir: str, *, resume_step: int | None, tensorboard: bool, wandb_project: str,
                 config_dict: dict) -> list[Writer]:
    """The writers of the main process (other processes write nothing)."""
    if not is_main_process():
        return []
    writers: list[Writer] = [JsonlWriter(run_dir, resume_step)]
    if tensorboard:
        writers.append(TensorBoardWriter(run_dir))
    if wandb_project:
        writers.append(WandbWriter(wandb_project, run_dir, config_dict))
    return writers


# ---------------------------------------------------------------------------------------------
# Metric windows and throughput.


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(tree))


class Tracker:
    """Metric windows, token counts, throughput/MFU, and the writers.

    Args:
      writers: where records go (``make_writers``).
      tokens_per_step: input tokens of one optimizer step (global batch x sequence length).
      flops_per_token: model FLOPs per trained token (``gf_jax.model.counting.flops_per_token``).
      n_devices, peak: devices of the mesh and one chip's peak TFLOP/s (None: no MFU).
      supervised_tokens, input_tokens: totals so far (a resumed run continues them).
    """

    def __init__(self, writers: list[Writer], *, tokens_per_step: int, flops_per_token: float, n_devices: int,
                 peak: float | None, supervised_tokens: int = 0, input_tokens: int = 0):
        self.writers = writers
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.n_devices = n_devices
        self.peak = peak
        self.supervised_tokens = supervised_tokens
        self.input_tokens = input_tokens
        self._pending: list = []          # per-step device metrics not yet read back
        self._compile_s: float | None = None
        self._compile_reported = False
        self._start_window(time.perf_counter())

    def _start_window(self, now: float) -> None:
        self._sums: LossSums | None = None
        self._last: dict[str, Any] = {}
        self._steps = 0
        self._window_start = now
        self._excluded = 0.0

    # ---- per step ----------------------------------------------------------------------------

    def step_done(self, metrics, step_started: float) -> None:
        """Queues one step's device metrics; the first step (mostly compilation) is timed apart."""
        self._pending.append(metrics)
        if self._compile_s is None:
            jax.block_until_ready(metrics)
            self._compile_s = time.perf_counter() - step_started
            self._start_window(time.perf_counter())
        else:
            self._steps += 1

    def exclude(self, seconds: float) -> None:
        """Time spent on other work (evaluation, checkpoints) is not training throughput."""
        self._excluded += seconds

    def read_back(self, step: int) -> None:
        """Reads the queued metrics back (waits for those steps) and adds them to the window.

        Raises NonFiniteLossError when a loss is NaN or infinite.
        """
        for host in _to_host(self._pending):
            if not math.isfinite(host["loss"]):
                raise NonFiniteLossError(f"the loss became {host['loss']} by step {step}")
            sums = LossSums(**{k: host[k] for k in LossSums._fields})
            self.supervised_tokens += int(sums.n_kept)
            self.input_tokens += self.tokens_per_step
            self._sums = sums if self._sums is None else self._sums.add(sums)
            self._last = {"grad_norm": host["grad_norm"], "lr": host["lr"]}
        self._pending = []

    # ---- records -----------------------------------------------------------------------------

    def log_record(self, step: int, z_loss: float) -> dict:
        """The record of the window that ends at ``step`` (then a new window starts)."""
        sums = self._sums if self._sums is not None else LossSums(*([0] * len(LossSums._fields)))
        ratios = _to_host(sums.ratios())
        record = {
            "step": step,
            "loss": float(sums.loss(z_loss)),
            **ratios,
            "supervised_tokens": self.supervised_tokens,
            "input_tokens": self.input_tokens,
            "grad_norm": self._last.get("grad_norm"),
            "lr": self._last.get("lr"),
            **self._throughput(time.perf_counter() - self._window_start - self._excluded),
        }
        if not self._compile_reported and self._compile_s is not None:
            record["compile_s"] = self._compile_s  # the first step's time is mostly compilation
            self._compile_reported = True
        self._start_window(time.perf_counter())
        return record

    def _throughput(self, elapsed: float) -> dict:
        if self._steps <= 0 or elapsed <= 0:
            return {"step_time_s": None, "tokens_per_s": 0.0, "tflops_per_device": None, "mfu": None}
        step_time = elapsed / self._steps
        tokens_per_s = self.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.n_devices / 1e12
        return {
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": None if self.peak is None else tflops / self.peak,
        }

    def write(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def format_record(r: dict) -> str:
    """One console line of a training record."""
    line = (
        f"step {r['step']:>6}  loss {r['loss']:.4f}  all {r['loss_all']:.4f}  "
        f"dropped {r['loss_dropped']:.4f}  drop {r['drop_fraction']:.3f}  "
        f"gnorm {r['grad_norm']:.3f}  lr {r['lr']:.2e}"
    )
    if r.get("step_time_s"):
        line += (
            f"  {r['step_time_s'] * 1e3:.0f} ms/step  {r['tokens_per_s']:,.0f} tok/s  "
            f"{r['tflops_per_device']:.3f} TFLOP/s/dev"
        )
        if r.get("mfu") is not None:
            line += f"  MFU {100 * r['mfu']:.1f}%"
    return line
