"""The train step of a tiny config compiled ahead of time for a TPU topology on this CPU host, with
splash attention: the Mosaic lowering of the TPU kernel and the SPMD partitioning are checked
without a TPU (needs libtpu from requirements.txt); scanned layers compile one block for all layers."""

import pytest

from gf_jax.config import load_config
from gf_jax.train import aot


@pytest.fixture(scope="module")
def v5e_2x2():
    pytest.importorskip("libtpu", reason="libtpu (requirements.txt) is not installed: no TPU compiler on this host")
    return aot.topology_devices("v5e:2x2")


def _tiny(*extra):
    return load_config("configs/tiny.yaml", [
        "model.n_layers=1", "model.max_seq_len=256", "train.seq_len=256", "train.global_batch=8",
        "train.grad_accum=2", "model.dtype=auto", "model.remat=minimal", "mesh.fsdp=2", "mesh.tensor=2",
        "model.attention_block_q=128", "model.attention_block_kv=128", *extra,
    ])


@pytest.fixture(scope="module")
def one_layer_step(v5e_2x2):
    return aot.compile_train_step(_tiny(), v5e_2x2)


def test_tiny_train_step_compiles_for_tpu_with_splash(one_layer_step):
    compiled, report = one_layer_step
    # attention: auto on a TPU mesh is splash: its forward, dq and dkv kernels are Mosaic calls.
    assert compiled.as_text().count("tpu_custom_call") >= 3
    assert report.chips == 4 and report.device_kind == "TPU v5 lite"
    assert report.hbm == 16 * aot.GIB and report.fits
    assert 0 < report.arguments < report.total < 0.1 * aot.GIB


def test_scanned_layers_compile_one_block_for_tpu(v5e_2x2, one_layer_step):
    compiled, report = aot.compile_train_step(_tiny("model.n_layers=3", "model.scan_layers=true"), v5e_2x2)
    # Three layers in one scan: the program holds the splash kernels of one block, not three.
    kernels = compiled.as_text().count("tpu_custom_call")
    assert kernels == one_layer_step[0].as_text().count("tpu_custom_call")
    assert report.fits and report.arguments > one_layer_step[1].arguments


def test_v4_topology_has_one_device_per_chip(v5e_2x2):
    # A real v4 slice runs each chip's two TensorCores as one device (megacore): v4-8 is 4 devices.
    devices = aot.topology_devices("v4:2x2x1")
    assert len(devices) == 4 and {d.core_on_chip for d in devices} == {0}


def test_unknown_topology_is_one_sentence(v5e_2x2):
    with pytest.raises(ValueError, match="cannot describe TPU topology 'v9z:2x2'"):
        aot.topology_devices("v9z:2x2")


def test_hbm_table():
    assert aot.hbm_gib("TPU v6 lite") == 32 and aot.hbm_gib("TPU v5 lite") == 16
    assert aot.hbm_gib("TPU v5p") == 95 and aot.hbm_gib("TPU v4") == 32 and aot.hbm_gib("cpu") is None
