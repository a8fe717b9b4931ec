"""Tokenizers: one interface (``interface.Tokenizer``), two kinds behind it, and training.

    tokenizer = load_tokenizer("runs/tiny/tokenizer.model")   # or a tokenizer.json, or an HF directory
    ids = tokenizer.encode(["To be, or not to be"])[0]

Modules: ``interface`` (the Protocol and its shared helpers), ``sentencepiece_model``
(``SentencePieceTokenizer``), ``hf_tokenizer`` (``HFTokenizer`` over a ``tokenizer.json`` with its
special-token files), ``loading`` (``load_tokenizer``), ``training`` (a sentencepiece model trained
on a corpus, cached), ``cli`` (``python -m gf_jax.tokenizer train``). The tokenizer a run config
means (trained on its corpus when none is set): ``gf_jax.data.tokens.corpus_tokenizer``.
"""

from gf_jax.tokenizer.hf_tokenizer import HFTokenizer
from gf_jax.tokenizer.interface import Tokenizer
from gf_jax.tokenizer.loading import load_tokenizer
from gf_jax.tokenizer.sentencepiece_model import SentencePieceTokenizer
from gf_jax.tokenizer.training import cached_tokenizer, train_from_texts, train_tokenizer

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "cached_tokenizer",
           "train_from_texts", "train_tokenizer"]
