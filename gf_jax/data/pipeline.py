"""From a ``DataConfig`` to this process's training batches, and from local batches to the mesh."""

from __future__ import annotations

import jax

from gf_jax.batch import Batch
from gf_jax.data import prepare, stored
from gf_jax.data.canaries import document_stream
from gf_jax.data.config import DataConfig
from gf_jax.data.iterator import BatchIterator, default_process
from gf_jax.data.protect import protected_targets, read_field_spans
from gf_jax.data.sources import read_in_chunks
from gf_jax.data.splits import load_documents, process_share, split_of
from gf_jax.data.store import uses_store
from gf_jax.data.tokens import tokenize_documents


def make_train_iterator(config: DataConfig, tokenizer, *, global_batch: int, seq_len: int, split: str = "train",
                        process_index: int | None = None, process_count: int | None = None, prefetch: int = 2,
                        with_doc_ids: bool = False) -> BatchIterator:
    """Training (or validation) batches of this process, from its share of the document stream
    (documents: ``data.format=text``; examples: ``gf_jax.data.example_batches``).

    The process reads and tokenizes only its contiguous share of the stream (canaries included),
    then keeps the documents of ``split``. The iterator's ``documents`` are that local
    ``Document`` list, aligned with ``doc_ids_BxT``. Where the canary copies sit in the stream:
    ``document_stream(config).canary_record``.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} must be 'train' or 'validation'.")
    if split == "validation" and config.validation_fraction <= 0:
        raise ValueError("split='validation' needs data.validation_fraction > 0.")
    pi, pc = default_process(process_index, process_count)
    if uses_store(config, pc):
        return _store_iterator(config, tokenizer, global_batch=global_batch, seq_len=seq_len, split=split,
                               process_index=pi, process_count=pc, prefetch=prefetch, with_doc_ids=with_doc_ids)
    stream = document_stream(config)
    share = process_share(len(stream), pi, pc)
    docs = [d for chunk in read_in_chunks(stream, share) for d in chunk
            if split_of(d.id, config.validation_fraction) == split]
    if not docs:
        raise ValueError(f"process {pi} of {pc} got no {split} documents out of {len(stream)}; use more documents, "
                         "fewer processes or a larger data.validation_fraction.")
    tokens = tokenize_documents(docs, tokenizer, config.add_bos, config.add_eos)
    protected = None
    if config.protect or config.protect_field:  # spans never supervised (gf_jax.data.protect)
        protected = protected_targets(docs, tokenizer, config, tokens, read_field_spans(config))
    return BatchIterator(tokens, global_batch=global_batch, seq_len=seq_len, seed=config.seed, process_index=pi,
                         process_count=pc, mode=config.mode, pad_id=tokenizer.pad_id, shuffle=config.shuffle,
                         prefetch=prefetch, with_doc_ids=with_doc_ids, context=config.row_context, documents=docs,
                         shuffle_algorithm=config.shuffle_algorithm, protected=protected)


def _store_iterator(config: DataConfig, tokenizer, *, global_batch: int, seq_len: int, split: str,
                    process_index: int, process_count: int, prefetch: int, with_doc_ids: bool) -> BatchIterator:
    """``make_train_iterator`` on the tokenized store: the same documents in the same order (so the
    same batches), memory-mapped instead of read and tokenized."""
    store = prepare.ensure_store(config, tokenizer)
    tokens = stored.process_tokens(config, tokenizer, store, split, process_index, process_count)
    if not len(tokens):
        raise ValueError(f"process {process_index} of {process_count} got no {split} documents out of "
                         f"{stored.stream_length(config, store)}; use more documents, fewer processes or a larger "
                         "data.validation_fraction.")
    return BatchIterator(tokens, global_batch=global_batch, seq_len=seq_len, seed=config.seed,
                         process_index=process_index, process_count=process_count, mode=config.mode,
                         pad_id=tokenizer.pad_id, shuffle=config.shuffle, prefetch=prefetch,
                         with_doc_ids=with_doc_ids, context=config.row_context, documents=tokens.documents,
                         shuffle_algorithm=config.shuffle_algorithm)


def validation_tokens(config: DataConfig, tokenizer):
    """Token arrays of every validation document, in order (what ``eval_batches`` takes): read and
    tokenized, or memory-mapped from the tokenized store (``gf_jax.data.store.uses_store``)."""
    if uses_store(config, default_process(None, None)[1]):
        return stored.split_tokens(config, tokenizer, prepare.ensure_store(config, tokenizer), "validation")
    return tokenize_documents(load_documents(config, "validation"), tokenizer, config.add_bos, config.add_eos)


def to_global_batch(local_batch: Batch, sharding) -> Batch:
    """The global ``Batch`` of ``jax.Array``s from each process's local rows (batch dim split over
    processes by ``sharding``). Document ids stay on the host: the result has none."""
    # None fields (no row context, no document ids) are empty subtrees: tree.map keeps them None.
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local_batch.for_device())
