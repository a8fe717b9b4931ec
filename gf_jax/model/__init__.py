"""The LLaMA-family decoder and what runs it on devices.

Modules: ``config`` (ModelConfig, LoRAConfig), ``transformer`` (the Flax NNX modules), ``numerics``
(RMSNorm, RoPE), ``attention`` (reference path and fused kernels), ``lora`` (adapters inside the
modules), ``layers`` (the unrolled and stacked block layouts of a state), ``transforms`` (relayout,
merged adapters), ``sharding`` (mesh and logical-axis rules), ``generate`` (greedy and beam decoding
with a KV cache), ``counting`` (parameters, FLOPs per token). Imports only the core below it.
"""

from gf_jax.model.config import LoRAConfig, ModelConfig
from gf_jax.model.counting import flops_per_token, param_count
from gf_jax.model.transformer import Transformer

__all__ = ["ModelConfig", "LoRAConfig", "Transformer", "param_count", "flops_per_token"]
