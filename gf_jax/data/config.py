"""``DataConfig``: where the text comes from and how it becomes batches, with its own checks.

Checks that involve other config sections (``train``, ``goldfish``) live in
``gf_jax.config.validate``, the one place for cross-section rules.
"""

from __future__ import annotations

import dataclasses

from gf_jax.data.shuffle import ALGORITHMS as SHUFFLE_ALGORITHMS

SOURCES = ("text", "jsonl", "parquet", "tfds")
STORES = ("auto", "on", "off")
SPLIT_RULES = ("file", "blank_line", "wikitext")
MODES = ("packed", "document")
FORMATS = ("text", "prompt_completion", "chat")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches.

    Attributes:
      source: ``text`` (a file or a folder of ``.txt``), ``jsonl`` (a file or folder of ``.jsonl``,
        ``.jsonl.gz``, and ``.jsonl.zst`` where ``zstandard`` is installed), ``parquet`` (a file or
        folder of ``.parquet``) or ``tfds`` (a prepared tensorflow-datasets dataset, read with
        ``tfds.data_source``).
      path: file or folder of the text/jsonl/parquet source.
      split_rule: text sources: ``file`` (one document per file), ``blank_line`` (documents
        separated by blank lines) or ``wikitext`` (an article per `` = Title = `` heading).
      text_field, id_field: JSONL keys (Parquet columns) of the text and (optional) stable document id.
      tfds_name, tfds_split, tfds_data_dir, tfds_text_feature: the TFDS dataset (``tfds_split``
        accepts slicing such as ``train[:1%]``; ``tfds_data_dir`` may be a ``gs://`` bucket).
        ``id_field`` names an id feature there too.
      tokenizer: a sentencepiece ``.model``; None trains one on the corpus (cached; see
        ``gf_jax.data.corpus_tokenizer``).
      vocab_size: size of that trained tokenizer.
      tokenizer_cache_dir: where trained tokenizers are cached (keyed by corpus content).
      add_bos, add_eos: frame each document with BOS/EOS.
      mode: ``packed`` (documents concatenated into rows of T+1 tokens) or ``document`` (one
        document, or one piece of a long one, per row, padded).
      seed: shuffling seed (documents and rows, new order every epoch).
      shuffle: False packs documents in stream order and serves rows in order.
      shuffle_algorithm: how an epoch's document and row orders are drawn: ``feistel`` (keyed
        bijections computed on demand: no memory per row or document), ``permutation`` (numpy
        permutations held in memory: the batches of runs started before this key existed) or
        ``auto``: ``feistel`` for a new run, and on resume whatever its checkpoint was saved with
        (so older runs keep their batches). See ``gf_jax.data.shuffle``.
      validation_fraction: share of documents (chosen by a hash of their id, independent of the
        seed) held out as the ``validation`` split. Canaries are never held out.
      max_documents: keep only the first N documents of the source.
      canary_path: text file (split by ``canary_split_rule``) or ``.jsonl`` (``text_field``) whose
        documents are the canaries.
      canary_count: inject only the first N canaries (None: all); the rest are held-out canaries,
        the non-members of a membership test.
      canary_repeats: copies of each injected canary inserted into the stream (0: no canaries).
      canary_seed: seed of the insertion places (independent of ``seed``).
      canary_perturb_rate, canary_perturb_noise: near-duplicate copies: each copy gets about this
        many word substitutions or insertions per 100 words (0: exact copies), and with the noise
        flag case and whitespace changes at the same rate (``gf_jax.data.canaries.perturb``).
      row_context: each batch carries ``context_BxC`` (C = row_context): the targets that precede
        a row's first column in its document, so the goldfish hash of a row that starts
        mid-document sees its whole window instead of dropping its first h targets. Keep it
        >= goldfish.h (0: no context).
      format: ``text`` (documents), ``prompt_completion`` or ``chat`` (JSONL examples whose
        answers alone are supervised; see docs/fine-tuning.md and ``gf_jax.data.examples``).
      prompt_field, completion_field: JSONL keys of a ``prompt_completion`` example.
      messages_field: JSONL key of a ``chat`` example's ``[{role, content}]`` turns.
      chat_template: "" = the tokenizer's own ``chat_template``; else a built-in template name
        (``chatml``, ``llama2``, ``llama3``) or a ``.jinja`` file.
      train_on_prompt: supervise the prompt (and chat headers) too, not only the answers.
      truncate: cut an example longer than a row (train.seq_len + 1 tokens) instead of failing.
      store: ``on``: a tokenized store, prepared once with ``python -m gf_jax.data prepare`` or on
        first use and memory-mapped by every process (start-up and memory do not grow with the
        corpus; the batches are identical); ``off``: each start reads and tokenizes this process's
        share in memory; ``auto`` (default): ``on`` for a corpus of at least ``store_above_bytes``
        (text documents; in a multi-process run only with a shared ``store_dir``), else ``off``.
        See ``gf_jax.data.store.uses_store``.
      store_dir: the store's folder (local or ``gs://``); a store there prepared with other
        settings is refused. None: ``.cache/stores/<key of the settings and the files' times>``.
      protect: spans never supervised but kept in context (``gf_jax.data.protect``): regular
        expressions or built-in names (``email``, ``phone``, ``ipv4``, ``iban``); text and example data.
      protect_field: JSONL key of a document's protected character spans ``[[start, end], ...]``.
      store_above_bytes: the corpus size from which ``store: auto`` uses a store (1 GiB: the
        in-memory path holds about 3 bytes of RAM per corpus byte).
      store_workers: processes that tokenize while preparing a store (None: every core).
      store_wait: seconds the other processes of a multi-process run wait for process 0 to prepare
        a missing store (they poll for its manifest, written last) before giving up with an error.
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
    shuffle_algorithm: str = "auto"
    validation_fraction: float = 0.0
    max_documents: int | None = None
    canary_path: str | None = None
    canary_split_rule: str = "wikitext"
    canary_count: int | None = None
    canary_repeats: int = 0
    canary_seed: int = 0
    canary_perturb_rate: float = 0.0
    canary_perturb_noise: bool = False
    row_context: int = 32
    format: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chat_template: str = ""
    train_on_prompt: bool = False
    truncate: bool = False
    store: str | bool = "auto"  # YAML reads on/off as booleans
    protect: tuple[str, ...] = ()
    protect_field: str | None = None
    store_dir: str | None = None
    store_above_bytes: int = 2**30
    store_workers: int | None = None
    store_wait: float = 10800.0

    def __post_init__(self):
        check_choice("data.source", self.source, SOURCES)
        check_choice("data.split_rule", self.split_rule, SPLIT_RULES)
        check_choice("data.canary_split_rule", self.canary_split_rule, SPLIT_RULES)
        check_choice("data.mode", self.mode, MODES)
        if isinstance(self.store, bool):
            object.__setattr__(self, "store", "on" if self.store else "off")
        check_choice("data.store", self.store, STORES)
        if self.store_above_bytes < 0:
            raise ValueError(f"data.store_above_bytes={self.store_above_bytes} must be >= 0.")
        check_choice("data.shuffle_algorithm", self.shuffle_algorithm, SHUFFLE_ALGORITHMS)
        if self.store_workers is not None and self.store_workers < 1:
            raise ValueError(f"data.store_workers={self.store_workers} must be >= 1 or null (every core).")
        if self.store_wait <= 0:
            raise ValueError(f"data.store_wait={self.store_wait} must be > 0 seconds.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1).")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 1 or null.")
        if self.canary_repeats < 0:
            raise ValueError(f"data.canary_repeats={self.canary_repeats} must be >= 0.")
        if self.row_context < 0:
            raise ValueError(f"data.row_context={self.row_context} must be >= 0 (0: no row context).")
        if self.canary_perturb_rate < 0 or self.canary_perturb_rate > 100:
            raise ValueError(f"data.canary_perturb_rate={self.canary_perturb_rate} must be in [0, 100] (edits per 100 "
                             "words).")
        if self.canary_perturb_rate > 0 and self.store == "on":
            raise ValueError("perturbed canary copies are made in memory; set data.store=off or auto.")
        if self.canary_repeats > 0 and not self.canary_path:
            raise ValueError("data.canary_repeats > 0 needs data.canary_path (a file of canary documents).")
        check_choice("data.format", self.format, FORMATS)
        object.__setattr__(self, "protect", tuple(str(p) for p in (self.protect or ())))
        if (self.protect or self.protect_field) and self.store == "on":
            raise ValueError("data.protect and data.protect_field mark tokens in memory; set data.store=off or auto "
                             "(the tokenized store holds no protection masks).")
        if self.protect_field and (self.source != "jsonl" or self.format != "text"):
            raise ValueError("data.protect_field reads spans from JSONL documents; set data.source=jsonl with "
                             "data.format=text, or use data.protect patterns.")
        if self.format != "text" and self.store == "on":
            raise ValueError(f"data.format={self.format} examples are read in memory; set data.store=off (the "
                             "tokenized store holds plain documents).")
        if self.format != "text" and (self.source != "jsonl" or self.canary_repeats):
            raise ValueError(f"data.format={self.format} reads examples from JSONL without canaries; set "
                             "data.source=jsonl and data.canary_repeats=0.")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data.source=tfds needs data.tfds_name (e.g. 'wikipedia/20230601.en').")


def check_choice(name: str, value, choices) -> None:
    """Raises a one-sentence error if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}; pick one of those.")
