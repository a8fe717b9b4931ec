"""How a command ends: a user error is one sentence on stderr and exit status 2, never a traceback.

    def main(argv=None):
        run_command(lambda: _main(argv))

``ValueError`` and ``OSError`` (a missing file, a full disk, a folder that cannot be written)
raised by the work are user errors: their message is written as ``error: ...`` and the process
exits with status 2. Ctrl-C ends with one line and status 130. ``GF_JAX_TRACEBACK=1`` shows the
full traceback instead, for debugging gf_jax itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
USER_ERRORS = (ValueError, OSError)
USER_ERROR_STATUS = 2


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
        sys.exit(130)
