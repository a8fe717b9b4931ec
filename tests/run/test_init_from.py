"""Fine-tuning from a Hugging Face model: train.init_from, a few steps, export back."""

import json
import os

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from gf_jax.config import config_from_dict
from gf_jax.run.export import export_run
from gf_jax.run.load import load_model
from gf_jax.train.trainer import Trainer

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.run.source",
)

REPO = helpers.REPO
LLAMA3 = os.path.join(REPO, "tests", "fixtures", "hf", "llama3")


def finetune_config(run_dir, *extra):
    return config_from_dict({}, [
        f"train.init_from={LLAMA3}", f"train.run_dir={run_dir}", "data.path=data/tinyshakespeare.txt",
        "data.max_documents=200", "data.validation_fraction=0", "model.max_seq_len=128",
        "train.seq_len=32", "train.global_batch=8", "train.steps=3", "train.log_every=1", "train.ckpt_every=0",
        "optimizer.warmup=1", "optimizer.lr=1e-2", "train.progress=false", "train.tensorboard=false", *extra,
    ])


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_finetune_from_a_hugging_face_model_trains_and_exports(tmp_path):
    run_dir = str(tmp_path / "ft")
    trainer = Trainer(finetune_config(run_dir))
    assert trainer.config.model.d_model == 48 and trainer.config.model.vocab_size == 320  # from the HF config
    start = leaves(trainer.model)
    hf_model, _, _ = load_model(LLAMA3)
    assert all(np.array_equal(a, b) for a, b in zip(start, leaves(hf_model)))  # starts at the HF weights
    assert trainer.run()["step"] == 3
    trained, config, tokenizer = load_model(run_dir)
    assert any(not np.allclose(a, b) for a, b in zip(leaves(trained), start))  # training moved them
    # The run keeps the HF tokenizer with its special tokens (not a bare tokenizer.json copy).
    assert os.path.isfile(os.path.join(run_dir, "hf", "tokenizer_config.json")) and tokenizer.bos_id == 0

    out = str(tmp_path / "export")
    export_run(run_dir, out, dtype="float32")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    reloaded, _, _ = load_model(out)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(reloaded), leaves(trained)))  # bit-exact round trip


def test_a_model_field_that_disagrees_with_init_from_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"has model\.d_model=48 but the config sets 64; remove model\.d_model"):
        Trainer(finetune_config(str(tmp_path / "x"), "model.d_model=64"))
    assert not os.path.exists(tmp_path / "x" / "config.yaml")
