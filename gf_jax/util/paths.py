"""File I/O for local paths and cloud URLs (``gs://``, ``s3://``) alike.

Orbax writes checkpoints to a ``gs://`` run directory natively (tensorstore for the arrays,
``etils.epath`` for the directory layout). Every small file gf_jax writes (a run's
``config.yaml``, ``metrics.jsonl``, tokenizer copy; reports, exports' JSON files) goes through
this module, so a whole run directory can live in a bucket. Local paths use ``os``; URLs use
``etils.epath`` (Orbax's own path layer; on a TPU VM ``gs://`` needs ``gcsfs`` installed, which
``scripts/tpu_vm.sh setup`` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile


def is_url(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    # URLs only (gs://, s3://): local paths never load it
    from etils import epath

    return epath.Path(path)


def absolute(path: str) -> str:
    """An absolute local path, or the URL unchanged (``os.path.abspath`` would mangle it)."""
    return str(path) if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_url(path):
        return _epath(path).read_text()
    with open(path) as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file; a crash never leaves half of it (local: temp file + rename; object
    stores replace an object atomically)."""
    if is_url(path):
        _epath(path).write_bytes(data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Writes a whole file; a crash never leaves half of it (local: temp file + rename; object
    stores replace an object atomically)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, values) -> None:
    """Writes ``values`` as indented JSON with a final newline, atomically (as :func:`write_bytes`)."""
    write_text(path, json.dumps(values, indent=2) + "\n")


def append_text(path: str, text: str) -> None:
    """Appends to a file. Object stores cannot append, so a URL is read and rewritten whole
    (metrics files are small and written every N steps)."""
    if is_url(path):
        old = read_text(path) if exists(path) else ""
        _epath(path).write_text(old + text)
        return
    with open(path, "a") as f:
        f.write(text)


def copy_file(src: str, dst: str) -> None:
    """Copies a file atomically: other processes polling ``dst`` see nothing or the whole file."""
    if is_url(dst):
        _epath(dst).write_bytes(read_bytes(src))
        return
    tmp = f"{dst}.{os.getpid()}.tmp"
    if is_url(src):
        with open(tmp, "wb") as f:
            f.write(read_bytes(src))
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def move(src: str, dst: str) -> None:
    """Moves a file or directory (local: one rename; object stores: copy, then delete)."""
    if is_url(src) or is_url(dst):
        _epath(src).rename(_epath(dst))
        return
    os.replace(src, dst)


def remove_tree(path: str) -> None:
    """Removes a file or folder (local or URL); a missing one is not an error."""
    if is_url(path):
        target = _epath(path)
        if target.is_dir():
            target.rmtree()
        elif target.exists():
            target.unlink()
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def same_content(a: str, b: str) -> bool:
    return read_bytes(a) == read_bytes(b)


def localize(path: str, cache_dir: str | None = None) -> str:
    """A local file with the content of ``path``: the path itself when local, else a cached copy
    (for libraries that only open local files, such as sentencepiece)."""
    if not is_url(path):
        return path
    data = read_bytes(path)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "gf_jax_remote")
    os.makedirs(cache_dir, exist_ok=True)
    name = hashlib.sha256(data).hexdigest()[:16] + "_" + os.path.basename(str(path).rstrip("/"))
    local = os.path.join(cache_dir, name)
    if not os.path.exists(local):
        tmp = f"{local}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    return local
