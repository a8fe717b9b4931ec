"""Hugging Face import: logits and greedy continuations equal transformers' on the saved fixtures
(tests/fixtures/hf, made by scripts/make_hf_fixtures.py), both config dialects, and every
unsupported feature refused in one sentence."""

import json
import os
import shutil

import helpers
import jax.numpy as jnp
import numpy as np
import pytest

from gf_jax.hf import config as hf_config
from gf_jax.hf import load as hf_load
from gf_jax.model import ModelConfig
from gf_jax.model.generate import generate

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.hf.config",
    "gf_jax.hf.safetensors_io",
    "gf_jax.hf.weights",
)

FIXTURES = helpers.HF_FIXTURES
NAMES = ["llama3", "llama2", "mistral", "qwen2", "qwen3"]


def fixture(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    return np.load(os.path.join(FIXTURES, "reference", f"{name}.npz"))


def load(name, **overrides):
    config = hf_config.model_config_from_hf(hf_config.read_config(fixture(name)), param_dtype="float32",
                                            attention="xla", **overrides)
    return hf_load.load_model(fixture(name), config), config


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_continuations_equal_transformers(name):
    model, _ = load(name)
    ref = reference(name)
    prompts = [ref[f"prompt_{i}"].tolist() for i in range(3)]
    for i, prompt in enumerate(prompts):
        logits_TxV = np.asarray(model(jnp.asarray([prompt]))[0], np.float32)
        np.testing.assert_allclose(logits_TxV, ref[f"logits_{i}"], atol=1e-4, rtol=0)
    out = generate(model, prompts, max_new_tokens=len(ref["greedy_0"]))  # KV-cache decoding
    for i in range(3):
        assert out.tokens[i].tolist() == ref[f"greedy_{i}"].tolist()


def test_architecture_features_are_read():
    cfgs = {n: hf_config.model_config_from_hf(hf_config.read_config(fixture(n))) for n in NAMES}
    assert cfgs["llama3"].rope_scaling == "llama3" and cfgs["llama3"].rope_original_max_len == 64
    assert not cfgs["llama3"].tie_embeddings and cfgs["llama2"].tie_embeddings
    assert cfgs["llama2"].rope_scaling == "linear" and cfgs["llama2"].rope_scaling_factor == 2.0
    assert cfgs["mistral"].param_dtype == "bfloat16" and cfgs["mistral"].sliding_window == 4096
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].param_dtype == "float16"
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].resolved_head_dim == 32 != cfgs["qwen3"].d_model // 4


def test_both_config_dialects_give_the_same_model_config():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    v4 = {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}, "torch_dtype": "bfloat16"}
    v4_old = {**v4, "rope_scaling": {"type": "llama3", **scaling}}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}, "dtype": "bfloat16"}
    configs = [hf_config.model_config_from_hf(c) for c in (v4, v4_old, v5)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_theta == 5e5 and configs[0].param_dtype == "bfloat16"


def test_default_model_config_is_plain_llama():
    c = ModelConfig()
    assert (c.qkv_bias, c.qk_norm, c.rope_scaling, c.sliding_window) == (False, False, "none", None)


def _llama(**extra):
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 128, **extra}


@pytest.mark.parametrize("extra, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architectures=\['GPT2LMHeadModel'\]"),
    ({"architectures": ["MixtralForCausalLM"]}, r"architectures=\['MixtralForCausalLM'\]"),
    ({"num_local_experts": 8}, r"num_local_experts=8.*mixture-of-experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling\.rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, r"rope_parameters\.rope_type='dynamic'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"mlp_bias": True}, r"mlp_bias=True"),
    ({"attention_bias": True}, r"attention_bias=True.*o_proj"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ({"torch_dtype": "int8"}, r"torch_dtype='int8'"),
])
def test_unsupported_features_fail_in_one_sentence_naming_the_field(extra, match):
    with pytest.raises(ValueError, match=match) as e:
        hf_config.model_config_from_hf(_llama(**extra))
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(").")


def test_mistral_window_caps_the_sequence_length():
    mistral = _llama(architectures=["MistralForCausalLM"], sliding_window=64)
    assert hf_config.model_config_from_hf(mistral).max_seq_len == 64
    with pytest.raises(ValueError, match=r"model\.max_seq_len \(128\) exceeds model\.sliding_window \(64\)"):
        ModelConfig(max_seq_len=128, sliding_window=64)


def test_pickle_weights_are_refused_without_being_opened(tmp_path):
    shutil.copy(os.path.join(fixture("llama2"), "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle that anyone should open")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loads.*convert them to safetensors"):
        load_dir(str(tmp_path))


def load_dir(path):
    config = hf_config.model_config_from_hf(hf_config.read_config(path), param_dtype="float32")
    return hf_load.load_model(path, config)


def _edited_copy(tmp_path, name, edit):
    from gf_jax.hf.safetensors_io import SafetensorsReader, write_file

    out = tmp_path / name
    shutil.copytree(fixture(name), out)
    reader = SafetensorsReader(str(out))
    tensors = {n: np.array(reader.view(n)) for n in reader.names()}
    edit(tensors)
    for f in os.listdir(out):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(out / f)
    write_file(str(out / "model.safetensors"), [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])
    return str(out)


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    missing = _edited_copy(tmp_path, "llama3", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_dir(missing)
    (tmp_path / "x").mkdir()
    extra = _edited_copy(tmp_path / "x", "llama3",
                         lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(48, np.float32)}))
    with pytest.raises(ValueError, match=r"has tensor model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_dir(extra)


def test_missing_config_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf_config.read_config(str(tmp_path))


def test_reference_fixtures_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIXTURES) for f in fs)
    assert total < 2 * 1024 * 1024
    with open(os.path.join(FIXTURES, "reference", "llama3.json")) as f:
        assert json.load(f)["min_greedy_margin"] > 1e-3  # greedy ties cannot flip on rounding


@pytest.mark.parametrize("keep", [5, 40, -1000])  # inside the length, inside the header, inside the tensors
def test_a_truncated_safetensors_file_is_one_sentence_naming_it(tmp_path, keep):
    copy = tmp_path / "llama3"
    shutil.copytree(fixture("llama3"), copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or not a safetensors file .*; download "
                                         r"or export it again\.") as info:
        load_dir(str(copy))
    assert str(copy) in str(info.value) and "\n" not in str(info.value)
