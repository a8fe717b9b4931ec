"""Documents in, batches out: text/JSONL/TFDS sources, canaries, packing with positions, per-host input.

Pipeline::

    DataConfig -> document stream (stable ids, optional canary copies) -> this process's share
               -> tokens (BOS/EOS) -> rows of T+1 tokens (packed, or one document per row)
               -> local batch dict (numpy) -> ``to_global_batch`` -> jax.Array on the mesh

Batches follow the contract in ``notes/contracts.md``: ``inputs_BxT``, ``targets_BxT``,
``positions_BxT`` (index of the input token in its document; a row that starts mid-document
carries the true positions), ``segment_ids_BxT`` (1, 2, ... per document in the row, 0 = padding)
and ``weights_BxT`` (0 for padding and for targets that cross a document boundary).

Why plain numpy rather than grain: every row is computed by index arithmetic from
(seed, epoch, row), so batch ``s`` is a pure function of ``(seed, s)``, resuming is "set the step",
and a document split across rows keeps its true positions (grain's packing transforms restart
positions in every row and carry an opaque iterator state). A background thread prefetches the
next batches; that is all the host work there is, because tokenization happens once up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import sys
import threading
import weakref
from typing import Any, Iterator, Sequence

import numpy as np

SOURCES = ("text", "jsonl", "tfds")
SPLIT_RULES = ("file", "blank_line", "wikitext")
MODES = ("packed", "document")
CANARY_PREFIX = "canary/"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches.

    Attributes:
      source: ``text`` (a file or a folder of ``.txt``), ``jsonl`` (a file or folder of ``.jsonl``)
        or ``tfds`` (a prepared tensorflow-datasets dataset, read with ``tfds.data_source``).
      path: file or folder of the text/jsonl source.
      split_rule: text sources: ``file`` (one document per file), ``blank_line`` (documents
        separated by blank lines) or ``wikitext`` (an article per `` = Title = `` heading).
      text_field, id_field: JSONL keys of the text and (optional) stable document id.
      tfds_name, tfds_split, tfds_data_dir, tfds_text_feature: the TFDS dataset (``tfds_split``
        accepts slicing such as ``train[:1%]``; ``tfds_data_dir`` may be a ``gs://`` bucket).
        ``id_field`` names an id feature there too.
      tokenizer: a sentencepiece ``.model``; None trains one on the corpus (cached).
      vocab_size: size of that trained tokenizer.
      tokenizer_cache_dir: where trained tokenizers are cached (keyed by corpus content).
      add_bos, add_eos: frame each document with BOS/EOS.
      mode: ``packed`` (documents concatenated into rows of T+1 tokens) or ``document`` (one
        document, or one piece of a long one, per row, padded).
      seed: shuffling seed (documents and rows, new order every epoch).
      shuffle: False packs documents in stream order and serves rows in order.
      validation_fraction: share of documents (chosen by a hash of their id, independent of the
        seed) held out as the ``validation`` split. Canaries are never held out.
      max_documents: keep only the first N documents of the source.
      canary_path: text file (split by ``canary_split_rule``) or ``.jsonl`` (``text_field``) whose
        documents are the canaries.
      canary_count: inject only the first N canaries (None: all); the rest are held-out canaries,
        the non-members of a membership test.
      canary_repeats: copies of each injected canary inserted into the stream (0: no canaries).
      canary_seed: seed of the insertion places (independent of ``seed``).
      row_context: each batch carries ``context_BxC`` (C = row_context): the targets that precede
        a row's first column in its document, so the goldfish hash of a row that starts
        mid-document sees its whole window instead of dropping its first h targets. Keep it
        >= goldfish.h (0: no context).
    """

    source: str = "text"
    path: str = "data/tinyshakespeare.txt"
    # Tiny Shakespeare is one file: blank-line splitting makes its ~7k speeches the documents.
    split_rule: str = "blank_line"
    text_field: str = "text"
    id_field: str | None = None
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    tfds_text_feature: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 512
    tokenizer_cache_dir: str = ".cache/tokenizers"
    add_bos: bool = True
    add_eos: bool = True
    mode: str = "packed"
    seed: int = 0
    shuffle: bool = True
    validation_fraction: float = 0.0
    max_documents: int | None = None
    canary_path: str | None = None
    canary_split_rule: str = "wikitext"
    canary_count: int | None = None
    canary_repeats: int = 0
    canary_seed: int = 0
    row_context: int = 32

    def __post_init__(self):
        _check_choice("data.source", self.source, SOURCES)
        _check_choice("data.split_rule", self.split_rule, SPLIT_RULES)
        _check_choice("data.canary_split_rule", self.canary_split_rule, SPLIT_RULES)
        _check_choice("data.mode", self.mode, MODES)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1).")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 1 or null.")
        if self.canary_repeats < 0:
            raise ValueError(f"data.canary_repeats={self.canary_repeats} must be >= 0.")
        if self.row_context < 0:
            raise ValueError(f"data.row_context={self.row_context} must be >= 0 (0: no row context).")
        if self.canary_repeats > 0 and not self.canary_path:
            raise ValueError("data.canary_repeats > 0 needs data.canary_path (a file of canary documents).")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data.source=tfds needs data.tfds_name (e.g. 'wikipedia/20230601.en').")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}; pick one of those.")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable id (same in every run on the same data) and its text."""

    id: str
    text: str


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

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


def _files(path: str, suffix: str, what: str) -> tuple[list[str], str]:
    """Files of a source path (a file, or a folder searched recursively), and the id root."""
    if os.path.isfile(path):
        return [path], os.path.dirname(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix))
        if not files:
            raise ValueError(f"the folder {path!r} has no {suffix} files; point data.path at a {what} file or folder.")
        return files, path
    raise FileNotFoundError(f"data path {path!r} does not exist; set data.path to a {what} file or folder.")


def read_text_documents(path: str, split_rule: str) -> list[Document]:
    """Documents of a text file or folder of ``.txt`` files, ids ``relpath`` or ``relpath#k``."""
    files, root = _files(path, ".txt", "text")
    docs = []
    for f in files:
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        with open(f, encoding="utf-8-sig", errors="replace") as fh:
            parts = _split(fh.read(), split_rule)
        for k, text in enumerate(parts):
            docs.append(Document(rel if split_rule == "file" else f"{rel}#{k}", text))
    return docs


def read_jsonl_documents(path: str, text_field: str, id_field: str | None) -> list[Document]:
    """Documents of a JSONL file or folder; ids from ``id_field`` or ``relpath:line``."""
    files, root = _files(path, ".jsonl", "JSONL")
    docs = []
    for f in files:
        rel = os.path.relpath(f, root) if root else os.path.basename(f)
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{line_no}: not valid JSON ({e.msg}); fix or delete that line.") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{f}:{line_no}: no string field {text_field!r} (found {keys}); set "
                                     "data.text_field to the key that holds the text.")
                if id_field is not None and id_field not in record:
                    raise ValueError(f"{f}:{line_no}: no id field {id_field!r}; set data.id_field to an existing "
                                     "key or to null.")
                doc_id = str(record[id_field]) if id_field is not None else f"{rel}:{line_no}"
                if record[text_field].strip():
                    docs.append(Document(doc_id, record[text_field]))
    return docs


class TfdsDocuments(Sequence):
    """Random-access documents of a prepared TFDS dataset (ArrayRecord, no TensorFlow needed).

    Only the records asked for are read, so each host of a pod reads just its share.
    Ids: the ``id_field`` feature if given, else ``name/split#index``.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, text_feature: str,
                 id_field: str | None = None, max_documents: int | None = None):
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


def read_background(config: DataConfig) -> Sequence[Document]:
    """The source's documents (no canaries, all splits), in source order, at most ``max_documents``."""
    if config.source == "tfds":
        return TfdsDocuments(config.tfds_name, config.tfds_split, config.tfds_data_dir, config.tfds_text_feature,
                             config.id_field, config.max_documents)
    if config.source == "jsonl":
        docs = read_jsonl_documents(config.path, config.text_field, config.id_field)
    else:
        docs = read_text_documents(config.path, config.split_rule)
    docs = docs[: config.max_documents] if config.max_documents else docs
    if not docs:
        raise ValueError(f"no documents found in {config.path!r} (source {config.source}, split rule "
                         f"{config.split_rule}); check data.path and data.split_rule.")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"document id {dup!r} occurs more than once in {config.path!r}; give data.id_field "
                         "unique values or set it to null.")
    return docs


# ----------------------------------------------------------------------------------------------
# Canaries
# ----------------------------------------------------------------------------------------------


def load_canaries(config: DataConfig) -> tuple[list[Document], list[Document]]:
    """(injected, held_out) canary documents, ids prefixed with ``canary/``.

    The first ``canary_count`` documents of ``canary_path`` are injected (members); the rest are
    held out (non-members of the same distribution). Empty lists when no canary path is set.
    """
    if not config.canary_path:
        return [], []
    if config.canary_path.endswith(".jsonl"):
        docs = read_jsonl_documents(config.canary_path, config.text_field, config.id_field)
    else:
        docs = read_text_documents(config.canary_path, config.canary_split_rule)
    if not docs:
        raise ValueError(f"no canary documents found in {config.canary_path!r}; check data.canary_path.")
    docs = [Document(CANARY_PREFIX + d.id, d.text) for d in docs]
    count = len(docs) if config.canary_count is None else config.canary_count
    if not 0 <= count <= len(docs):
        raise ValueError(f"data.canary_count={config.canary_count} but {config.canary_path!r} has only "
                         f"{len(docs)} documents; lower data.canary_count.")
    return docs[:count], docs[count:]


def canary_plan(num_background: int, num_canaries: int, repeats: int, seed: int) -> np.ndarray:
    """Stream layout: entry ``j >= 0`` is background document j (in order); ``-(c+1)`` is canary c.

    Each canary appears ``repeats`` times at uniformly random places (seeded); the background
    keeps its order.
    """
    total = num_background + num_canaries * repeats
    rng = np.random.default_rng([seed, 0xCA7A21])
    plan = np.empty(total, np.int64)
    is_canary = np.zeros(total, bool)
    is_canary[rng.choice(total, size=num_canaries * repeats, replace=False)] = True
    plan[~is_canary] = np.arange(num_background)
    plan[is_canary] = -1 - rng.permutation(np.repeat(np.arange(num_canaries), repeats))
    return plan


class DocumentStream(Sequence):
    """The training stream: background documents with canary copies inserted (lazily indexed).

    ``canary_record`` maps each injected canary id to its stream indices (``repeats`` of them).
    """

    def __init__(self, background: Sequence[Document], canaries: Sequence[Document] = (), repeats: int = 0,
                 seed: int = 0):
        self.background = background
        self.canaries = list(canaries) if repeats else []
        self.plan = canary_plan(len(background), len(self.canaries), repeats, seed) if self.canaries else None
        self.canary_record: dict[str, list[int]] = {}
        if self.plan is not None:
            for where in np.flatnonzero(self.plan < 0):
                self.canary_record.setdefault(self.canaries[-1 - self.plan[where]].id, []).append(int(where))

    def __len__(self) -> int:
        return len(self.background) if self.plan is None else len(self.plan)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.get_many(range(*index.indices(len(self))))
        j = index if self.plan is None else int(self.plan[index])
        return self.background[j] if j >= 0 else self.canaries[-1 - j]

    def get_many(self, indices: Sequence[int]) -> list[Document]:
        """Documents at ``indices``, reading background records in one call where the source allows."""
        indices = [int(i) for i in indices]
        refs = indices if self.plan is None else [int(self.plan[i]) for i in indices]
        wanted = [j for j in refs if j >= 0]
        if hasattr(self.background, "get_many"):
            fetched = dict(zip(wanted, self.background.get_many(wanted)))
        else:
            fetched = {j: self.background[j] for j in wanted}
        return [fetched[j] if j >= 0 else self.canaries[-1 - j] for j in refs]


def document_stream(config: DataConfig) -> DocumentStream:
    """Background documents of ``config`` with its canaries injected (every split)."""
    injected, _ = load_canaries(config)
    return DocumentStream(read_background(config), injected, config.canary_repeats, config.canary_seed)


# ----------------------------------------------------------------------------------------------
# Splits and document lookup
# ----------------------------------------------------------------------------------------------


def split_of(doc_id: str, validation_fraction: float) -> str:
    """``validation`` or ``train``, from a hash of the id (stable across runs, seeds and hosts)."""
    if validation_fraction <= 0 or doc_id.startswith(CANARY_PREFIX):
        return "train"
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def _check_split(split: str):
    _check_choice("split", split, ("train", "validation", "all"))


def load_documents(config: DataConfig, split: str = "all") -> list[Document]:
    """Unique documents of ``config`` (each injected canary once), filtered to a split.

    ``split``: ``train`` (what the model trains on: background train split + injected canaries),
    ``validation`` (held out by ``validation_fraction``) or ``all``. Reads the whole source.
    """
    _check_split(split)
    background = read_background(config)
    docs = [d for chunk in _chunks(background, range(len(background))) for d in chunk]
    if config.canary_repeats:
        docs += load_canaries(config)[0]
    if split != "all":
        docs = [d for d in docs if split_of(d.id, config.validation_fraction) == split]
    return docs


def _chunks(docs: Sequence[Document], indices: Sequence[int], size: int = 4096) -> Iterator[list[Document]]:
    """Documents at ``indices`` in chunks (one read per chunk on random-access sources), with a
    progress bar on large reads."""
    bar = None
    if len(indices) > 5 * size:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="reading documents", unit="doc", file=sys.stderr)
    for start in range(0, len(indices), size):
        part = indices[start:start + size]
        yield docs.get_many(part) if hasattr(docs, "get_many") else [docs[i] for i in part]
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()


def documents_by_id(docs: Sequence[Document]) -> dict[str, Document]:
    """Lookup of documents by their stable id."""
    return {d.id: d for d in docs}


def process_share(n: int, process_index: int, process_count: int) -> range:
    """Contiguous, disjoint share of ``range(n)`` for one process; the shares cover everything."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count}).")
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


# ----------------------------------------------------------------------------------------------
# Tokens and checks
# ----------------------------------------------------------------------------------------------


def tokenize_documents(docs: Sequence[Document], tokenizer, add_bos: bool = True, add_eos: bool = True,
                       *, chunk: int = 2048) -> list[np.ndarray]:
    """int32 token arrays of the documents (BOS/EOS as asked), with progress on large inputs."""
    out: list[np.ndarray] = []
    bar = None
    if len(docs) > 20 * chunk:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), desc="tokenizing", unit="doc", file=sys.stderr)
    for start in range(0, len(docs), chunk):
        texts = [d.text for d in docs[start:start + chunk]]
        out.extend(tokenizer.encode_arrays(texts, add_bos=add_bos, add_eos=add_eos))
        if bar is not None:
            bar.update(len(texts))
    if bar is not None:
        bar.close()
    return out


def check_vocab_fits(tokenizer, model_vocab_size: int) -> None:
    """Raises if the tokenizer emits ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                         f"{model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer.")


def check_documents_long_enough(tokens: Sequence[np.ndarray], min_len: int, ids: Sequence[str] | None = None,
                                what: str = "the evaluation split") -> None:
    """Raises if any document has fewer than ``min_len`` tokens (e.g. prefix + suffix to extract)."""
    short = [i for i, t in enumerate(tokens) if len(t) < min_len]
    if short:
        i = short[0]
        name = ids[i] if ids is not None else f"#{i}"
        raise ValueError(f"{len(short)} of {len(tokens)} documents are shorter than the {min_len} tokens "
                         f"{what} needs (first: {name!r}, {len(tokens[i])} tokens); use longer documents or a "
                         "shorter prefix/suffix.")


def load_tokenizer(config: DataConfig, *, max_chars: int = 50_000_000):
    """``config.tokenizer`` if set, else a tokenizer trained on the training documents (cached by
    corpus content, so a changed corpus retrains). Canaries are not part of its training text."""
    from gf_jax.tokenizer import Tokenizer, cached_tokenizer

    if config.tokenizer:
        return Tokenizer.load(config.tokenizer)
    background = read_background(config)
    texts, n_chars = [], 0
    for chunk in _chunks(background, range(len(background))):
        for d in chunk:
            if split_of(d.id, config.validation_fraction) == "train":
                texts.append(d.text)
                n_chars += len(d.text)
        if n_chars >= max_chars:
            break
    return cached_tokenizer(texts, config.vocab_size, config.tokenizer_cache_dir)


# ----------------------------------------------------------------------------------------------
# Rows: packing arithmetic
# ----------------------------------------------------------------------------------------------


class _Layout:
    """Rows of one epoch: documents in ``order``, cut into rows of T+1 tokens with stride T.

    Consecutive rows overlap by one token so every transition is a target exactly once.
    ``packed``: the documents form one stream; ``document``: each document is cut on its own.
    """

    def __init__(self, lengths: np.ndarray, order: np.ndarray, seq_len: int, mode: str):
        self.order, self.T, self.mode = order, seq_len, mode
        lens = lengths[order].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)])  # stream offset of each doc, + total
        if mode == "packed":
            total = int(self.starts[-1])
            self.num_rows = max(1, -(-(total - 1) // seq_len))
        else:
            chunks = np.maximum(0, -(-(lens - 1) // seq_len))
            self.row_starts = np.concatenate([[0], np.cumsum(chunks)])  # first row of each doc
            self.num_rows = int(self.row_starts[-1])

    def row(self, r: int) -> list[tuple[int, int, int]]:
        """Pieces of row r: (document index, first token, end token) in document coordinates."""
        T = self.T
        if self.mode == "document":
            k = int(np.searchsorted(self.row_starts, r, "right")) - 1
            c = r - int(self.row_starts[k])
            doc_len = int(self.starts[k + 1] - self.starts[k])
            return [(int(self.order[k]), c * T, min(c * T + T + 1, doc_len))]
        a = r * T
        b = min(a + T + 1, int(self.starts[-1]))
        k0 = int(np.searchsorted(self.starts, a, "right")) - 1
        k1 = int(np.searchsorted(self.starts, b - 1, "right")) - 1
        pieces = []
        for k in range(k0, k1 + 1):
            s = int(self.starts[k])
            lo, hi = max(a, s) - s, min(b, int(self.starts[k + 1])) - s
            if hi > lo:
                pieces.append((int(self.order[k]), lo, hi))
        return pieces


BATCH_KEYS = ("inputs_BxT", "targets_BxT", "positions_BxT", "segment_ids_BxT", "weights_BxT")


def assemble_rows(tokens: Sequence[np.ndarray], rows: Sequence[Sequence[tuple[int, int, int]]], seq_len: int,
                  pad_id: int, with_doc_ids: bool = False, context: int = 0) -> dict[str, np.ndarray]:
    """Batch dict (B = len(rows)) from row pieces; an empty row is all padding (weight 0).

    With ``context`` > 0 it also holds ``context_BxC``: the C targets of the row's first document
    that precede column 0, oldest first, right-aligned (``pad_id`` where the document has fewer),
    the goldfish mask's view of a row that starts mid-document.
    """
    B, T = len(rows), seq_len
    tok = np.full((B, T + 1), pad_id, np.int32)
    pos = np.zeros((B, T + 1), np.int32)
    seg = np.zeros((B, T + 1), np.int32)
    doc = np.full((B, T + 1), -1, np.int32)
    for b, pieces in enumerate(rows):
        col = 0
        for s, (d, lo, hi) in enumerate(pieces, 1):
            n = hi - lo
            tok[b, col:col + n] = tokens[d][lo:hi]
            pos[b, col:col + n] = np.arange(lo, hi, dtype=np.int32)
            seg[b, col:col + n] = s
            doc[b, col:col + n] = d
            col += n
    # A target is real when it sits in the same document as its input (not padding, not across).
    weights = ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)).astype(np.float32)
    batch = {
        "inputs_BxT": tok[:, :-1],
        "targets_BxT": tok[:, 1:],
        "positions_BxT": pos[:, :-1],
        "segment_ids_BxT": seg[:, :-1],
        "weights_BxT": weights,
    }
    if with_doc_ids:
        batch["doc_ids_BxT"] = doc[:, :-1]
    if context > 0:
        ctx = np.full((B, context), pad_id, np.int32)
        for b, pieces in enumerate(rows):
            if pieces and pieces[0][1] > 0:  # the row starts at token lo > 0 of document d
                d, lo, _ = pieces[0]
                # Column 0's target is token lo + 1; the targets before it are tokens 1 .. lo.
                before = tokens[d][max(1, lo - context + 1): lo + 1]
                ctx[b, context - len(before):] = before
        batch["context_BxC"] = ctx
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}


def unpack_batch(batch: dict[str, np.ndarray]) -> list[list[tuple[int, np.ndarray]]]:
    """Inverse of packing, per row: [(first position, tokens of that piece incl. its last target)].

    Used by tests and debugging: concatenating a document's pieces in position order (overlaps
    removed) gives back its tokens.
    """
    out = []
    for b in range(batch["inputs_BxT"].shape[0]):
        seg, pos = batch["segment_ids_BxT"][b], batch["positions_BxT"][b]
        inp, tgt, w = batch["inputs_BxT"][b], batch["targets_BxT"][b], batch["weights_BxT"][b]
        pieces = []
        for s in np.unique(seg[seg > 0]):
            cols = np.flatnonzero(seg == s)
            toks = inp[cols]
            if w[cols[-1]] > 0:  # the piece's last target belongs to it too
                toks = np.append(toks, tgt[cols[-1]])
            pieces.append((int(pos[cols[0]]), toks))
        out.append(pieces)
    return out


# ----------------------------------------------------------------------------------------------
# Iterators
# ----------------------------------------------------------------------------------------------


def _default_process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class BatchIterator:
    """Infinite, deterministic, resumable batches of one process.

    Args:
      tokens: this process's documents as token arrays (``make_train_iterator`` gives each
        process its share of the stream; see ``process_share``).
      global_batch: rows per step over all processes; this process yields
        ``global_batch // process_count`` of them.
      seq_len: T (rows hold T+1 tokens).
      seed: shuffle seed; batch ``s`` is a pure function of (seed, s, process_index, data).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      mode: ``packed`` or ``document``.
      pad_id: id written in padding.
      shuffle: new document and row order each epoch (False: stream order).
      prefetch: batches computed ahead on a background thread (0: none).
      with_doc_ids: add ``doc_ids_BxT`` (index into ``tokens`` of each input, -1 = padding).

    ``get_state()`` is ``{"step": s, "fingerprint": ...}``; ``set_state`` resumes exactly there.
    """

    def __init__(self, tokens: Sequence[np.ndarray], *, global_batch: int, seq_len: int, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None, mode: str = "packed",
                 pad_id: int = 0, shuffle: bool = True, prefetch: int = 2, with_doc_ids: bool = False,
                 context: int = 0):
        _check_choice("mode", mode, MODES)
        self.process_index, self.process_count = _default_process(process_index, process_count)
        if global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {self.process_count} "
                             "processes; make train.global_batch a multiple of the process count.")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1.")
        self.tokens = [np.asarray(t, np.int32) for t in tokens]
        self.lengths = np.array([len(t) for t in self.tokens], np.int64)
        if not len(self.tokens) or self.lengths.sum() < 2 or (mode == "document" and self.lengths.max() < 2):
            raise ValueError(f"process {self.process_index} has no document with at least 2 tokens to train on; "
                             "use more (or longer) documents or fewer processes.")
        self.global_batch, self.local_batch, self.seq_len = global_batch, global_batch // self.process_count, seq_len
        self.seed, self.mode, self.pad_id, self.shuffle = int(seed), mode, int(pad_id), bool(shuffle)
        self.with_doc_ids, self.prefetch, self.context = with_doc_ids, int(prefetch), int(context)
        self.rows_per_epoch = self._layout(0).num_rows
        self._epoch_cache: dict[int, tuple[_Layout, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._step = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        h = hashlib.sha256(self.lengths.tobytes())
        h.update(repr((self.seed, self.process_index, self.process_count, global_batch, seq_len, mode,
                       self.shuffle)).encode())
        self.fingerprint = h.hexdigest()[:16]

    # -- pure part ---------------------------------------------------------------------------
    def _rng(self, epoch: int, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.process_index, epoch, tag])

    def _layout(self, epoch: int) -> _Layout:
        n = len(self.tokens)
        order = self._rng(epoch, 1).permutation(n) if self.shuffle else np.arange(n)
        return _Layout(self.lengths, order, self.seq_len, self.mode)

    def _epoch(self, epoch: int) -> tuple[_Layout, np.ndarray]:
        with self._lock:  # the prefetch thread and direct batch() calls share the cache
            return self._epoch_locked(epoch)

    def _epoch_locked(self, epoch: int) -> tuple[_Layout, np.ndarray]:
        if epoch not in self._epoch_cache:
            layout = self._layout(epoch)
            rows = self._rng(epoch, 2).permutation(layout.num_rows) if self.shuffle else np.arange(layout.num_rows)
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (layout, rows)
        return self._epoch_cache[epoch]

    def epoch_of(self, step: int) -> int:
        """Epoch (pass over this process's documents) that the first row of ``step`` belongs to."""
        return step * self.local_batch // self.rows_per_epoch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The local batch of ``step`` (random access, thread-safe)."""
        rows = []
        for g in range(step * self.local_batch, (step + 1) * self.local_batch):
            layout, perm = self._epoch(g // self.rows_per_epoch)
            rows.append(layout.row(int(perm[g % self.rows_per_epoch])))
        return assemble_rows(self.tokens, rows, self.seq_len, self.pad_id, self.with_doc_ids, self.context)

    # -- iteration, prefetch and state --------------------------------------------------------
    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            out = self.batch(self._step)
        else:
            if self._thread is None:
                self._start()
            step, out = self._queue.get()
            if isinstance(out, BaseException):
                self._thread = None
                raise out
            assert step == self._step, (step, self._step)
        self._step += 1
        return out

    def _start(self):
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # The thread holds only a weak reference, so an iterator dropped without close() is
        # collected and its thread ends instead of waiting forever on a full queue.
        self._thread = threading.Thread(target=_produce, args=(weakref.ref(self), self._step, self._stop, self._queue),
                                        daemon=True, name="gf_jax-data-prefetch")
        self._thread.start()

    def close(self):
        """Stops the prefetch thread (iteration can continue; it restarts on demand)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass

    @property
    def step(self) -> int:
        """Steps consumed so far (the next batch is ``batch(step)``)."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints."""
        return {"step": int(self._step), "fingerprint": self.fingerprint}

    def set_state(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume: the next batch is the one an uninterrupted run sees at ``state["step"]``.

        With ``strict`` a state saved for other data or settings (documents, seed, batch, T,
        processes) is refused, because resuming it would silently change the batches.
        """
        fp = state.get("fingerprint")
        if strict and fp is not None and fp != self.fingerprint:
            raise ValueError("the data iterator state in the checkpoint was saved for different data or settings "
                             "(documents, seed, batch size, seq_len or process count); resume with the same data "
                             "config, or pass strict=False to accept different batches.")
        self.close()
        self._step = int(state["step"])


def _produce(ref, step: int, stop: threading.Event, q: queue.Queue):
    """Prefetch loop: computes batches step, step+1, ... into ``q`` until stopped or orphaned."""
    while not stop.is_set():
        it = ref()
        if it is None:
            return
        try:
            item = (step, it.batch(step))
        except BaseException as e:  # surfaced in the consumer's next()
            item = (step, e)
        del it
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                if ref() is None:
                    return
        if isinstance(item[1], BaseException):
            return
        step += 1


def eval_batches(tokens: Sequence[np.ndarray], *, global_batch: int, seq_len: int, pad_id: int = 0,
                 mode: str = "packed", process_index: int | None = None, process_count: int | None = None,
                 with_doc_ids: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One in-order pass over ``tokens`` (ALL documents: every process passes the same list).

    The global rows are dealt out to processes batch by batch; the last batch is padded with empty
    rows (weight 0), so every process yields the same number of batches and every real target is
    counted exactly once over all processes.
    """
    _check_choice("mode", mode, MODES)
    pi, pc = _default_process(process_index, process_count)
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by the {pc} processes.")
    tokens = [np.asarray(t, np.int32) for t in tokens]
    if not tokens:
        raise ValueError("there are no documents to evaluate; set data.validation_fraction > 0 or check the data.")
    lengths = np.array([len(t) for t in tokens], np.int64)
    layout = _Layout(lengths, np.arange(len(tokens)), seq_len, mode)
    local = global_batch // pc
    for b in range(math.ceil(layout.num_rows / global_batch)):
        first = b * global_batch + pi * local
        rows = [layout.row(r) if r < layout.num_rows else [] for r in range(first, first + local)]
        yield assemble_rows(tokens, rows, seq_len, pad_id, with_doc_ids)


def make_train_iterator(config: DataConfig, tokenizer, *, global_batch: int, seq_len: int, split: str = "train",
                        process_index: int | None = None, process_count: int | None = None, prefetch: int = 2,
                        with_doc_ids: bool = False) -> BatchIterator:
    """Training (or validation) batches of this process, from its share of the document stream.

    The process reads and tokenizes only its contiguous share of the stream (canaries included),
    then keeps the documents of ``split``. The returned iterator carries ``documents`` (its
    local ``Document`` list, aligned with ``doc_ids_BxT``) and ``canary_record``.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} must be 'train' or 'validation'.")
    if split == "validation" and config.validation_fraction <= 0:
        raise ValueError("split='validation' needs data.validation_fraction > 0.")
    pi, pc = _default_process(process_index, process_count)
    stream = document_stream(config)
    share = process_share(len(stream), pi, pc)
    docs = [d for chunk in _chunks(stream, share) for d in chunk if split_of(d.id, config.validation_fraction) == split]
    if not docs:
        raise ValueError(f"process {pi} of {pc} got no {split} documents out of {len(stream)}; use more documents, "
                         "fewer processes or a larger data.validation_fraction.")
    tokens = tokenize_documents(docs, tokenizer, config.add_bos, config.add_eos)
    it = BatchIterator(tokens, global_batch=global_batch, seq_len=seq_len, seed=config.seed, process_index=pi,
                       process_count=pc, mode=config.mode, pad_id=tokenizer.pad_id, shuffle=config.shuffle,
                       prefetch=prefetch, with_doc_ids=with_doc_ids, context=config.row_context)
    it.documents = docs
    it.canary_record = stream.canary_record
    return it


def make_eval_batches(config: DataConfig, tokenizer, *, global_batch: int, seq_len: int, split: str = "validation",
                      process_index: int | None = None, process_count: int | None = None) -> Iterator[dict]:
    """One pass over the (unique) documents of ``split`` as padded batches (see ``eval_batches``)."""
    docs = load_documents(config, split)
    tokens = tokenize_documents(docs, tokenizer, config.add_bos, config.add_eos)
    return eval_batches(tokens, global_batch=global_batch, seq_len=seq_len, pad_id=tokenizer.pad_id, mode=config.mode,
                        process_index=process_index, process_count=process_count)


def to_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """Global ``jax.Array`` batch from each process's local rows (batch dim split over processes)."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
