"""LoRA adapters as a PEFT adapter directory, and back.

A PEFT directory holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules`` in Hugging Face names, ...) and ``adapter_model.safetensors`` with, per layer
``i`` and targeted module, ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
(``r x in``) and ``...lora_B.weight`` (``out x r``); the update is ``(lora_alpha / r) B A``. This is
what ``peft.PeftModel.from_pretrained`` and vLLM's LoRA loader read. gf_jax's adapters are the same
matrices transposed (``A``: ``in x r``, ``B``: ``r x out``), with the same flattening of heads
(``q``'s outputs and ``o``'s inputs are ``n * head_dim + h``, as in the HF weights).

Importing accepts what gf_jax's adapters can represent: plain LoRA on the listed projections
of every layer (no DoRA, rsLoRA, biases, per-layer ranks or extra trained modules).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from gf_jax.hf.safetensors_io import NUMPY_DTYPES, SafetensorsReader, write_file
from gf_jax.model.config import LORA_TARGETS as TARGETS
from gf_jax.model.config import LoRAConfig
from gf_jax.util import paths
from gf_jax.util.staging import check_target, staged_folder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BY_HF_NAME = {module.split(".")[-1]: target for target, module in HF_MODULES.items()}
_PREFIX = "base_model.model.model.layers."
# adapter_config.json keys whose non-default values gf_jax's adapters cannot represent.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def tensor_name(layer: int, target: str, matrix: str) -> str:
    """The PEFT tensor of ``matrix`` (``"A"`` or ``"B"``) of ``target``'s adapter in ``layer``."""
    return f"{_PREFIX}{layer}.{HF_MODULES[target]}.lora_{matrix}.weight"


def adapter_arrays(model) -> dict[tuple[int, str, str], np.ndarray]:
    """``(layer, target, "A" | "B") -> our float32 matrix`` of every adapter of ``model`` (host copies).
    A layer's index is the integer in its state path, or the leading axis of stacked layers."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        target, matrix = path[-2], {"lora_a": "A", "lora_b": "B"}[path[-1]]
        value = np.asarray(jax.device_get(variable.get_value()), np.float32)
        layers = [p for p in path if isinstance(p, int)]
        if layers:
            out[(layers[0], target, matrix)] = value
        else:  # stacked layers: L x I x r
            out.update({(i, target, matrix): value[i] for i in range(value.shape[0])})
    return out


def adapter_config(lora: LoRAConfig, base_name: str) -> dict:
    alpha = lora.rank if lora.alpha is None else lora.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,  # PEFT's type: int
        "lora_dropout": lora.dropout, "target_modules": [HF_MODULES[t].split(".")[-1] for t in lora.targets],
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "revision": None,
        **_UNSUPPORTED,
    }


def export_peft(model, out_dir: str, *, base_name: str, dtype: str = "float32", overwrite: bool = False) -> list[str]:
    """Writes ``model``'s adapters as a PEFT directory (new or empty, or an earlier export with
    ``overwrite``; it appears only once complete); returns the file names written."""
    if not model.config.lora.enabled:
        raise ValueError("the model has no LoRA adapters (model.lora.rank is 0); export it without --peft.")
    np_dtype = NUMPY_DTYPES[dtype]
    arrays = adapter_arrays(model)
    specs = []
    for layer, target, matrix in sorted(arrays, key=lambda k: (k[0], TARGETS.index(k[1]), k[2])):
        hf = arrays[(layer, target, matrix)].T  # ours I x r / r x O -> PEFT's r x I / O x r
        specs.append((tensor_name(layer, target, matrix), hf.shape, np_dtype, lambda hf=hf: hf.astype(np_dtype)))
    check_target(out_dir, overwrite=overwrite, what="hf export --peft")
    with staged_folder(out_dir, marker={"kind": "hf export --peft"}) as tmp:
        write_file(os.path.join(tmp, WEIGHTS_FILE), specs, {"format": "pt"})
        paths.write_json(os.path.join(tmp, CONFIG_FILE), adapter_config(model.config.lora, base_name))
    return [WEIGHTS_FILE, CONFIG_FILE]


# ---- reading -------------------------------------------------------------------------------------


def read_adapter_config(peft_dir: str) -> tuple[LoRAConfig, str]:
    """``(model.lora settings, base_model_name_or_path)`` of a PEFT directory; anything gf_jax's
    adapters cannot represent is one sentence naming the key."""
    path = os.path.join(peft_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{peft_dir!r} has no {CONFIG_FILE}; pass a PEFT adapter directory.")
    with open(path) as f:
        values = json.load(f)
    if values.get("peft_type") != "LORA":
        raise ValueError(f"{path} has peft_type={values.get('peft_type')!r}; gf_jax reads LORA adapters only.")
    for key, default in _UNSUPPORTED.items():
        value = values.get(key, default)
        if value != default and (value or default):  # None, [], {} and False all mean "not used"
            raise ValueError(f"{path} has {key}={values[key]!r}, which gf_jax's LoRA adapters cannot represent "
                             f"(only {key}={default!r} is read).")
    modules = values.get("target_modules")
    if not isinstance(modules, list):
        raise ValueError(f"{path} has target_modules={modules!r}; gf_jax reads an explicit list of projections "
                         f"({', '.join(_BY_HF_NAME)}).")
    unknown = [m for m in modules if m not in _BY_HF_NAME]
    if unknown:
        raise ValueError(f"{path} targets {unknown[0]!r}; gf_jax's adapters go on {', '.join(_BY_HF_NAME)} only.")
    rank = int(values["r"])
    alpha = float(values.get("lora_alpha", rank))
    lora = LoRAConfig(rank=rank, alpha=None if alpha == rank else alpha,
                      targets=tuple(t for t in TARGETS if HF_MODULES[t].split(".")[-1] in modules),
                      dropout=float(values.get("lora_dropout", 0.0)))
    return lora, str(values.get("base_model_name_or_path") or "")


def load_adapters(peft_dir: str, abstract_adapters, shardings):
    """The adapters of ``peft_dir`` as an ``nnx.State`` like ``abstract_adapters`` (adapter leaves of
    a model with the directory's ``model.lora``), float32, each on its ``shardings`` leaf."""
    path = os.path.join(peft_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{peft_dir!r} has no {WEIGHTS_FILE}; pass a PEFT adapter directory.")
    reader = SafetensorsReader.of_file(path)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    wanted, leaves = set(), []
    for path, variable in nnx.to_flat_state(abstract_adapters):
        target, matrix = path[-2], {"lora_a": "A", "lora_b": "B"}[path[-1]]
        layers = [p for p in path if isinstance(p, int)]
        indices = layers or list(range(variable.shape[0]))  # stacked layers: one tensor per layer
        per_layer = []
        for layer in indices:
            name = tensor_name(layer, target, matrix)
            wanted.add(name)
            if name not in reader.files:
                raise ValueError(f"{peft_dir!r} lacks tensor {name} that its {CONFIG_FILE} implies; the adapter "
                                 "does not match its config or this base model.")
            per_layer.append(np.asarray(reader.view(name), np.float32).T)
        value = per_layer[0] if layers else np.stack(per_layer)
        if value.shape != tuple(variable.shape):
            raise ValueError(f"tensor {name} in {peft_dir!r} has the shape of an adapter of {value.shape} (ours), "
                             f"but this base model needs {tuple(variable.shape)}; use the base it was trained on.")
        sharding = flat_shardings[path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        leaves.append((path, variable.replace(jax.device_put(value, sharding))))
    extra = sorted(set(reader.files) - wanted)
    if extra:
        raise ValueError(f"{peft_dir!r} has tensor {extra[0]}, which this base model has no place for "
                         "(another number of layers, or a module gf_jax does not adapt).")
    return nnx.from_flat_state(leaves)


def with_peft_settings(model_config, peft_dir: str):
    """``model_config`` with ``model.lora`` from ``peft_dir``'s adapter_config.json; a LoRA setting
    in the config that disagrees with it is one sentence naming the key."""
    lora, _ = read_adapter_config(peft_dir)
    mine = model_config.lora
    if not mine.enabled:
        return dataclasses.replace(model_config, lora=lora)
    for name, theirs, ours in (("rank", lora.rank, mine.rank), ("alpha", lora.scale * lora.rank,
                                                                  mine.scale * mine.rank),
                               ("targets", lora.targets, tuple(t for t in TARGETS if t in mine.targets))):
        if theirs != ours:
            raise ValueError(f"{peft_dir} has model.lora.{name}={theirs!r} but the config sets {ours!r}; remove "
                             f"model.lora.{name} from the config (the adapters' settings come with them).")
    # The config's own dropout stays: dropout is a training choice, not part of the adapters.
    return dataclasses.replace(model_config, lora=dataclasses.replace(lora, dropout=mine.dropout))
