"""Fine-tuning on prompt/completion examples end to end: train, validation loss, evaluate."""

import json
import os

import helpers

from gf_jax.config import config_from_dict
from gf_jax.train.trainer import Trainer

REPO = helpers.REPO
LLAMA3 = os.path.join(REPO, "tests", "fixtures", "hf", "llama3")


def write_examples(path, n=48):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: name {i}?\nA:", "completion": f" Item {i} is fine."}) + "\n")
    return str(path)


def sft_config(run_dir, path, *extra):
    return config_from_dict({}, [
        f"train.init_from={LLAMA3}", f"train.run_dir={run_dir}", "data.source=jsonl", f"data.path={path}",
        "data.format=prompt_completion", "data.validation_fraction=0.25", "model.max_seq_len=128",
        "train.seq_len=32", "train.global_batch=8", "train.steps=3", "train.log_every=1", "train.ckpt_every=0",
        "train.eval_every=3", "optimizer.warmup=1", "optimizer.lr=1e-2", "train.progress=false",
        "train.tensorboard=false", *extra,
    ])


def test_training_on_examples_runs_and_evaluates_answers_only(tmp_path):
    path = write_examples(tmp_path / "qa.jsonl")
    trainer = Trainer(sft_config(str(tmp_path / "run"), path))
    val_tokens = trainer.val_tokens
    n_answer_targets = sum(int(s.sum()) for s in val_tokens.supervised)
    record = trainer.evaluate()
    assert record["val_tokens"] == n_answer_targets  # prompts are not scored
    assert trainer.run()["step"] == 3
    trainer.close()

    from gf_jax.evaluate import cli as evaluate_cli

    run_dir = str(tmp_path / "run")
    results = evaluate_cli.run(["--run", run_dir, "--docs", "train", "--heldout", "validation", "--suffix-len", "4",
                             "--batch-size", "8", "--out", str(tmp_path / "eval")])
    result = results["run"]
    per_doc = result["memorization"]["per_doc"]
    assert per_doc and all(d["reference"].endswith(" fine.") for d in per_doc)  # the suffix is the answer's end
    assert result["mia"]["n_nonmembers"] == len(val_tokens.tokens)
    assert result["heldout"]["loss"] > 0
