"""Evaluating saved models on chosen documents: which documents a ``--docs`` source names, and one
model source's memorization, membership inference and held-out loss, the same way for documents
and for instruction or chat examples (the run's data task says which tokens count)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gf_jax.data import check_vocab_fits, load_canaries, task_for
from gf_jax.data.config import DataConfig
from gf_jax.evaluate.choice import evaluate_choices
from gf_jax.evaluate.extraction import offset_extraction
from gf_jax.evaluate.memorization import answer_memorization
from gf_jax.evaluate.scoring import heldout_loss, membership_inference
from gf_jax.model.sharding import rows_for_mesh
from gf_jax.run.load import load_model
from gf_jax.run.source import ModelSource
from gf_jax.util import paths

DOC_SOURCES = ("train", "validation", "canaries", "canaries-heldout")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated (``python -m gf_jax.evaluate``'s flags, for the library).

    Attributes:
      step: checkpoint of a run (None: its ``@STEP``, else the newest).
      suffix_len, prefix_len: tokens to extract, and prompt tokens before them (None: all).
      beam_width: 1 = greedy (the paper's metric); > 1 = beam search (adaptive attack).
      batch_size: prompts decoded (documents scored) per batch.
      fpr: the false-positive rate of the reported membership-inference TPR.
      offsets: prefix offsets of the offset extraction (empty: none); ``offset_prefix_len`` prompt
        tokens at each, then ``suffix_len`` tokens to extract (``gf_jax.evaluate.extraction``).
      choices: multiple-choice task files (JSONL) scored for downstream utility
        (``gf_jax.evaluate.choice``).
    """

    step: int | None = None
    suffix_len: int = 50
    prefix_len: int | None = None
    beam_width: int = 1
    batch_size: int = 16
    fpr: float = 0.001
    offsets: tuple[int, ...] = ()
    offset_prefix_len: int = 32
    choices: tuple[str, ...] = ()


def resolve_documents(source: str, data_config: DataConfig, *, split_rule: str = "blank_line") -> list:
    """The documents (or examples) a ``--docs`` / ``--heldout`` source names.

    ``train``: exactly the documents the run trained on (its split by id, injected canaries
    included); ``validation``: its held-out split; ``canaries`` / ``canaries-heldout``: the
    injected / held-out canaries; anything else: a file or folder, read as the run's data task
    reads one (documents: ``.txt`` split by ``split_rule`` or ``.jsonl``; examples: JSONL).
    """
    task = task_for(data_config)
    if source in ("train", "validation"):
        if source == "validation" and data_config.validation_fraction <= 0:
            raise ValueError("--heldout/--docs validation needs a run trained with data.validation_fraction > 0; "
                             "pass a file of held-out documents instead.")
        docs = task.documents(source)
    elif source in ("canaries", "canaries-heldout"):
        if not data_config.canary_path:
            raise ValueError(f"--docs/--heldout {source} needs a run trained with data.canary_path set; "
                             "pass a file of documents instead.")
        injected, held_out = load_canaries(data_config)
        docs = injected if source == "canaries" else held_out
    elif paths.exists(source):
        docs = task.documents_at(source, split_rule)
    else:
        raise FileNotFoundError(f"document source {source!r} is neither one of {', '.join(DOC_SOURCES)} "
                                "nor an existing file or folder; fix --docs/--heldout.")
    if not docs:
        raise ValueError(f"document source {source!r} holds no documents; choose another --docs/--heldout.")
    return docs


def select_documents(docs: list, ids_file: str | None, max_docs: int | None) -> list:
    """The documents named in ``ids_file`` (one id per line; all when None), at most ``max_docs``."""
    if ids_file:
        with open(ids_file) as f:
            wanted = [line.strip() for line in f if line.strip()]
        by_id = {d.id: d for d in docs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} ids of {ids_file} are not among the documents (first: "
                             f"{missing[0]!r}); check --doc-ids against --docs.")
        docs = [by_id[i] for i in wanted]
    return docs[:max_docs] if max_docs else docs


def evaluate_run(source: str | ModelSource, docs: list, heldout: list | None, settings: EvalSettings,
                 mesh=None, *, name: str = "") -> dict[str, Any]:
    """Loads one model source and evaluates it: memorization of ``docs`` (MIA members), and with
    ``heldout`` the membership-inference attacks and the held-out loss."""
    source = ModelSource.parse(source)
    model, config, tokenizer = load_model(source, settings.step, mesh=mesh)
    check_vocab_fits(tokenizer, model.config.vocab_size)
    task = task_for(config.data)
    seq_len = min(config.train.seq_len, model.config.max_seq_len)
    members = task.evaluation_set(docs, tokenizer, seq_len)
    batch = rows_for_mesh(settings.batch_size, mesh)
    per_doc, aggregate = answer_memorization(
        model, tokenizer, members, suffix_len=settings.suffix_len, prefix_len=settings.prefix_len,
        batch_size=batch, beam_width=settings.beam_width, mesh=mesh, progress=f"{name}: memorization")
    result: dict[str, Any] = {"run_dir": paths.absolute(source.path), "goldfish": dataclasses.asdict(config.goldfish),
                              "memorization": {"per_doc": per_doc, "aggregate": aggregate}}
    if settings.choices:
        result["downstream"] = {
            os.path.basename(path): evaluate_choices(model, tokenizer, path, add_bos=config.data.add_bos,
                                                     batch_size=batch, mesh=mesh, progress=f"{name}: {path}")
            for path in settings.choices}
    if settings.offsets:
        result["offsets"] = offset_extraction(
            model, tokenizer, members.tokens, doc_ids=members.ids, offsets=settings.offsets,
            prefix_len=settings.offset_prefix_len, suffix_len=settings.suffix_len, batch_size=batch, mesh=mesh,
            progress=f"{name}: offsets")
    if heldout:
        held = task.evaluation_set(heldout, tokenizer, seq_len)
        result["mia"] = membership_inference(model, tokenizer, members, held, fpr=settings.fpr, batch_size=batch,
                                             mesh=mesh, progress=f"{name}: MIA")
        # Every host builds the global batch: one process's view.
        batches = task.eval_batches(held, global_batch=batch, seq_len=seq_len, pad_id=tokenizer.pad_id,
                                    process_index=0, process_count=1)
        loss, ppl = heldout_loss(model, batches, mesh=mesh, progress=f"{name}: held-out loss")
        result["heldout"] = {"loss": loss, "perplexity": ppl, "n_documents": len(heldout)}
    return result
