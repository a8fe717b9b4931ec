"""``ModelConfig`` (the ``model:`` section) and ``LoRAConfig`` (``model.lora``): the decoder's
architecture, dtypes and memory policy, and the adapters trained on it.

Fields made with ``architecture_field`` fix the parameters' shapes or meaning: a checkpoint is
resumed, and a pretrained model started from, only under the same values (``ARCHITECTURE_FIELDS``).
The others (dtypes, remat, attention kernel, max_seq_len, scan_layers) may change between runs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from gf_jax.util.settings import architecture_field, architecture_fields, check_choices, choices

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
AttentionKind = Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"]
# Projections an adapter can target: q k v o of attention, gate up down of the MLP.
LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "down"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``model.lora`` section (adapters: gf_jax.model.lora).

    Attributes:
      rank: r, the adapters' inner width; 0 = no adapters (the whole model is trained).
      alpha: the update is scaled by ``alpha / rank``; null = ``rank`` (scale 1).
      targets: projections that get an adapter, among q, k, v, o, gate, up, down.
      dropout: dropout rate on each adapter's input, in training steps only.
    """

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")  # among LORA_TARGETS (checked with a hint)
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be > 0 to train adapters (0 turns LoRA off), got {self.rank}.")
        if self.rank == 0:
            changed = [f.name for f in dataclasses.fields(self) if f.name != "rank"
                       and getattr(self, f.name) != getattr(LoRAConfig, f.name)]
            if changed:
                raise ValueError(f"model.lora.{changed[0]} is set but model.lora.rank is 0 (no adapters); "
                                 "set model.lora.rank > 0 (e.g. 16) or remove the model.lora section.")
            return
        self._check_targets()
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0 (or null for alpha = rank), got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")

    def _check_targets(self) -> None:
        names = ", ".join(LORA_TARGETS)
        if not self.targets:
            raise ValueError(f"model.lora.targets is empty; list at least one of {names}.")
        for target in self.targets:
            if target not in LORA_TARGETS:
                raise ValueError(f"model.lora.targets has {target!r}, which is not a projection; choose among "
                                 f"{names} (q_proj is q, gate_proj is gate, ...).")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"model.lora.targets lists a projection twice ({list(self.targets)}); list each once.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of every adapter's update."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


LORA_TARGETS: tuple[str, ...] = LoRATarget.__args__


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, dtypes and memory policy of the decoder.

    ``param_dtype`` is the storage dtype of the weights (and of the optimizer's view of them);
    ``dtype`` is the compute dtype of matmuls and activations (``"auto"``: bfloat16 on GPU/TPU,
    float32 on CPU). Norms, RoPE and the attention softmax always run in float32.
    ``remat``: ``"none"`` keeps all activations, ``"full"`` recomputes each block in the backward
    pass, ``"save_dots"`` keeps only the weight matmul outputs
    (``jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims``), ``"minimal"`` only each
    block's attention output and MLP input. ``scan_layers`` runs the blocks as one ``lax.scan``
    over stacked weights (the policy then applies per layer inside the scan body).
    """

    vocab_size: int = architecture_field(512)
    d_model: int = architecture_field(128)
    n_layers: int = architecture_field(2)
    n_heads: int = architecture_field(4)
    n_kv_heads: int = architecture_field(2)
    head_dim: int | None = architecture_field(None)
    d_ff: int = architecture_field(384)
    max_seq_len: int = 256
    rope_theta: float = architecture_field(10000.0)
    norm_eps: float = architecture_field(1e-5)
    tie_embeddings: bool = architecture_field(False)
    param_dtype: DType = "float32"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "save_dots", "minimal"] = "none"
    # Stack the blocks into one module with a leading layer axis and run them with a scan: one
    # block is compiled instead of n_layers (compile time flat in depth); the state layout differs
    # (``layers`` instead of ``blocks``; gf_jax.model.layers converts checkpoints between the two).
    scan_layers: bool = False
    attention: AttentionKind = "auto"
    attention_block_q: int = 512    # splash attention tiles (multiples of 128; cut to divide T)
    attention_block_kv: int = 512
    init_std: float = 0.02
    # Pretrained-architecture features (gf_jax.hf imports them); the defaults are plain LLaMA.
    qkv_bias: bool = architecture_field(False)  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = architecture_field(False)  # Qwen3: RMSNorm over head_dim of each query/key head, before RoPE
    # HF rope_scaling / rope_parameters: none, linear (positions / factor) or llama3 (by wavelength).
    rope_scaling: Literal["none", "linear", "llama3"] = architecture_field("none")
    rope_scaling_factor: float = architecture_field(1.0)
    rope_low_freq_factor: float = architecture_field(1.0)  # llama3 only
    rope_high_freq_factor: float = architecture_field(4.0)  # llama3 only
    rope_original_max_len: int = architecture_field(8192)  # llama3 only: original_max_position_embeddings
    sliding_window: int | None = None  # Mistral: recorded so max_seq_len can never exceed it
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # adapters; rank 0: none

    def __post_init__(self):
        check_choices(self, "model")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}); change one of them."
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) is not divisible by model.n_heads ({self.n_heads}); "
                "change them or set model.head_dim explicitly."
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.resolved_head_dim}.")
        for name in ("attention_block_q", "attention_block_kv"):
            if getattr(self, name) <= 0 or getattr(self, name) % 128:
                raise ValueError(f"model.{name} must be a positive multiple of 128, got {getattr(self, name)!r}.")
        # Sliding-window attention is not implemented; it equals full attention while every
        # sequence fits in the window, so the window caps the sequence length instead.
        if self.sliding_window is not None and self.max_seq_len > self.sliding_window:
            raise ValueError(
                f"model.max_seq_len ({self.max_seq_len}) exceeds model.sliding_window ({self.sliding_window}), "
                "and gf_jax has no sliding-window attention; set model.max_seq_len <= the window."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        """The jnp dtype of activations; ``"auto"`` resolves against the default backend."""
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]


# Fields that fix the parameters' shapes or meaning (see the module docstring).
ARCHITECTURE_FIELDS = architecture_fields(ModelConfig)
ATTENTION_KINDS = choices(ModelConfig, "attention")
