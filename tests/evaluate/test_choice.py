"""Multiple-choice scoring as lm-evaluation-harness does it: each choice's log-likelihood given the
context equals the model's own logits summed by hand, acc and acc_norm (per byte) pick as the
harness picks, the context/continuation split is the harness's, and bad task files are one sentence."""

import json
import os

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from gf_jax.evaluate import choice
from gf_jax.model import ModelConfig
from gf_jax.model.transformer import Transformer

TASK = os.path.join(helpers.REPO, "data", "tasks", "basic_mc.jsonl")


@pytest.fixture(scope="module")
def model(tok):
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                         max_seq_len=64)
    return Transformer(config, rngs=nnx.Rngs(3))


@nnx.jit
def _forward(model, ids_BxT):
    return model(ids_BxT)


def _reference_ll(model, tok, context, continuation):
    """Harness-style log-likelihood, computed from the full logits in numpy."""
    whole = tok.encode([context + continuation])[0]
    n_ctx = len(tok.encode([context])[0])
    ids = np.array([tok.bos_id] + whole, np.int32)
    # Padded to one length so that one shape compiles; a causal model's logits before the padding
    # do not depend on it.
    padded = np.zeros((1, 64), np.int32)
    padded[0, :len(ids) - 1] = ids[:-1]
    logits = np.asarray(jax.device_get(_forward(model, padded)), np.float64)[0, :len(ids) - 1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.arange(1 + n_ctx, len(ids))
    return float(logp[targets - 1, ids[targets]].sum())


def test_log_likelihoods_equal_the_models_logits(model, tok):
    items = choice.read_task(TASK)[:6]
    lls = choice.choice_log_likelihoods(model, tok, items, batch_size=4)
    for item, ll in zip(items, lls):
        expected = [_reference_ll(model, tok, item.context, " " + c) for c in item.choices]
        np.testing.assert_allclose(ll, expected, rtol=1e-4, atol=1e-3)


def test_acc_and_acc_norm_pick_as_the_harness_does():
    items = [choice.ChoiceItem("a", "Q", ("yes", "a much longer answer"), 1),
             choice.ChoiceItem("b", "Q", ("x", "y"), 0)]
    lls = [np.array([-4.0, -10.0]), np.array([-1.0, -2.0])]
    scores = choice.accuracy(items, lls)
    # item a: raw ll prefers "yes" (wrong); per byte -4/4 = -1.0 vs -10/21 = -0.48 prefers the gold one.
    assert scores["acc"] == 0.5 and scores["acc_norm"] == 1.0 and scores["n_items"] == 2
    assert scores["acc_stderr"] == pytest.approx(np.std([0, 1], ddof=1) / np.sqrt(2))


def test_the_context_split_follows_the_whole_text(tok):
    ids, first = choice.continuation_tokens(tok, "To be or not to", " be", add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode(["To be or not to be"])[0]
    assert first == 1 + len(tok.encode(["To be or not to"])[0])


def test_the_bundled_task_and_bad_files(tmp_path, model, tok):
    result = choice.evaluate_choices(model, tok, TASK, batch_size=8)
    assert result["n_items"] == 40 and 0.0 <= result["acc"] <= 1.0 and len(result["per_item"]) == 40
    bad = tmp_path / "bad.jsonl"
    for line, message in (('{"context": "a", "choices": ["b"], "gold": 0}', "at least 2"),
                          ('{"context": "a", "choices": ["b", "c"], "gold": 2}', "'gold' must be the index"),
                          ("{nope", "not valid JSON")):
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            choice.read_task(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        choice.read_task(str(tmp_path / "missing.jsonl"))
    assert json.loads(open(TASK).readline())["id"] == "basic-00"
