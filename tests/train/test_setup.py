"""A run's set-up: what lies in its directory is adopted only from its own checkpoints, somebody
else's files are refused, an imported run trains from its parameters, ``fresh`` holds the lock
before it removes anything, and a corpus smaller than a batch is warned about (issue 22)."""

import os
import shutil

import helpers
import numpy as np
import pytest

from gf_jax.config import load_config
from gf_jax.data.iterator import BatchIterator
from gf_jax.experiments.training import train_arm
from gf_jax.hf import load as hf_load
from gf_jax.run import hf_import
from gf_jax.run.lock import RunDirInUse, RunLock
from gf_jax.train import setup
from gf_jax.train.trainer import Trainer

TINY = os.path.join(helpers.REPO, "configs", "tiny.yaml")
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "data.max_documents=200", "data.vocab_size=384",
    "train.global_batch=8", "train.seq_len=32", "train.steps=2", "train.log_every=1", "train.ckpt_every=2",
    "train.eval_every=0", "train.progress=false", "train.tensorboard=false",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return helpers.corpus_tokenizer_path(load_config(TINY, SMALL), tmp_path_factory)


def config_for(run_dir, *extra):
    return load_config(TINY, SMALL + [f"train.run_dir={run_dir}", *extra])


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_new_run_never_adopts_a_tokenizer_left_in_its_directory(tokenizer_path, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(b"a tokenizer of another corpus")
    config = config_for(str(run), f"data.tokenizer_cache_dir={tmp_path / 'cache'}")
    tokenizer, copy = setup.resolve_tokenizer(config, str(run), adopt=False)  # trained on this corpus
    assert copy == str(run / "tokenizer.model") and open(tokenizer.path, "rb").read() != b"a tokenizer of another corpus"
    shutil.copyfile(tokenizer_path, run / "tokenizer.model")
    adopted, _ = setup.resolve_tokenizer(config, str(run), adopt=True)  # resuming: its own copy
    assert adopted.path == str(run / "tokenizer.model")


def test_leftovers_of_a_run_that_saved_nothing_are_replaced_with_a_line(tokenizer_path, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(b"stale")
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    (run / "config.yaml").write_text("stale: true\n")
    lines = []
    Trainer(config_for(str(run), f"data.tokenizer={tokenizer_path}"), log=lines.append).run()
    assert open(run / "tokenizer.model", "rb").read() == open(tokenizer_path, "rb").read()
    assert '"step": 7' not in (run / "metrics.jsonl").read_text()
    assert any("replaced what an earlier run left" in line and "tokenizer.model" in line for line in lines)


def test_somebody_elses_folder_is_refused_before_anything_is_written(tokenizer_path, tmp_path):
    run = tmp_path / "model_copy"
    run.mkdir()
    for name in ("config.json", "model.safetensors", "config.yaml"):
        (run / name).write_text(name)
    with pytest.raises(ValueError, match="holds files a gf_jax run does not write .config.json, model.safetensors"):
        Trainer(config_for(str(run), f"data.tokenizer={tokenizer_path}"))
    assert listing(run) == ["config.json", "config.yaml", "model.safetensors"]
    assert (run / "config.yaml").read_text() == "config.yaml"


def test_a_run_made_by_hf_import_trains_from_its_parameters(tmp_path):
    fixture = os.path.join(helpers.HF_FIXTURES, "llama2")
    run = hf_import.import_to_run(fixture, str(tmp_path / "run"))
    config = load_config(os.path.join(run, "config.yaml"), [
        f"train.run_dir={run}", "train.steps=1", "train.global_batch=8", "train.seq_len=16", "train.eval_every=0",
        "train.ckpt_every=1", "train.progress=false", "train.tensorboard=false", "data.max_documents=50"])
    lines = []
    trainer = Trainer(config, log=lines.append)
    imported = hf_load.numpy_state(hf_load.load_model(fixture, config.model))
    start = {k: np.asarray(v) for k, v in hf_load.numpy_state(trainer.model).items()}
    assert all(np.array_equal(imported[k], start[k]) for k in imported)
    trainer.run()
    assert any("imported; fresh optimizer" in line for line in lines)
    assert "1" in listing(os.path.join(run, "checkpoints"))
    assert not os.path.exists(os.path.join(run, "corrupt_checkpoints"))


def test_fresh_holds_the_lock_before_it_removes_anything(tokenizer_path, tmp_path):
    run = str(tmp_path / "arm")
    config = config_for(run, f"data.tokenizer={tokenizer_path}")
    Trainer(config).run()
    lock = RunLock.acquire(run, log=lambda line: None)  # another experiment is training this arm
    before = listing(run)
    try:
        with pytest.raises(RunDirInUse):
            train_arm(config, devices=None, fresh=True)
        assert listing(run) == before and listing(os.path.join(run, "checkpoints")) == ["2"]
    finally:
        lock.release()
    _, _, summary = train_arm(config, devices=None, fresh=True)  # free: retrained from step 0
    assert summary["resumed_from"] is None and summary["step"] == 2


def test_a_corpus_smaller_than_one_batch_is_warned_about():
    def iterator(lengths):
        tokens = [np.arange(n, dtype=np.int32) % 7 + 1 for n in lengths]
        return BatchIterator(tokens, global_batch=8, seq_len=32, process_index=0, process_count=1, prefetch=0)

    warning = setup.corpus_warning(iterator([20, 30]))
    assert "hold 50 tokens, fewer than one batch (8 x 33 = 264)" in warning
    assert setup.corpus_warning(iterator([300])) is None


def test_resuming_with_another_process_count_is_refused(tmp_path):
    loop = {"data": {"step": 3, "fingerprint": "a"}, "data_fingerprints": ["a", "b"]}
    with pytest.raises(ValueError, match="trained by 2 processes and this run has 1"):
        setup.own_data_state(loop, str(tmp_path))
    assert setup.own_data_state({"data": {"step": 3}}, str(tmp_path)) == {"step": 3}
