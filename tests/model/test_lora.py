"""LoRA (model.lora): adapters-only training on a frozen base, checkpoints of adapters, merge, PEFT."""

import json
import os
import shutil

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gf_jax.batch import Batch
from gf_jax.config import config_from_dict
from gf_jax.hf.export import export_model
from gf_jax.hf.safetensors_io import SafetensorsReader
from gf_jax.model import LoRAConfig, ModelConfig, lora
from gf_jax.model.counting import flops_per_token
from gf_jax.model.sharding import MeshConfig, make_mesh
from gf_jax.model.transformer import Transformer
from gf_jax.model.transforms import merged as merged_model
from gf_jax.model.transforms import relayout
from gf_jax.run.export import export_run
from gf_jax.run.load import load_model
from gf_jax.run.source import architecture
from gf_jax.train.step import StepConfig, make_step_functions
from gf_jax.train.trainer import Trainer

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.hf.peft",
    "gf_jax.run.adapters",
    "gf_jax.model.transforms",
)

REPO = helpers.REPO
LLAMA3 = os.path.join(REPO, "tests", "fixtures", "hf", "llama3")
ALL = "[q,k,v,o,gate,up,down]"


def lora_config(run_dir, *extra):
    return config_from_dict({}, [
        f"train.init_from={LLAMA3}", f"train.run_dir={run_dir}", "data.path=data/tinyshakespeare.txt",
        "data.max_documents=200", "data.validation_fraction=0", "model.max_seq_len=128", "train.seq_len=32",
        "train.global_batch=8", "train.steps=4", "train.log_every=1", "train.ckpt_every=2", "optimizer.warmup=1",
        "optimizer.lr=1e-2", "train.progress=false", "train.tensorboard=false", "train.async_checkpoint=false",
        "model.lora.rank=4", "model.lora.alpha=8", f"model.lora.targets={ALL}", *extra,
    ])


def host(state):
    return jax.tree.map(np.asarray, jax.device_get(state))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 4-step LoRA run on the LLaMA-3 fixture (bfloat16 base, float32 adapters): its directory, the
    state before training and the losses."""
    run_dir = str(tmp_path_factory.mktemp("lora") / "run")
    trainer = Trainer(lora_config(run_dir, "model.param_dtype=bfloat16"))
    start = host(nnx.state(trainer.model))
    trainer.run()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return run_dir, start, losses


# ---- config ------------------------------------------------------------------------------------


def test_lora_settings_from_yaml_and_the_command_line():
    from_yaml = config_from_dict({"model": {"lora": {"rank": 16, "alpha": 32, "targets": ["q", "v"]}}})
    from_cli = config_from_dict({}, ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=[q, v]"])
    assert from_yaml.model.lora == from_cli.model.lora == LoRAConfig(16, 32.0, ("q", "v"))
    assert from_cli.model.lora.scale == 2.0 and config_from_dict({}).model.lora.enabled is False


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", r"model\.lora\.rank must be > 0 to train adapters \(0 turns LoRA off\), got -1\."),
    ("model.lora.alpha=32", r"model\.lora\.alpha is set but model\.lora\.rank is 0 .*set model\.lora\.rank > 0"),
    ("model.lora.targets=[q, q_proj]", r"has 'q_proj', which is not a projection; choose among q, k, v, o, gate"),
    ("model.lora.targets=[]", r"model\.lora\.targets is empty"),
    ("model.lora.dropout=1.5", r"model\.lora\.dropout must be in \[0, 1\), got 1\.5\."),
])
def test_bad_lora_settings_are_one_sentence(override, message):
    extra = [] if override.startswith(("model.lora.rank", "model.lora.alpha")) else ["model.lora.rank=8"]
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, [*extra, override])


def test_lora_without_a_base_or_on_a_lora_run_is_refused(lora_run, tmp_path):
    config = config_from_dict({}, ["model.lora.rank=4", f"train.run_dir={tmp_path / 'x'}",
                                   "data.path=data/tinyshakespeare.txt", "train.progress=false"])
    with pytest.raises(ValueError, match=r"train\.init_from is not set; set train\.init_from to a Hugging Face"):
        Trainer(config)
    assert not os.path.exists(tmp_path / "x" / "config.yaml")
    with pytest.raises(ValueError, match=r"is a LoRA run .* --merge-lora\) and start from OUT"):
        architecture(lora_run[0])


# ---- the model -----------------------------------------------------------------------------------


@nnx.jit
def forward(model, tokens_BxT):
    return model(tokens_BxT)


def tiny(n_layers=2, remat="none", **lora_settings):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                       remat=remat, lora=LoRAConfig(**lora_settings) if lora_settings else LoRAConfig())


def with_random_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    adapters = lora.split(nnx.state(model))[1]
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), adapters))
    return model


def test_fresh_adapters_compute_the_base_model_and_merging_equals_the_unmerged_forward():
    tokens_BxT = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    plain = Transformer(tiny(), rngs=nnx.Rngs(0))
    adapted = Transformer(tiny(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")),
                          rngs=nnx.Rngs(0))
    nnx.update(adapted, lora.split(nnx.state(plain))[0])  # same base weights
    np.testing.assert_array_equal(forward(adapted, tokens_BxT), forward(plain, tokens_BxT))  # B = 0: the base
    with_random_adapters(adapted)
    merged = merged_model(adapted)
    assert not merged.config.lora.enabled and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert np.abs(np.asarray(forward(adapted, tokens_BxT) - forward(plain, tokens_BxT))).max() > 1e-2
    np.testing.assert_allclose(forward(merged, tokens_BxT), forward(adapted, tokens_BxT), rtol=1e-5, atol=1e-5)
    # Against numpy: wo (N x H x D) + 2 * (A B) with A over the flattened N*H inputs.
    attn = adapted.blocks[1].attn
    a, b = np.asarray(attn.lora["o"].lora_a[...]), np.asarray(attn.lora["o"].lora_b[...])
    expected = np.asarray(attn.wo[...]) + 2.0 * (a @ b).reshape(4, 8, 32)
    np.testing.assert_allclose(merged.blocks[1].attn.wo[...], expected, rtol=1e-6, atol=1e-6)


def test_adapter_dropout_acts_in_training_steps_only():
    model = with_random_adapters(Transformer(tiny(n_layers=1, rank=4, dropout=0.5), rngs=nnx.Rngs(0)))
    tokens_BxT = jnp.arange(32).reshape(2, 16) % 64

    @nnx.jit
    def with_dropout(model, tokens_BxT):
        return model(tokens_BxT, dropout_key=jax.random.key(3))

    plain = forward(model, tokens_BxT)
    assert np.abs(np.asarray(with_dropout(model, tokens_BxT) - plain)).max() > 1e-3
    np.testing.assert_array_equal(forward(model, tokens_BxT), plain)  # outside a training step: no dropout


def test_scanned_layers_draw_each_layer_its_own_dropout_masks():
    """Dropout keys are split per layer, so the scanned model draws exactly the masks the unrolled
    one draws (a scan body traced once used to give every layer the same mask), and two layers'
    masks differ."""
    config = tiny(n_layers=3, rank=4, dropout=0.5, targets=("q", "v", "up"))
    unrolled = with_random_adapters(Transformer(config, rngs=nnx.Rngs(0)))
    scanned = relayout(unrolled, scan_layers=True)
    tokens_BxT = jnp.arange(32).reshape(2, 16) % 64
    key = jax.random.key(7)

    @nnx.jit
    def with_dropout(model, tokens_BxT, key):
        return model(tokens_BxT, dropout_key=key)

    np.testing.assert_allclose(with_dropout(scanned, tokens_BxT, key), with_dropout(unrolled, tokens_BxT, key),
                               rtol=1e-5, atol=1e-5)
    keys_L = lora.layer_keys(key, config.n_layers)
    ones = jnp.ones((2, 16, 32))
    masks = [lora.dropout(ones, 0.5, jax.random.fold_in(keys_L[layer], 0)) for layer in range(config.n_layers)]
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


# ---- the step: what trains, meshes, accumulation -----------------------------------------------------


def _batch(seed, rows=16):
    tokens = np.random.default_rng(seed).integers(0, 64, (rows, 17), dtype=np.int32)
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), (rows, 16)).copy()
    weights = np.ones((rows, 16), np.float32)
    weights[0::2, 6:] = 0.0  # the two micro-batches keep very different numbers of targets
    return Batch(tokens[:, :-1], tokens[:, 1:], positions, np.ones((rows, 16), np.int32), weights)


def _train(sc, mesh, host_state, steps=2):
    fns = make_step_functions(sc, mesh)
    model_state, opt_state = fns.init()
    model_state = jax.device_put(host_state, fns.model_shardings)
    losses = []
    for i in range(steps):
        batch = jax.device_put(_batch(i), fns.batch_sharding)
        model_state, opt_state, metrics = fns.train_step(model_state, opt_state, batch)
        losses.append(float(metrics["loss"]))
    return losses, host(model_state), host(opt_state)


def test_only_adapters_train_and_8_fsdp_devices_with_accumulation_equal_one_device():
    from gf_jax.config import LossConfig, OptimizerConfig
    from gf_jax.goldfish import GoldfishConfig

    model = tiny(n_layers=1, remat="full", rank=4, alpha=8, targets=("q", "v", "o", "down"))
    sc = StepConfig(model, GoldfishConfig(k=3), OptimizerConfig(lr=1e-2, warmup=1), LossConfig(), total_steps=4)
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    start = host(make_step_functions(sc, one).init()[0])
    losses, state, opt_state = _train(sc, one, start)
    base_before, adapters_before = lora.split(start)
    base_after, adapters_after = lora.split(state)
    assert_trees_equal(base_after, base_before)  # the base is bit-identical
    assert all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters_after),
                                                        jax.tree.leaves(adapters_before)))
    # AdamW moments exist for the adapters only.
    moments = [path for path, _ in nnx.to_flat_state(opt_state["opt_state"]) if "mu" in path or "nu" in path]
    assert len(moments) == 2 * len(jax.tree.leaves(adapters_before)) and all("lora" in path for path in moments)

    # The base sharded over 8 fsdp devices, and 2 micro-batches of 8 rows: the same step.
    accumulated = StepConfig(model, sc.goldfish, sc.optimizer, sc.loss, grad_accum=2, total_steps=4)
    got_losses, got_state, _ = _train(accumulated, make_mesh(MeshConfig(1, 8, 1)), start)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    assert_trees_equal(lora.split(got_state)[0], base_before)
    for x, y in zip(jax.tree.leaves(lora.split(got_state)[1]), jax.tree.leaves(adapters_after)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


# ---- runs: checkpoints, resume, fingerprint ----------------------------------------------------------


def test_a_lora_run_trains_only_adapters_and_checkpoints_them_alone(lora_run):
    run_dir, start, losses = lora_run
    model, config, _ = load_model(run_dir)
    base_before, adapters_before = lora.split(start)
    base_after, adapters_after = lora.split(host(nnx.state(model)))
    assert_trees_equal(base_after, base_before)  # bit-identical bfloat16 base
    assert {x.dtype for x in jax.tree.leaves(base_after)} == {np.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters_after)} == {np.dtype(np.float32)}
    assert all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters_after)[1::2],
                                                        jax.tree.leaves(adapters_before)[1::2]))  # every B moved
    assert config.model.lora.rank == 4 and len(losses) == 4
    # The checkpoint's model item holds the adapters only (the optimizer holds their moments only).
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(run_dir, "checkpoints", "4", "model"))
    saved = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(metadata.item_metadata.tree)[0]]
    assert len(saved) == len(jax.tree.leaves(adapters_after)) and all("['lora']" in p for p in saved)


def test_resuming_a_lora_run_equals_the_uninterrupted_run(lora_run, tmp_path):
    run_dir, _, losses = lora_run
    resumed_dir = str(tmp_path / "resumed")
    assert Trainer(lora_config(resumed_dir, "model.param_dtype=bfloat16", "train.stop_at=2")).run()["step"] == 2
    assert Trainer(lora_config(resumed_dir, "model.param_dtype=bfloat16")).run()["step"] == 4
    with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
        resumed_losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    np.testing.assert_allclose(resumed_losses, losses, rtol=1e-6)
    assert_trees_equal(host(nnx.state(load_model(resumed_dir)[0])), host(nnx.state(load_model(run_dir)[0])))


def test_another_base_or_other_adapters_are_refused_at_resume_and_load(lora_run, tmp_path):
    run_dir = str(tmp_path / "copy")
    shutil.copytree(lora_run[0], run_dir)
    other = str(tmp_path / "other_base")  # the same model saved in float16: other safetensors headers
    base, _, tokenizer = load_model(LLAMA3)
    export_model(base, tokenizer, other, dtype="float16", source_dir=LLAMA3)
    with pytest.raises(ValueError, match=r"is not the model the adapters of .* were trained on \(file "
                                         r"model\.safetensors: .* then, .* now\); point train\.init_from"):
        load_model(run_dir, base=other)
    with pytest.raises(ValueError, match=r"is not the model the adapters of"):
        Trainer(lora_config(run_dir, f"train.init_from={other}", "model.param_dtype=bfloat16"))
    with pytest.raises(ValueError, match=r"holds checkpoints with model\.lora\.rank=4, but the config sets 8"):
        Trainer(lora_config(run_dir, "model.lora.rank=8"))
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass load_model\(\.\.\., base=PATH\)"):
        load_model(run_dir, base=str(tmp_path / "gone"))


# ---- export: merged, PEFT ------------------------------------------------------------------------------


def test_merged_export_equals_the_adapted_model_and_the_numpy_merge(lora_run, tmp_path):
    run_dir = lora_run[0]
    with pytest.raises(ValueError, match=r"is a LoRA run \(rank-4 adapters on .*\); pass --merge-lora .* or --peft"):
        export_run(run_dir, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    out = str(tmp_path / "merged")
    export_run(run_dir, out, merge_lora=True, dtype="float32")
    adapted, _, _ = load_model(run_dir)
    exported, config, _ = load_model(out)
    assert not config.model.lora.enabled
    tokens_BxT = jnp.arange(64).reshape(2, 32) % 320
    np.testing.assert_allclose(exported(tokens_BxT), adapted(tokens_BxT), rtol=2e-2, atol=2e-2)  # bf16 base
    # q_proj of layer 1 in HF layout (out x in): W + (alpha / r) (A B)^T, from the fixture's own tensor.
    a = np.asarray(adapted.blocks[1].attn.lora["q"].lora_a[...])
    b = np.asarray(adapted.blocks[1].attn.lora["q"].lora_b[...])
    w = np.asarray(SafetensorsReader(LLAMA3).view("model.layers.1.self_attn.q_proj.weight"), np.float32)
    base_w = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)  # the run's base is bfloat16
    got = np.asarray(SafetensorsReader(out).view("model.layers.1.self_attn.q_proj.weight"))
    np.testing.assert_allclose(got, base_w + 2.0 * (a @ b).T, rtol=1e-6, atol=1e-6)


def test_peft_export_round_trips_and_training_continues_from_it(lora_run, tmp_path):
    run_dir = lora_run[0]
    peft_dir = str(tmp_path / "peft")
    assert sorted(export_run(run_dir, peft_dir, peft=True)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        settings = json.load(f)
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["lora_alpha"] == 8 and isinstance(settings["lora_alpha"], int)
    assert settings["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    reader = SafetensorsReader.of_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert reader.shape("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (4, 48)  # r x in
    assert reader.shape("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight") == (24, 4)  # out x r
    assert reader.shape("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight") == (4, 48)
    assert len(reader.names()) == 2 * 7 * 2

    trained, _, _ = load_model(run_dir)
    # The base from base_model_name_or_path, in the run's dtype: the same model as the run's.
    imported, config, _ = load_model(peft_dir, param_dtype="bfloat16")
    assert config.model.lora == trained.config.lora
    assert_trees_equal(host(nnx.state(imported)), host(nnx.state(trained)))
    tokens_BxT = jnp.arange(64).reshape(2, 32) % 320
    np.testing.assert_array_equal(forward(imported, tokens_BxT), forward(trained, tokens_BxT))

    # A new run continues from the PEFT adapters (settings from adapter_config.json).
    trainer = Trainer(config_from_dict({}, [
        f"train.init_from={LLAMA3}", f"train.init_adapters={peft_dir}", f"train.run_dir={tmp_path / 'next'}",
        "data.path=data/tinyshakespeare.txt", "data.max_documents=50", "data.validation_fraction=0",
        "model.max_seq_len=128", "train.seq_len=32", "train.global_batch=8", "train.progress=false"]))
    try:
        assert trainer.config.model.lora == trained.config.lora
        assert_trees_equal(host(nnx.state(trainer.model, nnx.LoRAParam)), host(nnx.state(trained, nnx.LoRAParam)))
    finally:
        trainer.close()


def test_flops_per_token_of_a_lora_step_skips_the_base_weight_gradients():
    config = tiny(rank=4, targets=("q", "o", "down"))
    state = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    flat = {path: variable for path, variable in nnx.to_flat_state(state)}
    matmul = sum(v.size for p, v in flat.items() if p[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
                                                             "lm_head"))
    adapters = sum(v.size for p, v in flat.items() if "lora" in p)
    attention = 12 * 2 * 4 * 8 * 16  # 12 L N H T
    assert flops_per_token(tiny(), 16) == 6 * matmul + attention
    assert flops_per_token(config, 16) == 4 * matmul + attention + 6 * adapters


@pytest.mark.parametrize("setting, message", [
    ({"use_dora": True}, r"has use_dora=True, which gf_jax's LoRA adapters cannot represent"),
    ({"target_modules": "all-linear"}, r"has target_modules='all-linear'; gf_jax reads an explicit list"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"targets 'lm_head'; gf_jax's adapters go on q_proj, k_proj"),
    ({"peft_type": "IA3"}, r"has peft_type='IA3'; gf_jax reads LORA adapters only"),
])
def test_peft_settings_the_adapters_cannot_represent_are_named(tmp_path, setting, message):
    from gf_jax.hf.peft import adapter_config, read_adapter_config

    values = {**adapter_config(LoRAConfig(rank=8, targets=("q", "v")), "/models/base"), **setting}
    (tmp_path / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        read_adapter_config(str(tmp_path))


def test_lora_with_scanned_layers_trains_loads_and_exports_like_unrolled(lora_run, tmp_path):
    # The adapters are stacked with their blocks: the same run with model.scan_layers trains the same
    # losses, loads in either layout, and exports the same PEFT tensors.
    run_dir, _, losses = lora_run
    scanned_dir = str(tmp_path / "scanned")
    Trainer(lora_config(scanned_dir, "model.param_dtype=bfloat16", "model.scan_layers=true")).run()
    with open(os.path.join(scanned_dir, "metrics.jsonl")) as f:
        scanned_losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    np.testing.assert_allclose(scanned_losses, losses, rtol=1e-4)
    scanned, config, _ = load_model(scanned_dir)
    assert config.model.scan_layers and config.model.lora.rank == 4
    unrolled = load_model(scanned_dir, scan_layers=False)[0]
    tokens_BxT = jnp.arange(64).reshape(2, 32) % 320
    np.testing.assert_allclose(forward(scanned, tokens_BxT), forward(unrolled, tokens_BxT), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(scanned, tokens_BxT), forward(load_model(run_dir)[0], tokens_BxT),
                               rtol=1e-3, atol=1e-3)
    for source, name in ((scanned_dir, "from_scanned"), (run_dir, "from_unrolled")):
        export_run(source, str(tmp_path / name), peft=True)
    a = SafetensorsReader.of_file(str(tmp_path / "from_scanned" / "adapter_model.safetensors"))
    b = SafetensorsReader.of_file(str(tmp_path / "from_unrolled" / "adapter_model.safetensors"))
    assert a.names() == b.names()
    for name in a.names():
        np.testing.assert_allclose(np.asarray(a.view(name)), np.asarray(b.view(name)), rtol=1e-3, atol=1e-4)
