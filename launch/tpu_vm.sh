#!/usr/bin/env bash
# Runs `midijax train` on a Cloud TPU VM slice: creates the TPU (directly or through a queued
# resource), puts this code on every worker, installs midijax with its `tpu` extra (the
# runtime set of requirements.txt plus jax[tpu], which brings libtpu), and starts training
# on all workers at once. If training stops (preemption, maintenance, a lost connection),
# it recreates the TPU when needed and re-runs the same command; training resumes from the
# newest checkpoint in the gs:// workdir.
#
# usage: launch/tpu_vm.sh [up|create|setup|train|status|delete] --name=NAME --zone=ZONE
#          --accelerator_type=TYPE --bucket=gs://BUCKET --config=configs/FILE.py
#          [--runtime_version=VERSION] [--project=PROJECT] [--spot | --preemptible] [--queued]
#          [--workdir=gs://...] [--data_dir=gs://...] [--repo=GIT_URL [--branch=BRANCH]]
#          [--python=python3.11] [--max_restarts=10] [--dry_run] [-- TRAIN_FLAGS...]
#
#   up (default)  create (unless it is READY), setup, then train with restarts
#   create        create the TPU VM, or the queued resource and wait until it is ACTIVE
#   setup         copy this checkout (git ls-files) or clone --repo on every worker; install
#   train         run training on all workers; restart after preemption (recreating the TPU)
#   status        print the TPU's (or queued resource's) state
#   delete        delete the TPU VM (or the queued resource and its TPU)
#
# Flags take --flag=value or --flag value. Defaults: --workdir=BUCKET/runs/NAME,
# --data_dir=BUCKET/tensorflow_datasets (TFDS_DATA_DIR on every worker), --runtime_version
# by generation (v4: tpu-ubuntu2204-base, v5litepod/v5e: v2-alpha-tpuv5-lite, v5p:
# v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e). Flags after `--` go to `midijax train`
# (e.g. --config.train.num_steps=1000). --dry_run prints every command instead of running it.
#
# Example (preemptible v4-8, restarted after preemption; see launch/README.md):
#   launch/tpu_vm.sh up --name=mt-v4 --zone=us-central2-b --accelerator_type=v4-8 --spot \
#     --bucket=gs://my-bucket --config=configs/tpu_v4_8.py
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

action="up"
name=""
zone=""
accelerator_type=""
runtime_version=""
project=""
bucket=""
config=""
workdir=""
data_dir=""
repo=""
branch="main"
python_bin="python3.11"
max_restarts=10
spot=0
preemptible=0
queued=0
dry_run=0
restart_wait_s=60
train_flags=()

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Quotes one word for a POSIX shell, leaving plain words as they are (like shlex.quote);
# --flag=VALUE is written --flag='VALUE' (the same word, easier to read).
quote() {
  local word="$1" prefix=""
  if [[ "${word}" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  if [[ -n "${word}" && "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s%s' "${prefix}" "${word}"
  else
    printf "%s'%s'" "${prefix}" "${word//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "${word}")"
  done
  printf '%s' "${out}"
}

# Runs a command, or prints it (quoted, one line) in --dry_run mode.
run() {
  if (( dry_run )); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

note() {
  if (( dry_run )); then echo "# $*"; else echo "tpu_vm.sh: $*" >&2; fi
}

# ----------------------------------------------------------------------------- flags
if [[ $# -gt 0 && "$1" != -* ]]; then
  action="$1"
  shift
fi
while [[ $# -gt 0 ]]; do
  arg="$1"
  shift
  case "${arg}" in
    --) train_flags+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --spot) spot=1; continue ;;
    --preemptible) preemptible=1; continue ;;
    --queued) queued=1; continue ;;
    --dry_run|--dry-run) dry_run=1; continue ;;
    --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
    --*)
      [[ $# -gt 0 ]] || die "${arg} needs a value"
      key="${arg}"; value="$1"; shift ;;
    *) die "unexpected argument '${arg}' (train flags go after --)" ;;
  esac
  case "${key}" in
    --name) name="${value}" ;;
    --zone) zone="${value}" ;;
    --accelerator_type|--accelerator-type) accelerator_type="${value}" ;;
    --runtime_version|--runtime-version|--version) runtime_version="${value}" ;;
    --project) project="${value}" ;;
    --bucket) bucket="${value%/}" ;;
    --config) config="${value}" ;;
    --workdir) workdir="${value}" ;;
    --data_dir) data_dir="${value}" ;;
    --repo) repo="${value}" ;;
    --branch) branch="${value}" ;;
    --python) python_bin="${value}" ;;
    --max_restarts) max_restarts="${value}" ;;
    --restart_wait_s) restart_wait_s="${value}" ;;
    *) die "unknown flag ${key} (see --help)" ;;
  esac
done

case "${action}" in
  up|create|setup|train|status|delete) ;;
  *) die "unknown action '${action}'; expected up, create, setup, train, status or delete" ;;
esac
[[ -n "${name}" ]] || die "--name is required"
[[ -n "${zone}" ]] || die "--zone is required"
if [[ "${action}" =~ ^(up|create|train)$ ]]; then
  [[ -n "${accelerator_type}" ]] || die "--accelerator_type is required (e.g. v4-8, v5litepod-16)"
fi
if [[ "${action}" =~ ^(up|train)$ ]]; then
  [[ -n "${config}" ]] || die "--config is required (e.g. configs/tpu_v4_8.py)"
  if [[ -z "${workdir}" || -z "${data_dir}" ]]; then
    [[ "${bucket}" == gs://* ]] || die "--bucket=gs://BUCKET is required (or --workdir and --data_dir)"
  fi
fi
[[ "${max_restarts}" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number"
(( spot && preemptible )) && die "--spot and --preemptible exclude each other"
(( queued && preemptible )) && die "queued resources take --spot, not --preemptible"
workdir="${workdir:-${bucket}/runs/${name}}"
data_dir="${data_dir:-${bucket}/tensorflow_datasets}"

generation="${accelerator_type%-*}"
size="${accelerator_type##*-}"
if [[ -z "${runtime_version}" ]]; then
  case "${generation}" in
    v4) runtime_version="tpu-ubuntu2204-base" ;;
    v5litepod|v5e) runtime_version="v2-alpha-tpuv5-lite" ;;
    v5p) runtime_version="v2-alpha-tpuv5" ;;
    v6e) runtime_version="v2-alpha-tpuv6e" ;;
    *) [[ "${action}" =~ ^(up|create|train)$ ]] && die "give --runtime_version for ${accelerator_type}" ;;
  esac
fi

# Hosts (TPU VM workers) in the slice: v4 / v5p names count TensorCores (8 per host),
# v5e / v6e names count chips (up to 8 on one host, else 4 per host).
hosts=1
if [[ "${size}" =~ ^[0-9]+$ ]]; then
  case "${generation}" in
    v2|v3|v4|v5p) (( size > 8 )) && hosts=$(( size / 8 )) ;;
    v5litepod|v5e|v6e) (( size > 8 )) && hosts=$(( size / 4 )) ;;
  esac
fi

gcloud_scope=(--zone="${zone}")
[[ -n "${project}" ]] && gcloud_scope+=(--project="${project}")
archive="${TMPDIR:-/tmp}/midijax-${name}.tar.gz"

# ----------------------------------------------------------------------------- commands
tpu_state() {
  if (( queued )); then
    gcloud compute tpus queued-resources describe "${name}" "${gcloud_scope[@]}" \
      --format='value(state.state)' 2>/dev/null || echo MISSING
  else
    gcloud compute tpus tpu-vm describe "${name}" "${gcloud_scope[@]}" \
      --format='value(state)' 2>/dev/null || echo MISSING
  fi
}

ready_state() {
  if (( queued )); then echo ACTIVE; else echo READY; fi
}

create_tpu() {
  local capacity=()
  (( spot )) && capacity=(--spot)
  (( preemptible )) && capacity=(--preemptible)
  if (( queued )); then
    run gcloud compute tpus queued-resources create "${name}" "${gcloud_scope[@]}" \
      --node-id="${name}" --accelerator-type="${accelerator_type}" \
      --runtime-version="${runtime_version}" "${capacity[@]}"
    note "wait until the queued resource is ACTIVE (polled every 60 s):"
    if (( dry_run )); then
      run gcloud compute tpus queued-resources describe "${name}" "${gcloud_scope[@]}" \
        --format='value(state.state)'
      return
    fi
    local state
    while state="$(tpu_state)"; [[ "${state}" != ACTIVE ]]; do
      case "${state}" in
        FAILED|SUSPENDED|MISSING) die "queued resource ${name} is ${state}" ;;
      esac
      note "queued resource ${name}: ${state:-unknown}; waiting"
      sleep 60
    done
  else
    run gcloud compute tpus tpu-vm create "${name}" "${gcloud_scope[@]}" \
      --accelerator-type="${accelerator_type}" --version="${runtime_version}" "${capacity[@]}"
  fi
}

delete_tpu() {
  if (( queued )); then
    run gcloud compute tpus queued-resources delete "${name}" "${gcloud_scope[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${name}" "${gcloud_scope[@]}" --quiet
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${name}" "${gcloud_scope[@]}" --worker=all --command="$1"
}

setup_workers() {
  local fetch
  if [[ -n "${repo}" ]]; then
    local q_repo q_branch
    q_repo="$(quote "${repo}")"
    q_branch="$(quote "${branch}")"
    fetch="if [ -d ~/midijax/.git ]; then git -C ~/midijax fetch -q --depth=1 origin ${q_branch}"
    fetch+=" && git -C ~/midijax checkout -q -f FETCH_HEAD;"
    fetch+=" else git clone -q --depth=1 --branch=${q_branch} ${q_repo} ~/midijax; fi"
  else
    note "pack this checkout (tracked and untracked, not ignored files) and copy it to every worker:"
    if (( dry_run )); then
      echo "(cd $(quote "${REPO_ROOT}") && git ls-files -z --cached --others --exclude-standard" \
        "| tar --null -czf $(quote "${archive}") -T -)"
    else
      (cd "${REPO_ROOT}" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -czf "${archive}" -T -)
    fi
    run gcloud compute tpus tpu-vm scp "${archive}" "${name}:midijax-code.tar.gz" \
      "${gcloud_scope[@]}" --worker=all
    fetch="mkdir -p ~/midijax && tar -xzf ~/midijax-code.tar.gz -C ~/midijax"
  fi
  local py
  py="$(quote "${python_bin}")"
  local install="set -eu; if ! command -v ${py} >/dev/null; then sudo apt-get update -qq"
  install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${py} ${py}-venv; fi; "
  install+="${fetch}; cd ~/midijax; ${py} -m venv .venv; .venv/bin/pip install -q --upgrade pip; "
  install+=".venv/bin/pip install -q -e \".[tpu]\""
  note "install midijax with the tpu extra (requirements.txt + jax[tpu], libtpu from the index)" \
    "on every worker (${hosts} host(s)):"
  ssh_all "${install}"
}

train_command() {
  local env_vars=("TFDS_DATA_DIR=${data_dir}")
  # Multi-host slices: jax.distributed.initialize() with the host count; JAX finds the
  # coordinator and this worker's id from the TPU metadata.
  (( hosts > 1 )) && env_vars+=("MIDIJAX_NUM_PROCESSES=${hosts}")
  local cmd="cd ~/midijax && pid=\$(cat train.pid 2>/dev/null || true); "
  cmd+="if [ -n \"\$pid\" ] && ps -p \"\$pid\" -o args= | grep -q \"midijax train\"; "
  cmd+="then kill \"\$pid\"; sleep 30; fi; echo \$\$ > train.pid; "
  cmd+="exec env $(quote_all "${env_vars[@]}") .venv/bin/midijax train "
  cmd+="$(quote_all "--config=${config}" "--workdir=${workdir}" ${train_flags[@]+"${train_flags[@]}"})"
  printf '%s' "${cmd}"
}

train_with_restarts() {
  local cmd attempt=0 state
  cmd="$(train_command)"
  note "train on every worker (${hosts} host(s)) at once; workdir ${workdir}, TFDS data ${data_dir}:"
  if (( dry_run )); then
    ssh_all "${cmd}"
    note "if that fails (preemption, maintenance, lost connection), up to ${max_restarts} times:"
    note "wait ${restart_wait_s} s and read the state; unless $(ready_state), recreate and set up:"
    if (( queued )); then
      run gcloud compute tpus queued-resources describe "${name}" "${gcloud_scope[@]}" \
        --format='value(state.state)'
    else
      run gcloud compute tpus tpu-vm describe "${name}" "${gcloud_scope[@]}" --format='value(state)'
    fi
    delete_tpu
    create_tpu
    setup_workers
    note "then the same training command again; it resumes from the newest checkpoint in ${workdir}"
    return 0
  fi
  while true; do
    if ssh_all "${cmd}"; then
      note "training finished"
      return 0
    fi
    if (( attempt >= max_restarts )); then
      die "training failed ${attempt} restart(s) in a row; giving up (--max_restarts=${max_restarts})"
    fi
    attempt=$(( attempt + 1 ))
    note "training stopped; restart ${attempt}/${max_restarts} in ${restart_wait_s} s"
    sleep "${restart_wait_s}"
    state="$(tpu_state)"
    if [[ "${state}" != "$(ready_state)" ]]; then
      note "TPU ${name} is ${state:-unknown}: recreating it"
      [[ "${state}" != MISSING ]] && delete_tpu
      create_tpu
      setup_workers
    fi
  done
}

# ----------------------------------------------------------------------------- actions
if (( dry_run )); then
  note "tpu_vm.sh ${action} --dry_run: ${accelerator_type:-TPU} '${name}' in ${zone}," \
    "${hosts} host(s); nothing is run"
fi
case "${action}" in
  up)
    if (( dry_run )) || [[ "$(tpu_state)" != "$(ready_state)" ]]; then
      create_tpu
    else
      note "${name} is already $(ready_state)"
    fi
    setup_workers
    train_with_restarts
    ;;
  create) create_tpu ;;
  setup) setup_workers ;;
  train) train_with_restarts ;;
  status)
    if (( queued )); then
      run gcloud compute tpus queued-resources describe "${name}" "${gcloud_scope[@]}"
    else
      run gcloud compute tpus tpu-vm describe "${name}" "${gcloud_scope[@]}"
    fi
    ;;
  delete) delete_tpu ;;
esac
