"""Hugging Face ``config.json`` <-> :class:`gf_jax.model.ModelConfig`.

Read from the architectures' published definitions (transformers ``configuration_llama.py``,
``configuration_mistral.py``, ``configuration_qwen2.py``, ``configuration_qwen3.py``,
``modeling_rope_utils.py``). Two dialects exist: transformers 4 writes ``rope_theta`` /
``rope_scaling`` / ``torch_dtype`` at the top level, transformers 5 writes ``rope_parameters``
(theta and scaling together) and ``dtype``; both are read. Anything the model cannot represent
fails with one sentence naming the field and its value.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gf_jax.model import ModelConfig

# Architecture -> model_type; the model_type also stands in when "architectures" is missing.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# transformers' per-architecture defaults for keys a config.json may leave out.
_DEFAULT_THETA = 10000.0
_DEFAULT_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "qwen3": 1e-6}
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def read_config(hf_dir: str) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir!r} has no config.json; pass a Hugging Face model directory.")
    with open(path) as f:
        return json.load(f)


def _unsupported(field: str, value: Any, what: str) -> ValueError:
    return ValueError(f"config.json has {field}={value!r}, which gf_jax cannot import ({what}).")


def model_type_of(hf: dict) -> str:
    """``llama``/``mistral``/``qwen2``/``qwen3``, or a ValueError naming the architecture."""
    archs = hf.get("architectures") or []
    if archs:
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise _unsupported("architectures", archs, f"supported: {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise _unsupported("model_type", model_type, f"supported: {', '.join(ARCHITECTURES.values())}")
    return model_type


def rope_settings(hf: dict) -> dict:
    """ModelConfig's RoPE fields from either dialect (``rope_parameters`` or ``rope_theta`` +
    ``rope_scaling``)."""
    params = hf.get("rope_parameters")
    if params is not None:
        theta, scaling, where = params.get("rope_theta", _DEFAULT_THETA), params, "rope_parameters"
    else:
        theta, scaling, where = hf.get("rope_theta", _DEFAULT_THETA), hf.get("rope_scaling") or {}, "rope_scaling"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported("partial_rotary_factor", partial, "only full rotary embeddings are supported")
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(scaling["factor"])}
    if rope_type == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_max_len": int(scaling["original_max_position_embeddings"])}
    raise _unsupported(f"{where}.rope_type", rope_type, "supported: default, linear, llama3")


def _check_supported(hf: dict, model_type: str) -> None:
    for key in _MOE_KEYS:
        if hf.get(key):
            raise _unsupported(key, hf[key], "mixture-of-experts models are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "only SwiGLU with silu is supported")
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias", hf["mlp_bias"], "MLP biases are not supported")
    # Llama's and Qwen3's attention_bias puts a bias on o_proj as well, which gf_jax lacks;
    # Qwen2 always has q/k/v biases and no o_proj bias.
    if model_type in ("llama", "qwen3", "mistral") and hf.get("attention_bias"):
        raise _unsupported("attention_bias", hf["attention_bias"], "the o_proj bias is not supported")


def _sliding_window(hf: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return hf.get("sliding_window")
    return None


def checkpoint_dtype(hf: dict) -> str:
    """The weights' dtype the config declares (``dtype`` or ``torch_dtype``; float32 if neither)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in _DTYPE_NAMES:
        raise _unsupported("torch_dtype", name, "supported: float32, bfloat16, float16")
    return _DTYPE_NAMES[name]


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """The ModelConfig of a HF config dict; ``overrides`` set non-architecture fields (``param_dtype``,
    ``dtype``, ``remat``, ``attention``, ``max_seq_len``). ``param_dtype`` defaults to the checkpoint's."""
    model_type = model_type_of(hf)
    _check_supported(hf, model_type)
    n_heads = int(hf["num_attention_heads"])
    window = _sliding_window(hf, model_type)
    max_len = int(overrides.pop("max_seq_len", hf.get("max_position_embeddings", 2048)))
    if window is not None:
        max_len = min(max_len, int(window))  # equal to full attention within the window
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") is not None else None,
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=max_len,
        norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS[model_type])),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=int(window) if window is not None else None,
        param_dtype=checkpoint_dtype(hf),
        **rope_settings(hf),
    )
    return ModelConfig(**{**fields, **overrides})


def _rope_scaling_dict(config: ModelConfig) -> dict | None:
    if config.rope_scaling == "none":
        return None
    out = {"rope_type": config.rope_scaling, "factor": config.rope_scaling_factor}
    if config.rope_scaling == "llama3":
        out.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                   original_max_position_embeddings=config.rope_original_max_len)
    return out


def architecture_for(config: ModelConfig) -> str:
    """The HF architecture that computes exactly what ``config`` computes."""
    if config.qkv_bias and config.qk_norm:
        raise ValueError("a model with both model.qkv_bias and model.qk_norm has no Hugging Face "
                         "architecture; export a model with at most one of them.")
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    if config.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def hf_config_from_model(config: ModelConfig, *, dtype: str, special_ids: dict,
                         base: dict | None = None) -> dict:
    """A ``config.json`` dict (transformers-4 dialect, which transformers 5 also reads).

    ``base``: the config.json a model was imported from; its architecture and every key gf_jax
    does not model are kept, the architecture keys are rewritten from ``config``.
    ``special_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (None to leave out).
    """
    arch = (base.get("architectures") or [None])[0] if base else None
    arch = arch or architecture_for(config)
    out = dict(base or {"architectures": [arch], "model_type": ARCHITECTURES[arch], "hidden_act": "silu"})
    for key in ("rope_parameters", "dtype"):
        out.pop(key, None)  # rewritten below in the transformers-4 dialect
    out.update(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim,
        max_position_embeddings=out.get("max_position_embeddings", config.max_seq_len),
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=_rope_scaling_dict(config),
        tie_word_embeddings=config.tie_embeddings,
        torch_dtype=dtype,
    )
    if ARCHITECTURES[arch] in ("llama", "qwen3"):
        out.update(attention_bias=False)
    if ARCHITECTURES[arch] == "llama":
        out.update(mlp_bias=False)
    out.update({k: v for k, v in special_ids.items() if v is not None})
    return out
