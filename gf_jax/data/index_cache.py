"""Index files: a process's arrays over the tokenized store, computed once and memory-mapped after.

Before its first batch, a store-backed iterator needs arrays as long as its share of the corpus:
its documents' references and lengths (share, split and canary copies applied) and, per epoch,
the prefix sums that place each document in the shuffled stream (``RowLayout``), plus the
fingerprint hashed over those lengths. Computing them is vectorised but linear in the share
(about 0.2 us per document). The first start computes them and saves them in the store's
``index/`` folder; every later start and resume maps them, so start-up time and memory stop
growing with the corpus. (Megatron-LM caches its index mappings next to its data the same way.)

A file's name is a hash of everything its array depends on (the store's manifest, the process
share, split, canaries, seed, epoch, T, mode and order algorithm), so a changed setting never
reads a stale file. Files are written under a temporary name and renamed, so a file under its
final name is complete. A folder that cannot be written (a read-only mount) costs speed, not
correctness: the arrays are then computed at each start, as without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def key_name(kind: str, key: dict[str, Any]) -> str:
    """``kind-<hash of key>``: the file name of an entry (``kind`` keeps the folder readable)."""
    digest = hashlib.sha256(json.dumps([kind, key], sort_keys=True).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


class IndexCache:
    """Arrays (``.npy``, returned memory-mapped) and short texts (``.json``) in ``folder``, by key."""

    def __init__(self, folder: str):
        self.folder = folder
        self._unwritable = False

    def array(self, kind: str, key: dict[str, Any], build: Callable[[], np.ndarray]) -> np.ndarray:
        """The saved array of (kind, key), memory-mapped; else ``build()``, saved for next time."""
        path = os.path.join(self.folder, key_name(kind, key) + ".npy")
        if os.path.exists(path):
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError):  # cut short after all (a crash before the disk had it): rebuilt
                log.warning("the index file %s is damaged; computing it again.", path)
        value = np.ascontiguousarray(build())
        if value.size and self._write(path, lambda fh: np.save(fh, value, allow_pickle=False)):
            return np.load(path, mmap_mode="r")  # mapped: the computed copy is freed
        return value

    def text(self, kind: str, key: dict[str, Any], build: Callable[[], str]) -> str:
        """The saved text of (kind, key); else ``build()``, saved for next time."""
        path = os.path.join(self.folder, key_name(kind, key) + ".json")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    return json.load(fh)["text"]
            except (OSError, ValueError, KeyError):
                log.warning("the index file %s is damaged; computing it again.", path)
        value = build()
        self._write(path, lambda fh: fh.write(json.dumps({"text": value}).encode("utf-8")))
        return value

    def _write(self, path: str, write: Callable) -> bool:
        """Writes ``path`` atomically; False (after one log line) where the folder is not writable."""
        if self._unwritable:
            return False
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique across hosts sharing the folder, not just pids
        try:
            os.makedirs(self.folder, exist_ok=True)
            with open(tmp, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
            return True
        except OSError as e:
            self._unwritable = True
            log.warning("cannot write the store's index files to %s (%s); computing them at each start instead.",
                        self.folder, e)
            try:
                os.remove(tmp)
            except OSError:
                pass
            return False
