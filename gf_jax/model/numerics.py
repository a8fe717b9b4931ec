"""Pure numerics of the decoder: RMSNorm and rotary position embeddings (plain and scaled).

Shapes: B batch, T length, D d_model, N heads, H head_dim, Hh = H / 2 rotary frequencies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gf_jax.model.config import ModelConfig


def rms_norm(x_BxTxD, scale_D, eps: float, dtype):
    """RMSNorm in float32 (LLaMA): ``x / sqrt(mean(x^2) + eps) * scale``, returned in ``dtype``."""
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(jnp.float32)).astype(dtype)


def rope_inv_freq(config: ModelConfig):
    """Scaled inverse frequencies ``inv_freq_Hh`` (float32 numpy) of ``config.rope_scaling``,
    or None for plain RoPE (then :func:`apply_rope` computes them as it always has).

    ``linear`` divides every frequency by the factor (positions / factor). ``llama3``
    (LLaMA-3.1/3.2, HF ``modeling_rope_utils``) divides only the long wavelengths
    (> original_len / low_freq_factor) by the factor, keeps the short ones
    (< original_len / high_freq_factor) and interpolates smoothly in between.
    """
    if config.rope_scaling == "none":
        return None
    h = config.resolved_head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    low, high, old_len = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, theta: float, inv_freq_Hh=None):
    """Rotary embedding, rotate-half convention (HF LLaMA): pairs are (i, i + H/2).

    Angle of pair i at position p is ``p * theta ** (-2i / H)``, or ``p * inv_freq_Hh[i]`` when
    scaled frequencies are given (:func:`rope_inv_freq`). Computed in float32.
    """
    h = x_BxTxNxH.shape[-1]
    if inv_freq_Hh is None:
        inv_freq_Hh = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BxTxHh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Hh
    cos = jnp.cos(angle_BxTxHh)[:, :, None, :]
    sin = jnp.sin(angle_BxTxHh)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)

