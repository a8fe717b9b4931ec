"""Multi-process runs: when start-up initialises jax.distributed (decision table), and real
multi-process training on localhost (CPU devices, gloo collectives)."""

import pytest

from gf_jax.distributed import DistributedConfig, plan


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
