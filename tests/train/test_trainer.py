"""The trainer on 8 simulated CPU devices: meshes agree with one device, accumulation equals one
big batch, stop + resume equals an uninterrupted run, logged goldfish metrics match the batches,
NaN and SIGTERM handling, bad configs rejected early, and the tiny config learns."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from gf_jax import data as data_lib
from gf_jax import goldfish
from gf_jax.config import load_config
from gf_jax.data import corpus_tokenizer
from gf_jax.model.sharding import MeshConfig, make_mesh
from gf_jax.model.transformer import Transformer
from gf_jax.run.load import load_model
from gf_jax.tokenizer import load_tokenizer
from gf_jax.train.cli import NonFiniteLossError, Trainer, main
from gf_jax.train.step import make_step_functions

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.train.cli",
    "gf_jax.train.hooks",
    "gf_jax.train.optim",
    "gf_jax.train.step",
    "gf_jax.util.progress",
)

REPO = helpers.REPO
TINY = os.path.join(REPO, "configs", "tiny.yaml")
STEPS = 24

# The tiny config, shrunk so that a step compiles in seconds on 2 CPU cores.
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64",
    "data.max_documents=400", "data.validation_fraction=0.1", "data.vocab_size=384",
    "goldfish.h=3",  # short context: few targets at row starts lack a full window, so drop ~ 1/k
    "train.global_batch=8", "train.seq_len=32", f"train.steps={STEPS}", "optimizer.warmup=4",
    "optimizer.lr=1e-2", "train.log_every=1", "train.ckpt_every=8", "train.eval_every=12",
    "train.progress=false", "train.tensorboard=false",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A 384-piece tokenizer trained once on the test documents."""
    config = load_config(TINY, SMALL)
    cache = str(tmp_path_factory.mktemp("tokenizers"))
    tokenizer = corpus_tokenizer(
        data_lib.DataConfig(**{**config.data.__dict__, "tokenizer_cache_dir": cache})
    )
    return tokenizer.path


def small_config(tokenizer_path, run_dir, *extra):
    return load_config(TINY, SMALL + [f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}", *extra])


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    train = [r for r in lines if "loss" in r]
    val = [r for r in lines if "val_loss" in r]
    return train, val


def params(run_dir):
    model, _, _ = load_model(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def tree_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference_run(tokenizer_path, tmp_path_factory):
    """An uninterrupted 24-step run of the (shrunk) tiny config on all 8 devices (fsdp=8)."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    config = small_config(tokenizer_path, run_dir)
    summary = Trainer(config).run()
    assert summary == {"status": "done", "step": STEPS, "run_dir": run_dir}
    return run_dir


def test_tiny_config_trains_and_the_loss_falls(reference_run):
    train, val = records(reference_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses = np.array([r["loss"] for r in train])
    assert np.all(np.isfinite(losses))
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses
    assert [r["step"] for r in val] == [12, 24] and val[1]["val_loss"] < val[0]["val_loss"]
    last = train[-1]
    for key in ("loss_kept", "loss_all", "loss_dropped", "drop_fraction", "supervised_tokens", "grad_norm",
                "lr", "step_time_s", "tokens_per_s", "tflops_per_device", "mfu"):
        assert key in last, key
    assert last["mfu"] is None  # CPU: no peak FLOP/s
    assert last["tokens_per_s"] > 0 and last["tflops_per_device"] > 0
    assert "compile_s" in train[0]
    # lr: warm-up 1e-2 * s / 4, then cosine down to 1e-3 at the last step.
    assert train[0]["lr"] == pytest.approx(1e-2 / 4) and train[3]["lr"] == pytest.approx(1e-2)
    assert train[-1]["lr"] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + np.cos(np.pi * 19 / 20)), rel=1e-5)
    # Resolved config (with the tokenizer the run used) and the last 3 checkpoints are in the run dir.
    saved = load_config(os.path.join(reference_run, "config.yaml"))
    assert saved.data.tokenizer == os.path.join(reference_run, "tokenizer.model")
    assert saved.train.steps == STEPS and saved.goldfish.h == 3
    assert sorted(os.listdir(os.path.join(reference_run, "checkpoints"))) == ["16", "24", "8"]


def test_logged_goldfish_metrics_match_the_batches(reference_run, tokenizer_path):
    """Drop fraction and supervised-token counts recomputed from the same batches on the host."""
    config = load_config(os.path.join(reference_run, "config.yaml"))
    tokenizer = load_tokenizer(tokenizer_path)
    it = data_lib.make_train_iterator(config.data, tokenizer, global_batch=8, seq_len=32, prefetch=0)
    train, _ = records(reference_run)
    supervised, dropped_full, valid_full = 0, 0, 0
    for record in train:
        batch = next(it)
        drop = np.asarray(goldfish.goldfish_mask(batch.targets_BxT, config.goldfish,
                                                 positions_BxT=batch.positions_BxT,
                                                 context_BxC=batch.context_BxC))
        valid = batch.weights_BxT > 0
        n_dropped, n_valid = int((drop & valid).sum()), int(valid.sum())
        supervised += n_valid - n_dropped
        assert record["drop_fraction"] == pytest.approx(n_dropped / n_valid, abs=1e-6)
        assert record["supervised_tokens"] == supervised
        dropped_full, valid_full = dropped_full + n_dropped, valid_full + n_valid
    # The batches carry row context (data.row_context >= h), so every target is hashed with its
    # whole window, also in rows that start mid-document: ~1/k are left out (k = 4).
    assert config.data.row_context >= config.goldfish.h
    assert abs(dropped_full / valid_full - 0.25) < 0.03, dropped_full / valid_full


def test_stop_and_resume_equals_uninterrupted(reference_run, tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "resumed")
    first = Trainer(small_config(tokenizer_path, run_dir, "train.stop_at=12")).run()
    assert first["step"] == 12
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["12", "8"]
    trainer = Trainer(small_config(tokenizer_path, run_dir))
    assert trainer.resume_step == 12 and trainer.step == 12
    assert trainer.run()["step"] == STEPS

    ref_train, ref_val = records(reference_run)
    got_train, got_val = records(run_dir)
    assert [r["step"] for r in got_train] == list(range(1, STEPS + 1))  # each step logged once
    for key in ("loss", "loss_all", "drop_fraction", "grad_norm", "supervised_tokens"):
        np.testing.assert_allclose([r[key] for r in got_train], [r[key] for r in ref_train], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose([r["val_loss"] for r in got_val], [r["val_loss"] for r in ref_val], rtol=1e-6)
    for a, b in zip(params(run_dir), params(reference_run)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_resume_with_another_model_fails_clearly(reference_run, tokenizer_path):
    with pytest.raises(ValueError, match=r"holds checkpoints of a different model \(model\.d_model is 32 there, 48 now\)"):
        Trainer(small_config(tokenizer_path, reference_run, "model.d_model=48"))


def test_nan_loss_stops_without_touching_the_last_good_checkpoint(reference_run, tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "nan")
    shutil.copytree(reference_run, run_dir)
    good = tree_digest(os.path.join(run_dir, "checkpoints", "24"))
    # Resume for 8 more steps with an absurd learning rate: the parameters blow up within a step.
    trainer = Trainer(small_config(tokenizer_path, run_dir, "train.steps=32", "optimizer.lr=1e30"))
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint: step 24"):
        trainer.run()
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["16", "24", "8"]
    assert tree_digest(os.path.join(run_dir, "checkpoints", "24")) == good
    train, _ = records(run_dir)
    assert all(np.isfinite(r["loss"]) for r in train)  # the NaN step is not logged as a result


def _batches(config, n):
    tokenizer = load_tokenizer(config.data.tokenizer)
    it = data_lib.make_train_iterator(config.data, tokenizer, global_batch=config.train.global_batch,
                                      seq_len=config.train.seq_len, prefetch=0)
    return [b._replace(context_BxC=None, doc_ids_BxT=None) for b in (next(it) for _ in range(n))]


def _run_steps(config, mesh, host_state, batches):
    fns = make_step_functions(config, mesh)
    model_state = jax.device_put(host_state[0], fns.model_shardings)
    opt_state = jax.device_put(host_state[1], fns.opt_shardings)
    out = []
    for batch in batches:
        model_state, opt_state, metrics = fns.train_step(
            model_state, opt_state, data_lib.to_global_batch(batch, fns.batch_sharding)
        )
        out.append(jax.device_get(metrics))
    return out, jax.device_get(model_state)


def _one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def test_meshes_give_the_same_losses_as_one_device(tokenizer_path, tmp_path):
    config = small_config(tokenizer_path, str(tmp_path))
    batches = _batches(config, 3)
    host_state = jax.device_get(make_step_functions(config, _one_device()).init())
    reference, _ = _run_steps(config, _one_device(), host_state, batches)
    accumulated = small_config(tokenizer_path, str(tmp_path), "train.grad_accum=2")
    for layout, layout_config in (
        (MeshConfig(data=8, fsdp=1, tensor=1), config),
        (MeshConfig(data=1, fsdp=4, tensor=2), config),
        # Also with 2 micro-batches: sharded accumulation equals one big batch on one device.
        (MeshConfig(data=2, fsdp=2, tensor=2), accumulated),
    ):
        got, _ = _run_steps(layout_config, make_mesh(layout), host_state, batches)
        for key in ("loss", "loss_all", "grad_norm"):
            np.testing.assert_allclose([m[key] for m in got], [m[key] for m in reference], rtol=1e-5,
                                       err_msg=f"{key} on {layout}")
        assert [int(m["n_kept"]) for m in got] == [int(m["n_kept"]) for m in reference]


def test_gradient_accumulation_equals_one_big_batch(tokenizer_path, tmp_path):
    base = small_config(tokenizer_path, str(tmp_path))
    batches = _batches(base, 2)
    # Blank out most of micro-batch 0 (rows 0, 2, 4, 6) so the two micro-batches keep very
    # different numbers of targets: a mean of per-micro-batch means would then be wrong.
    for i, batch in enumerate(batches):
        batches[i] = batch._replace(weights_BxT=batch.weights_BxT.copy())
        batches[i].weights_BxT[0::2, 4:] = 0.0
    host_state = jax.device_get(make_step_functions(base, _one_device()).init())
    big, big_params = _run_steps(base, _one_device(), host_state, batches)
    accumulated, acc_params = _run_steps(
        small_config(tokenizer_path, str(tmp_path), "train.grad_accum=2"), _one_device(), host_state, batches
    )
    for key in ("loss", "loss_all", "loss_dropped", "drop_fraction", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in accumulated], [m[key] for m in big], rtol=2e-5, err_msg=key)
    assert [int(m["n_kept"]) for m in accumulated] == [int(m["n_kept"]) for m in big]
    # Adam divides by sqrt(second moment): float-rounding differences of near-zero gradients
    # move a parameter by up to ~lr * 1e-3; 1e-5 is a thousandth of one step (lr = 1e-2).
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # The micro-batches really are unequal, so the test would catch per-micro-batch averaging.
    drop = np.asarray(goldfish.goldfish_mask(batches[0].targets_BxT, base.goldfish,
                                             positions_BxT=batches[0].positions_BxT,
                                             context_BxC=batches[0].context_BxC))
    kept = (batches[0].weights_BxT > 0) & ~drop
    assert kept[0::2].sum() * 3 < kept[1::2].sum()


def test_bad_run_settings_fail_before_anything_compiles(tokenizer_path, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"train\.eval_every > 0 needs a validation split"):
        Trainer(small_config(tokenizer_path, str(tmp_path / "a"), "data.validation_fraction=0"))
    with pytest.raises(ValueError, match=r"tokenizer has 384 pieces but model\.vocab_size is 300"):
        Trainer(small_config(tokenizer_path, str(tmp_path / "b"), "model.vocab_size=300"))
    with pytest.raises(ValueError, match=r"cannot be split over 8 data x fsdp shards"):
        Trainer(small_config(tokenizer_path, str(tmp_path / "c"), "train.global_batch=12"))
    # The command line prints the one-sentence error and exits with status 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", TINY, "train.lrr=1"])
    assert exit_info.value.code == 2
    assert "unknown config key train.lrr (did you mean optimizer.lr?)" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenizer_path, tmp_path):
    run_dir = str(tmp_path / "preempted")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-m", "gf_jax.train", "--config", TINY, *SMALL, f"data.tokenizer={tokenizer_path}",
            f"train.run_dir={run_dir}", "train.steps=100000", "train.ckpt_every=0", "train.eval_every=0"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    steps = sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")))
    train, _ = records(run_dir)
    assert len(steps) == 1 and steps[0] >= 3 and train[-1]["step"] == steps[0], (steps, output)
    assert f"saved step {steps[0]}" in output


def test_init_from_starts_with_that_runs_parameters_and_a_fresh_optimizer(reference_run, tokenizer_path, tmp_path):
    trainer = Trainer(small_config(tokenizer_path, str(tmp_path / "ft"), f"train.init_from={reference_run}@16"))
    try:
        assert trainer.step == 0 and trainer.resume_step is None
        got = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model))]
        model, _, _ = load_model(reference_run, 16)
        want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        assert int(jax.device_get(trainer.opt_state["step"][...])) == 0  # the optimizer starts fresh
        deeper = dataclasses.replace(trainer.config.model, n_layers=2)
        with pytest.raises(ValueError, match="another architecture"):
            trainer.start_from(nnx.state(nnx.eval_shape(lambda: Transformer(deeper, rngs=nnx.Rngs(0)))))
    finally:
        trainer.close()
    with pytest.raises(ValueError, match=r"has model\.d_model=32 but the config sets 48; remove model\.d_model"):
        Trainer(small_config(tokenizer_path, str(tmp_path / "ft2"), f"train.init_from={reference_run}",
                             "model.d_model=48"))


def test_user_hooks_run_every_n_steps_and_at_the_end(tokenizer_path, tmp_path):
    trainer = Trainer(small_config(tokenizer_path, str(tmp_path / "hooks"), "train.steps=7", "train.eval_every=0",
                                   "train.ckpt_every=0"))
    seen = []
    trainer.add_hook(lambda step: seen.append((step, trainer.tracker.supervised_tokens > 0)), every=3)
    trainer.run()
    # Steps 3 and 6, then the last step; metrics were read back before the hook ran.
    assert seen == [(3, True), (6, True), (7, True)]


def test_a_stop_signal_at_step_1_logs_and_saves_that_step(tokenizer_path, tmp_path, monkeypatch):
    from gf_jax.train import hooks

    monkeypatch.setattr(hooks.StopSignal, "requested", lambda self, step: step == 1)  # SIGTERM during step 1
    run_dir = str(tmp_path / "stopped")
    summary = Trainer(small_config(tokenizer_path, run_dir, "train.log_every=5", "train.ckpt_every=0",
                                   "train.eval_every=0")).run()
    train, _ = records(run_dir)
    assert summary["status"] == "preempted" and [r["step"] for r in train] == [1]
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["1"]
