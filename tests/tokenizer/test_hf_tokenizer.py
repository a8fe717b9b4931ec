"""Hugging Face tokenizers: ids equal transformers' (recorded in the fixtures), exact round trips,
special ids from the tokenizer/generation/model configs, one ``Tokenizer.load`` for all kinds."""

import json
import os
import shutil

import helpers
import pytest

from gf_jax.tokenizer import load_tokenizer
from gf_jax.tokenizer.hf_tokenizer import HFTokenizer, special_ids

FIXTURES = helpers.HF_FIXTURES


def reference(name):
    with open(os.path.join(FIXTURES, "reference", f"{name}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "qwen3"])
def test_tokenizer_json_ids_equal_transformers(name):
    tok = load_tokenizer(os.path.join(FIXTURES, name))
    assert isinstance(tok, HFTokenizer)
    ref = reference(name)
    assert tok.encode(ref["texts"]) == ref["ids"]
    assert tok.decode(ref["ids"]) == ref["decoded"]
    want = {k: (-1 if v is None else v) for k, v in ref["special_ids"].items()}
    assert (tok.bos_id, tok.eos_id) == (want["bos"], want["eos"])
    assert tok.pad_id == (want["pad"] if want["pad"] >= 0 else want["eos"])


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_byte_level_bpe_round_trips_exactly(name):
    tok = load_tokenizer(os.path.join(FIXTURES, name))
    texts = reference(name)["texts"]
    assert tok.decode(tok.encode(texts)) == texts


def test_sentencepiece_only_directory_gives_the_sentencepiece_tokenizer():
    tok = load_tokenizer(os.path.join(FIXTURES, "llama2"))
    assert not isinstance(tok, HFTokenizer) and tok.path.endswith("tokenizer.model")
    ref = reference("llama2")
    # transformers' LlamaTokenizer drops one of several *leading* spaces that sentencepiece keeps;
    # on text that does not start with whitespace the ids agree.
    for text, ids in zip(ref["texts"], ref["ids"]):
        if not text[:1].isspace():
            assert tok.encode([text])[0] == ids
    assert tok.decode(tok.encode(ref["texts"])) == ref["texts"]
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_bos_eos_framing_and_missing_bos():
    qwen = load_tokenizer(os.path.join(FIXTURES, "qwen3"))
    assert qwen.encode_arrays(["hi"], add_eos=True)[0].tolist() == qwen.encode(["hi"])[0] + [qwen.eos_id]
    with pytest.raises(ValueError, match="names no BOS token; set data.add_bos=false"):
        qwen.encode_arrays(["hi"], add_bos=True)


def test_a_tokenizer_json_under_any_name_is_recognised(tmp_path):
    src = os.path.join(FIXTURES, "llama3")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), tmp_path)
    os.rename(tmp_path / "tokenizer.json", tmp_path / "tokenizer.model")  # as a trainer may copy it
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert isinstance(tok, HFTokenizer) and tok.bos_id == reference("llama3")["special_ids"]["bos"]


def test_special_ids_precedence(tmp_path):
    vocab = {"<a>": 5, "<b>": 6}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<a>"}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<b>", "pad_token": "<b>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 10], "bos_token_id": 7}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 8, "pad_token_id": 3}))
    assert special_ids(str(tmp_path), vocab.get) == {"bos": 7, "eos": 5, "pad": 6}


def test_directory_without_tokenizer_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
