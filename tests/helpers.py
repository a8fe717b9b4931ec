"""What several test modules share: where the repository and its fixtures are, and tokenizers
trained once per module (importable from any test folder: ``pythonpath`` in pyproject.toml)."""

import dataclasses
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
HF_FIXTURES = os.path.join(FIXTURES, "hf")
SHAKESPEARE = os.path.join(REPO, "data", "tinyshakespeare.txt")


def corpus_tokenizer_path(config, tmp_path_factory) -> str:
    """A tokenizer trained on ``config``'s corpus in a fresh cache (shared by the trainer tests)."""
    from gf_jax.data import corpus_tokenizer

    cache = str(tmp_path_factory.mktemp("tokenizers"))
    return corpus_tokenizer(dataclasses.replace(config.data, tokenizer_cache_dir=cache)).path


def shakespeare_tokenizer(tmp_path_factory):
    """A 330-piece tokenizer of the first 60,000 characters of the embedded Tiny Shakespeare."""
    from gf_jax.tokenizer import cached_tokenizer

    with open(SHAKESPEARE, encoding="utf-8") as fh:
        text = fh.read()[:60_000]
    return cached_tokenizer([text], 330, str(tmp_path_factory.mktemp("tok")), verbose=False)
