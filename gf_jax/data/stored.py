"""A process's documents out of the tokenized store: the same stream, shares and splits as the
in-memory pipeline, computed from the store's index arrays instead of the documents.

The stream is background documents with canary copies at ``canary_places``; a process takes
``process_share`` of it and keeps the documents of its split (``split_of`` on the stored id
hashes). Canaries are read and tokenized at start (a small file); background tokens stay on disk.
These index arrays are saved in the store's index files (``gf_jax.data.index_cache``) on the
first start and memory-mapped on every later one.
"""

from __future__ import annotations

import numpy as np

from gf_jax.data.canaries import canary_places, load_canaries, stream_refs
from gf_jax.data.config import DataConfig
from gf_jax.data.packing import index_dtype
from gf_jax.data.shuffle import CHUNK
from gf_jax.data.splits import process_share
from gf_jax.data.store import StoreTokens, TokenStore, reference_lengths
from gf_jax.data.tokens import tokenize_documents


def _canaries(config: DataConfig, tokenizer, store: TokenStore):
    """(injected canary documents, their tokens, places_Y, canary_Y) of the stream over ``store``."""
    injected = load_canaries(config)[0] if config.canary_repeats else []
    places_Y, canary_Y = canary_places(store.num_documents, len(injected), config.canary_repeats if injected else 0,
                                       config.canary_seed)
    tokens = tokenize_documents(injected, tokenizer, config.add_bos, config.add_eos) if injected else []
    return injected, tokens, places_Y, canary_Y


def stream_length(config: DataConfig, store: TokenStore) -> int:
    """Documents in the stream: background plus every canary copy."""
    copies = len(load_canaries(config)[0]) * config.canary_repeats if config.canary_repeats else 0
    return store.num_documents + copies


def canary_record(config: DataConfig, tokenizer, store: TokenStore) -> dict[str, list[int]]:
    """Each injected canary id -> its stream indices: ``document_stream(config).canary_record``
    without reading the background."""
    injected, _, places_Y, canary_Y = _canaries(config, tokenizer, store)
    record: dict[str, list[int]] = {}
    for place, c in zip(places_Y.tolist(), canary_Y.tolist()):
        record.setdefault(injected[c].id, []).append(place)
    return record


def process_tokens(config: DataConfig, tokenizer, store: TokenStore, split: str, process_index: int,
                   process_count: int) -> StoreTokens:
    """This process's documents of ``split`` (its contiguous share of the stream), by reference;
    the arrays come from the store's index files after the first start."""
    injected, canary_tokens, places_Y, canary_Y = _canaries(config, tokenizer, store)
    share = process_share(store.num_documents + len(places_Y), process_index, process_count)
    key = {"store": store.identity, "split": split, "validation_fraction": config.validation_fraction,
           "share": [process_index, process_count], "canary_seed": config.canary_seed,
           "canary_repeats": config.canary_repeats, "canary_lengths": [len(t) for t in canary_tokens]}
    return _cached_tokens(store, key, lambda: _split_refs(share, lambda part: stream_refs(part, places_Y, canary_Y),
                                                          store, split, config.validation_fraction),
                          canary_tokens, injected, tokenizer)


def split_tokens(config: DataConfig, tokenizer, store: TokenStore, split: str) -> StoreTokens:
    """Every background document of ``split`` in store order (no canaries): evaluation's list,
    the same on every process (``eval_batches`` deals the rows out)."""
    key = {"store": store.identity, "split": split, "validation_fraction": config.validation_fraction}
    return _cached_tokens(store, key, lambda: _split_refs(
        range(store.num_documents), lambda part: np.arange(part.start, part.stop, dtype=np.int64), store, split,
        config.validation_fraction), tokenizer=tokenizer)


def _cached_tokens(store: TokenStore, key: dict, build_refs, canary_tokens=(), canary_documents=(),
                   tokenizer=None) -> StoreTokens:
    """``StoreTokens`` whose references and lengths are the index files of ``key`` (built once)."""
    cache = store.index_cache
    refs_U = cache.array("refs", key, build_refs)
    lengths_U = cache.array("lengths", key, lambda: reference_lengths(store, refs_U, canary_tokens))
    return StoreTokens(store, refs_U, lengths_U, canary_tokens, canary_documents, tokenizer, index_cache=cache,
                       cache_key=key)


def _split_refs(stream: range, refs_of, store: TokenStore, split: str, validation_fraction: float) -> np.ndarray:
    """The references of ``split`` among ``refs_of(part)`` over consecutive parts of ``stream``,
    as int32 (int64 past 2**31 documents), computed a chunk at a time. The result is a prefix of
    an array sized for the whole stream: the pages of the unused tail are never touched, so they
    cost no memory."""
    out_U = np.empty(len(stream), index_dtype(max(store.num_documents, len(stream)) + 1))
    n = 0
    for a in range(stream.start, stream.stop, CHUNK):
        kept_U = _keep_split(refs_of(range(a, min(a + CHUNK, stream.stop))), store, split, validation_fraction)
        out_U[n:n + len(kept_U)] = kept_U
        n += len(kept_U)
    return out_U[:n]


def _keep_split(refs_U: np.ndarray, store: TokenStore, split: str, validation_fraction: float) -> np.ndarray:
    """The references of ``split``; canaries (negative) are always training documents."""
    is_store_U = refs_U >= 0
    validation_U = np.zeros(len(refs_U), bool)
    validation_U[is_store_U] = store.is_validation(refs_U[is_store_U], validation_fraction)
    return refs_U[validation_U] if split == "validation" else refs_U[~validation_U]
