"""Counting: parameters of a model and its training FLOPs per token (for MFU).

The FLOP count follows PaLM (appendix B), as MaxText and levanter do, so MFU figures compare
with theirs. A model with LoRA adapters trains the adapters alone: its count drops the frozen
weights' gradient matmuls and adds the adapters'.
"""

from __future__ import annotations

from gf_jax.model.config import ModelConfig


def _block_matmul_params(config: ModelConfig) -> int:
    d, h = config.d_model, config.resolved_head_dim
    attn = d * h * (2 * config.n_heads + 2 * config.n_kv_heads)  # wq, wo, wk, wv
    mlp = 3 * d * config.d_ff
    return attn + mlp


def param_count(config: ModelConfig) -> int:
    """Number of trainable parameters (embedding, blocks, norms, and the head unless tied)."""
    h = config.resolved_head_dim
    per_block = _block_matmul_params(config) + 2 * config.d_model
    per_block += (config.n_heads + 2 * config.n_kv_heads) * h if config.qkv_bias else 0
    per_block += 2 * h if config.qk_norm else 0
    head = 0 if config.tie_embeddings else config.d_model * config.vocab_size
    return config.vocab_size * config.d_model + config.n_layers * per_block + config.d_model + head


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """``12 * n_layers * n_heads * head_dim * seq_len``: QK^T and PV, forward and backward, over
    the full T x T square (no causal discount), as PaLM and MaxText count them."""
    return float(12 * config.n_layers * config.n_heads * config.resolved_head_dim * seq_len)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: ``6 N + 12 L N_h H T``.

    N counts the parameters that take part in matmuls: every block weight and the output head
    (tied or not; the embedding lookup and the norms cost no matmul). With ``model.lora`` only the
    adapters train: the frozen weights get no weight gradient (2 of their 6 FLOPs per parameter
    are skipped) and every adapter of an ``I x O`` projection costs ``6 (I + O) r``.
    """
    n_matmul = config.n_layers * _block_matmul_params(config) + config.d_model * config.vocab_size
    attention = attention_flops_per_token(config, seq_len)
    if not config.lora.enabled:
        return float(6 * n_matmul + attention)
    return float(4 * n_matmul + attention + 6 * _adapter_params(config))


def _adapter_params(config: ModelConfig) -> int:
    """Parameters of every LoRA adapter (``(I + O) r`` per targeted projection and layer)."""
    h, f, d, n, k = config.resolved_head_dim, config.d_ff, config.d_model, config.n_heads, config.n_kv_heads
    sizes = {"q": d + n * h, "k": d + k * h, "v": d + k * h, "o": n * h + d, "gate": d + f, "up": d + f, "down": f + d}
    return config.n_layers * config.lora.rank * sum(sizes[t] for t in config.lora.targets)
