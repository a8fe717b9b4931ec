"""How a command ends: a user error is one sentence on stderr and exit status 2, never a traceback.

    def main(argv=None):
        run_command(lambda: _main(argv))

``ValueError`` and ``OSError`` (a missing file, a full disk, a folder that cannot be written)
raised by the work are user errors: their message is written as ``error: ...`` and the process
exits with status 2. Ctrl-C ends with one line and status 130. ``GF_JAX_TRACEBACK=1`` shows the
full traceback instead, for debugging gf_jax itself.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
USER_ERRORS = (ValueError, OSError)
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130
# Messages of failures that the command reports itself, in one sentence: a full disk under Orbax's
# writer threads (TensorStore's RESOURCE_EXHAUSTED), the event loops they close, and Orbax's warning
# about a checkpoint folder without metadata (reported as "checkpoint step N does not restore").
_NOISE = ("No space left on device", "os_error_code='28'", "Event loop is closed", "Metadata file does not exist")


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (an OSError without one: its strerror and file)."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.strerror and (not text or text.startswith("[Errno")):
        where = f" ({error.filename})" if error.filename else ""
        text = f"{error.strerror}{where}"
    return text.splitlines()[0] if text else type(error).__name__


def fail(message: str, status: int = USER_ERROR_STATUS):
    """Ends the process with ``error: message`` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def quiet_background_noise() -> None:
    """Silences what background threads print about a failure the command reports itself (a full
    disk while a checkpoint is written): log records and exceptions of background threads or C
    callbacks whose text names it. The main thread's own exceptions are never hidden, everything
    else is printed as before, and ``GF_JAX_TRACEBACK=1`` keeps it all."""
    if os.environ.get("GF_JAX_TRACEBACK"):
        return

    def is_noise(text: str) -> bool:
        return any(marker in text for marker in _NOISE)

    def log_filter(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not is_noise(text)

    for handler in logging.getLogger().handlers or [logging.lastResort]:
        if handler is not None:
            handler.addFilter(log_filter)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(log_filter)
    previous_thread_hook, previous_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args) -> None:
        if not is_noise(str(args.exc_value)):
            previous_thread_hook(args)

    def unraisable_hook(info) -> None:  # what C callbacks (TensorStore's futures) report through
        if not is_noise(str(info.exc_value)):
            previous_unraisable(info)

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook


def run_command(work: Callable[[], T]) -> T:
    """``work()``; a user error or Ctrl-C ends the process with one line (see the module docstring)."""
    if os.environ.get("GF_JAX_TRACEBACK"):
        return work()
    try:
        return work()
    except USER_ERRORS as e:
        fail(one_line(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
