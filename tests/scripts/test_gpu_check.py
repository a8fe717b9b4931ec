"""scripts/gpu_check.py: the one-call GPU check, run as a CPU dry run (every step at tiny sizes),
so that it is known to work before a GPU minute is spent (issue 25)."""

import json
import math
import os
import subprocess
import sys

import helpers
import pytest

SCRIPT = os.path.join(helpers.REPO, "scripts", "gpu_check.py")
STEPS = ["train_1b", "train_135m", "loss_128k_chunked", "loss_128k_unchunked", "attention", "decode", "decode_f32"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--dry-run"], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=900)
    with open(out / "results.json") as f:
        return proc, json.load(f), (out / "results.md").read_text()


def test_every_step_runs_and_is_recorded(dry_run):
    proc, results, table = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [r["step"] for r in results["steps"]] == STEPS
    bad = {r["step"]: r.get("log_tail", "")[-500:] for r in results["steps"] if r["status"] != "ok"}
    assert not bad, bad
    assert all(f"| {name} | ok |" in table for name in STEPS)


def test_training_steps_report_times_ratio_and_no_mfu_on_cpu(dry_run):
    steps = {r["step"]: r["result"] for r in dry_run[1]["steps"]}
    train = steps["train_1b"]
    for variant in ("standard", "goldfish"):
        assert math.isfinite(train[variant]["step_time_s"]) and train[variant]["tokens_per_s"] > 0
        assert train[variant]["mfu"] is None  # the CPU has no peak: MFU is left out, not invented
    assert 0.2 < train["goldfish_over_standard"] < 5 and 0.1 < train["goldfish"]["drop_fraction"] < 0.5
    assert "goldfish" not in steps["loss_128k_chunked"] and "standard" in steps["loss_128k_unchunked"]


def test_attention_and_decoding_figures(dry_run):
    steps = {r["step"]: r["result"] for r in dry_run[1]["steps"]}
    xla = steps["attention"]["implementations"]["xla"]
    assert xla["fwd_bwd_ms"] > 0 and xla["max_abs_diff_vs_f32_xla"] < 1e-5  # float32 inputs: the same math
    decode = steps["decode"]
    assert decode["methods"]["jax KV cache"]["tokens_per_s"] > 0
    assert decode["cache_equals_recompute"] is True
    try:
        import transformers  # noqa: F401
    except ImportError:  # the test machine: the comparison is skipped and says why
        assert decode["speedup_over_hf"] is None and "not installed" in decode["hf_note"]


def test_list_and_unknown_steps():
    listed = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in listed.splitlines()] == STEPS
    bad = subprocess.run([sys.executable, SCRIPT, "--list", "--only", "trian_1b"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown step 'trian_1b'" in bad.stderr
