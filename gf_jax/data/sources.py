"""Readers of the sources (text, JSONL, Parquet, TFDS) into ``Document``s with stable ids.

A document id is the same in every run on the same data (``relpath#k``, ``relpath:line``,
``relpath#row``, an id field, or ``name/split#index``): splits, canary records and evaluation all
key on it. ``iter_background`` streams the same documents as ``read_background`` (constant
memory), with the source bytes consumed so far, for the tokenized store's one pass.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from gf_jax.data.config import DataConfig
from gf_jax.util.textcheck import check_text_file


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable id (same in every run on the same data) and its text."""

    id: str
    text: str


# ----------------------------------------------------------------------------------------------
# Text: splitting a file into documents.

_WIKITEXT_TITLE = re.compile(r"\s*=\s+[^=\s](?:.*[^=\s])?\s+=\s*")  # " = Title = ", not " = = S = = "


def split_blank_lines(text: str) -> list[str]:
    """Documents separated by one or more blank lines (whitespace-only lines count as blank)."""
    parts = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [p.strip("\n") for p in parts if p.strip()]


def split_wikitext(text: str) -> list[str]:
    """WikiText articles: each starts at a `` = Title = `` line (section lines `` = = S = = `` do not
    start one); text before the first title, if any, is a document of its own."""
    docs: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").split("\n"):
        if _WIKITEXT_TITLE.fullmatch(line):
            docs.append([])
        docs[-1].append(line)
    out = ["\n".join(lines).strip() for lines in docs]
    return [d for d in out if d]


def _split(text: str, rule: str) -> list[str]:
    if rule == "file":
        return [text] if text.strip() else []
    if rule == "blank_line":
        return split_blank_lines(text)
    return split_wikitext(text)


def list_files(path: str, suffix: str | tuple[str, ...], what: str) -> tuple[list[str], str]:
    """Files of a source path (a file, or a folder searched recursively), and the id root."""
    if os.path.isfile(path):
        return [path], os.path.dirname(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix))
        if not files:
            names = "/".join(suffix) if isinstance(suffix, tuple) else suffix
            raise ValueError(f"the folder {path!r} has no {names} files; point data.path at a {what} file or folder.")
        return files, path
    raise FileNotFoundError(f"data path {path!r} does not exist; set data.path to a {what} file or folder.")


def iter_text_documents(path: str, split_rule: str, what: str = "data.path") -> Iterator[tuple[Document, int]]:
    """(document, source bytes read so far) of a text file or folder of ``.txt`` files, ids
    ``relpath`` or ``relpath#k``, one file in memory at a time."""
    files, root = list_files(path, ".txt", "text")
    done = 0
    for f in files:
        check_text_file(f, what=what)  # a binary file is refused, naming the setting (``what``)
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        with open(f, encoding="utf-8-sig", errors="replace") as fh:
            parts = _split(fh.read(), split_rule)
        done += os.path.getsize(f)
        for k, text in enumerate(parts):
            yield Document(rel if split_rule == "file" else f"{rel}#{k}", text), done


def read_text_documents(path: str, split_rule: str, what: str = "data.path") -> list[Document]:
    """Documents of a text file or folder of ``.txt`` files, ids ``relpath`` or ``relpath#k``."""
    return [d for d, _ in iter_text_documents(path, split_rule, what)]


# ----------------------------------------------------------------------------------------------
# JSONL (plain, gzip, zstandard).


def _has_zstandard() -> bool:
    try:
        import zstandard  # noqa: F401  (optional: read .jsonl.zst only where it is installed)
    except ImportError:
        return False
    return True


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def _open_jsonl(f: str):
    """(text lines, raw binary file): the raw file's ``tell()`` is the compressed bytes consumed."""
    raw = open(f, "rb")
    if f.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8"), raw
    if f.endswith(".zst"):
        if not _has_zstandard():
            raw.close()
            raise ValueError(f"{f!r} is zstandard-compressed but the zstandard package is not installed; "
                             "install it or decompress the file (gzip works without extra packages).")
        # optional: .jsonl.zst sources only
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8"), raw
    return io.TextIOWrapper(raw, encoding="utf-8"), raw


def iter_jsonl_documents(path: str, text_field: str, id_field: str | None,
                         what: str = "data.path") -> Iterator[tuple[Document, int]]:
    """(document, source bytes read so far) of a JSONL file or folder (``.jsonl``, ``.jsonl.gz``,
    ``.jsonl.zst``); ids from ``id_field`` or ``relpath:line``."""
    files, root = list_files(path, JSONL_SUFFIXES, "JSONL")
    done = 0
    for f in files:
        if f.endswith(".jsonl"):  # compressed files are checked line by line as JSON instead
            check_text_file(f, what=what)
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        fh, raw = _open_jsonl(f)
        with raw, fh:  # a GzipFile does not close the file it was given
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = _jsonl_record(line, f"{f}:{line_no}", text_field, id_field)
                doc_id = str(record[id_field]) if id_field is not None else f"{rel}:{line_no}"
                if record[text_field].strip():
                    yield Document(doc_id, record[text_field]), done + raw.tell()
        done += os.path.getsize(f)


def read_jsonl_documents(path: str, text_field: str, id_field: str | None,
                         what: str = "data.path") -> list[Document]:
    """Documents of a JSONL file or folder; ids from ``id_field`` or ``relpath:line``."""
    return [d for d, _ in iter_jsonl_documents(path, text_field, id_field, what)]


def _jsonl_record(line: str, where: str, text_field: str, id_field: str | None) -> dict:
    """One JSONL line as a dict with a string ``text_field`` (and ``id_field``), or a one-sentence error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); fix or delete that line.") from None
    if isinstance(record, dict) and text_field in record and not isinstance(record[text_field], str):
        value = record[text_field]
        kinds = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
        kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
        raise ValueError(f"{where}: field {text_field!r} is {kind}, not a string; put the document's text there.")
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no string field {text_field!r} (found {keys}); set "
                         "data.text_field to the key that holds the text.")
    if id_field is not None and id_field not in record:
        raise ValueError(f"{where}: no id field {id_field!r}; set data.id_field to an existing key or to null.")
    return record


# ----------------------------------------------------------------------------------------------
# Parquet (FineWeb, RedPajama samples, most hub corpora).


def iter_parquet_documents(path: str, text_field: str, id_field: str | None,
                           batch_rows: int = 4096) -> Iterator[tuple[Document, int]]:
    """(document, source bytes read so far, by row share) of a Parquet file or folder, reading a
    batch of rows at a time; ids from ``id_field`` or ``relpath#row``. Empty texts are skipped."""
    # heavy: Parquet sources only
    import pyarrow.parquet as pq

    files, root = list_files(path, ".parquet", "Parquet")
    done = 0
    for f in files:
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        pf, size = pq.ParquetFile(f), os.path.getsize(f)
        names = pf.schema_arrow.names
        for field, key in ((text_field, "data.text_field"), (id_field, "data.id_field")):
            if field is not None and field not in names:
                raise ValueError(f"{f!r} has no column {field!r} (it has {names}); set {key} to one of those.")
        columns = [text_field] + ([id_field] if id_field is not None else [])
        row, rows = 0, max(1, pf.metadata.num_rows)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field is not None else None
            at = done + size * min(row + len(texts), rows) // rows
            for k, text in enumerate(texts):
                if isinstance(text, str) and text.strip():
                    yield Document(str(ids[k]) if ids is not None else f"{rel}#{row + k}", text), at
            row += len(texts)
        done += size


def read_parquet_documents(path: str, text_field: str, id_field: str | None) -> list[Document]:
    """Documents of a Parquet file or folder; ids from ``id_field`` or ``relpath#row``."""
    return [d for d, _ in iter_parquet_documents(path, text_field, id_field)]


# ----------------------------------------------------------------------------------------------
# TFDS.


class TfdsDocuments(Sequence):
    """Random-access documents of a prepared TFDS dataset (ArrayRecord, no TensorFlow needed).

    Only the records asked for are read, so each host of a pod reads just its share.
    Ids: the ``id_field`` feature if given, else ``name/split#index``.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, text_feature: str,
                 id_field: str | None = None, max_documents: int | None = None):
        # heavy: TFDS sources only
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types (not found, bad split, no ArrayRecord)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"TFDS dataset {name!r} split {split!r} could not be opened in data_dir {data_dir!r} "
                f"({first}); prepare it in ArrayRecord format there or fix data.tfds_*."
            ) from None
        self.name, self.split, self.text_feature, self.id_field = name, split, text_feature, id_field
        self._len = len(self._source) if max_documents is None else min(max_documents, len(self._source))

    def __len__(self) -> int:
        return self._len

    def _document(self, index: int, record: dict) -> Document:
        if self.text_feature not in record:
            raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.text_feature!r} (it has "
                             f"{sorted(record)}); set data.tfds_text_feature.")
        if self.id_field is not None and self.id_field not in record:
            raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.id_field!r}; set data.id_field "
                             "to an existing feature or to null.")
        text = _to_str(record[self.text_feature])
        doc_id = _to_str(record[self.id_field]) if self.id_field else f"{self.name}/{self.split}#{index}"
        return Document(doc_id, text)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.get_many(range(*index.indices(len(self))))
        if not 0 <= index < self._len:
            raise IndexError(index)
        return self._document(index, self._source[index])

    def get_many(self, indices: Sequence[int]) -> list[Document]:
        indices = [int(i) for i in indices]
        records = self._source.__getitems__(indices) if indices else []
        return [self._document(i, r) for i, r in zip(indices, records)]


def _to_str(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return _to_str(value.item())
    return str(value)


# ----------------------------------------------------------------------------------------------
# The configured source.


def read_background(config: DataConfig) -> Sequence[Document]:
    """The source's documents (no canaries, all splits), in source order, at most ``max_documents``."""
    if config.source == "tfds":
        return TfdsDocuments(config.tfds_name, config.tfds_split, config.tfds_data_dir, config.tfds_text_feature,
                             config.id_field, config.max_documents)
    return check_records([d for d, _ in iter_background(config)], config)


def check_records(docs: list, config: DataConfig) -> list:
    """``docs`` (documents or examples), once they are known to be there and to have unique ids."""
    if not docs:
        raise ValueError(f"no documents found in {config.path!r} (source {config.source}, split rule "
                         f"{config.split_rule}); check data.path and data.split_rule.")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise duplicate_id_error(dup, config)
    return docs


def duplicate_id_error(doc_id: str, config: DataConfig) -> ValueError:
    return ValueError(f"document id {doc_id!r} occurs more than once in {config.path!r}; give data.id_field "
                      "unique values or set it to null.")


def iter_background(config: DataConfig) -> Iterator[tuple[Document, int]]:
    """(document, progress) in ``read_background``'s order, streamed (at most ``max_documents``).

    Progress is source bytes consumed (file sources) or documents read (TFDS); see
    ``source_size``. No emptiness or duplicate checks: the caller makes them as it goes.
    """
    if config.source == "tfds":
        docs = read_background(config)
        stream = ((d, i + 1) for i, d in enumerate(d for chunk in read_in_chunks(docs, range(len(docs)))
                                                     for d in chunk))
    elif config.source == "jsonl":
        stream = iter_jsonl_documents(config.path, config.text_field, config.id_field)
    elif config.source == "parquet":
        stream = iter_parquet_documents(config.path, config.text_field, config.id_field)
    else:
        stream = iter_text_documents(config.path, config.split_rule)
    for n, item in enumerate(stream):
        if config.max_documents is not None and n >= config.max_documents:
            return
        yield item


def source_files(config: DataConfig) -> list[tuple[str, int]]:
    """(path relative to ``data.path``, size in bytes) of every file of a file source, in read order
    ([] for TFDS): what a tokenized store records to notice a changed corpus."""
    if config.source == "tfds":
        return []
    suffix = {"jsonl": JSONL_SUFFIXES, "parquet": ".parquet"}.get(config.source, ".txt")
    files, root = list_files(config.path, suffix, config.source)
    return [(os.path.relpath(f, root) if root else os.path.basename(f), os.path.getsize(f)) for f in files]


def source_mtimes(config: DataConfig) -> list[int]:
    """Modification times (ns) of the files of ``source_files``, in the same order."""
    if config.source == "tfds":
        return []
    suffix = {"jsonl": JSONL_SUFFIXES, "parquet": ".parquet"}.get(config.source, ".txt")
    return [os.stat(f).st_mtime_ns for f in list_files(config.path, suffix, config.source)[0]]


def source_size(config: DataConfig) -> int:
    """The total ``iter_background`` progress counts to: bytes of the files, or TFDS documents."""
    if config.source == "tfds":
        return len(read_background(config))
    return sum(size for _, size in source_files(config))


def read_in_chunks(docs: Sequence[Document], indices: Sequence[int], size: int = 4096) -> Iterator[list[Document]]:
    """Documents at ``indices`` in chunks (one read per chunk on random-access sources), with a
    progress bar on large reads."""
    bar = None
    if len(indices) > 5 * size:
        bar = tqdm(total=len(indices), desc="reading documents", unit="doc", file=sys.stderr)
    for start in range(0, len(indices), size):
        part = indices[start:start + size]
        yield docs.get_many(part) if hasattr(docs, "get_many") else [docs[i] for i in part]
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
