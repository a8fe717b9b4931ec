"""Loading any tokenizer gf_jax reads: a sentencepiece ``.model``, a ``tokenizer.json``, a Hugging
Face model directory (its ``tokenizer.json``, else its ``tokenizer.model``), local or a URL."""

from __future__ import annotations

import os

from gf_jax.tokenizer.hf_tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, HFTokenizer, is_tokenizer_json
from gf_jax.tokenizer.interface import Tokenizer
from gf_jax.tokenizer.sentencepiece_model import SentencePieceTokenizer
from gf_jax.util import paths


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at ``path``; a missing or unreadable one is one sentence naming it."""
    path = os.fspath(path)
    if paths.is_url(path) and paths.exists(path):  # e.g. gs://bucket/run/tokenizer.model
        path = paths.localize(path)
    if os.path.isdir(path):
        return load_directory(path)
    if is_tokenizer_json(path):
        return HFTokenizer(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer model {path!r} does not exist; set data.tokenizer to a sentencepiece "
            ".model file, or to null to train one on the corpus."
        )
    return SentencePieceTokenizer.load(path)


def load_directory(directory: str):
    """The tokenizer of a Hugging Face directory: ``tokenizer.json`` if present (what
    ``AutoTokenizer`` uses), else the sentencepiece ``tokenizer.model``."""
    json_path = os.path.join(directory, TOKENIZER_JSON)
    if os.path.isfile(json_path):
        return HFTokenizer(json_path)
    sp_path = os.path.join(directory, SENTENCEPIECE_MODEL)
    if os.path.isfile(sp_path):
        return SentencePieceTokenizer.load(sp_path)
    raise FileNotFoundError(f"{directory!r} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}; "
                            "point the tokenizer setting at a directory or file that has one.")
