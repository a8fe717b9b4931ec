"""The checks and choices of a run's set-up that need no trainer state: which tokenizer, whether
the batch fits the mesh, whether the corpus fills a batch, which data position to resume.

Each is one function of plain inputs, so the trainer reads as a sequence of steps and each rule
is tested on its own (tests/train/test_setup.py).
"""

from __future__ import annotations

import jax

from gf_jax.config import RunConfig
from gf_jax.data import check_vocab_fits
from gf_jax.data.tasks import corpus_tokenizer
from gf_jax.run.rundir import RunDir, tokenizer_identity_file
from gf_jax.tokenizer import load_tokenizer
from gf_jax.util import paths


def resolve_tokenizer(config: RunConfig, run_dir: str, *, adopt: bool = True):
    """The run's tokenizer: ``data.tokenizer``, else the run directory's copy when ``adopt`` (the
    run resumes from its own checkpoints), else one trained on the corpus (cached). Returns
    (tokenizer, path of the run directory's copy); the copy is written by the trainer once every
    check has passed. A new run never adopts a tokenizer that merely lies in its directory (a
    leftover of a run that saved nothing, or of an interrupted import): it is replaced."""
    run = RunDir(run_dir)
    existing = run.tokenizer_copy() if adopt else None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
        if existing and not paths.same_content(tokenizer_identity_file(existing), tokenizer.path):
            if paths.absolute(existing) != paths.absolute(config.data.tokenizer):
                raise ValueError(
                    f"{run_dir} was trained with a different tokenizer ({existing}) than data.tokenizer="
                    f"{config.data.tokenizer}; drop the data.tokenizer setting or choose a new train.run_dir."
                )
    elif existing:
        tokenizer = load_tokenizer(existing)
    else:
        tokenizer = corpus_tokenizer(config.data)
    check_vocab_fits(tokenizer, config.model.vocab_size)
    return tokenizer, existing or run.tokenizer_copy_path(tokenizer)


def check_batch_fits_mesh(config: RunConfig, mesh) -> None:
    """A micro-batch must split evenly over the mesh's batch shards (data x fsdp)."""
    t = config.train
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = t.global_batch // t.grad_accum
    if micro % n_batch_shards:
        raise ValueError(
            f"a micro-batch of {micro} sequences (train.global_batch / train.grad_accum) cannot "
            f"be split over {n_batch_shards} data x fsdp shards; make it a multiple of {n_batch_shards}."
        )


def corpus_warning(iterator) -> str | None:
    """A warning line when this process's share of the corpus is smaller than its share of one
    batch: each step then repeats the same few tokens and fills the rest of the rows with padding
    (or, in document mode, pads every row), which trains on very little."""
    if not hasattr(iterator, "lengths"):  # an iterator of the user's own (Trainer.train_iter replaced)
        return None
    if getattr(iterator, "mode", "packed") == "document":  # one document per row: rows, not tokens, count
        if len(iterator.lengths) >= iterator.local_batch:
            return None
        return (f"[gf_jax.train] warning: {len(iterator.lengths)} training documents, fewer than the "
                f"{iterator.local_batch} rows of one batch; every batch repeats them: lower train.global_batch or "
                "add data.")
    tokens = int(sum(int(n) for n in iterator.lengths))
    batch_tokens = iterator.local_batch * (iterator.seq_len + 1)
    if tokens >= batch_tokens:
        return None
    return (
        f"[gf_jax.train] warning: the training documents hold {tokens} tokens, fewer than one batch "
        f"({iterator.local_batch} x {iterator.seq_len + 1} = {batch_tokens}); most of every batch is padding or "
        "repeats: lower train.global_batch or train.seq_len, or add data."
    )


def own_data_state(loop: dict, run_dir: str) -> dict:
    """This process's data-iterator state from a checkpoint's loop state (each process's data
    stream depends on the process count, so a different count is refused)."""
    state = dict(loop["data"])
    fingerprints = loop.get("data_fingerprints")
    if fingerprints is not None and "fingerprint" in state:
        if len(fingerprints) != jax.process_count():
            raise ValueError(
                f"{run_dir} was trained by {len(fingerprints)} processes and this run has "
                f"{jax.process_count()}; resume it with {len(fingerprints)} processes (each one's data "
                "stream depends on it), or read its parameters anywhere with gf_jax.run.load.load_model."
            )
        state["fingerprint"] = fingerprints[jax.process_index()]
    return state
