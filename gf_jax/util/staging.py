"""Folders written whole or not at all, and never over somebody else's files.

    check_target(out_dir, overwrite=False, what="hf export")   # refuses before any work is done
    with staged_folder(out_dir) as tmp:                        # write everything into tmp
        write_files(tmp)
    # out_dir now holds exactly what was written, with a marker saying gf_jax wrote it

The work goes into a hidden sibling ``.NAME.partial-PID-XXXX`` and is renamed into place only
once complete, so a full disk, an exception or a SIGKILL never leaves a half-written folder that
looks finished. A partial folder whose process is gone is removed by the next write to the same
target. A target that already holds files is replaced only when it is gf_jax's own earlier output
(it has the marker) and the caller asked to overwrite; a folder of anybody else's files is never
touched. Local paths only: an object store has no rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

MARKER = "gf_jax_written.json"
_PARTIAL = ".partial-"


def is_own_output(path: str) -> bool:
    """Whether ``path`` is a folder that :func:`staged_folder` wrote."""
    return os.path.isfile(os.path.join(path, MARKER))


def check_target(path: str, *, overwrite: bool, what: str) -> None:
    """Refuses, in one sentence, a target that is not a new or empty local folder, unless it is
    gf_jax's own earlier output and ``overwrite`` is set (``what``: the command, for the message)."""
    if "://" in str(path):
        raise ValueError(f"{what} writes to a local folder, not to {path}; write locally, then copy it there.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; give {what} a new folder.")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not is_own_output(path):
        raise ValueError(
            f"{path} already holds files that {what} did not write; give it a new or empty folder "
            "(nothing was written)."
        )
    if not overwrite:
        raise ValueError(f"{path} holds an earlier {_kind(path) or what} output; pass --overwrite to replace it "
                         "whole, or choose a new folder.")


def _kind(path: str) -> str | None:
    """The ``kind`` recorded in a folder's marker (which command wrote it)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Removes the partial folders of ``path`` left by processes that are gone; returns them."""
    parent, name = os.path.split(os.path.abspath(path))
    removed = []
    if not os.path.isdir(parent):
        return removed
    prefix = f".{name}{_PARTIAL}"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(os.path.join(parent, entry))
    return removed


@contextlib.contextmanager
def staged_folder(path: str, *, marker: dict | None = None):
    """Yields an empty hidden folder beside ``path``; when the block ends normally it becomes
    ``path`` (replacing an empty folder or gf_jax's own earlier output whole), otherwise it is
    removed and ``path`` is left as it was. Call :func:`check_target` first."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the result is an ordinary folder
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"written_by": "gf_jax", **(marker or {})}, f)
        _swap_into_place(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"writing {path} failed: the disk is full; {path} was left as it was "
                          "(free some space and run the same command again)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: str, path: str) -> None:
    """Renames ``tmp`` to ``path``; an existing (empty or own) ``path`` is renamed aside first and
    removed only after the new folder is in place."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{_PARTIAL}{os.getpid()}-old-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
