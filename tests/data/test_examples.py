"""Instruction and chat examples: supervision masks, packing, goldfish holes, chat templates, errors."""

import json
import os
import shutil

import helpers
import numpy as np
import pytest

from gf_jax import data
from gf_jax.data import chat
from gf_jax.data.example_batches import ExampleIterator, example_eval_batches
from gf_jax.goldfish import GoldfishConfig, goldfish_mask
from gf_jax.tokenizer import load_tokenizer

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.data.chat",
    "gf_jax.data.example_batches",
)

REPO = helpers.REPO
LLAMA3 = os.path.join(REPO, "tests", "fixtures", "hf", "llama3")
LLAMA2 = os.path.join(REPO, "tests", "fixtures", "hf", "llama2")

# A template that exercises trim_blocks/lstrip_blocks, bos/eos, raise_exception and the generation
# prompt; EXPECTED_* are transformers 5.23's apply_chat_template(tokenize=False) outputs for it.
FIXTURE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}
    {{ raise_exception('unknown role ' + m['role']) }}
  {% endif %}
  <|{{ m['role'] }}|>
{{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
EXPECTED = ("<|begin_of_text|>\n  <|system|>\nBe brief.<|end_of_text|>\n  <|user|>\nHi there<|end_of_text|>\n"
            "  <|assistant|>\nHello!<|end_of_text|>\n  <|user|>\n2+2?<|end_of_text|>\n")
EXPECTED_GENERATION = EXPECTED + "<|assistant|>\n"


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def qa_records(n=12):
    return [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "completion": f" It is {2 * i}, surely."}
            for i in range(n)]


def config(path, **kw):
    return data.DataConfig(source="jsonl", path=path, format=kw.pop("format", "prompt_completion"),
                           tokenizer=LLAMA3, **kw)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LLAMA3)


def test_only_the_completion_and_eos_are_supervised(tmp_path, tok):
    cfg = config(write_jsonl(tmp_path / "qa.jsonl", qa_records(3)))
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg)
    for tokens, sup, (start, end), rec in zip(enc.tokens, enc.supervised, enc.answers, qa_records(3)):
        assert end == len(tokens) and tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and sup[-1]
        assert not sup[:start].any() and sup[start:].all()
        assert tok.decode([tokens[start:]])[0] == rec["completion"]
        assert tok.decode([tokens[:start]])[0] == rec["prompt"]


def test_train_on_prompt_supervises_everything_but_the_first_token(tmp_path, tok):
    cfg = config(write_jsonl(tmp_path / "qa.jsonl", qa_records(2)), train_on_prompt=True)
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg)
    assert all(not s[0] and s[1:].all() for s in enc.supervised)
    assert enc.answers[0][0] > 1  # the answer still starts where it does (evaluation's split)


def _goldfish_holes(batches, tok, gcfg):
    """{(example, position of target): {dropped?}} over every supervised target of the batches."""
    holes = {}
    for batch in batches:
        drop_BxT = np.asarray(goldfish_mask(batch.targets_BxT, gcfg, positions_BxT=batch.positions_BxT,
                                            context_BxC=batch.context_BxC))
        for b, t in zip(*np.nonzero(batch.weights_BxT > 0)):
            key = (int(batch.doc_ids_BxT[b, t]), int(batch.positions_BxT[b, t]) + 1)
            holes.setdefault(key, set()).add(bool(drop_BxT[b, t]))
    return holes


def test_packed_examples_are_whole_weighted_on_answers_with_the_same_goldfish_holes(tmp_path, tok):
    cfg = config(write_jsonl(tmp_path / "qa.jsonl", qa_records(12)))
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg, max_len=65)
    it = ExampleIterator(enc.tokens, enc.supervised, global_batch=4, seq_len=64, seed=3, process_index=0,
                         process_count=1, prefetch=0, with_doc_ids=True, context=16)
    batches = [it.batch(s) for s in range(4 * it.rows_per_epoch)]  # several epochs, other packings
    for batch in batches:
        for pieces in data.unpack_batch(batch):
            for first, _ in pieces:
                assert first == 0  # every example starts its row piece: never cut
        real_BxT = batch.doc_ids_BxT >= 0
        docs_BxT, pos_BxT = np.maximum(batch.doc_ids_BxT, 0), batch.positions_BxT
        expected_BxT = np.zeros(batch.weights_BxT.shape, bool)
        for b, t in zip(*np.nonzero(real_BxT)):
            d, p = docs_BxT[b, t], pos_BxT[b, t]
            expected_BxT[b, t] = p + 1 < len(enc.tokens[d]) and enc.supervised[d][p + 1]
        np.testing.assert_array_equal(batch.weights_BxT > 0, expected_BxT)
    holes = _goldfish_holes(batches, tok, GoldfishConfig(k=4, h=4))
    assert all(len(v) == 1 for v in holes.values())  # same holes wherever the example was packed
    n_supervised = sum(int(s.sum()) for s in enc.supervised)
    assert len(holes) == n_supervised  # every supervised target was seen
    dropped = sum(v == {True} for v in holes.values())
    assert 0 < dropped < n_supervised / 2


def test_packed_examples_every_epoch_holds_each_example_once():
    # Lengths that greedy packing packs into a different number of rows in a different order:
    # every epoch must still hold every example exactly once, and later epochs must not fail.
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=37)
    tokens = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
    supervised = [np.ones(n, bool) for n in lengths]
    it = ExampleIterator(tokens, supervised, global_batch=1, seq_len=48, seed=5, process_index=0,
                         process_count=1, mode="packed", prefetch=0, with_doc_ids=True)
    rows = it.rows_per_epoch
    for epoch in range(6):
        seen = [b.doc_ids_BxT for b in (it.batch(s) for s in range(epoch * rows, (epoch + 1) * rows))]
        ids_per_row = [np.unique(row[row >= 0]).tolist() for batch in seen for row in batch]
        assert sorted(i for ids in ids_per_row for i in ids) == list(range(len(tokens))), epoch
        if epoch == 0:
            first = ids_per_row
        elif epoch == 1:
            assert ids_per_row != first  # the rows come in another order


def test_prompt_targets_are_neither_kept_nor_dropped(tmp_path, tok):
    from gf_jax.loss import goldfish_sums

    cfg = config(write_jsonl(tmp_path / "qa.jsonl", qa_records(4)))
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg)
    batch = next(example_eval_batches(enc, global_batch=4, seq_len=64, pad_id=tok.pad_id, process_index=0,
                                      process_count=1))
    V = tok.vocab_size
    logits_BxTxV = np.zeros(batch.targets_BxT.shape + (V,), np.float32)
    sums = goldfish_sums(logits_BxTxV, batch.targets_BxT, GoldfishConfig(k=2, h=2), weights_BxT=batch.weights_BxT,
                         positions_BxT=batch.positions_BxT)
    n_supervised = sum(int(s.sum()) for s in enc.supervised)
    assert int(sums.n_valid) == n_supervised
    assert int(sums.n_kept) + int(sums.n_dropped) == n_supervised


def test_fixture_template_renders_like_transformers():
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    assert chat.render_chat(FIXTURE_TEMPLATE, MESSAGES, specials) == EXPECTED
    assert chat.render_chat(FIXTURE_TEMPLATE, MESSAGES, specials, add_generation_prompt=True) == EXPECTED_GENERATION
    with pytest.raises(Exception, match="unknown role robot"):
        chat.render_chat(FIXTURE_TEMPLATE, [{"role": "robot", "content": "x"}], specials)


def test_builtin_llama2_template_renders_the_published_format():
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    text = chat.render_chat(chat.BUILTIN_TEMPLATES["llama2"], MESSAGES[:3] + [MESSAGES[3]], specials)
    # The system block is prepended before strip(), so the user text keeps its leading space.
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST] Hello! </s><s>[INST] 2+2? [/INST]"


def _hf_dir_with_template(tmp_path, template):
    d = tmp_path / "tok"
    shutil.copytree(LLAMA3, d)
    cfg_path = d / "tokenizer_config.json"
    values = json.loads(cfg_path.read_text())
    values["chat_template"] = template
    cfg_path.write_text(json.dumps(values))
    return str(d)


def test_chat_examples_supervise_assistant_turns_with_the_tokenizers_template(tmp_path):
    tok_dir = _hf_dir_with_template(tmp_path, FIXTURE_TEMPLATE)
    convo = MESSAGES + [{"role": "assistant", "content": "Four."}]
    cfg = data.DataConfig(source="jsonl", path=write_jsonl(tmp_path / "c.jsonl", [{"messages": convo}]),
                          format="chat", tokenizer=tok_dir)
    tok = load_tokenizer(tok_dir)
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg)
    tokens, sup = enc.tokens[0], enc.supervised[0]
    # This template's generation prompt lacks the turn's indentation, so the header is supervised too.
    runs = np.split(np.arange(len(tokens)), np.flatnonzero(np.diff(sup.astype(int))) + 1)
    supervised_texts = [tok.decode([tokens[r]])[0] for r in runs if sup[r[0]]]
    assert supervised_texts == ["  <|assistant|>\nHello!\n", "  <|assistant|>\nFour.\n"]  # EOS decodes to ""
    assert tok.decode([tokens])[0] == tok.decode([tok.encode([EXPECTED])[0]])[0] + "  <|assistant|>\nFour.\n"


def test_chatml_spans_are_the_replies_and_their_end_markers():
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    text, spans = chat.assistant_spans(chat.BUILTIN_TEMPLATES["chatml"], MESSAGES[:3], specials)
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>\n"]


def test_sentencepiece_tokenizer_maps_special_pieces_and_offsets(tmp_path):
    tok = load_tokenizer(os.path.join(LLAMA2, "tokenizer.model"))
    cfg = data.DataConfig(source="jsonl", path=write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES[:3]}]),
                          format="chat", chat_template="llama2", tokenizer=LLAMA2)
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg)
    tokens, sup = enc.tokens[0], enc.supervised[0]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and sup[-1]
    assert tok.decode([tokens[sup]])[0].strip() == "Hello!"


@pytest.mark.parametrize("record, fields, message", [
    ({"prompt": "a"}, {}, r"bad\.jsonl:2: no string field 'completion'"),
    ({"prompt": "a", "completion": "  "}, {}, r"bad\.jsonl:2: the completion is empty"),
    ({"question": "a", "answer": "b"}, {}, r"bad\.jsonl:2: no string field 'prompt'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, {"format": "chat"}, r"bad\.jsonl:2: turn 0 has unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, {"format": "chat"}, r"bad\.jsonl:2: no assistant turn"),
    ({"msgs": []}, {"format": "chat"}, r"bad\.jsonl:2: no non-empty list field 'messages'"),
    ("{oops", {}, r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_examples_are_named_by_file_and_line(tmp_path, record, fields, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [qa_records(1)[0] if not fields else
                                                {"messages": MESSAGES[:3]}, record])
    with pytest.raises(ValueError, match=message):
        data.read_examples(config(path, **fields))


def test_custom_field_names(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": " Yes."}])
    cfg = config(path, prompt_field="q", completion_field="a")
    assert data.read_examples(cfg)[0].completion == " Yes."


def test_too_long_example_fails_unless_truncated(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q:", "completion": " word" * 40}])
    with pytest.raises(ValueError, match=r"qa\.jsonl:1: the example has \d+ tokens, more than the 17"):
        data.encode_examples(data.read_examples(config(path)), tok, config(path), max_len=17)
    cfg = config(path, truncate=True)
    enc = data.encode_examples(data.read_examples(cfg), tok, cfg, max_len=17)
    assert len(enc.tokens[0]) == 17 and enc.supervised[0][-1]


def test_missing_chat_template_says_what_to_set(tmp_path, tok):
    cfg = data.DataConfig(source="jsonl", path=write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES[:3]}]),
                          format="chat", tokenizer=LLAMA3)
    with pytest.raises(ValueError, match="has no chat_template; set data.chat_template"):
        data.encode_examples(data.read_examples(cfg), tok, cfg)


def test_example_formats_need_jsonl():
    with pytest.raises(ValueError, match="set data.source=jsonl"):
        data.DataConfig(format="chat")


def test_the_example_task_serves_examples_and_splits_them(tmp_path, tok):
    cfg = config(write_jsonl(tmp_path / "qa.jsonl", qa_records(40)), validation_fraction=0.25)
    task = data.task_for(cfg)
    assert isinstance(task, data.ExampleTask) and isinstance(data.task_for(data.DataConfig()), data.TextTask)
    it = task.train_iterator(tok, global_batch=4, seq_len=64, process_index=0, process_count=1, prefetch=0)
    assert isinstance(it, ExampleIterator) and next(it).doc_ids_BxT is None
    train_ids = {d.id for d in it.documents}
    val_ids = {d.id for d in task.documents("validation")}
    assert train_ids and val_ids and not train_ids & val_ids and len(train_ids | val_ids) == 40
