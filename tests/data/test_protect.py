"""Spans never learned but kept in context (data.protect, data.protect_field): the protected
tokens are those overlapping a span, their targets weigh 0 wherever packing cuts, everything else
is as without protection, and examples lose the protected part of their answers."""

import json
import os

import helpers
import numpy as np
import pytest

from gf_jax import data
from gf_jax.config import load_config
from gf_jax.data import protect
from gf_jax.tokenizer import load_tokenizer

LLAMA3 = os.path.join(helpers.HF_FIXTURES, "llama3")
EMAILS = ["ann.lee@example.org", "bo+x@mail.example.com"]


def corpus(tmp_path, n=40):
    records = [{"id": f"t{i}", "text": f"Ticket {i}: please write to {EMAILS[i % 2]} about order {1000 + i}, "
                                       f"thanks. The weather was fine on day {i}.",
                "spans": [[0, 6]]} for i in range(n)]
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), records


def test_covered_marks_every_token_that_overlaps_a_span():
    starts = np.array([0, 3, 5, 9, 12])  # tokens [0,3) [3,5) [5,9) [9,12) [12,15)
    assert protect.covered(starts, 15, [(4, 6)]).tolist() == [False, True, True, False, False]
    assert protect.covered(starts, 15, [(12, 15), (0, 1)]).tolist() == [True, False, False, False, True]
    assert protect.pattern_spans("mail a.b@c.io now", protect.compile_patterns(["email"])) == [(5, 13)]
    with pytest.raises(ValueError, match="not a regular expression"):
        protect.compile_patterns(["(unclosed"])


def test_protected_targets_weigh_nothing_and_nothing_else_changes(tok, tmp_path):
    path, records = corpus(tmp_path)
    base = data.DataConfig(source="jsonl", path=path, tokenizer=tok.path, id_field="id", shuffle=False)
    guarded = data.DataConfig(**{**base.__dict__, "protect": ("email",)})
    kwargs = dict(global_batch=4, seq_len=24, process_index=0, process_count=1, prefetch=0, with_doc_ids=True)
    plain_it, guarded_it = data.make_train_iterator(base, tok, **kwargs), data.make_train_iterator(guarded, tok, **kwargs)
    # The reference: a token is protected iff its decoded characters overlap an e-mail address.
    expected = []
    for record in records:
        ids, starts = tok.encode_offsets(record["text"])
        at = record["text"].index(EMAILS[int(record["id"][1:]) % 2])
        span = (at, at + len(EMAILS[int(record["id"][1:]) % 2]))
        ends = starts[1:] + [len(record["text"])]
        inner = [s < span[1] and e > span[0] for s, e in zip(starts, ends)]
        expected.append(np.array([False] + inner + [False]))  # BOS and EOS framing
    assert all(e.sum() >= 3 for e in expected)
    for step in range(6):
        plain, guarded_batch = plain_it.batch(step), guarded_it.batch(step)
        assert np.array_equal(plain.inputs_BxT, guarded_batch.inputs_BxT)  # still read as context
        doc = guarded_batch.doc_ids_BxT
        targets_protected = np.zeros_like(plain.weights_BxT, bool)
        for b, t in zip(*np.nonzero(plain.weights_BxT)):
            position = guarded_batch.positions_BxT[b, t] + 1  # the target's index in its document
            targets_protected[b, t] = expected[doc[b, t]][position]
        assert np.array_equal(guarded_batch.weights_BxT, plain.weights_BxT * ~targets_protected)
        assert targets_protected.any() or step > 3


def test_spans_from_a_jsonl_field_are_protected(tok, tmp_path):
    path, records = corpus(tmp_path, n=8)
    cfg = data.DataConfig(source="jsonl", path=path, tokenizer=tok.path, id_field="id", protect_field="spans",
                          shuffle=False)
    it = data.make_train_iterator(cfg, tok, global_batch=2, seq_len=64, process_index=0, process_count=1, prefetch=0)
    mask = it.protected[0]
    ids, starts = tok.encode_offsets(records[0]["text"])
    first_word = [s < 6 for s in starts]  # "Ticket" is characters [0, 6)
    assert mask[1:1 + len(ids)].tolist() == first_word and not mask[0] and not mask[-1]


def test_examples_lose_the_protected_part_of_their_answers(tmp_path):
    tok = load_tokenizer(LLAMA3)
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Who handles billing?", "completion": " Write to ann.lee@example.org today."})
                    + "\n")
    plain = data.DataConfig(source="jsonl", path=str(path), format="prompt_completion", tokenizer=LLAMA3)
    guarded = data.DataConfig(**{**plain.__dict__, "protect": ("email",)})
    a = data.encode_examples(data.read_examples(plain), tok, plain)
    b = data.encode_examples(data.read_examples(guarded), tok, guarded)
    assert np.array_equal(a.tokens[0], b.tokens[0])
    lost = a.supervised[0] & ~b.supervised[0]
    assert "example.org" in tok.decode([a.tokens[0][lost]])[0] and not (b.supervised[0] & ~a.supervised[0]).any()
    assert "today" in tok.decode([b.tokens[0][b.supervised[0]]])[0]  # the rest of the answer is still learned


def test_protection_and_the_store_are_refused_together_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="set data.store=off or auto"):
        data.DataConfig(protect=("email",), store="on")
    with pytest.raises(ValueError, match="data.protect_field reads spans from JSONL documents"):
        data.DataConfig(protect_field="spans")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  protect: [email, 'SSN-\\d{4}']\n")
    assert load_config(str(yaml)).data.protect == ("email", r"SSN-\d{4}")
