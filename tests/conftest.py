"""Test set-up: 8 simulated CPU devices (set before JAX initialises its backends)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


def corpus_tokenizer_path(config, tmp_path_factory) -> str:
    """A tokenizer trained on ``config``'s corpus in a fresh cache (shared by the trainer tests)."""
    import dataclasses

    from gf_jax.tokenizer import corpus_tokenizer

    cache = str(tmp_path_factory.mktemp("tokenizers"))
    return corpus_tokenizer(dataclasses.replace(config.data, tokenizer_cache_dir=cache)).path
