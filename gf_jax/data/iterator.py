"""``BatchIterator``: infinite, deterministic, resumable batches of one process, prefetched.

Every row is computed by index arithmetic from (seed, epoch, row), so batch ``s`` is a pure
function of ``(seed, s)`` and resuming is "set the step". A background thread computes the next
batches; that is all the host work there is, because tokenization happens once up front.

An epoch's document and row orders come from ``gf_jax.data.shuffle``: lazy Feistel bijections
for new runs (no memory per row or per document), numpy permutations for runs whose checkpoints
were saved with them (``shuffle_algorithm`` in the state; ``auto`` follows it on resume).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gf_jax.batch import Batch
from gf_jax.data.config import MODES, check_choice
from gf_jax.data.packing import RowLayout, assemble_rows, layout_sums
from gf_jax.data.shuffle import ALGORITHMS, CHUNK, epoch_order, resolve_algorithm
from gf_jax.data.sources import Document


def default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process index, process count), defaulting to ``jax.process_index()`` / ``jax.process_count()``."""
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def token_arrays(tokens) -> tuple[Sequence[np.ndarray], np.ndarray]:
    """(token arrays, lengths_U): a store's memory-mapped view is kept as it is (rows read only the
    documents they hold; its lengths stay int32); anything else becomes a list of int32 arrays."""
    if hasattr(tokens, "lengths"):
        return tokens, np.asarray(tokens.lengths)
    arrays = [np.asarray(t, np.int32) for t in tokens]
    return arrays, np.array([len(t) for t in arrays], np.int64)


class BatchIterator:
    """Infinite, deterministic, resumable batches (``Batch`` of numpy arrays) of one process.

    Args:
      tokens: this process's documents as token arrays (``make_train_iterator`` gives each
        process its share of the stream; see ``process_share``), or a tokenized store's view of
        them (``gf_jax.data.store.StoreTokens``: not copied).
      global_batch: rows per step over all processes; this process yields
        ``global_batch // process_count`` of them.
      seq_len: T (rows hold T+1 tokens).
      seed: shuffle seed; batch ``s`` is a pure function of (seed, s, process_index, data).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      mode: ``packed`` or ``document``.
      pad_id: id written in padding.
      shuffle: new document and row order each epoch (False: stream order).
      shuffle_algorithm: ``feistel`` (lazy bijections), ``permutation`` (numpy permutations, the
        order of runs started before this setting existed) or ``auto`` (``feistel``, or on
        ``set_state`` whatever the saved state was made with).
      prefetch: batches computed ahead on a background thread (0: none).
      with_doc_ids: fill ``doc_ids_BxT`` (index into ``tokens`` of each input, -1 = padding).
      context: C, the width of each batch's ``context_BxC`` (0: none; see ``DataConfig.row_context``).
      documents: optional, the ``Document`` of each token array (so ``documents[doc_ids_BxT]``
        names what a row holds); kept as the ``documents`` attribute.
      protected: optional, per token array a bool array: tokens whose targets get weight 0 (kept as
        inputs; ``gf_jax.data.protect``).

    ``get_state()`` is ``{"step": s, "fingerprint": ..., "shuffle_algorithm": ...}``; ``set_state``
    resumes exactly there.
    """

    def __init__(self, tokens: Sequence[np.ndarray], *, global_batch: int, seq_len: int, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None, mode: str = "packed",
                 pad_id: int = 0, shuffle: bool = True, prefetch: int = 2, with_doc_ids: bool = False,
                 context: int = 0, documents: Sequence[Document] | None = None, shuffle_algorithm: str = "auto",
                 protected: Sequence[np.ndarray] | None = None):
        check_choice("mode", mode, MODES)
        check_choice("shuffle_algorithm", shuffle_algorithm, ALGORITHMS)
        self.process_index, self.process_count = default_process(process_index, process_count)
        if global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {self.process_count} "
                             "processes; make train.global_batch a multiple of the process count.")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1.")
        if documents is not None and len(documents) != len(tokens):
            raise ValueError(f"got {len(documents)} documents for {len(tokens)} token arrays; pass one per array.")
        self.tokens, self.lengths = token_arrays(tokens)
        if protected is not None and len(protected) != len(self.tokens):
            raise ValueError(f"got {len(protected)} protection masks for {len(tokens)} token arrays; pass one per "
                             "array.")
        self.protected = protected
        # A store's documents are made on access (a list would read the whole share).
        self.documents = documents if documents is None or hasattr(tokens, "lengths") else list(documents)
        # A store's per-epoch arrays and fingerprint are saved in (and mapped from) its index files.
        self._index_cache = getattr(tokens, "index_cache", None)
        self.global_batch, self.local_batch, self.seq_len = global_batch, global_batch // self.process_count, seq_len
        self.seed, self.mode, self.pad_id, self.shuffle = int(seed), mode, int(pad_id), bool(shuffle)
        self.with_doc_ids, self.prefetch, self.context = with_doc_ids, int(prefetch), int(context)
        self.configured_algorithm = shuffle_algorithm
        self.shuffle_algorithm = "feistel" if shuffle_algorithm == "auto" else shuffle_algorithm
        self._epoch_cache: dict[int, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        if not len(self.tokens) or not self._epoch(0)[0].has_targets:
            raise ValueError(f"process {self.process_index} has no document with at least 2 tokens to train on; "
                             "use more (or longer) documents or fewer processes.")
        self.rows_per_epoch = self._epoch(0)[0].num_rows
        self._step = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.fingerprint = self._cached("fingerprint", self._fingerprint, text=True, global_batch=self.global_batch)

    def _cached(self, kind: str, build, text: bool = False, **key):
        """``build()``, or for a store its index file keyed by the store's share and these settings."""
        if self._index_cache is None:
            return build()
        key = {"tokens": self.tokens.cache_key, "seed": self.seed, "process": [self.process_index, self.process_count],
               "seq_len": self.seq_len, "mode": self.mode, "shuffle": self.shuffle, **key}
        return (self._index_cache.text if text else self._index_cache.array)(kind, key, build)

    def _fingerprint(self) -> str:
        """Hash of what decides the batches (not ``context``, which only adds a field): a resumed
        run with another value here would silently see other batches."""
        h = hashlib.sha256()
        for a in range(0, len(self.lengths), CHUNK):  # the int64 bytes, as before lengths were int32
            h.update(self.lengths[a:a + CHUNK].astype(np.int64).tobytes())
        h.update(repr((self.seed, self.process_index, self.process_count, self.global_batch, self.seq_len,
                       self.mode, self.shuffle)).encode())
        return h.hexdigest()[:16]

    # -- pure part ---------------------------------------------------------------------------
    def _order(self, n: int, epoch: int, tag: int):
        """The epoch's order of n elements: tag 1 orders the documents, tag 2 the rows."""
        return epoch_order(n, (self.seed, self.process_index, epoch, tag), self.shuffle_algorithm, self.shuffle)

    def _layout(self, epoch: int) -> RowLayout:
        order = self._order(len(self.tokens), epoch, 1)
        sums_U1 = self._cached("layout", lambda: layout_sums(self.lengths, order, self.seq_len, self.mode),
                               epoch=epoch, algorithm=self.shuffle_algorithm)
        return RowLayout(self.lengths, order, self.seq_len, self.mode, sums_U1)

    def _epoch(self, epoch: int) -> tuple[RowLayout, Any]:
        """(layout, row order) of ``epoch``; the two latest are cached."""
        with self._lock:  # the prefetch thread and direct batch() calls share the cache
            if epoch not in self._epoch_cache:
                layout = self._layout(epoch)
                rows = self._order(layout.num_rows, epoch, 2)
                if len(self._epoch_cache) >= 2:
                    self._epoch_cache.pop(min(self._epoch_cache))
                self._epoch_cache[epoch] = (layout, rows)
            return self._epoch_cache[epoch]

    def epoch_of(self, step: int) -> int:
        """Epoch (pass over this process's documents) that the first row of ``step`` belongs to."""
        return step * self.local_batch // self.rows_per_epoch

    def batch(self, step: int) -> Batch:
        """The local batch of ``step`` (random access, thread-safe)."""
        g_B = np.arange(step * self.local_batch, (step + 1) * self.local_batch, dtype=np.int64)
        epoch_B = g_B // self.rows_per_epoch
        rows = []
        for epoch in np.unique(epoch_B).tolist():  # a batch spans at most a few epochs
            layout, order = self._epoch(epoch)
            rows += layout.rows(np.asarray(order[g_B[epoch_B == epoch] % self.rows_per_epoch], np.int64))
        return assemble_rows(self.tokens, rows, self.seq_len, self.pad_id, self.with_doc_ids, self.context,
                             self.protected)

    # -- iteration, prefetch and state --------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
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
        return {"step": int(self._step), "fingerprint": self.fingerprint, "shuffle_algorithm": self.shuffle_algorithm}

    def set_state(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume: the next batch is the one an uninterrupted run sees at ``state["step"]``.

        With ``strict`` a state saved for other data or settings (documents, seed, batch, T,
        processes, an explicit other ``shuffle_algorithm``) is refused, because resuming it would
        silently change the batches. With ``auto`` the iterator takes the state's algorithm (a
        state without one was saved before the setting existed: ``permutation``).
        """
        fp = state.get("fingerprint")
        if strict and fp is not None and fp != self.fingerprint:
            raise ValueError("the data iterator state in the checkpoint was saved for different data or settings "
                             "(documents, seed, batch size, seq_len or process count); resume with the same data "
                             "config, or pass strict=False to accept different batches.")
        try:
            algorithm = resolve_algorithm(self.configured_algorithm, state.get("shuffle_algorithm"))
        except ValueError:
            if strict and self.shuffle:
                raise
            algorithm = self.shuffle_algorithm
        self.close()
        if algorithm != self.shuffle_algorithm:
            with self._lock:
                self.shuffle_algorithm = algorithm
                self._epoch_cache.clear()
            self.rows_per_epoch = self._epoch(0)[0].num_rows  # examples' row counts depend on the order
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
