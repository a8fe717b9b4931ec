"""Multi-process runs: when start-up initialises jax.distributed (decision table), and real
multi-process training on localhost (CPU devices, gloo collectives)."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from gf_jax.config import DistributedConfig, load_config
from gf_jax.data import TextTask, corpus_tokenizer
from gf_jax.run.distributed import plan
from gf_jax.run.load import load_model
from gf_jax.train.cli import Trainer

# ---------------------------------------------------------------------------------------------
# The decision: explicit settings, environment variables, detected clusters, single process.


def test_single_process_skips_initialisation():
    decision = plan(DistributedConfig(), {}, on_tpu_vm=False)
    assert not decision.initialize and decision.source == "single"
    # One process announced explicitly is still a single-process run.
    assert not plan(DistributedConfig(num_processes=1), {}, on_tpu_vm=False).initialize
    assert not plan(DistributedConfig(mode="off"), {"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-8]"}).initialize


def test_explicit_settings_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "env-host:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
    decision = plan(DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2), env)
    assert (decision.initialize, decision.source) == (True, "explicit")
    assert (decision.coordinator_address, decision.num_processes, decision.process_id) == ("10.0.0.1:1234", 4, 2)
    # Fields left unset are taken from the environment (e.g. a per-process rank variable).
    decision = plan(DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4), {"JAX_PROCESS_ID": "3"})
    assert decision.process_id == 3


def test_environment_variables_gf_jax_first():
    env = {"GF_JAX_COORDINATOR": "a:1", "JAX_COORDINATOR_ADDRESS": "b:2", "JAX_NUM_PROCESSES": "2",
           "GF_JAX_PROCESS_ID": "1"}
    decision = plan(DistributedConfig(), env, on_tpu_vm=False)
    assert (decision.initialize, decision.source) == (True, "environment")
    assert (decision.coordinator_address, decision.num_processes, decision.process_id) == ("a:1", 2, 1)


def test_clusters_are_left_to_jax_auto_detection():
    slurm = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    decision = plan(DistributedConfig(), slurm, on_tpu_vm=False)
    assert (decision.initialize, decision.source, decision.num_processes) == (True, "slurm", None)
    # The batch script itself (no job step) and one-task steps are single-process.
    assert not plan(DistributedConfig(), {"SLURM_NTASKS": "4"}, on_tpu_vm=False).initialize
    assert not plan(DistributedConfig(), {**slurm, "SLURM_NTASKS": "1"}, on_tpu_vm=False).initialize
    assert plan(DistributedConfig(), {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "2"},
                on_tpu_vm=False).source == "mpi"
    assert plan(DistributedConfig(), {}, on_tpu_vm=True).source == "tpu"
    # A cluster fills what the settings leave open.
    assert plan(DistributedConfig(coordinator_address="h:9"), slurm, on_tpu_vm=False).initialize


@pytest.mark.parametrize(
    "config, env, match",
    [
        (DistributedConfig(num_processes=2), {}, "distributed.coordinator_address and distributed.process_id"),
        (DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"process_id must be in \[0, 2\)"),
        (DistributedConfig(), {"JAX_NUM_PROCESSES": "two"}, "must be an integer"),
    ],
)
def test_inconsistent_settings_fail_with_a_fix(config, env, match):
    with pytest.raises(ValueError, match=match):
        plan(config, env, on_tpu_vm=False)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="distributed.mode must be one of"):
        DistributedConfig(mode="on")
    with pytest.raises(ValueError, match="distributed.cpu_collectives"):
        DistributedConfig(cpu_collectives="nccl")
    with pytest.raises(ValueError, match="heartbeat_timeout must be >= 1"):
        DistributedConfig(heartbeat_timeout=0)


# ---------------------------------------------------------------------------------------------
# Real multi-process runs on localhost: N processes x 2 CPU devices, gloo collectives, one mesh.

REPO = helpers.REPO
TINY = os.path.join(REPO, "configs", "tiny.yaml")
DEVICES_PER_PROCESS = 2
STEPS = 10
HEARTBEAT_S = 10
# The tiny config shrunk so that a process starts, compiles and trains in seconds on 2 CPU cores.
SMALL = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "data.max_documents=400", "data.validation_fraction=0.1",
    "data.vocab_size=384", "train.global_batch=8", "train.seq_len=32", f"train.steps={STEPS}", "optimizer.warmup=2",
    "train.log_every=1", "train.ckpt_every=0", "train.eval_every=0", "train.progress=false",
    "train.tensorboard=false",
]
COMPARED = ("loss", "loss_all", "loss_dropped", "drop_fraction", "grad_norm", "supervised_tokens")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A 384-piece tokenizer trained once on the test documents (every process reads this file)."""
    config = load_config(TINY, SMALL)
    cache = str(tmp_path_factory.mktemp("tokenizers"))
    return corpus_tokenizer(dataclasses.replace(config.data, tokenizer_cache_dir=cache)).path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """N ``python -m gf_jax.train`` processes on localhost; killed on exit whatever happens."""

    def __init__(self, n, run_dir, tokenizer, log_dir, extra=(), per_process=None):
        self.n, self.run_dir, self.logs = n, str(run_dir), [os.path.join(log_dir, f"process{i}.log") for i in range(n)]
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"}
        self.procs = []
        for i in range(n):
            cmd = [
                sys.executable, "-m", "gf_jax.train", "--config", TINY, *SMALL, f"data.tokenizer={tokenizer}",
                f"train.run_dir={run_dir}", f"distributed.coordinator_address=127.0.0.1:{port}",
                f"distributed.num_processes={n}", f"distributed.process_id={i}",
                f"distributed.heartbeat_timeout={HEARTBEAT_S}", "distributed.initialization_timeout=60",
                *extra, *(per_process or {}).get(i, ()),
            ]
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)

    def wait(self, timeout: float, *, while_running=None) -> list[int]:
        """Exit codes of all processes; fails (after killing them) past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                pytest.fail(f"processes still running after {timeout:.0f} s:\n{self.output()}")
            if while_running is not None:
                while_running(self)
            time.sleep(0.1)
        return [p.returncode for p in self.procs]

    def output(self, i: int | None = None) -> str:
        texts = []
        for j in range(self.n) if i is None else [i]:
            with open(self.logs[j]) as f:
                texts.append(f"--- process {j} ---\n{f.read()[-4000:]}" if i is None else f.read())
        return "\n".join(texts)


def records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_run(config, n_processes: int, monkeypatch) -> str:
    """The same training in this process on as many devices, fed the global batches that
    ``n_processes`` processes assemble (their local shares, concatenated in process order)."""
    original = TextTask.train_iterator

    class Shares:
        def __init__(self, iterators):
            self.iterators = iterators

        def __next__(self):
            parts = [next(it) for it in self.iterators]
            return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

        def get_state(self):
            return {"step": self.iterators[0].get_state()["step"]}

        def close(self):
            for it in self.iterators:
                it.close()

    def train_iterator(self, tokenizer, **kwargs):
        return Shares([original(self, tokenizer, process_index=i, process_count=n_processes, **kwargs)
                       for i in range(n_processes)])

    monkeypatch.setattr(TextTask, "train_iterator", train_iterator)
    Trainer(config, devices=jax.devices()[: n_processes * DEVICES_PER_PROCESS], log=lambda line: None).run()
    return config.train.run_dir


def params(run_dir) -> list[np.ndarray]:
    model, _, _ = load_model(run_dir)  # one process, one device: whatever wrote it
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_same_training(run_dir, reference_dir):
    got, want = records(run_dir), records(reference_dir)
    val_got, val_want = [r for r in got if "val_loss" in r], [r for r in want if "val_loss" in r]
    for g, w in zip(val_got, val_want, strict=True):  # held-out loss over batches dealt to processes
        assert (g["step"], g["val_tokens"]) == (w["step"], w["val_tokens"])
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5)
    got, want = [r for r in got if "loss" in r], [r for r in want if "loss" in r]
    # Process 0 alone writes: one record per step, no duplicates from the other processes.
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in COMPARED:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["step"], key)
    # The checkpoint written by all processes restores in this single process, on one device.
    for a, b in zip(params(run_dir), params(reference_dir), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # 10 AdamW steps of float32 noise


def test_two_processes_preempted_and_resumed_train_like_one_process(tmp_path, tokenizer_path, monkeypatch):
    """2 processes x 2 devices (mesh fsdp=4). SIGTERM to process 1 only: both stop after the same
    step with one checkpoint; the same command resumes; losses and parameters equal one process
    on 4 devices fed the same global batches, and the checkpoint loads in one process."""
    run_dir = tmp_path / "run"
    evaluate = [f"train.eval_every={STEPS}"]

    def preempt_process_1(cluster):
        # config.yaml is written after the processes' first collective (so JAX's preemption
        # service is listening) and before the first step.
        if not cluster.preempted and (run_dir / "config.yaml").exists():
            cluster.procs[1].send_signal(signal.SIGTERM)
            cluster.preempted = True

    with Cluster(2, run_dir, tokenizer_path, tmp_path, extra=evaluate) as cluster:
        cluster.preempted = False
        assert cluster.wait(240, while_running=preempt_process_1) == [0, 0], cluster.output()
        out0 = cluster.output(0)
    assert "{'data': 1, 'fsdp': 4, 'tensor': 1}" in out0  # one mesh over both processes' devices
    assert "received signal" in out0 and "step " not in cluster.output(1)  # process 1 prints no log lines
    stopped = records(run_dir)[-1]["step"]
    assert 1 <= stopped < STEPS and os.listdir(run_dir / "checkpoints") == [str(stopped)]

    with Cluster(2, run_dir, tokenizer_path, tmp_path, extra=evaluate) as cluster:
        assert cluster.wait(240) == [0, 0], cluster.output()
        assert f"resuming from step {stopped}" in cluster.output(0)

    config = load_config(TINY, SMALL + evaluate + [f"data.tokenizer={tokenizer_path}",
                                                  f"train.run_dir={tmp_path / 'reference'}"])
    assert_same_training(run_dir, reference_run(config, 2, monkeypatch))
    assert any("val_loss" in r for r in records(run_dir))


def test_four_processes_train_like_one_process(tmp_path, tokenizer_path, monkeypatch):
    """4 processes x 2 devices on a data=2 x fsdp=4 mesh equal one process on 8 devices, with
    scanned layers (stacked weights saved by every process, restored in one)."""
    mesh = ["mesh.data=2", "mesh.fsdp=4", "model.n_layers=2", "model.scan_layers=true"]
    with Cluster(4, tmp_path / "run", tokenizer_path, tmp_path, extra=mesh) as cluster:
        assert cluster.wait(300) == [0, 0, 0, 0], cluster.output()
        assert "{'data': 2, 'fsdp': 4, 'tensor': 1}" in cluster.output(0)
    config = load_config(TINY, SMALL + mesh + [f"data.tokenizer={tokenizer_path}",
                                              f"train.run_dir={tmp_path / 'reference'}"])
    assert_same_training(tmp_path / "run", reference_run(config, 4, monkeypatch))


@pytest.mark.parametrize("failing", [1, 0])
def test_an_error_in_one_process_ends_the_whole_run(tmp_path, tokenizer_path, failing):
    """One process has a bad data path: it exits with the message, and the other (waiting for it
    in a collective, or for the coordinator it hosted) stops too instead of hanging."""
    other = 1 - failing
    start = time.monotonic()
    bad = {failing: ["data.path=/nonexistent/corpus.txt"]}
    with Cluster(2, tmp_path / "run", tokenizer_path, tmp_path, per_process=bad) as cluster:
        codes = cluster.wait(HEARTBEAT_S + 120)
        elapsed = time.monotonic() - start
        assert codes[failing] == 2 and codes[other] != 0, cluster.output()
        assert "data path '/nonexistent/corpus.txt' does not exist" in cluster.output(failing)
        # The other learns it from its failed collective or from the coordination service.
        out = cluster.output(other)
        assert f"error (process {other} of 2)" in out or "another task died" in out, out
    assert elapsed < HEARTBEAT_S + 90
