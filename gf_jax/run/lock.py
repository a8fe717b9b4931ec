"""One trainer per run directory: a lock file ``RUN/run.lock`` taken before anything is written.

    lock = RunLock.acquire("runs/tiny")   # RunDirInUse (one sentence naming the holder) if taken
    ...
    lock.release()                        # also on errors; a killed process's lock is broken later

The file holds JSON: host, pid, start time and a heartbeat (refreshed every ``heartbeat_s`` by a
background thread, so a long compile or a slow step never makes a live run look stale).

* Local (or network-mounted) directory: ``fcntl.flock`` on the file. The kernel (or the NFS
  server) drops the lock when its process dies, kill -9 included, so a lock file left behind is
  taken over at once, with a message naming the run that left it.
* Bucket (``gs://``, ``s3://``), or a file system without ``flock``: the lock is an object created
  only if absent (fsspec ``pipe_file(mode="create")``: an ``ifGenerationMatch=0`` upload on
  gcsfs >= 2024.12, ``If-None-Match`` on s3fs; other file systems check then write, which leaves a
  window of one round trip). It is stale when its heartbeat is older than ``stale_after_s``, or
  when it names a process of this host that is gone; a stale lock is replaced with a message. Two
  launches breaking the same stale lock in the same second could both proceed: the heartbeat
  thread re-reads the lock and the loser stops at its next step (``check()``).

Only process 0 of a multi-process run takes the lock (``Trainer`` shares the outcome with the
other processes).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid

from gf_jax.run.rundir import RunDir
from gf_jax.util import paths


class RunDirInUse(ValueError):
    """Another live process holds the run directory (or it cannot be written at all)."""


class RunLockLost(RuntimeError):
    """The lock was taken over while this run was going (a bucket lock broken as stale)."""


def _now() -> float:
    return time.time()


def _describe(info: dict | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    started = info.get("started")
    when = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if started else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} (started {when})"


def _parse(text: str | None) -> dict | None:
    try:
        info = json.loads(text) if text else None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # someone else's process, or nothing to check: assume alive
    return True


def _unwritable(run_dir: str, e: OSError) -> RunDirInUse:
    return RunDirInUse(
        f"cannot write to the run directory {run_dir} ({e.strerror or e}); make it writable or choose "
        "another train.run_dir."
    )


class RunLock:
    """The lock of one run directory; use ``RunLock.acquire``."""

    def __init__(self, run_dir: str, *, heartbeat_s: float, stale_after_s: float, log):
        self.run_dir = run_dir
        self.path = RunDir(run_dir).lock
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._log = log
        self._fd: int | None = None  # flock mode
        self._token = uuid.uuid4().hex
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "token": self._token}
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    @classmethod
    def acquire(cls, run_dir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
                log=print) -> RunLock:
        """Takes the run directory's lock (creating the directory if needed).

        Raises RunDirInUse with one sentence when a live process holds it or the directory cannot
        be written. ``stale_after_s`` must exceed ``heartbeat_s`` by a margin (bucket locks only).
        """
        lock = cls(run_dir, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s, log=log)
        lock._make_dir()
        try:
            if paths.is_url(run_dir) or not lock._take_flock():
                lock._take_object()
        except BaseException:
            lock._remove_dir_if_empty()
            raise
        lock._thread = threading.Thread(target=lock._beat, name="gf_jax-runlock", daemon=True)
        lock._thread.start()
        return lock

    # ---- directory -----------------------------------------------------------------------------

    def _make_dir(self) -> None:
        if paths.exists(self.run_dir):
            return
        try:
            paths.makedirs(self.run_dir)
        except OSError as e:
            raise _unwritable(self.run_dir, e) from None
        self._created_dir = True

    def _remove_dir_if_empty(self) -> None:
        """A run directory this lock created and nothing else filled is removed again: a run that
        failed its checks leaves nothing behind."""
        if not self._created_dir:
            return
        try:
            if paths.is_url(self.run_dir):
                # URLs only
                from etils import epath

                path = epath.Path(self.run_dir)
                if path.exists() and not any(path.iterdir()):
                    path.rmdir()
            else:
                os.rmdir(self.run_dir)
        except OSError:
            pass  # not empty (or already gone): keep it

    # ---- local: flock --------------------------------------------------------------------------

    def _take_flock(self) -> bool:
        """True when taken; False when this file system has no flock (use the object scheme)."""
        # POSIX only: other systems fall back to lock objects
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _unwritable(self.run_dir, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise RunDirInUse(self._in_use_message(holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise
            # The holder we waited for may have removed the file before we locked it: then our
            # lock is on a deleted inode, and a third process may hold the new file. Try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            if previous:
                self._log(f"[gf_jax.train] took over the lock of {self.run_dir} left by {_describe(previous)}: "
                          "that process is gone.")
            self._fd = fd
            self._write_flock()
            return True

    def _write_flock(self) -> None:
        data = json.dumps({**self._info, "heartbeat": _now()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    # ---- bucket (or no flock): create-if-absent object with a heartbeat -----------------------

    def _fs(self):
        # bucket locks only
        import fsspec

        return fsspec.core.url_to_fs(self.path)

    def _content(self) -> bytes:
        return json.dumps({**self._info, "heartbeat": _now()}).encode()

    def _create(self) -> bool:
        if not paths.is_url(self.path):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._content())
            return True
        fs, path = self._fs()
        try:
            fs.pipe_file(path, self._content(), mode="create")
        except FileExistsError:
            return False
        except OSError as e:
            if "precondition" in str(e).lower() or getattr(e, "errno", None) == errno.EEXIST:
                return False  # gcsfs reports a failed ifGenerationMatch=0 as an HTTP 412
            raise
        return True

    def _read(self) -> dict | None:
        try:
            return _parse(paths.read_text(self.path))
        except FileNotFoundError:
            return None

    def _delete(self) -> None:
        try:
            if paths.is_url(self.path):
                fs, path = self._fs()
                fs.rm_file(path)
            else:
                os.remove(self.path)
        except FileNotFoundError:
            pass

    def _is_stale(self, holder: dict | None) -> str | None:
        """Why ``holder``'s lock is stale, or None while it may be alive."""
        if holder is None:
            return None  # being written right now, or unreadable: not ours to break
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
            return "that process is gone"
        age = _now() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)"
        return None

    def _take_object(self) -> None:
        try:
            created = self._create()
        except OSError as e:
            raise _unwritable(self.run_dir, e) from None
        if created:
            return
        holder = self._read()
        why = self._is_stale(holder)
        if why is None:
            raise RunDirInUse(self._in_use_message(holder))
        if self._read() != holder:  # it moved on while we looked: a live holder after all
            raise RunDirInUse(self._in_use_message(self._read()))
        self._delete()
        if not self._create():
            raise RunDirInUse(self._in_use_message(self._read()))
        self._log(f"[gf_jax.train] broke the stale lock of {self.run_dir} left by {_describe(holder)}: {why}.")

    # ---- heartbeat, check, release ------------------------------------------------------------

    def _beat(self) -> None:
        while self.lost is None and not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except OSError:
                pass  # a transient storage error: try again at the next beat

    def beat(self) -> None:
        """Refreshes the heartbeat once (the background thread does so every ``heartbeat_s``); a
        bucket lock that another launch has taken over is marked lost instead (see ``check``)."""
        if self._fd is not None:
            self._write_flock()
            return
        holder = self._read()
        if holder is None or holder.get("token") != self._token:
            self.lost = _describe(holder)
            return
        paths.write_text(self.path, self._content().decode())

    def check(self) -> None:
        """Raises RunLockLost when another launch has taken the lock over (bucket locks)."""
        if self.lost is not None:
            raise RunLockLost(
                f"the lock of {self.run_dir} was taken over by {self.lost} (this run's heartbeat was judged "
                "stale); stopped so that two runs never write one directory. Stop the other run, then resume."
            )

    def release(self) -> None:
        """Removes the lock file (idempotent); a directory this lock created and left empty goes too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._fd is not None:
            try:
                os.remove(self.path)  # while still holding the flock: see _take_flock
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        elif self.lost is None and self._token is not None:
            holder = self._read()
            if holder is not None and holder.get("token") == self._token:
                self._delete()
        self._token = None
        self._remove_dir_if_empty()

    def _in_use_message(self, holder: dict | None) -> str:
        return (
            f"the run directory {self.run_dir} is in use by {_describe(holder)}; wait for that run to end "
            f"or stop it, or choose another train.run_dir (if that process is gone on another host, delete "
            f"{self.path})."
        )
