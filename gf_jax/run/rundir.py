"""A run directory and every file name in it: the one place that knows the layout.

    RUN/config.yaml              the resolved run config (written once every check has passed)
    RUN/metrics.jsonl            one JSON record per log step and evaluation
    RUN/tokenizer.model          the run's sentencepiece tokenizer, or
    RUN/hf/                      its Hugging Face tokenizer and the original model's metadata files
    RUN/checkpoints/<step>/      Orbax checkpoints (gf_jax.run.checkpoint)
    RUN/corrupt_checkpoints/     checkpoints that did not restore, moved aside by a resume
    RUN/run.lock                 the trainer holding the run (gf_jax.run.lock)
    RUN/tensorboard/             TensorBoard events
    RUN/eval/                    the default report folder of ``python -m gf_jax.evaluate``

Local paths and ``gs://`` URLs alike (``gf_jax.util.paths``).
"""

from __future__ import annotations

import dataclasses
import os

from gf_jax.hf import METADATA_FILES
from gf_jax.tokenizer import HFTokenizer
from gf_jax.tokenizer.hf_tokenizer import TOKENIZER_JSON
from gf_jax.util import paths
from gf_jax.util.staging import MARKER

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.model"
HF_SUBDIR = "hf"
CHECKPOINTS_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
LOCK_FILE = "run.lock"
TENSORBOARD_SUBDIR = "tensorboard"
EVAL_SUBDIR = "eval"
# What a run that saved no checkpoint leaves behind (a failed start, a NaN before the first save, an
# interrupted import); a new run in the same directory replaces them, never adopts them.
LEFTOVERS = (CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE, HF_SUBDIR, TENSORBOARD_SUBDIR, CHECKPOINTS_SUBDIR)
# Kept as they are by a new run: reports, checkpoints set aside, the lock (gf_jax.run.lock owns it),
# the marker of a run directory written by ``hf import``.
KEPT = (EVAL_SUBDIR, CORRUPT_SUBDIR, LOCK_FILE, MARKER)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run directory (``path``: local or a URL)."""

    path: str

    def file(self, name: str) -> str:
        return paths.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file(CONFIG_FILE)

    @property
    def metrics(self) -> str:
        return self.file(METRICS_FILE)

    @property
    def lock(self) -> str:
        return self.file(LOCK_FILE)

    @property
    def tensorboard(self) -> str:
        return self.file(TENSORBOARD_SUBDIR)

    @property
    def eval(self) -> str:
        return self.file(EVAL_SUBDIR)

    @property
    def hf(self) -> str:
        """``RUN/hf``: the HF tokenizer and metadata of a run made from (or tokenized like) an HF model."""
        return self.file(HF_SUBDIR)

    @property
    def checkpoints(self) -> str:
        """``RUN/checkpoints`` as an absolute path (Orbax needs one; a URL stays a URL)."""
        return paths.join(paths.absolute(self.path), CHECKPOINTS_SUBDIR)

    @property
    def corrupt_checkpoints(self) -> str:
        return paths.join(paths.absolute(self.path), CORRUPT_SUBDIR)

    def has_config(self) -> bool:
        return paths.exists(self.config)

    # ---- the tokenizer copy ---------------------------------------------------------------------

    def tokenizer_copy_path(self, tokenizer) -> str:
        """Where the run keeps ``tokenizer``: ``tokenizer.model`` (sentencepiece) or ``hf/`` (HF files)."""
        return self.hf if isinstance(tokenizer, HFTokenizer) else self.file(TOKENIZER_FILE)

    def tokenizer_copy(self) -> str | None:
        """The tokenizer copy written into this run directory earlier (``tokenizer.model``, or ``hf/``
        holding a ``tokenizer.json`` or a ``tokenizer.model``), or None."""
        if paths.exists(self.file(TOKENIZER_FILE)):
            return self.file(TOKENIZER_FILE)
        if any(paths.exists(paths.join(self.hf, name)) for name in (TOKENIZER_JSON, TOKENIZER_FILE)):
            return self.hf
        return None

    def replaceable(self, *, fresh: bool) -> list[str]:
        """What a new run in this directory replaces: the leftovers of a run that saved no checkpoint
        (``LEFTOVERS``; an empty ``checkpoints/`` stays), and with ``fresh`` (start over) also the
        checkpoints and reports of a finished one. Raises a one-sentence ValueError when the directory
        holds anything a gf_jax run does not write (somebody's files are never removed)."""
        names = self._entries()
        foreign = [n for n in names if n not in LEFTOVERS + KEPT]
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise ValueError(
                f"{self.path} holds files a gf_jax run does not write ({shown}); choose a new train.run_dir "
                "(nothing was written)."
            )
        if fresh:
            return [n for n in names if n not in (LOCK_FILE, MARKER)]
        return [n for n in names if n in LEFTOVERS and n != CHECKPOINTS_SUBDIR]

    def _entries(self) -> list[str]:
        """The names in this directory (a bucket: only those a run writes; it lists slowly)."""
        if paths.is_url(self.path):
            return [name for name in LEFTOVERS + KEPT if paths.exists(self.file(name))]
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if not n.startswith("."))

    def remove(self, name: str) -> None:
        """Removes the file or folder ``name`` of this run directory (local; a URL: the object)."""
        paths.remove_tree(self.file(name))

    def hf_metadata(self) -> str | None:
        """``RUN/hf`` when it holds an HF model's ``config.json`` (a run made from an HF model), else None."""
        return self.hf if not paths.is_url(self.path) and os.path.isfile(os.path.join(self.hf, "config.json")) else None


def tokenizer_identity_file(copy_path: str) -> str:
    """The file whose bytes identify a tokenizer copy (``hf/`` -> its tokenizer.json)."""
    hf_json = paths.join(copy_path, TOKENIZER_JSON)
    return hf_json if paths.exists(hf_json) else copy_path


def write_tokenizer_copy(tokenizer, copy_path: str, metadata_dirs: list[str]) -> None:
    """Copies the tokenizer to ``copy_path``: a ``.model`` file, or for an HF tokenizer its files plus
    the metadata files (config.json, generation_config.json) of ``metadata_dirs`` (first found wins)."""
    if not copy_path.endswith(HF_SUBDIR):
        paths.copy_file(tokenizer.path, copy_path)
        return
    copy_metadata([os.path.dirname(os.path.abspath(tokenizer.path)), *metadata_dirs], copy_path)


def copy_metadata(source_dirs: list[str], dst: str) -> None:
    """Copies the HF metadata files (``gf_jax.hf.METADATA_FILES``: config, generation config,
    tokenizer files; no weights) of ``source_dirs`` into ``dst``; the first directory holding a
    file gives it."""
    paths.makedirs(dst)
    for name in METADATA_FILES:
        target = paths.join(dst, name)
        source = next((os.path.join(d, name) for d in source_dirs if os.path.isfile(os.path.join(d, name))), None)
        if source is not None and not paths.exists(target):
            paths.copy_file(source, target)
