"""A run directory written before the package layout changed (main at 8f28386: a tiny model,
checkpoints at steps 2 and 4) still loads with the same logits, resumes with the losses that
code produced, and exports."""

import json
import os
import shutil

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gf_jax.config import load_config
from gf_jax.hf.safetensors_io import SafetensorsReader
from gf_jax.run.export import export_run
from gf_jax.run.load import load_model
from gf_jax.train import Trainer

FIXTURE = os.path.join(helpers.FIXTURES, "run_before_layout")
with open(FIXTURE + "_expected.json") as _f:
    EXPECTED = json.load(_f)


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return str(run)


def test_an_old_run_loads_with_the_same_logits(old_run):
    model, config, tokenizer = load_model(old_run)
    assert config.train.steps == 4 and tokenizer.vocab_size == 320
    logits = np.asarray(model(jnp.asarray(EXPECTED["tokens"], jnp.int32)), np.float64)
    np.testing.assert_allclose(logits[0, 0, :8], EXPECTED["logits_first_row"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[0, -1, :8], EXPECTED["logits_last_row"], rtol=1e-5, atol=1e-6)
    assert logits.sum() == pytest.approx(EXPECTED["logits_sum"], rel=1e-4)


def test_an_old_run_resumes_with_the_losses_the_old_code_produced(old_run):
    config = load_config(os.path.join(old_run, "config.yaml"),
                         [f"train.run_dir={old_run}", f"data.tokenizer={old_run}/tokenizer.model", "train.steps=6",
                          "train.ckpt_every=0"])
    trainer = Trainer(config, devices=jax.devices()[:1], log=lambda line: None)  # as it was trained
    assert trainer.resume_step == 4
    trainer.run()
    with open(os.path.join(old_run, "metrics.jsonl")) as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and r["step"] > 4}
    assert losses.keys() == {5, 6}
    for step, loss in EXPECTED["resumed_losses"].items():
        assert losses[int(step)] == pytest.approx(loss, rel=1e-5)


def test_an_old_run_exports(old_run, tmp_path):
    files = export_run(f"{old_run}@2", str(tmp_path / "hf"))
    assert "model.safetensors" in files
    reader = SafetensorsReader(str(tmp_path / "hf"))
    assert reader.shape("model.embed_tokens.weight") == (320, 32)
