"""Preparing a tokenized store: one streamed pass over the source, tokenized by a process pool.

The main process reads documents in source order and hands batches of them to the workers; the
results are written back in submission order, so the store is the same for any worker count.
Everything goes to a temporary folder that becomes the store by one rename once its manifest is
written: a prepare killed mid-way leaves a ``.partial`` folder, never a store, and the next prepare
removes it and starts over. Layout: ``gf_jax.data.store``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from gf_jax.data.config import DataConfig
from gf_jax.data.iterator import default_process
from gf_jax.data.sources import duplicate_id_error, iter_background, source_size
from gf_jax.data.store import MANIFEST, TokenStore, check_settings, read_manifest, store_path, store_settings
from gf_jax.util import paths
from gf_jax.util.staging import pid_alive

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: few files, each well under object-store limits
BATCH_CHARS = 1 << 20  # text per worker task: large enough to amortise pickling, small for a steady ETA


def ensure_store(config: DataConfig, tokenizer, *, workers: int | None = None, progress: bool = True,
                 process_index: int | None = None, process_count: int | None = None) -> TokenStore:
    """The store of ``config`` and ``tokenizer``: opened if a matching one exists, else prepared
    first. A store at ``data.store_dir`` with other settings is refused (one sentence, the difference).

    In a multi-process run (``process_index``/``process_count``, default ``jax.process_index()`` /
    ``jax.process_count()``) only process 0 prepares a missing store; the others wait for its
    manifest (``wait_for_store``), so the store must be on storage every host sees.
    """
    settings = store_settings(config, tokenizer)
    path = store_path(config, settings)
    manifest = read_manifest(path)
    if manifest is None:
        process_index, process_count = default_process(process_index, process_count)
        if process_index == 0:
            prepare_store(config, tokenizer, path=path, workers=workers, progress=progress, settings=settings)
            manifest = read_manifest(path)
        else:
            manifest = wait_for_store(path, process_index, config.store_wait)
    check_settings(path, manifest, settings)
    return TokenStore(path, manifest)


WAIT_POLL_SECONDS = 5.0  # how often a waiting process looks for the manifest
WAIT_NOTE_SECONDS = 300.0  # how often it says that it is still waiting


def wait_for_store(path: str, process_index: int, timeout: float) -> dict:
    """The manifest of the store that process 0 is preparing at ``path``, once it is there (it is
    written last, so its presence means the store is complete); a one-sentence error after
    ``timeout`` seconds."""
    start = time.monotonic()
    notes = 1
    while True:
        try:
            manifest = read_manifest(path)
        except ValueError:  # an object store showing a manifest mid-upload: look again
            manifest = None
        if manifest is not None:
            return manifest
        waited = time.monotonic() - start
        if waited > timeout:
            raise ValueError(f"process {process_index} waited {waited:.0f} s for process 0 to prepare the tokenized "
                             f"store {path}; put data.store_dir on storage that every host sees (a gs:// bucket or a "
                             "shared folder), prepare it first with `python -m gf_jax.data prepare --config C`, or "
                             "raise data.store_wait.")
        if waited >= notes * WAIT_NOTE_SECONDS:
            notes += 1
            print(f"[gf_jax.data] process {process_index}: waiting {waited:.0f} s so far for process 0 to prepare "
                  f"the tokenized store {path} (gives up after data.store_wait={timeout:.0f} s)", file=sys.stderr,
                  flush=True)
        time.sleep(min(WAIT_POLL_SECONDS, max(0.0, timeout - waited) + 0.01))


def default_workers(config: DataConfig) -> int:
    if config.store_workers:
        return config.store_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_store(config: DataConfig, tokenizer, *, path: str | None = None, workers: int | None = None,
                  progress: bool = True, shard_tokens: int = SHARD_TOKENS,
                  settings: dict[str, Any] | None = None) -> str:
    """Tokenizes the configured source into a store at ``path`` (default: ``store_path``); returns it.

    An existing complete store there is checked and kept (never rewritten).
    """
    settings = settings or store_settings(config, tokenizer)
    path = path or store_path(config, settings)
    manifest = read_manifest(path)
    if manifest is not None:
        check_settings(path, manifest, settings)
        return path
    workers = workers or default_workers(config)
    remote = paths.is_url(path)  # built in a local folder first, then uploaded
    local_parent = os.path.join(".cache", "stores") if remote else os.path.dirname(os.path.abspath(path))
    os.makedirs(local_parent, exist_ok=True)
    base = os.path.basename(str(path).rstrip("/"))
    _remove_stale_partials(local_parent, base)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-{socket.gethostname()}-{os.getpid()}-", dir=local_parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the store is read by every process and user
    try:
        t0 = time.perf_counter()
        manifest = _write(config, tokenizer, tmp, workers, progress, shard_tokens)
        manifest.update(settings=settings, workers=workers, prepare_seconds=round(time.perf_counter() - t0, 2),
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_manifest(tmp, manifest)  # last: its presence is what makes the folder a store
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_stale_partials(parent: str, base: str) -> None:
    """Deletes ``.partial`` folders that this host's dead processes left (killed prepares)."""
    prefix = f".{base}.partial-{socket.gethostname()}-"
    for name in os.listdir(parent):
        if name.startswith(prefix):
            pid = int(name[len(prefix):].split("-")[0] or 0)
            if not pid_alive(pid):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)


def _publish(tmp: str, path: str) -> None:
    """Makes the finished folder the store: a rename locally; file by file, manifest last, to a URL."""
    if paths.is_url(path):
        paths.makedirs(path)
        for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):
            _copy_stream_up(os.path.join(tmp, name), paths.join(path, name))
        return
    if os.path.isdir(path) and read_manifest(path) is None:
        shutil.rmtree(path)  # an unfinished store from an older, non-atomic copy: start over
    try:
        os.rename(tmp, path)
    except OSError:
        if read_manifest(path) is None:  # not another process that finished the same store first
            raise


def _copy_stream_up(src: str, dst: str) -> None:
    # URLs only
    from etils import epath

    with open(src, "rb") as fin, epath.Path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


# ----------------------------------------------------------------------------------------------
# Tokenizing in workers.

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, add_bos: bool, add_eos: bool, dtype: str, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    _WORKER.update(tokenizer=tokenizer, add_bos=add_bos, add_eos=add_eos, dtype=np.dtype(dtype))


def _die_with_parent(parent_pid: int) -> None:
    """A pool worker ends when the preparing process dies, even by SIGKILL (which runs no clean-up
    and would leave the pool tokenizing for nobody): Linux's PR_SET_PDEATHSIG."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the call above: end now
        os._exit(1)


def _encode(texts: list[str], ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat tokens, lengths_U, split hashes_U) of one batch of documents."""
    w = _WORKER
    arrays = w["tokenizer"].encode_arrays(texts, add_bos=w["add_bos"], add_eos=w["add_eos"])
    flat = np.concatenate(arrays).astype(w["dtype"]) if arrays else np.zeros(0, w["dtype"])
    lengths_U = np.array([len(a) for a in arrays], np.int64)
    hashes_U = np.array([int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "little") for i in ids], np.uint64)
    return flat, lengths_U, hashes_U


def _batches(config: DataConfig) -> Iterator[tuple[list[str], list[str], int]]:
    """(texts, ids, progress after them) of consecutive documents, about ``BATCH_CHARS`` each."""
    texts, ids, chars, at = [], [], 0, 0
    for doc, at in iter_background(config):
        texts.append(doc.text)
        ids.append(doc.id)
        chars += len(doc.text)
        if chars >= BATCH_CHARS:
            yield texts, ids, at
            texts, ids, chars = [], [], 0
    if texts:
        yield texts, ids, at


def _encoded(config: DataConfig, tokenizer, workers: int, dtype: np.dtype) -> Iterator[tuple[Any, list[str], int]]:
    """Encoded batches in source order: in this process (1 worker) or a pool with a bounded
    window of batches in flight (memory stays constant however large the source)."""
    args = (tokenizer, config.add_bos, config.add_eos, dtype.str)
    if workers <= 1:
        _init_worker(*args)
        for texts, ids, at in _batches(config):
            yield _encode(texts, ids), ids, at
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                                                initargs=(*args, os.getpid())) as pool:
        window: collections.deque = collections.deque()
        for texts, ids, at in _batches(config):
            window.append((pool.submit(_encode, texts, ids), ids, at))
            if len(window) >= 2 * workers:
                future, ids_, at_ = window.popleft()
                yield future.result(), ids_, at_
        while window:
            future, ids_, at_ = window.popleft()
            yield future.result(), ids_, at_


def _pool_context():
    """fork while JAX has no backend threads (workers start at once, nothing re-imported); spawn
    once it has, because forking a multithreaded process can deadlock (e.g. inside a trainer)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    jax_threads = bridge is not None and getattr(bridge, "_at_fork_handler_installed", True)
    if sys.platform != "linux" or jax_threads:
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


class _Writer:
    """Appends encoded batches to the store files in ``folder``, opening a new shard when one is full."""

    def __init__(self, folder: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.files = {name: open(os.path.join(folder, name), "wb") for name in
                      ("offsets.bin", "split_hashes.bin", "id_offsets.bin", "ids.bin")}
        self.files["offsets.bin"].write(np.zeros(1, np.int64).tobytes())
        self.files["id_offsets.bin"].write(np.zeros(1, np.int64).tobytes())
        self.tokens, self.id_bytes, self.documents = 0, 0, 0
        self.shards: list[dict] = []
        self.shard_file = None

    def _new_shard(self) -> None:
        if self.shard_file is not None:
            self.shard_file.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "first_token": self.tokens, "tokens": 0,
                            "first_document": self.documents, "documents": 0})
        self.shard_file = open(os.path.join(self.folder, name), "wb")

    def add(self, flat: np.ndarray, lengths_U: np.ndarray, hashes_U: np.ndarray, ids: list[str]) -> None:
        # A batch goes whole into one shard (documents never straddle shards); shards end near
        # shard_tokens, off by at most one batch.
        if self.shard_file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self._new_shard()
        self.shard_file.write(flat.tobytes())
        self.shards[-1]["tokens"] += len(flat)
        self.shards[-1]["documents"] += len(lengths_U)
        self.files["offsets.bin"].write((self.tokens + np.cumsum(lengths_U)).astype(np.int64).tobytes())
        self.files["split_hashes.bin"].write(hashes_U.astype(np.uint64).tobytes())
        encoded = [i.encode("utf-8") for i in ids]
        self.files["ids.bin"].write(b"".join(encoded))
        id_lens = np.array([len(e) for e in encoded], np.int64)
        self.files["id_offsets.bin"].write((self.id_bytes + np.cumsum(id_lens)).tobytes())
        self.tokens += len(flat)
        self.id_bytes += int(id_lens.sum())
        self.documents += len(lengths_U)

    def close(self) -> None:
        for fh in [*self.files.values(), self.shard_file]:
            if fh is not None:
                fh.close()


def _write(config: DataConfig, tokenizer, folder: str, workers: int, progress: bool, shard_tokens: int) -> dict:
    """Writes the store files into ``folder``; returns the manifest without its settings."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    bar = _progress_bar(config, workers) if progress else None
    writer = _Writer(folder, dtype, shard_tokens)
    try:
        for (flat, lengths_U, hashes_U), ids, at in _encoded(config, tokenizer, workers, dtype):
            writer.add(flat, lengths_U, hashes_U, ids)
            if bar is not None:
                bar.update(at - bar.n)
                bar.set_postfix(documents=f"{writer.documents:,}", tokens=f"{writer.tokens:,}", refresh=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    if writer.documents == 0:
        raise ValueError(f"no documents found in {config.path!r} (source {config.source}, split rule "
                         f"{config.split_rule}); check data.path and data.split_rule.")
    _check_unique_ids(folder, writer.documents, config)
    return {"format": 1, "dtype": dtype.name, "documents": writer.documents, "tokens": writer.tokens,
            "shards": writer.shards}


def _progress_bar(config: DataConfig, workers: int):
    unit = "doc" if config.source == "tfds" else "B"
    return tqdm(total=source_size(config), unit=unit, unit_scale=True, file=sys.stderr,
                desc=f"preparing tokenized store ({workers} worker{'s' if workers > 1 else ''})")


def _check_unique_ids(folder: str, n: int, config: DataConfig) -> None:
    """Refuses duplicate ids (split and canary records key on them), comparing 8-byte hashes first."""
    hashes_U = np.fromfile(os.path.join(folder, "split_hashes.bin"), np.uint64)
    order_U = np.argsort(hashes_U, kind="stable")
    same_U = np.flatnonzero(hashes_U[order_U][1:] == hashes_U[order_U][:-1])
    if not len(same_U):
        return
    id_offsets = np.fromfile(os.path.join(folder, "id_offsets.bin"), np.int64)
    blob = np.memmap(os.path.join(folder, "ids.bin"), np.uint8, mode="r")
    for k in same_U:
        a, b = int(order_U[k]), int(order_U[k + 1])
        id_a = bytes(blob[id_offsets[a]:id_offsets[a + 1]])
        if id_a == bytes(blob[id_offsets[b]:id_offsets[b + 1]]):
            raise duplicate_id_error(id_a.decode("utf-8"), config)
