"""The paper-reproduction experiments (gf_jax.experiments) run end to end on their smoke presets
(a tiny model, a few steps) and write one sane result per arm; every experiment preset, full-size
ones included, is a valid config."""

import glob
import json
import math
import os

import helpers
import pytest

from gf_jax.experiments import canary, corpus, memorization
from gf_jax.experiments.arms import load_experiment, preset_path

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.experiments.arms",
    "gf_jax.experiments.base_model",
    "gf_jax.experiments.canary",
    "gf_jax.experiments.cli",
    "gf_jax.experiments.corpus",
    "gf_jax.experiments.evaluation",
    "gf_jax.experiments.io",
    "gf_jax.experiments.runner",
    "gf_jax.experiments.tables",
    "gf_jax.experiments.training",
)

REPO = helpers.REPO


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def memorization_run(tmp_path_factory, tok_cache):
    out = str(tmp_path_factory.mktemp("memorization"))
    result = memorization.run(["--preset", "smoke", "--out", out, "--devices", "1",
                               f"data.tokenizer_cache_dir={tok_cache}", "experiment.offsets=[0,2]",
                               "experiment.offset_prefix_len=4"])
    return out, result


def _check_arm_rows(arms: dict, n_docs: int):
    for name, r in arms.items():
        agg = r["memorization"]["aggregate"]
        assert agg["n_documents"] == n_docs and agg["n_skipped"] == 0, name
        assert 0 <= agg["n_memorized"] <= n_docs
        for row in r["memorization"]["per_doc"]:
            assert 0.0 <= row["rougeL"] <= 1.0 and 0.0 <= row["exact_match"] <= 1.0
            assert isinstance(row["generated"], str) and row["reference"]
        assert 0.0 <= r["mia"]["loss"]["auc"] <= 1.0
        assert math.isfinite(r["heldout"]["loss"]) and r["heldout"]["loss"] > 0
        assert r["train"]["status"] == "done" and math.isfinite(r["train"]["final_loss_all"])


def test_memorization_smoke_writes_one_row_per_arm(memorization_run):
    out, result = memorization_run
    saved = json.load(open(os.path.join(out, "results.json")))
    assert list(saved["arms"]) == list(memorization.DEFAULT_ARMS)
    _check_arm_rows(saved["arms"], n_docs=3)
    for name in ("results.md", "rougeL_hist.png", "report/report.md", "report/report.json", "report/rougeL_hist.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    table = open(os.path.join(out, "results.md")).read()
    assert all(r["label"] in table for r in saved["arms"].values())
    for r in saved["arms"].values():  # extraction at prefix offsets, per arm
        assert set(r["offsets"]["offsets"]) == {"0", "2"} and r["offsets"]["offsets"]["0"]["n_documents"] == 3
    assert "## Prefix offsets" in open(os.path.join(out, "report", "report.md")).read()
    # Steps come from the epochs: 4 epochs of 3 one-row documents at batch 3.
    assert all(r["train"]["step"] == 4 for r in saved["arms"].values())


def test_memorization_documents_are_the_training_documents(memorization_run):
    out, _ = memorization_run
    saved = json.load(open(os.path.join(out, "results.json")))
    docs = saved["documents"]
    assert len(docs["members"]) == 3 and len(docs["control"]) == 3 and len(docs["heldout"]) == 2
    assert not set(docs["members"]) & (set(docs["control"]) | set(docs["heldout"]))
    from gf_jax.config import load_config
    from gf_jax.data import load_documents

    for arm, expected in (("standard", docs["members"]), ("control", docs["control"])):
        config = load_config(os.path.join(out, "arms", arm, "config.yaml"))
        assert [d.id for d in load_documents(config.data)] == expected
    # Every arm is evaluated on the members, the control included.
    for r in saved["arms"].values():
        assert [row["id"] for row in r["memorization"]["per_doc"]] == docs["members"]
    # The goldfish arms leave suffix tokens unsupervised, the standard arm none.
    never = {name: [row["suffix_never_supervised"] for row in r["memorization"]["per_doc"]]
             for name, r in saved["arms"].items()}
    assert never["standard"] == [0, 0, 0] and never["random-drop"] == [None] * 3
    assert sum(never["goldfish-static"]) == 6  # every 4th of 8 suffix targets, in each of 3 documents


def test_memorization_init_from_starts_from_trained_weights(memorization_run, tmp_path, tok_cache):
    trained, _ = memorization_run
    common_args = ["--preset", "smoke", "--devices", "1", "--arms", "standard", f"data.tokenizer_cache_dir={tok_cache}"]
    init_from = os.path.join(trained, "arms", "standard")
    result = memorization.run(common_args + ["--out", str(tmp_path), "--init-from", init_from])

    def first_loss(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return json.loads(f.readline())["loss_all"]

    scratch = first_loss(os.path.join(trained, "arms", "standard"))
    continued = first_loss(result["arms"]["standard"]["run_dir"])
    assert continued < scratch - 0.1


def test_memorization_fine_tuning_mode_pretrains_one_base_for_every_arm(tmp_path, tok_cache):
    import yaml

    args = ["--preset", "smoke", "--devices", "1", "--out", str(tmp_path), "--arms", "standard,lora-goldfish-hash",
            f"data.tokenizer_cache_dir={tok_cache}", "experiment.base_corpus=data/tinyshakespeare.txt",
            "experiment.base_steps=3", "experiment.lora_rank=4", "experiment.lora_lr=1e-2"]
    result = memorization.run(args)
    base = result["meta"]["base"]
    assert base["steps"] == 3 and base["status"] == "done" and base["resumed_from"] is None
    assert os.path.isdir(os.path.join(base["run_dir"], "checkpoints", "3"))
    configs = {}
    for name in ("standard", "lora-goldfish-hash"):
        with open(os.path.join(tmp_path, "arms", name, "config.yaml")) as f:
            configs[name] = yaml.safe_load(f)
        assert configs[name]["train"]["init_from"] == base["run_dir"]
    lora = configs["lora-goldfish-hash"]
    assert lora["model"]["lora"]["rank"] == 4 and len(lora["model"]["lora"]["targets"]) == 7
    assert lora["optimizer"]["lr"] == 1e-2 and configs["standard"]["model"]["lora"]["rank"] == 0
    assert lora["goldfish"]["strategy"] == "hash" and result["arms"]["lora-goldfish-hash"]["label"].startswith("LoRA")
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["base"]["run_dir"] == base["run_dir"]
    assert "fine-tunes one base model, pretrained 3 steps" in open(tmp_path / "results.md").read()
    # A second run reuses the finished base instead of training it again.
    assert memorization.run(args)["meta"]["base"]["resumed_from"] == 3


def test_memorization_lora_arms_need_a_base(tmp_path):
    with pytest.raises(ValueError, match="LoRA adapters on a pretrained base; set experiment.base_corpus"):
        memorization.run(["--preset", "smoke", "--out", str(tmp_path / "out"), "--arms", "standard,lora-standard"])
    assert not os.listdir(tmp_path / "out")  # refused before a tokenizer or document was written


def test_canary_smoke_writes_one_row_per_arm(tmp_path, tok_cache):
    result = canary.run(["--preset", "smoke", "--out", str(tmp_path), "--devices", "1",
                         f"data.tokenizer_cache_dir={tok_cache}", "experiment.offsets=[0,4]",
                         "experiment.offset_prefix_len=8"])
    saved = json.load(open(tmp_path / "results.json"))
    assert list(saved["arms"]) == ["standard", "k4", "control"]
    _check_arm_rows(saved["arms"], n_docs=2)
    assert saved["arms"]["k4"]["goldfish"]["k"] == 4 and saved["arms"]["k4"]["goldfish"]["strategy"] == "hash"
    assert len(saved["heldout_canary_ids"]) == 2 and not set(saved["canary_ids"]) & set(saved["heldout_canary_ids"])
    assert all(i.startswith("canary/") for i in saved["canary_ids"])
    # The canaries reached the training stream of the canary arms, not the control's.
    from gf_jax.config import load_config

    assert load_config(str(tmp_path / "arms" / "k4" / "config.yaml")).data.canary_repeats == 3
    assert load_config(str(tmp_path / "arms" / "control" / "config.yaml")).data.canary_repeats == 0
    for name in ("results.md", "rougeL_hist.png", "report/report.md"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert result["meta"]["steps"] == 6
    assert saved["arms"]["k4"]["offsets"]["offsets"]["4"]["n_documents"] == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "experiments", "*.yaml"))))
def test_experiment_presets_are_valid(path):
    name = os.path.basename(path)
    cls = memorization.MemorizationExperiment if name.startswith("memorization_") else canary.CanaryExperiment
    experiment, config = load_experiment(path, [], cls)
    assert config.train.seq_len <= config.model.max_seq_len


def test_unknown_experiment_key_is_a_clear_error():
    path = preset_path("memorization", "smoke", memorization.PRESET_ALIASES)
    with pytest.raises(ValueError, match="experiment.epoch"):
        load_experiment(path, ["experiment.epoch=3"], memorization.MemorizationExperiment)
    with pytest.raises(ValueError, match="no preset 'nope'"):
        preset_path("memorization", "nope", memorization.PRESET_ALIASES)


def test_truncate_to_tokens_cuts_at_a_token_boundary(tmp_path):
    from gf_jax.data import read_text_documents
    from gf_jax.tokenizer import cached_tokenizer

    docs = read_text_documents(os.path.join(REPO, "data", "wikitext2_valid.txt"), "wikitext")[:4]
    tokenizer = cached_tokenizer([d.text for d in docs], 400, str(tmp_path))
    for doc in docs:
        for n in (17, 60):
            cut = corpus.truncate_to_tokens(doc.text, tokenizer, n)
            assert doc.text.startswith(cut) and len(tokenizer.encode([cut])[0]) == n
    assert corpus.truncate_to_tokens("a few words", tokenizer, 500) is None


def test_rows_per_epoch_matches_the_pipeline():
    import numpy as np

    from gf_jax import data
    from gf_jax.data import BatchIterator

    lengths = [5, 40, 17, 64, 65, 3]
    tokens = [np.arange(n, dtype=np.int32) % 7 for n in lengths]
    for mode in ("packed", "document"):
        it = BatchIterator(tokens, global_batch=2, seq_len=16, mode=mode, process_index=0, process_count=1, prefetch=0)
        assert data.rows_per_epoch(lengths, 16, mode) == it.rows_per_epoch


def test_memorization_fine_tunes_a_hugging_face_model(tmp_path):
    """--init-from an HF directory: the architecture and tokenizer come from it (no model.* keys)."""
    import yaml

    preset = preset_path("memorization", "smoke", memorization.PRESET_ALIASES)
    with open(preset) as f:
        values = yaml.safe_load(f)
    values["model"] = {"max_seq_len": 64}
    values["data"].pop("vocab_size")
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(values))
    hf_dir = os.path.join(REPO, "tests", "fixtures", "hf", "llama3")
    result = memorization.run(["--config", str(path), "--out", str(tmp_path / "out"), "--devices", "1",
                               "--arms", "standard", "--init-from", hf_dir])
    assert result["meta"]["tokenizer"] == os.path.join(hf_dir, "tokenizer.json")
    assert result["meta"]["vocab_size"] == 320  # the fixture's tokenizer, not one trained on the corpus
    _check_arm_rows({"standard": result["arms"]["standard"]}, 3)
