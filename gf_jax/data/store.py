"""The tokenized store: a corpus tokenized once, memory-mapped by every process.

Layout of a store folder (all arrays raw little-endian, dtypes in the manifest)::

    tokens-00000.bin ...   shards of one flat token array (uint16 when the vocabulary fits, else
                           uint32); a document never straddles two shards
    offsets.bin            int64, N+1: document d is global tokens [offsets[d], offsets[d+1])
    split_hashes.bin       uint64, N: the first 8 bytes of sha256(id), so the train/validation split
                           (``split_of``) is a vectorised compare instead of N hashes per start
    id_offsets.bin, ids.bin  int64 N+1 and utf-8 bytes: the document ids
    manifest.json          written last: settings (tokenizer fingerprint, source, BOS/EOS), counts,
                           shards. A folder without it is an unfinished prepare, never a store.

    index/                 a process's arrays over the store (its share's references and lengths,
                           each epoch's layout), written on first use (``gf_jax.data.index_cache``)

A reader touches only the pages of the documents it reads. The per-document index a process
needs (``StoreTokens``: an int32 reference and an int32 length per document of its share) is
computed once, reading the store's files in windows rather than through their memory maps (a
scan leaves no mapped pages behind), and memory-mapped from ``index/`` at every later start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from gf_jax.data.config import DataConfig
from gf_jax.data.index_cache import IndexCache
from gf_jax.data.shuffle import CHUNK
from gf_jax.data.sources import Document, source_files, source_mtimes, source_size
from gf_jax.util import paths

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILES = ("offsets.bin", "split_hashes.bin", "id_offsets.bin", "ids.bin")


# ----------------------------------------------------------------------------------------------
# Settings: what a store must agree on with the config and tokenizer that read it.


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer file's bytes (any tokenizer class with a ``path``)."""
    path = getattr(tokenizer, "path", None)
    if not path:
        raise ValueError("the tokenized store needs a tokenizer loaded from a file (its bytes are the store's "
                         "key); set data.tokenizer to that file or set data.store=off.")
    return hashlib.sha256(paths.read_bytes(path)).hexdigest()[:20]


def source_settings(config: DataConfig) -> dict[str, Any]:
    """The fields that decide which documents (ids, texts, order) a source yields."""
    fields = {"text": ("path", "split_rule"), "jsonl": ("path", "text_field", "id_field"),
              "parquet": ("path", "text_field", "id_field"),
              "tfds": ("tfds_name", "tfds_split", "tfds_data_dir", "tfds_text_feature", "id_field")}[config.source]
    out = {"source": config.source, **{f: getattr(config, f) for f in fields}, "max_documents": config.max_documents}
    if "path" in out:
        out["path"] = paths.absolute(out["path"])
    out["files"] = [list(f) for f in source_files(config)]  # a changed corpus changes the store
    return out


def store_settings(config: DataConfig, tokenizer) -> dict[str, Any]:
    """Everything a store's tokens depend on; two configs with equal settings share a store."""
    return {
        "format": FORMAT,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": int(tokenizer.vocab_size),
                      "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id)},
        "add_bos": bool(config.add_bos),
        "add_eos": bool(config.add_eos),
        "source": source_settings(config),
    }


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def store_path(config: DataConfig, settings: dict[str, Any]) -> str:
    """``data.store_dir``, else ``.cache/stores/<source>-<key>``. The default folder's key also holds
    the files' modification times, so an edit that keeps a file's size never reuses the old tokens
    (an explicit ``store_dir``, shared by hosts with their own copies of a corpus, compares sizes)."""
    if config.store_dir:
        return config.store_dir
    name = os.path.basename(str(config.path).rstrip("/")) if config.source != "tfds" else config.tfds_name
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    key = settings_key({**settings, "mtimes": source_mtimes(config)})
    return os.path.join(".cache", "stores", f"{config.source}-{name}-{key}")


def uses_store(config: DataConfig, process_count: int = 1) -> bool:
    """Whether the data is read through a tokenized store: ``data.store`` on, or auto for text
    documents of at least ``data.store_above_bytes``. A multi-process run uses one by itself only
    with a shared ``store_dir``: the default folder is on each host's own disk, where the other
    hosts would wait for a store they cannot see."""
    if config.store != "auto":
        return config.store == "on"
    if config.format != "text" or config.source == "tfds" or config.protect or config.protect_field or (
            config.canary_perturb_rate > 0) or (
            process_count > 1 and not config.store_dir):
        return False
    return source_size(config) >= config.store_above_bytes


def settings_difference(found: dict, wanted: dict, prefix: str = "") -> str | None:
    """The first setting that differs, as ``name (store: x, config: y)``; None when equal."""
    for key in sorted(set(found) | set(wanted)):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = settings_difference(a, b, f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            if key == "files":
                return f"{prefix}files (the source files or their sizes changed: {len(a or [])} files in the store, " \
                       f"{len(b or [])} now)"
            return f"{prefix}{key} (store: {_short(a)}, now: {_short(b)})"
    return None


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_settings(path: str, manifest: dict, wanted: dict) -> None:
    """Refuses a store prepared with other settings, in one sentence naming the first difference."""
    diff = settings_difference(manifest.get("settings", {}), wanted)
    if diff:
        raise ValueError(f"the tokenized store {path} was prepared with other settings ({diff}); set "
                         "data.store_dir to a new folder (or delete that one) to prepare a matching store.")


def read_manifest(path: str) -> dict | None:
    """The manifest of a complete store at ``path``; None if there is none (or it is unfinished)."""
    manifest = paths.join(path, MANIFEST)
    return json.loads(paths.read_text(manifest)) if paths.exists(manifest) else None


# ----------------------------------------------------------------------------------------------
# Reading.


def _copy_stream(src: str, dst: str) -> None:
    """Copies a (remote) file to a local path in 16 MiB pieces, atomically."""
    # URLs only
    from etils import epath

    tmp = f"{dst}.{os.getpid()}.tmp"
    with epath.Path(src).open("rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
    os.replace(tmp, dst)


class TokenStore:
    """A complete store, memory-mapped. ``gs://`` stores are copied to a local cache
    (``cache_dir``, default ``.cache/stores/remote``) file by file, on first use, so a process
    fetches only the shards that hold its share.

    ``tokens(d)`` is document d's tokens (a read-only view of the shard, no copy).
    """

    def __init__(self, path: str, manifest: dict | None = None, cache_dir: str | None = None):
        self.path = path
        self.manifest = manifest or read_manifest(path)
        if self.manifest is None:
            raise FileNotFoundError(f"{path} is not a complete tokenized store (no {MANIFEST}); run "
                                    "`python -m gf_jax.data prepare --config C` or set data.store=on.")
        # A remote store's local copy is keyed by its path and manifest: a store prepared again at
        # the same URL (other settings, other corpus) never reads the files cached for the old one.
        key = hashlib.sha256(json.dumps([path, self.manifest], sort_keys=True).encode()).hexdigest()[:16]
        # What the index files are keyed by: a store prepared again (other corpus) has new ones.
        self.identity = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]
        self.local = path if not paths.is_url(path) else os.path.join(
            cache_dir or os.path.join(".cache", "stores", "remote"), key)
        # The process index files of this store (``gf_jax.data.index_cache``), in its local folder.
        self.index_cache = IndexCache(os.path.join(self.local, "index"))
        self.dtype = np.dtype(self.manifest["dtype"])
        self.num_documents = int(self.manifest["documents"])
        self.offsets = self._map("offsets.bin", np.int64)
        self.split_hashes = self._map("split_hashes.bin", np.uint64)
        self.id_offsets = self._map("id_offsets.bin", np.int64)
        self.ids = self._map("ids.bin", np.uint8)
        shards = self.manifest["shards"]
        self.shard_first_token = np.array([s["first_token"] for s in shards] + [int(self.offsets[-1])], np.int64)
        self._shards: dict[int, np.ndarray] = {}

    def _file(self, name: str) -> str:
        if self.local == self.path:
            return os.path.join(self.path, name)
        os.makedirs(self.local, exist_ok=True)
        local = os.path.join(self.local, name)
        if not os.path.exists(local):
            _copy_stream(paths.join(self.path, name), local)
        return local

    def _map(self, name: str, dtype) -> np.ndarray:
        path = self._file(name)
        if os.path.getsize(path) == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = self._map(self.manifest["shards"][k]["file"], self.dtype)
        return self._shards[k]

    def tokens(self, d: int) -> np.ndarray:
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        k = int(np.searchsorted(self.shard_first_token, a, "right")) - 1
        first = int(self.shard_first_token[k])
        return self.shard(k)[a - first:b - first]

    def _read(self, name: str, dtype, first: int, stop: int) -> np.ndarray:
        """Entries ``[first, stop)`` of an index file, read (not mapped): a bulk scan then leaves
        no mapped pages in this process."""
        dtype = np.dtype(dtype)
        with open(self._file(name), "rb") as fh:
            fh.seek(first * dtype.itemsize)
            return np.fromfile(fh, dtype, count=stop - first)

    def _gather(self, name: str, mapped: np.ndarray, docs_U: np.ndarray, extra: int = 0) -> tuple[np.ndarray, int]:
        """(window, first): entries ``first .. max(docs_U) + extra`` of an index file, read in one
        piece when ``docs_U`` is dense (a process's share is a contiguous run of documents)."""
        first, last = int(docs_U.min()), int(docs_U.max()) + extra
        if last - first > 4 * len(docs_U) + 4096:  # scattered: a window would read mostly unneeded entries
            return mapped, 0
        return self._read(name, mapped.dtype, first, last + 1), first

    def lengths(self, docs_U: np.ndarray) -> np.ndarray:
        """Token counts of documents ``docs_U`` (int64)."""
        docs_U = np.asarray(docs_U, np.int64)
        if not len(docs_U):
            return np.zeros(0, np.int64)
        offsets, first = self._gather("offsets.bin", self.offsets, docs_U, extra=1)
        return (offsets[docs_U - first + 1] - offsets[docs_U - first]).astype(np.int64)

    def doc_id(self, d: int) -> str:
        return bytes(self.ids[int(self.id_offsets[d]):int(self.id_offsets[d + 1])]).decode("utf-8")

    def is_validation(self, docs_U: np.ndarray, validation_fraction: float) -> np.ndarray:
        """``split_of(id) == "validation"`` for documents ``docs_U``, from the stored id hashes."""
        if validation_fraction <= 0:
            return np.zeros(len(docs_U), bool)
        docs_U = np.asarray(docs_U, np.int64)
        if not len(docs_U):
            return np.zeros(0, bool)
        hashes, first = self._gather("split_hashes.bin", self.split_hashes, docs_U)
        # Same arithmetic as split_of: the 64-bit integer rounded to float64, over 2**64.
        return hashes[docs_U - first].astype(np.float64) / 2.0**64 < validation_fraction


# ----------------------------------------------------------------------------------------------
# A process's documents: store documents and in-memory canaries, by reference.


@dataclasses.dataclass
class StoreTokens(Sequence):
    """Token arrays of a list of references: ``refs_U[i] >= 0`` is store document j, ``-(c+1)`` is
    ``canaries[c]``. What ``BatchIterator`` and ``eval_batches`` read rows from: a row copies only
    the tokens it holds, and canary copies are indices, not copies of the corpus.

    Attributes: ``lengths`` (int32 per entry, ``reference_lengths``), ``documents`` (lazy
    ``Document``s, texts decoded from the tokens with ``tokenizer`` when given). ``refs_U``
    keeps its integer dtype (int32 from ``gf_jax.data.stored``). With
    ``index_cache``, ``BatchIterator`` saves and maps its per-epoch arrays there, under
    ``cache_key`` (what decides ``refs_U``) plus its own settings.
    """

    store: TokenStore
    refs_U: np.ndarray
    lengths: np.ndarray
    canary_tokens: Sequence[np.ndarray] = ()
    canary_documents: Sequence[Document] = ()
    tokenizer: Any = None
    index_cache: IndexCache | None = None
    cache_key: dict | None = None

    def __post_init__(self):
        self.refs_U = np.asarray(self.refs_U)
        if self.refs_U.dtype.kind != "i":
            self.refs_U = self.refs_U.astype(np.int64)
        self.documents = StoreDocuments(self)

    def __len__(self) -> int:
        return len(self.refs_U)

    def __getitem__(self, i: int) -> np.ndarray:
        ref = int(self.refs_U[i])
        return self.store.tokens(ref) if ref >= 0 else self.canary_tokens[-1 - ref]


def reference_lengths(store: TokenStore, refs_U: np.ndarray, canary_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """int32 token counts of the references ``refs_U`` (see ``StoreTokens``), a chunk at a time."""
    canary_len = np.array([len(t) for t in canary_tokens] or [0], np.int64)
    lengths_U = np.empty(len(refs_U), np.int32)
    for a in range(0, len(refs_U), CHUNK):  # bounded int64 temporaries
        refs = np.asarray(refs_U[a:a + CHUNK], np.int64)
        is_store = refs >= 0
        lengths = np.empty(len(refs), np.int64)
        lengths[is_store] = store.lengths(refs[is_store])
        lengths[~is_store] = canary_len[-1 - refs[~is_store]]
        if len(lengths) and lengths.max() >= 2**31:
            raise ValueError(f"a document of {store.path} has {int(lengths.max())} tokens, more than "
                             "2**31 - 1; split such documents into smaller ones in the source.")
        lengths_U[a:a + len(refs)] = lengths
    return lengths_U


class StoreDocuments(Sequence):
    """``Document``s of a ``StoreTokens``, made on access: the id from the store and the text decoded
    from the tokens (BOS/EOS dropped). Canaries are the original documents."""

    def __init__(self, tokens: StoreTokens):
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, i: int) -> Document:
        ref = int(self._tokens.refs_U[i])
        if ref < 0:
            return self._tokens.canary_documents[-1 - ref]
        text = ""
        tok = self._tokens.tokenizer
        if tok is not None:
            ids = [int(t) for t in self._tokens.store.tokens(ref) if t not in (tok.bos_id, tok.eos_id)]
            text = tok.decode([ids])[0]
        return Document(self._tokens.store.doc_id(ref), text)
