"""Memory-mapped safetensors reading and streaming, sharded safetensors writing.

The format (huggingface/safetensors): 8 bytes little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw
little-endian tensor bytes. Reading maps the file and views each tensor in place, so only the
slices a process asks for are ever paged in; :meth:`SafetensorsReader.release` drops a tensor's
pages once it is on the devices, which keeps the host's resident memory near one copy of the
model. Writing streams one tensor at a time (the header is known from shapes alone), so an export
never holds a whole shard in memory either.

PyTorch ``.bin`` / ``.pt`` / ``.pth`` files are pickles, and unpickling runs whatever code the file
carries: they are refused, never opened.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size ("5GB")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}
_CODES = {v: k for k, v in _DTYPES.items()}
# The dtypes an export may write its weights in, by name.
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


def refuse_pickles(hf_dir: str) -> None:
    """Raises when the directory's weights exist only as pickles (which are never opened)."""
    pickles = sorted(f for f in os.listdir(hf_dir) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{hf_dir!r} holds PyTorch pickle weights ({pickles[0]}), which gf_jax never loads because "
            "unpickling can run arbitrary code; convert them to safetensors first (in transformers: "
            "model.save_pretrained(out_dir, safe_serialization=True))."
        )
    raise FileNotFoundError(f"{hf_dir!r} has no {SINGLE_FILE} or {INDEX_FILE}; pass a Hugging Face model directory.")


def weight_files(hf_dir: str) -> dict[str, str]:
    """Tensor name -> path of the safetensors file holding it (one file, or the index's shards)."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in _read_header(single)[0]}
    refuse_pickles(hf_dir)
    raise AssertionError("unreachable")


def _read_header(path: str) -> tuple[dict, int]:
    """(tensor entries without ``__metadata__``, byte offset of the data section); a file that is
    truncated or not safetensors at all is one sentence naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first = f.read(8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 else None
        if n is None or n > size - 8:
            raise _damaged(path, f"{size} bytes, too short for its header")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise _damaged(path, "its header is not valid JSON") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        if not 0 <= begin <= end or 8 + n + end > size:
            raise _damaged(path, f"tensor {name} ends at byte {8 + n + end} of {size}")
    return header, 8 + n


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is truncated or not a safetensors file ({why}); download or export it again.")


class _MappedFile:
    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = _read_header(path)
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def view(self, name: str) -> np.ndarray:
        entry = self.header[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} in {self.path} has dtype {entry['dtype']}; gf_jax reads "
                             f"{', '.join(_DTYPES)} only.")
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        flat = np.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=self.data_start + begin)
        return flat.reshape(entry["shape"])

    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process (they are re-read from disk if touched again)."""
        begin, end = self.header[name]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self.data_start + begin) // page * page
        length = self.data_start + end - start
        if length > 0 and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED, start, length)


class SafetensorsReader:
    """Lazy access to the tensors of a Hugging Face directory: ``view(name)`` is a read-only numpy
    array backed by the memory-mapped file (nothing is read until it is sliced)."""

    def __init__(self, hf_dir: str):
        self.files = weight_files(hf_dir)
        self._open: dict[str, _MappedFile] = {}

    @classmethod
    def of_file(cls, path: str) -> SafetensorsReader:
        """A reader of one safetensors file that is not a model's (e.g. a PEFT adapter's)."""
        reader = cls.__new__(cls)
        reader.files = {name: path for name in _read_header(path)[0]}
        reader._open = {}
        return reader

    def names(self) -> list[str]:
        return sorted(self.files)

    def _file(self, name: str) -> _MappedFile:
        if name not in self.files:
            raise KeyError(name)
        path = self.files[name]
        if path not in self._open:
            self._open[path] = _MappedFile(path)
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).header[name]["shape"])

    def view(self, name: str) -> np.ndarray:
        return self._file(name).view(name)

    def release(self, name: str) -> None:
        self._file(name).release(name)


# ---- writing ---------------------------------------------------------------------------------

TensorSpec = tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]  # name, shape, dtype, producer


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def write_file(path: str, specs: Iterable[TensorSpec], metadata: dict | None = None) -> None:
    """Writes one safetensors file, calling each producer only when its bytes are due."""
    specs = list(specs)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype, _ in specs:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in specs:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name} has shape {array.shape}, expected {tuple(shape)}.")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            del array
    os.replace(tmp, path)


def write_sharded(out_dir: str, specs: list[TensorSpec], *, max_shard_bytes: int = MAX_SHARD_BYTES,
                  metadata: dict | None = None) -> list[str]:
    """Writes ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, each shard at most ``max_shard_bytes`` (a single tensor
    larger than that gets a shard of its own). Returns the file names written."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    metadata = {"format": "pt", **(metadata or {})}  # transformers expects format=pt
    if len(shards) == 1:
        write_file(os.path.join(out_dir, SINGLE_FILE), shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(os.path.join(out_dir, name), shard, metadata)
        weight_map.update({spec[0]: name for spec in shard})
    total = sum(_nbytes(s[1], s[2]) for s in specs)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*names, INDEX_FILE]
