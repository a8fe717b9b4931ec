"""Evaluation: a model overfit on a few documents recites them, an untrained one does not; losses,
membership inference and RougeL agree with independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gf_jax import data, evaluate
from gf_jax.evaluate import cli as evaluate_cli
from gf_jax.evaluate import extraction, metrics
from gf_jax.evaluate.scoring import token_statistics
from gf_jax.model import ModelConfig
from gf_jax.model.transformer import Transformer
from gf_jax.tokenizer import load_tokenizer, train_from_texts

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.evaluate.cli",
    "gf_jax.evaluate.extraction",
    "gf_jax.evaluate.runs",
    "gf_jax.evaluate.scoring",
)

SUFFIX = 16
MEMBERS = (0, 2, 4, 6)  # Tiny Shakespeare speeches of 40-60 tokens
NONMEMBERS = (7, 10, 11, 13)
SHORT = 18  # 14 tokens: too short for a 16-token suffix


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    docs = data.read_text_documents("data/tinyshakespeare.txt", "blank_line")
    path = train_from_texts([d.text for d in docs[:1500]], 350, str(tmp_path_factory.mktemp("tok")))
    tokenizer = load_tokenizer(path)

    def tokens(indices):
        return [t.tolist() for t in tokenizer.encode_arrays([docs[i].text for i in indices], add_bos=True,
                                                             add_eos=True)]

    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=128, max_seq_len=96)
    untrained = Transformer(config, rngs=nnx.Rngs(0))
    trained = Transformer(config, rngs=nnx.Rngs(0))
    members = tokens(MEMBERS)
    batch = data.eval_batches([np.asarray(t, np.int32) for t in members], global_batch=len(members),
                              seq_len=config.max_seq_len, mode="document", pad_id=tokenizer.pad_id)
    batch = next(iter(batch))
    final_loss = _overfit(trained, batch, steps=250)
    return dict(tokenizer=tokenizer, members=members, nonmembers=tokens(NONMEMBERS), short=tokens([SHORT])[0],
                ids=[docs[i].id for i in MEMBERS], trained=trained, untrained=untrained, final_loss=final_loss)


def _overfit(model, batch, steps):
    """Full-batch Adam on the members' every token: standard loss, trained to recite."""
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch.inputs_BxT, positions_BxT=batch.positions_BxT,
                           segment_ids_BxT=batch.segment_ids_BxT).astype(jnp.float32)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch.targets_BxT[..., None], -1)[..., 0]
            return jnp.sum(nll * batch.weights_BxT) / jnp.sum(batch.weights_BxT)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    batch = jax.tree.map(jnp.asarray, batch.for_device())
    for _ in range(steps):
        loss = step(model, optimizer, batch)
    return float(loss)


def test_overfit_model_recites_every_document(setup):
    assert setup["final_loss"] < 0.05
    per_doc, agg = evaluate.evaluate_memorization(
        setup["trained"], setup["tokenizer"], setup["members"] + [setup["short"]],
        doc_ids=setup["ids"] + ["short"], suffix_len=SUFFIX, batch_size=2)
    assert agg["n_documents"] == len(MEMBERS) and agg["n_memorized"] == len(MEMBERS)
    assert agg["n_skipped"] == 1 and agg["skipped_ids"] == ["short"]  # counted, not dropped
    assert agg["rougeL_mean"] == 1.0 and agg["exact_match_mean"] == 1.0
    for doc, tokens, doc_id in zip(per_doc, setup["members"], setup["ids"]):
        assert doc["id"] == doc_id and doc["memorized"] and doc["longest_run"] == SUFFIX
        # The suffix is the text's last 16 tokens: the trailing EOS is not part of it.
        assert doc["reference"] == setup["tokenizer"].decode([tokens[-SUFFIX - 1:-1]])[0]
        assert doc["generated"] == doc["reference"]
        assert doc["prompt_len"] == len(tokens) - 1 - SUFFIX  # BOS + text before the suffix


def test_a_suffix_longer_than_every_document_is_refused_not_reported_as_zero(setup):
    with pytest.raises(ValueError, match=r"all 1 documents are shorter than suffix_len \+ 1 = 17 tokens \(the "
                                         r"longest has \d+\); lower --suffix-len"):
        evaluate.evaluate_memorization(setup["trained"], setup["tokenizer"], [setup["short"]], suffix_len=SUFFIX)


def test_untrained_model_recites_nothing(setup):
    per_doc, agg = evaluate.evaluate_memorization(setup["untrained"], setup["tokenizer"], setup["members"],
                                                  suffix_len=SUFFIX)
    assert agg["n_memorized"] == 0
    assert agg["rougeL_mean"] < 0.2 and agg["exact_match_mean"] < 0.1


def test_tokenizer_free_scores_match_independent_definitions(setup):
    # Without a tokenizer, RougeL runs on ids written as words: it must equal the LCS F-measure
    # of the id sequences, and exact match the share of equal positions.
    model = setup["trained"]
    docs = [d[:40] for d in setup["members"]] + setup["nonmembers"]  # cut members: partial recall
    per_doc, _ = evaluate.evaluate_memorization(model, None, docs, suffix_len=SUFFIX, eos_id=2)
    rouges = []
    for doc, tokens in zip(per_doc, docs):
        tokens = tokens[:-1] if tokens[-1] == 2 else tokens
        generated = [int(t) for t in doc["generated"].split()]
        reference = tokens[-SUFFIX:]
        assert doc["reference"].split() == [str(t) for t in reference]
        assert doc["exact_match"] == np.mean(np.array(generated) == np.array(reference))
        lcs = _lcs(generated, reference)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(generated) + len(reference))
        assert doc["rougeL"] == pytest.approx(expected, abs=1e-12)
        rouges.append(doc["rougeL"])
    assert 0.0 < np.mean(rouges) < 1.0  # a mix of recalled and not recalled text


def _lcs(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
    return int(table[-1, -1])


def test_prefix_length_and_context_cap():
    tokens = list(range(1, 101)) + [2]  # 100 tokens then EOS
    prompt, suffix, start = evaluate.extraction_split(tokens, suffix_len=10, max_prompt_len=1000, eos_id=2)
    assert suffix == list(range(91, 101)) and prompt == list(range(1, 91)) and start == 0
    prompt, _, start = evaluate.extraction_split(tokens, suffix_len=10, max_prompt_len=1000, prefix_len=5, eos_id=2)
    assert prompt == [86, 87, 88, 89, 90] and start == 85  # true positions kept
    prompt, _, start = evaluate.extraction_split(tokens, suffix_len=10, max_prompt_len=30, eos_id=2)
    assert len(prompt) == 30 and start == 60
    assert evaluate.extraction_split(tokens[:10], suffix_len=10, max_prompt_len=30) is None


@nnx.jit
def _logits(model, inputs_BxT, positions_BxT, segment_ids_BxT):
    return model(inputs_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)


def _numpy_nll_BxT(model, inputs_BxT, targets_BxT, positions_BxT=None, segment_ids_BxT=None):
    """Independent reference: full logits, log-softmax in float64 numpy."""
    if positions_BxT is None:
        positions_BxT = np.broadcast_to(np.arange(inputs_BxT.shape[1]), inputs_BxT.shape)
    if segment_ids_BxT is None:
        segment_ids_BxT = np.ones_like(inputs_BxT)
    logits = np.asarray(_logits(model, jnp.asarray(inputs_BxT), jnp.asarray(positions_BxT),
                                jnp.asarray(segment_ids_BxT)), np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, np.asarray(targets_BxT)[..., None], -1)[..., 0]


def _numpy_nll(model, tokens, width=96):
    # One document in a fixed-width row (one compiled program); causal attention ignores the tail.
    inputs, targets = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    n = len(tokens) - 1
    inputs[0, :n], targets[0, :n] = tokens[:-1], tokens[1:]
    return _numpy_nll_BxT(model, inputs, targets)[0, :n]


def test_document_nll_and_membership_inference(setup):
    model, tok = setup["trained"], setup["tokenizer"]
    docs = setup["members"] + setup["nonmembers"]
    nll = evaluate.document_nll(model, docs, batch_size=3)
    np.testing.assert_allclose(nll, [_numpy_nll(model, d).mean() for d in docs], rtol=1e-4)
    mia = evaluate.membership_inference(model, tok, setup["members"], setup["nonmembers"])
    # Overfit members have a far lower loss than unseen text: both attacks separate them perfectly.
    assert (mia["loss"]["auc"], mia["loss"]["tpr_at_fpr"]) == (1.0, 1.0)
    assert mia["zlib"]["auc"] == 1.0
    assert mia["member_nll_mean"] < 0.1 < mia["nonmember_nll_mean"]
    zlib = [metrics.zlib_length(t) for t in tok.decode(setup["members"])]
    np.testing.assert_allclose(
        metrics.zlib_scores(nll[: len(MEMBERS)], zlib), -nll[: len(MEMBERS)] / np.array(zlib))


def test_heldout_loss_matches_numpy(setup):
    model, tok = setup["untrained"], setup["tokenizer"]
    docs = [np.asarray(d, np.int32) for d in setup["nonmembers"]]
    batches = list(data.eval_batches(docs, global_batch=2, seq_len=32, pad_id=tok.pad_id))  # packed rows
    loss, ppl = evaluate.heldout_loss(model, batches)
    total, count = 0.0, 0
    for b in batches:
        nll = _numpy_nll_BxT(model, b.inputs_BxT, b.targets_BxT, b.positions_BxT, b.segment_ids_BxT)
        total += float(np.sum(nll * b.weights_BxT))
        count += int(b.weights_BxT.sum())
    assert count == sum(len(d) - 1 for d in docs)  # every target of every document, exactly once
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(np.exp(total / count), rel=1e-5)
    assert loss == pytest.approx(np.log(tok.vocab_size), rel=0.1)  # untrained: about uniform


def test_user_errors_are_explained(setup):
    with pytest.raises(ValueError, match="shorter than model.max_seq_len"):
        evaluate.evaluate_memorization(setup["untrained"], None, setup["members"], suffix_len=96)
    with pytest.raises(ValueError, match="one id per document"):
        evaluate.evaluate_memorization(setup["untrained"], None, setup["members"], doc_ids=["a"], suffix_len=8)
    with pytest.raises(FileNotFoundError, match="--docs"):
        evaluate.resolve_documents("no/such/file.txt", data.DataConfig())


def _write_jsonl(path, texts):
    import json

    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")


def _save_run(run_dir, model, data_config, tokenizer_path):
    """A run directory as gf_jax.train writes it: config.yaml, tokenizer.model, checkpoints/<step>/."""
    import os
    import shutil

    from gf_jax.config import RunConfig, TrainConfig, save_config, to_dict
    from gf_jax.run.checkpoint import Checkpointer

    config = RunConfig(model=model.config, data=data_config, train=TrainConfig(seq_len=64, run_dir=run_dir))
    os.makedirs(run_dir, exist_ok=True)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    shutil.copy(tokenizer_path, os.path.join(run_dir, "tokenizer.model"))
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(7, model_state=nnx.split(model)[1], opt_state=None, loop_state={"step": 7},
              config_dict=to_dict(config))
    ckpt.close()


def test_cli_compares_runs_on_the_documents_they_trained_on(setup, tmp_path, capsys):
    import json
    import os

    docs = data.read_text_documents("data/tinyshakespeare.txt", "blank_line")
    members, heldout = tmp_path / "members.jsonl", tmp_path / "heldout.jsonl"
    _write_jsonl(members, [docs[i].text for i in MEMBERS])
    _write_jsonl(heldout, [docs[i].text for i in NONMEMBERS])
    data_config = data.DataConfig(source="jsonl", path=str(members), id_field="id",
                                  tokenizer=setup["tokenizer"].path)
    _save_run(str(tmp_path / "standard"), setup["trained"], data_config, setup["tokenizer"].path)
    _save_run(str(tmp_path / "control"), setup["untrained"], data_config, setup["tokenizer"].path)
    out = tmp_path / "report"
    results = evaluate_cli.run([
        "--run", str(tmp_path / "standard"), "--run", str(tmp_path / "control"), "--docs", "train",
        "--heldout", str(heldout), "--suffix-len", str(SUFFIX), "--batch-size", "4", "--out", str(out),
        "--offsets", "0", "8", "--offset-prefix-len", "16", "--choices", "data/tasks/basic_mc.jsonl"])
    standard, control = results["standard"], results["control"]
    assert standard["offsets"]["offsets"]["0"]["aggregate"]["exact_match_mean"] == 1.0
    assert standard["downstream"]["basic_mc.jsonl"]["n_items"] == 40
    for section in ("## Extraction under sampling", "## Membership inference", "## Prefix offsets",
                    "## Downstream utility"):
        assert section in (out / "report.md").read_text()
    assert standard["memorization"]["aggregate"]["n_memorized"] == len(MEMBERS)
    assert [d["id"] for d in standard["memorization"]["per_doc"]] == [f"doc{i}" for i in range(len(MEMBERS))]
    assert control["memorization"]["aggregate"]["n_memorized"] == 0
    assert standard["mia"]["loss"]["auc"] == 1.0
    assert np.isfinite(standard["heldout"]["loss"]) and np.isfinite(control["heldout"]["loss"])
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"standard", "control"}
    assert f"| standard | {len(MEMBERS)}/{len(MEMBERS)} |" in (out / "report.md").read_text()
    assert (out / "rougeL_hist.png").exists() and (out / "exact_match_hist.png").exists()
    assert "| control | 0/4 |" in capsys.readouterr().out

    # A run directory without checkpoints gets a clear message.
    empty = tmp_path / "empty"
    os.makedirs(empty)
    (empty / "config.yaml").write_text((tmp_path / "standard" / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        evaluate_cli.run(["--run", str(empty), "--docs", "train", "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate_cli.run(["--run", str(tmp_path / "nowhere"), "--docs", "train"])
    # A model whose vocabulary is smaller than its tokenizer's is refused before anything runs.
    small = Transformer(ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                                    max_seq_len=96), rngs=nnx.Rngs(0))
    _save_run(str(tmp_path / "small"), small, data_config, setup["tokenizer"].path)
    with pytest.raises(ValueError, match="model.vocab_size"):
        evaluate_cli.run(["--run", str(tmp_path / "small"), "--docs", "train", "--out", str(out)])


def test_sharded_evaluation_equals_single_device(setup):
    from gf_jax.model.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))  # 8 simulated CPU devices
    model, tok = setup["trained"], setup["tokenizer"]
    docs = setup["members"] + setup["nonmembers"]
    np.testing.assert_allclose(evaluate.document_nll(model, docs, batch_size=3, mesh=mesh),
                               evaluate.document_nll(model, docs, batch_size=3), rtol=1e-4)
    batches = list(data.eval_batches([np.asarray(d, np.int32) for d in docs], global_batch=8, seq_len=32,
                                     pad_id=tok.pad_id))
    assert evaluate.heldout_loss(model, batches, mesh=mesh)[0] == pytest.approx(
        evaluate.heldout_loss(model, batches)[0], rel=1e-5)
    sharded, agg = evaluate.evaluate_memorization(model, tok, docs, suffix_len=SUFFIX, mesh=mesh)
    single, _ = evaluate.evaluate_memorization(model, tok, docs, suffix_len=SUFFIX)
    assert [d["generated"] for d in sharded] == [d["generated"] for d in single]
    assert agg["n_memorized"] >= len(MEMBERS)


# ---- extraction under sampling, prefix offsets, the newer attacks (issue 24) ----------------------


def test_discoverable_rates_follow_the_closed_form():
    log_p = np.log([0.5, 1e-3, 1e-9, 0.999])
    rates = extraction.discoverable_rates(log_p)
    # 1 - (1 - p)^n >= p_threshold, written out for each document
    for n in extraction.NS:
        for p in extraction.PS:
            expected = np.mean([1 - (1 - np.exp(x)) ** n >= p for x in log_p])
            assert rates["n"][str(n)][str(p)] == expected, (n, p)
    assert extraction.extraction_probability(np.log(1e-12), 1000) == pytest.approx(1e-9, rel=1e-6)  # no rounding to 0


def test_token_statistics_equal_the_full_softmax(setup):
    model, doc = setup["trained"], np.asarray(setup["members"][0], np.int32)
    stats = token_statistics(model, [doc, doc[:20]], batch_size=2, start_positions=[0, 5])[0]
    logits = np.asarray(jax.device_get(model(doc[None, :-1])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    p = np.exp(logp)
    np.testing.assert_allclose(stats["logprob"], logp[np.arange(len(doc) - 1), doc[1:]], atol=2e-4)
    np.testing.assert_allclose(stats["mu"], (p * logp).sum(-1), atol=2e-4)
    np.testing.assert_allclose(stats["sigma"], np.sqrt((p * logp ** 2).sum(-1) - (p * logp).sum(-1) ** 2), atol=2e-3)


def test_an_overfit_model_is_discoverable_with_one_sample_and_an_untrained_one_is_not(setup):
    _, trained = evaluate.evaluate_memorization(setup["trained"], setup["tokenizer"], setup["members"], suffix_len=16)
    _, untrained = evaluate.evaluate_memorization(setup["untrained"], setup["tokenizer"], setup["members"],
                                                  suffix_len=16)
    assert trained["discoverable"]["n"]["1"]["0.5"] == 1.0
    assert untrained["discoverable"]["n"]["1000"]["0.1"] == 0.0 and untrained["discoverable"]["mean_log_p"] < -20


def test_prefix_offsets_report_each_offset_and_the_documents_that_fit(setup):
    result = extraction.offset_extraction(setup["trained"], setup["tokenizer"], setup["members"],
                                          offsets=(0, 8, 500), prefix_len=16, suffix_len=16, batch_size=4)
    offsets = result["offsets"]
    assert offsets["0"]["n_documents"] == 4 and offsets["500"] == {"n_documents": 0}
    assert offsets["0"]["aggregate"]["exact_match_mean"] == 1.0  # recited from the start of the document
    assert 0 < offsets["8"]["n_documents"] <= 4 and "discoverable" in offsets["8"]


def test_membership_inference_reports_every_attack_with_low_fpr_rates(setup):
    mia = evaluate.membership_inference(setup["trained"], setup["tokenizer"], setup["members"], setup["nonmembers"])
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        assert mia[attack]["auc"] == 1.0  # the overfit members stand out to every attack
        assert mia[attack]["n_members"] == 4 and not mia[attack]["tpr_at"]["0.01"]["reliable"]
        assert mia[attack]["roc"]["fpr"][0] == 0.0 and mia[attack]["roc"]["tpr"][-1] == 1.0
