"""The tracker: windows of LossSums turned into records, throughput, and the writers."""

import os

import numpy as np
import pytest

from gf_jax.loss import LossSums
from gf_jax.train.tracker import (
    JsonlWriter,
    NonFiniteLossError,
    TensorBoardWriter,
    Tracker,
    format_record,
    read_metrics,
)


def step_metrics(xent, z, xent_all, xent_dropped, kept, dropped, loss=1.0):
    sums = LossSums(np.float32(xent), np.float32(z), np.float32(xent_all), np.float32(xent_dropped),
                    np.int32(kept), np.int32(dropped), np.int32(kept + dropped))
    return {**sums._asdict(), "loss": np.float32(loss), "grad_norm": np.float32(0.5), "lr": np.float32(1e-3)}


def test_a_window_divides_its_summed_counts_once():
    tracker = Tracker([], tokens_per_step=100, flops_per_token=6.0, n_devices=2, peak=None)
    tracker.step_done(step_metrics(0, 0, 0, 0, 0, 0), step_started=0.0)  # the compile step (timed apart)
    tracker.read_back(1)
    tracker.log_record(1, z_loss=0.0)
    # Two steps that keep very different numbers of targets: the mean of means would be 2.5.
    tracker.step_done(step_metrics(10.0, 4.0, 16.0, 6.0, kept=10, dropped=3), step_started=0.0)
    tracker.step_done(step_metrics(40.0, 8.0, 50.0, 10.0, kept=10 * 4, dropped=2), step_started=0.0)
    tracker.read_back(3)
    record = tracker.log_record(3, z_loss=0.5)
    assert record["loss"] == pytest.approx((10 + 40 + 0.5 * (4 + 8)) / 50)
    assert record["loss_kept"] == pytest.approx(50 / 50)
    assert record["loss_all"] == pytest.approx(66 / 55)
    assert record["loss_dropped"] == pytest.approx(16 / 5)
    assert record["drop_fraction"] == pytest.approx(5 / 55)
    assert record["supervised_tokens"] == 50 and record["input_tokens"] == 300
    assert record["tokens_per_s"] > 0 and record["mfu"] is None
    assert "compile_s" not in record  # reported once, with the first record
    assert "MFU" not in format_record(record) and "tok/s" in format_record(record)


def test_a_non_finite_loss_is_caught_at_read_back():
    tracker = Tracker([], tokens_per_step=1, flops_per_token=1.0, n_devices=1, peak=100.0)
    tracker.step_done(step_metrics(1, 0, 1, 0, 1, 0, loss=float("nan")), step_started=0.0)
    with pytest.raises(NonFiniteLossError, match="nan by step 4"):
        tracker.read_back(4)


def test_jsonl_writer_drops_records_after_the_resumed_step(tmp_path):
    run_dir = str(tmp_path)
    writer = JsonlWriter(run_dir, resume_step=None)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": float(step)})
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    JsonlWriter(run_dir, resume_step=2)  # a resume from step 2: step 3 was never checkpointed
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    JsonlWriter(run_dir, resume_step=None)  # a fresh run in an old directory starts an empty file
    assert read_metrics(run_dir) == [] and read_metrics(str(tmp_path / "none")) == []


def test_tensorboard_writer_writes_scalar_events(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.write({"step": 5, "loss": 1.25, "note": "text is skipped", "mfu": None})
    writer.close()
    files = [os.path.join(root, f) for root, _, fs in os.walk(tmp_path / "tensorboard") for f in fs]
    assert len(files) == 1 and b"loss" in open(files[0], "rb").read()
    assert b"note" not in open(files[0], "rb").read()
