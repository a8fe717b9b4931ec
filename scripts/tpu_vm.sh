#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice of many): every worker runs the same
# `python -m gf_jax.train` command; JAX connects them (gf_jax.run.distributed detects the TPU VM).
#
#   export TPU_NAME=gf-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32   # PROJECT=... optional
#   scripts/tpu_vm.sh create                 # create the TPU VM (reused if it exists)
#   scripts/tpu_vm.sh setup                  # copy this checkout to all workers, install requirements + jax[tpu]
#   BUCKET=my-bucket scripts/tpu_vm.sh mount   # gs://my-bucket at /mnt/gcs/my-bucket on all workers
#   scripts/tpu_vm.sh train --config configs/tinyllama-1b.yaml train.run_dir=/mnt/gcs/my-bucket/runs/tl1b
#   scripts/tpu_vm.sh logs                   # fetch every worker's log into logs/$TPU_NAME/
#   scripts/tpu_vm.sh ssh 'nvidia-smi || true'   # any command on all workers
#   scripts/tpu_vm.sh stop                   # kill the training processes on all workers
#   scripts/tpu_vm.sh delete                 # delete the TPU VM
#
# Settings (environment variables):
#   TPU_NAME, ZONE (required); ACCELERATOR_TYPE (create: v4-8, v4-32, v5p-128, v6e-16, ...);
#   RUNTIME_VERSION (create: default picked from the accelerator type); PROJECT (default: gcloud's);
#   SPOT=1 (create a spot VM); REPO_URL (setup: `git clone` this URL on the workers instead of
#   copying the local checkout; REPO_REF selects a branch/tag/commit); REMOTE_DIR (default gf_jax);
#   PYTHON_VERSION (default 3.11: the pinned numpy/jax need >= 3.11, newer than the TPU images').
#
# `train` runs in the background on the workers (nohup), so a dropped ssh connection does not stop
# it; its output goes to ~/$REMOTE_DIR/logs/train.log on each worker (fetch with `logs`). With
# FOREGROUND=1 the command stays attached and streams every worker's output instead.
set -euo pipefail

usage() { sed -n '2,24p' "$0"; exit "${1:-0}"; }

: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b for v4, us-east5-a for v5p)}"
REMOTE_DIR=${REMOTE_DIR:-gf_jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project "$PROJECT")

on_all() {  # run a bash command on every worker of the slice, in parallel
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"
}

num_workers() {
  "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)' \
    | tr ';,' '\n\n' | grep -c .
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create)
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v4-32)}"
    if "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" >/dev/null 2>&1; then
      echo "TPU VM $TPU_NAME exists in $ZONE; reusing it ($(num_workers) workers)."
    else
      extra=()
      [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
      "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
        --version "${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}" "${extra[@]}"
      echo "created $TPU_NAME: $(num_workers) workers"
    fi
    ;;

  setup)
    if [[ -n "${REPO_URL:-}" ]]; then
      on_all "set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; \
              else git clone -q $REPO_URL $REMOTE_DIR; fi; git -C $REMOTE_DIR checkout -q ${REPO_REF:-origin/HEAD}"
    else
      # The local checkout as it is (committed or not; .venv, runs and caches left out).
      tarball=$(mktemp /tmp/gf_jax.XXXXXX.tar.gz)
      trap 'rm -f "$tarball"' EXIT
      tar -C "$(dirname "$0")/.." -czf "$tarball" --exclude=.venv --exclude=.git --exclude=runs \
        --exclude=.cache --exclude=logs --exclude='__pycache__' --exclude='*.egg-info' .
      "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:gf_jax.tar.gz" "${WHERE[@]}" --worker=all
      on_all "mkdir -p $REMOTE_DIR && tar -xzf gf_jax.tar.gz -C $REMOTE_DIR && rm gf_jax.tar.gz"
    fi
    # uv brings a Python >= 3.11 (the TPU images ship 3.10); jax[tpu] adds libtpu to the pinned jax.
    on_all "set -e; cd $REMOTE_DIR; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
            export PATH=\$HOME/.local/bin:\$PATH; uv venv -q --allow-existing --python $PYTHON_VERSION .venv; \
            uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==$JAX_VERSION' gcsfs; \
            uv pip install -q --python .venv/bin/python --no-deps -e .; \
            .venv/bin/python -c 'import jax, libtpu; print(\"jax\", jax.__version__, \"with libtpu\")'"
    ;;

  train)
    [[ $# -gt 0 ]] || { echo "usage: $0 train --config CONFIG [section.key=value ...]" >&2; exit 2; }
    args=$(printf '%q ' "$@")
    prefix="cd $REMOTE_DIR && mkdir -p logs &&"
    if [[ "${FOREGROUND:-0}" == 1 ]]; then
      on_all "$prefix .venv/bin/python -u -m gf_jax.train $args 2>&1 | tee logs/train.log"
    else
      on_all "$prefix { nohup .venv/bin/python -u -m gf_jax.train $args > logs/train.log 2>&1 < /dev/null & } \
              && echo \"worker \$(hostname): started\""
      echo "training in the background; follow it with: $0 logs  (or $0 ssh 'tail -n 3 $REMOTE_DIR/logs/train.log')"
    fi
    ;;

  logs)
    out="logs/$TPU_NAME"
    mkdir -p "$out"
    n=$(num_workers)
    for ((w = 0; w < n; w++)); do
      "${GCLOUD[@]}" scp "$TPU_NAME:$REMOTE_DIR/logs/train.log" "$out/worker$w.log" "${WHERE[@]}" --worker=$w
    done
    echo "fetched $n logs into $out/ (worker 0 writes the metrics; the others only errors)"
    tail -n 5 "$out/worker0.log"
    ;;

  mount)
    # A GCS bucket as a directory shared by all workers (gcsfuse): a run directory under it holds
    # the checkpoints every worker writes and the logs worker 0 writes.
    : "${BUCKET:?set BUCKET (the bucket name, without gs://)}"
    on_all "set -e; if ! command -v gcsfuse >/dev/null; then \
              echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' \
                | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
              curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null 2>&1; \
              sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi; \
            sudo mkdir -p /mnt/gcs/$BUCKET; sudo chown \$(id -u):\$(id -g) /mnt/gcs/$BUCKET; \
            mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET"
    echo "mounted gs://$BUCKET at /mnt/gcs/$BUCKET on every worker; e.g. train.run_dir=/mnt/gcs/$BUCKET/runs/NAME"
    ;;

  ssh)
    on_all "${1:?usage: $0 ssh 'COMMAND'}"
    ;;

  stop)
    # SIGTERM: the trainer saves a checkpoint and exits (resume with the same train command).
    on_all "pkill -TERM -f '[g]f_jax.train' || true"
    ;;

  delete)
    "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;

  help|-h|--help) usage 0 ;;
  *) echo "unknown command $cmd" >&2; usage 2 ;;
esac
