#!/usr/bin/env bash
# Downloads wheels of packages a GPU host lacks into .whl/ (ignored by git), for scripts/gpu_check.sh to
# install there without an index. The device tool's KINDS.md lists what the H200 image already holds
# (Python 3.12); gf_jax imports its other dependencies (rouge-score, tensorboardX, tensorflow-datasets,
# pyarrow) only where they are used, and the GPU check uses none of them, so by default nothing is needed:
#   bash scripts/gpu_wheels.sh PACKAGE==VERSION ...
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "nothing to download: name the packages the GPU host lacks"; exit 0; }
python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d .whl "$@"
