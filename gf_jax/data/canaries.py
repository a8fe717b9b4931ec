"""Canaries: documents inserted ``canary_repeats`` times at seeded places into the training stream.

``document_stream(config)`` is the stream every process cuts its share from; its
``canary_record`` says where each copy went. Held-out canaries (after ``canary_count``) are the
non-members of a membership test and never enter the stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from gf_jax.data.config import DataConfig
from gf_jax.data.sources import Document, read_background, read_jsonl_documents, read_text_documents

CANARY_PREFIX = "canary/"


def load_canaries(config: DataConfig) -> tuple[list[Document], list[Document]]:
    """(injected, held_out) canary documents, ids prefixed with ``canary/``.

    The first ``canary_count`` documents of ``canary_path`` are injected (members); the rest are
    held out (non-members of the same distribution). Empty lists when no canary path is set.
    """
    if not config.canary_path:
        return [], []
    if config.canary_path.endswith(".jsonl"):
        docs = read_jsonl_documents(config.canary_path, config.text_field, config.id_field, what="data.canary_path")
    else:
        docs = read_text_documents(config.canary_path, config.canary_split_rule, what="data.canary_path")
    if not docs:
        raise ValueError(f"no canary documents found in {config.canary_path!r}; check data.canary_path.")
    docs = [Document(CANARY_PREFIX + d.id, d.text) for d in docs]
    count = len(docs) if config.canary_count is None else config.canary_count
    if not 0 <= count <= len(docs):
        raise ValueError(f"data.canary_count={config.canary_count} but {config.canary_path!r} has only "
                         f"{len(docs)} documents; lower data.canary_count.")
    return docs[:count], docs[count:]


def canary_places(num_background: int, num_canaries: int, repeats: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(places_Y, canary_Y), K = num_canaries * repeats: the sorted stream indices holding a canary
    copy and which canary each holds. Memory O(K), not O(stream): the tokenized store locates
    background documents around these places at any corpus size."""
    total = num_background + num_canaries * repeats
    rng = np.random.default_rng([seed, 0xCA7A21])
    places_Y = np.sort(rng.choice(total, size=num_canaries * repeats, replace=False)).astype(np.int64)
    canary_Y = rng.permutation(np.repeat(np.arange(num_canaries), repeats)).astype(np.int64)
    return places_Y, canary_Y


def canary_plan(num_background: int, num_canaries: int, repeats: int, seed: int) -> np.ndarray:
    """Stream layout: entry ``j >= 0`` is background document j (in order); ``-(c+1)`` is canary c.

    Each canary appears ``repeats`` times at uniformly random places (seeded); the background
    keeps its order.
    """
    places_Y, canary_Y = canary_places(num_background, num_canaries, repeats, seed)
    plan = np.empty(num_background + len(places_Y), np.int64)
    is_canary = np.zeros(len(plan), bool)
    is_canary[places_Y] = True
    plan[~is_canary] = np.arange(num_background)
    plan[places_Y] = -1 - canary_Y
    return plan


def stream_refs(stream_range: range, places_Y: np.ndarray, canary_Y: np.ndarray) -> np.ndarray:
    """``canary_plan(...)[stream_range]`` computed from the canary places alone: background document
    j as j >= 0, canary c as -(c+1). Memory O(len(stream_range) + K)."""
    index_U = np.arange(stream_range.start, stream_range.stop, dtype=np.int64)
    before_U = np.searchsorted(places_Y, index_U)  # canary copies at smaller stream indices
    hit_U = before_U < len(places_Y)
    hit_U[hit_U] = places_Y[before_U[hit_U]] == index_U[hit_U]
    refs_U = index_U - before_U
    refs_U[hit_U] = -1 - canary_Y[before_U[hit_U]]
    return refs_U


_WORD_OR_SPACE = re.compile(r"\S+|\s+")


def perturb(text: str, rate: float, rng: np.random.Generator, vocabulary: Sequence[str], noise: bool = False) -> str:
    """A near-duplicate of ``text``: each word is, with probability ``rate / 100``, replaced by a
    word of ``vocabulary`` or followed by an inserted one (equally likely); with ``noise`` each word
    also has that chance of a case change and each space of being doubled. Seeded by ``rng``."""
    p = rate / 100.0
    out = []
    for part in _WORD_OR_SPACE.findall(text):
        if part.isspace():
            out.append(part + " " if noise and rng.random() < p else part)
            continue
        if rng.random() < p:
            word = vocabulary[int(rng.integers(len(vocabulary)))]
            part = word if rng.random() < 0.5 else f"{part} {word}"
        if noise and rng.random() < p:
            part = part.swapcase()
        out.append(part)
    return "".join(out)


class DocumentStream(Sequence):
    """The training stream: background documents with canary copies inserted (lazily indexed).

    ``canary_record`` maps each injected canary id to its stream indices (``repeats`` of them).
    With ``perturb_rate`` > 0 every copy is its own near-duplicate of the canary (``perturb``,
    seeded by the canary and the copy's number), as templated or lightly edited text is.
    """

    def __init__(self, background: Sequence[Document], canaries: Sequence[Document] = (), repeats: int = 0,
                 seed: int = 0, perturb_rate: float = 0.0, perturb_noise: bool = False):
        self.background = background
        self.canaries = list(canaries) if repeats else []
        self.plan = canary_plan(len(background), len(self.canaries), repeats, seed) if self.canaries else None
        self.canary_record: dict[str, list[int]] = {}
        self._copies: dict[int, Document] = {}
        if self.plan is not None:
            for where in np.flatnonzero(self.plan < 0):
                self.canary_record.setdefault(self.canaries[-1 - self.plan[where]].id, []).append(int(where))
        if self.plan is not None and perturb_rate > 0:
            vocabulary = sorted({w for c in self.canaries for w in c.text.split()})
            for c, canary in enumerate(self.canaries):
                for copy, where in enumerate(self.canary_record[canary.id]):
                    rng = np.random.default_rng([seed, c, copy])
                    self._copies[where] = Document(canary.id, perturb(canary.text, perturb_rate, rng, vocabulary,
                                                                      perturb_noise))

    def __len__(self) -> int:
        return len(self.background) if self.plan is None else len(self.plan)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.get_many(range(*index.indices(len(self))))
        j = index if self.plan is None else int(self.plan[index])
        return self.background[j] if j >= 0 else self._copies.get(int(index), self.canaries[-1 - j])

    def get_many(self, indices: Sequence[int]) -> list[Document]:
        """Documents at ``indices``, reading background records in one call where the source allows."""
        indices = [int(i) for i in indices]
        refs = indices if self.plan is None else [int(self.plan[i]) for i in indices]
        wanted = [j for j in refs if j >= 0]
        if hasattr(self.background, "get_many"):
            fetched = dict(zip(wanted, self.background.get_many(wanted)))
        else:
            fetched = {j: self.background[j] for j in wanted}
        return [fetched[j] if j >= 0 else self._copies.get(i, self.canaries[-1 - j]) for i, j in zip(indices, refs)]


def document_stream(config: DataConfig) -> DocumentStream:
    """Background documents of ``config`` with its canaries injected (every split)."""
    injected, _ = load_canaries(config)
    return DocumentStream(read_background(config), injected, config.canary_repeats, config.canary_seed,
                          config.canary_perturb_rate, config.canary_perturb_noise)
