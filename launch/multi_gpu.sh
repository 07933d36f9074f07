#!/usr/bin/env bash
# Trains on every GPU of one host with one process: JAX sees all local GPUs as devices of one
# mesh (config.mesh, e.g. configs/gpu_8.py: data parallel over 8). If training stops, it is
# re-run (up to --max_restarts times) and resumes from the newest checkpoint in the workdir.
#
# usage: launch/multi_gpu.sh --config=configs/FILE.py --workdir=DIR [--gpus=0,1,2,3]
#          [--install] [--max_restarts=0] [--dry_run] [-- TRAIN_FLAGS...]
#
#   --gpus          CUDA_VISIBLE_DEVICES (default: every GPU); the mesh must match the count
#   --install       first install midijax with its cuda12 extra (requirements.txt plus
#                   jax[cuda12] at the pinned jax version) into .venv (pip wheels bring CUDA and cuDNN; needs an NVIDIA driver >= 525)
#   --max_restarts  re-run after a failure this many times (default 0)
#   --dry_run       print the commands and environment instead of running them
#
# Example:
#   launch/multi_gpu.sh --install --config=configs/gpu_8.py --workdir=/scratch/mt \
#     -- --config.train.num_steps=10000
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

config=""
workdir=""
gpus=""
install=0
max_restarts=0
dry_run=0
train_flags=()

die() {
  echo "multi_gpu.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

run() {
  if (( dry_run )); then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

while [[ $# -gt 0 ]]; do
  arg="$1"
  shift
  case "${arg}" in
    --) train_flags+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --install) install=1; continue ;;
    --dry_run|--dry-run) dry_run=1; continue ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*)
      [[ $# -gt 0 ]] || die "${arg} needs a value"
      key="${arg}"; value="$1"; shift ;;
    *) die "unexpected argument '${arg}' (train flags go after --)" ;;
  esac
  case "${key}" in
    --config) config="${value}" ;;
    --workdir) workdir="${value}" ;;
    --gpus) gpus="${value}" ;;
    --max_restarts) max_restarts="${value}" ;;
    *) die "unknown flag ${key} (see --help)" ;;
  esac
done
[[ -n "${config}" ]] || die "--config is required (e.g. configs/gpu_8.py)"
[[ -n "${workdir}" ]] || die "--workdir is required"
[[ "${max_restarts}" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number"

cd "${REPO_ROOT}"
(( dry_run )) && echo "# multi_gpu.sh --dry_run: nothing is run"
if (( install )); then
  [[ -x .venv/bin/python ]] || run python3 -m venv .venv
  run .venv/bin/python -m pip install -q -e ".[cuda12]"
fi

# One process owns every local GPU; TensorFlow (tf.data) is kept off them by the input
# pipeline. JAX preallocates 75% of each GPU's memory by default; 90% leaves room for
# larger batches while keeping some for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
if [[ -n "${gpus}" ]]; then
  export CUDA_VISIBLE_DEVICES="${gpus}"
fi
cmd=(.venv/bin/midijax train --config="${config}" --workdir="${workdir}"
     ${train_flags[@]+"${train_flags[@]}"})

if (( dry_run )); then
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION}"
  [[ -n "${gpus}" ]] && echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES}"
  run "${cmd[@]}"
  exit 0
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L >&2 || true
fi
attempt=0
while true; do
  if run "${cmd[@]}"; then
    exit 0
  else
    status=$?
  fi
  # Status 2: a bad flag or config; re-running cannot help.
  if (( status == 2 || attempt >= max_restarts )); then
    echo "multi_gpu.sh: training exited with status ${status}" >&2
    exit "${status}"
  fi
  attempt=$(( attempt + 1 ))
  echo "multi_gpu.sh: training exited with status ${status}; restart ${attempt}/${max_restarts}" \
    "(resumes from the newest checkpoint in ${workdir})" >&2
  sleep 10
done
