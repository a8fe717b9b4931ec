"""gf_jax: Goldfish loss for JAX/Flax.

``import gf_jax`` then ``gf_jax.loss_fn(...)`` (a codebase's own ``loss_fn`` closure keeps its
name) needs nothing but JAX; the model, data, training and evaluation modules (flax, optax, orbax,
sentencepiece, tfds) are imported only when you import them (``gf_jax.model``, ``gf_jax.train``, ...).
"""

from gf_jax.goldfish import (
    GoldfishConfig,
    goldfish_mask,
    positions_from_bos,
    positions_from_segment_ids,
)
from gf_jax.loss import (
    LossSums,
    TokenTerms,
    chunked_goldfish_sums,
    chunked_goldfish_terms,
    chunked_loss_fn,
    goldfish_sums,
    goldfish_terms,
    loss_fn,
    summarize,
)

__all__ = [
    "GoldfishConfig", "goldfish_mask", "positions_from_bos", "positions_from_segment_ids",
    "loss_fn", "chunked_loss_fn", "goldfish_sums", "chunked_goldfish_sums", "goldfish_terms",
    "chunked_goldfish_terms", "LossSums", "TokenTerms", "summarize",
]
__version__ = "0.1.0"
