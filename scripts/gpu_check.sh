#!/usr/bin/env bash
# One call on a GPU host (H100/H200) that yields every GPU figure: `bash scripts/gpu_check.sh --out DIR`.
#
# The host's Python already has jax (0.11, CUDA 13), flax, optax, orbax-checkpoint, torch, transformers,
# safetensors, tokenizers and sentencepiece, and nothing can be downloaded there. So gf_jax is installed
# without dependencies (the host's jax and flax stay as they are; gf_jax works with jax 0.10.2 and 0.11),
# plus any wheels carried in .whl/ (made here by `bash scripts/gpu_wheels.sh`, for a package the host
# lacks). Then scripts/gpu_check.py runs each benchmark in its own process within an 8-minute budget and
# writes DIR/results.json and DIR/results.md. `--dry-run` runs every step at tiny sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index .whl/*.whl
fi
# --no-build-isolation: the build backend must come from the host (no index to fetch it from).
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "[gpu_check] pip install -e . failed; using PYTHONPATH=$PWD instead"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import importlib
for name in ("jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers"):
    try:
        module = importlib.import_module(name)
        print(f"[gpu_check] {name} {getattr(module, '__version__', '?')}")
    except ImportError as e:
        print(f"[gpu_check] {name} missing ({e})")
PY
exec "$PY" scripts/gpu_check.py "$@"
