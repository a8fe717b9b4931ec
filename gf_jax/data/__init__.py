"""Documents in, batches out: text/JSONL/TFDS sources, canaries, packing with positions, per-host input.

Pipeline::

    DataConfig -> document stream (stable ids, optional canary copies) -> this process's share
               -> tokens (BOS/EOS) -> rows of T+1 tokens (packed, or one document per row)
               -> local ``Batch`` (numpy) -> ``to_global_batch`` -> ``Batch`` of jax.Arrays on the mesh

Batches are ``gf_jax.batch.Batch``: ``inputs_BxT``, ``targets_BxT``, ``positions_BxT`` (index of
the input token in its document; a row that starts mid-document carries the true positions),
``segment_ids_BxT`` (1, 2, ... per document in the row, 0 = padding), ``weights_BxT`` (0 for
padding and for targets that cross a document boundary), ``context_BxC`` (the targets before a
row's first column, C = ``row_context``) and, on the host only, ``doc_ids_BxT``.

Why plain numpy rather than grain: every row is computed by index arithmetic from
(seed, epoch, row), so batch ``s`` is a pure function of ``(seed, s)``, resuming is "set the step",
and a document split across rows keeps its true positions (grain's packing transforms restart
positions in every row and carry an opaque iterator state).

Modules, one concern each: ``config`` (DataConfig), ``sources`` (readers, Document),
``canaries`` (the stream with canary copies), ``splits`` (train/validation, per-process shares),
``tokens`` (tokenizing and fit checks), ``packing`` (rows and Batch assembly), ``shuffle`` (epoch
orders: lazy Feistel bijections), ``iterator`` (BatchIterator), ``eval_batches`` (one in-order
pass), ``pipeline`` (config to iterator, to the mesh), ``tasks`` (what ``data.format`` means:
the one object per format that the trainer and the evaluation use; the corpus's tokenizer),
``store`` (the tokenized store's format and memory-mapped reader), ``prepare`` (its parallel
writer; ``python -m gf_jax.data prepare --config C``), ``stored`` (a process's share from it);
instruction and chat examples: ``examples`` (reading, tokens and supervision), ``chat`` (chat
templates), ``example_batches`` (whole examples per row, weights on answers only).
Imports the core, the tokenizers and the small utilities below it; nothing above it.
"""

from gf_jax.data.canaries import CANARY_PREFIX, DocumentStream, canary_plan, document_stream, load_canaries
from gf_jax.data.config import FORMATS, MODES, SOURCES, SPLIT_RULES, STORES, DataConfig
from gf_jax.data.eval_batches import eval_batches
from gf_jax.data.example_batches import ExampleIterator, example_eval_batches, make_example_iterator, supervise
from gf_jax.data.examples import EncodedExamples, Example, encode_examples, read_examples
from gf_jax.data.iterator import BatchIterator
from gf_jax.data.packing import assemble_rows, rows_per_epoch, unpack_batch
from gf_jax.data.pipeline import make_train_iterator, to_global_batch, validation_tokens
from gf_jax.data.prepare import ensure_store, prepare_store
from gf_jax.data.sources import (
    Document,
    TfdsDocuments,
    iter_background,
    read_background,
    read_jsonl_documents,
    read_parquet_documents,
    read_text_documents,
    split_blank_lines,
    split_wikitext,
)
from gf_jax.data.splits import load_documents, process_share, split_of, train_texts
from gf_jax.data.store import TokenStore
from gf_jax.data.tasks import ExampleTask, TextTask, corpus_tokenizer, task_for
from gf_jax.data.tokens import check_documents_long_enough, check_vocab_fits, tokenize_documents

__all__ = [
    "CANARY_PREFIX", "FORMATS", "MODES", "SOURCES", "SPLIT_RULES", "STORES",
    "DataConfig", "Document", "DocumentStream", "TfdsDocuments", "BatchIterator",
    "read_text_documents", "read_jsonl_documents", "read_parquet_documents", "read_background", "iter_background",
    "split_blank_lines", "split_wikitext",
    "load_canaries", "canary_plan", "document_stream",
    "split_of", "process_share", "load_documents", "train_texts",
    "tokenize_documents", "check_vocab_fits", "check_documents_long_enough",
    "assemble_rows", "rows_per_epoch", "unpack_batch", "eval_batches", "make_train_iterator", "to_global_batch",
    "Example", "EncodedExamples", "read_examples", "encode_examples", "ExampleIterator", "make_example_iterator",
    "example_eval_batches", "supervise",
    "validation_tokens", "ensure_store", "prepare_store", "TokenStore",
    "TextTask", "ExampleTask", "task_for", "corpus_tokenizer",
]
