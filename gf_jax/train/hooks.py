"""Periodic work of the training loop: hooks that run every N steps, and the stop signal.

A hook is a function of the step that runs when the step is a multiple of ``every`` (and, unless
told otherwise, at the last step). The trainer registers logging, checkpointing and evaluation
as hooks, in that order: metrics are read back (and a non-finite loss stops the run) before a
checkpoint is written, and the checkpoint is on its way before an evaluation can fail.
Users add their own with ``Trainer.add_hook(fn, every=N)``.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable

from jax.experimental import multihost_utils

from gf_jax.run import distributed


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(step)`` every ``every`` steps (0: never periodically) and at the last step if ``at_end``."""

    name: str
    fn: Callable[[int], None]
    every: int
    at_end: bool = True

    def due(self, step: int, end: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == end)


class StopSignal:
    """SIGTERM (a TPU preemption, a scheduler) or Ctrl-C asks the loop to save and stop.

    Single process: handlers installed for the duration of the loop; a second Ctrl-C stops at
    once. Multi-process: SIGTERM is left to JAX's preemption service, which makes every process
    stop after the same step (a process stopping alone would hang the others in a collective).
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        for sig in () if distributed.is_multiprocess() else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no preemption handling
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = signum

    def requested(self, step: int) -> bool:
        """A stop signal arrived (multi-process: on any process, agreed at this same step)."""
        if self.received is not None:
            return True
        if distributed.is_multiprocess():
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = signal.SIGTERM
                return True
        return False
