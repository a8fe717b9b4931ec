"""Run config: YAML + dotted overrides into typed dataclasses; bad keys and types fail early."""

import dataclasses
import glob
import os

import helpers
import pytest

from gf_jax.config import OptimizerConfig, RunConfig, TrainConfig, config_from_dict, load_config, save_config
from gf_jax.config.run import dump_config

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.config.loader",
    "gf_jax.config.sections",
    "gf_jax.util.settings",
)

REPO = helpers.REPO


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_yaml_and_overrides_give_typed_values(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model: {d_model: 64, n_heads: 4}\noptimizer:\n  lr: 3e-4\ntrain:\n  steps: 7\ngoldfish: {k: 3}\n",
    )
    config = load_config(
        path,
        ["train.steps=11", "train.run_dir=2024", "data.tokenizer=null", "goldfish.never_drop_ids=[2, 1]",
         "optimizer.clip=0", "train.async_checkpoint=false"],
    )
    assert isinstance(config, RunConfig)
    assert config.model.d_model == 64 and config.model.n_heads == 4
    # PyYAML reads "3e-4" as a string; a float field accepts it.
    assert config.optimizer.lr == pytest.approx(3e-4) and isinstance(config.optimizer.lr, float)
    assert config.train.steps == 11  # the override wins over the file
    assert config.train.run_dir == "2024"  # a string field keeps the literal text
    assert config.optimizer.clip == 0.0 and isinstance(config.optimizer.clip, float)
    assert config.train.async_checkpoint is False
    assert config.data.tokenizer is None
    assert config.goldfish.k == 3 and config.goldfish.never_drop_ids == (1, 2)
    # Unset keys keep their defaults.
    assert config.optimizer.warmup == OptimizerConfig().warmup


def test_unknown_keys_fail_with_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key train\.lrr \(did you mean optimizer\.lr\?\).*valid keys under train are: steps, "):
        config_from_dict({}, ["train.lrr=1e-3"])
    path = write(tmp_path / "c.yaml", "model:\n  dmodel: 64\n")
    with pytest.raises(ValueError, match=r"model\.dmodel.*valid keys under model are: .*d_model"):
        load_config(path)
    with pytest.raises(ValueError, match=r"unknown config key trainer.*valid keys at the top level are: model, mesh, data, goldfish, loss, optimizer, train"):
        config_from_dict({"trainer": {"steps": 1}})
    with pytest.raises(ValueError, match=r"train\.steps is not a section"):
        config_from_dict({}, ["train.steps.x=1"])
    with pytest.raises(ValueError, match=r"section\.key=value"):
        config_from_dict({}, ["train.steps"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=1.5", r"train\.steps must be an integer, got 1\.5"),
        ("train.steps=true", r"train\.steps must be an integer"),
        ("optimizer.lr=fast", r"optimizer\.lr must be a number, got 'fast'"),
        ("train.async_checkpoint=3", r"train\.async_checkpoint must be true or false"),
        ("model.d_model=[1]", r"model\.d_model must be an integer"),
        ("goldfish.never_drop_ids=[a]", r"goldfish\.never_drop_ids\[0\] must be an integer"),
        ("train={}", None),  # a section replaced by an empty mapping keeps its defaults
    ],
)
def test_wrong_types_fail(override, message):
    if message is None:
        assert config_from_dict({}, [override]).train == TrainConfig()
        return
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, [override])


def test_wrong_types_in_yaml_fail():
    with pytest.raises(ValueError, match=r"data\.tokenizer must be a string or null, got \['x'\]"):
        config_from_dict({"data": {"tokenizer": ["x"]}})
    with pytest.raises(ValueError, match=r"config key model must be a mapping"):
        config_from_dict({"model": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.global_batch=10", "train.grad_accum=3"], r"multiple of train\.grad_accum"),
        (["train.seq_len=512", "model.max_seq_len=256"], r"train\.seq_len \(512\) exceeds model\.max_seq_len"),
        (["train.steps=0"], r"train\.steps must be >= 1"),
        (["optimizer.lr=0"], r"optimizer\.lr must be > 0"),
        (["optimizer.min_lr_ratio=2"], r"min_lr_ratio must be in \[0, 1\]"),
        (["goldfish.k=1"], r"goldfish k must be >= 2"),  # checked by the section's own dataclass
        (["goldfish.strategy=nope"], r"use one of none, static, hash"),
        (["model.n_heads=3"], r"n_heads"),
        (["data.mode=rows"], r"data\.mode"),
    ],
)
def test_invalid_values_fail(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)


def test_keys_that_moved_sections_are_read_at_their_new_place(tmp_path, capsys):
    # A run directory's config.yaml written before the optimizer / loss split still resumes.
    path = write(tmp_path / "old.yaml", "train:\n  lr: 2e-4\n  loss_chunk_size: 64\n  steps: 9\n")
    config = load_config(path, ["train.clip=0.5"])
    assert config.optimizer.lr == pytest.approx(2e-4) and config.loss.chunk_size == 64
    assert config.optimizer.clip == 0.5 and config.train.steps == 9
    err = capsys.readouterr().err
    assert "train.lr is now optimizer.lr" in err and "train.clip is now optimizer.clip" in err


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_saved_config_reloads_identically(tmp_path):
    config = config_from_dict({}, ["goldfish.never_drop_ids=[1,2]", "optimizer.lr=1e-3", "data.max_documents=5"])
    save_config(config, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == config
    assert "never_drop_ids" in dump_config(config)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.train.seq_len <= config.model.max_seq_len
    assert dataclasses.is_dataclass(config.model)


def test_large_presets_without_a_tokenizer_get_one_that_fits(tmp_path):
    # configs/tinyllama-1b.yaml and llama2-7b.yaml fall back to a tokenizer trained on their
    # placeholder corpus when data.tokenizer is not set: that must work and fit the model.
    from gf_jax import data as data_lib
    from gf_jax.data import corpus_tokenizer

    for name in ("configs/tinyllama-1b.yaml", "configs/llama2-7b.yaml"):
        config = load_config(name, [f"data.tokenizer_cache_dir={tmp_path}"])
        assert config.data.tokenizer is None
        tokenizer = corpus_tokenizer(config.data)
        data_lib.check_vocab_fits(tokenizer, config.model.vocab_size)
        assert tokenizer.vocab_size == config.data.vocab_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.eval_every=10", "data.validation_fraction=0"], r"train\.eval_every > 0 needs a validation split"),
        (["data.row_context=8", "goldfish.h=13"], r"set data\.row_context >= 13 \(or 0"),
        # With no row context, a window as long as the row would drop every continued row's targets.
        (["data.row_context=0", "goldfish.h=1000000"], r"goldfish\.h \(1000000\) is not shorter than "
                                                        r"train\.seq_len .*set data\.row_context >= 1000000"),
    ],
)
def test_data_cross_section_checks_fail_at_load(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)
    # The same data settings are fine where the other section does not need them.
    config_from_dict({}, overrides + ["train.eval_every=0", "goldfish.strategy=static"])
    config_from_dict({}, ["data.row_context=0", "goldfish.h=13"])  # 0: no row context at all


def test_docs_configuration_lists_every_config_key():
    """docs/configuration.md names every field of every section, under that section's heading."""
    import re

    from gf_jax.config import RunConfig

    doc = open(os.path.join(helpers.REPO, "docs", "configuration.md")).read()
    sections = dict(re.findall(r"^## `(\w+)`[^\n]*\n(.*?)(?=^## |\Z)", doc, flags=re.M | re.S))
    config, missing = RunConfig(), []
    for section in dataclasses.fields(config):
        value, text = getattr(config, section.name), sections.get(section.name, "")
        for field in dataclasses.fields(value):
            sub = getattr(value, field.name)  # model.lora is a section inside a section
            names = [f"{field.name}.{f.name}" for f in dataclasses.fields(sub)] if dataclasses.is_dataclass(sub) else [field.name]
            missing += [f"{section.name}.{n}" for n in names if f"`{n}`" not in text]
    assert not missing, missing


def test_row_context_must_cover_the_passage_key_window():
    with pytest.raises(ValueError, match=r"goldfish hash window goldfish\.key_window \(64\); set data\.row_context >= 64"):
        config_from_dict({}, ["data.row_context=32", "goldfish.h=2", "goldfish.key_window=64"])
    config = config_from_dict({}, ["data.row_context=64", "goldfish.h=2", "goldfish.key_window=64"])
    assert config.goldfish.reach == 64
