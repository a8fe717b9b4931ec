"""Documents to token arrays, and the checks that tokens fit the model and the evaluation."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from gf_jax.data.sources import Document


def tokenize_documents(docs: Sequence[Document], tokenizer, add_bos: bool = True, add_eos: bool = True,
                       *, chunk: int = 2048) -> list[np.ndarray]:
    """int32 token arrays of the documents (BOS/EOS as asked), with progress on large inputs."""
    out: list[np.ndarray] = []
    bar = None
    if len(docs) > 20 * chunk:
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
                         f"{model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size} or use a smaller "
                         "tokenizer.")


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
