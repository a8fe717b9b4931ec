"""gf_jax: Goldfish loss for JAX/Flax.

``from gf_jax import GoldfishConfig, goldfish_mask, loss_fn`` needs nothing but JAX; the model,
data, training and evaluation modules (flax, optax, orbax, sentencepiece, tfds) are imported only
when you import them (``gf_jax.model``, ``gf_jax.train``, ...).
"""

from gf_jax.goldfish import (
    GoldfishConfig,
    chunked_loss_fn,
    goldfish_mask,
    loss_fn,
    summarize,
)

__all__ = ["GoldfishConfig", "goldfish_mask", "loss_fn", "chunked_loss_fn", "summarize"]
__version__ = "0.1.0"
