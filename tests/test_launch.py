"""Tests for launch/ and `midijax compile` (midijax.aot), as far as a CPU machine allows.

* Every launch/*.sh and the SLURM template pass shellcheck (missing shellcheck: skipped
  outside CI, a failure under CI=true).
* `launch/tpu_vm.sh --dry_run` prints exactly the expected gcloud commands for a v4-8
  (TPU VM, spot, copied checkout) and a v5e-16 (queued resource, spot, git clone, 4 hosts).
* The SLURM template renders the MIDIJAX_* variables, per task under a stand-in srun.
* `midijax compile` compiles a tiny config for 8 CPU devices and reports memory and FLOPs
  (in a subprocess that sees 8 devices); TPU targets: tests/test_tpu_compile.py.
* launch/local_multiprocess.py: its process set-up and failure propagation. The real
  2-process training run is in tests/test_multihost.py.
"""
import importlib.util
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import IN_CI
from midijax import aot
from midijax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
JAX_PIN = next(line.split("==")[1].strip() for line in
               (REPO / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))


def _scripts():
  return sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))


def _run(cmd, env=None, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, **(env or {})}, timeout=300, **kwargs)


# ----------------------------------------------------------------------------- shellcheck


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    if IN_CI:
      pytest.fail("CI=true but shellcheck is missing (bash launch/setup.sh --system installs it)")
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  proc = _run(["shellcheck", "--shell=bash", "--external-sources", str(script)])
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_script_is_strict_bash():
  for script in _scripts():
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script.name
    assert "\nset -euo pipefail\n" in text, script.name


# ----------------------------------------------------------------------------- tpu_vm.sh

SETUP_TAIL = ("cd ~/midijax; python3.11 -m venv .venv; .venv/bin/pip install -q --upgrade pip; "
              '.venv/bin/pip install -q -e ".[tpu]"')
SETUP_HEAD = ("set -eu; if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq && "
              "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 "
              "python3.11-venv; fi; ")
TRAIN_HEAD = ('cd ~/midijax && pid=$(cat train.pid 2>/dev/null || true); if [ -n "$pid" ] && '
              'ps -p "$pid" -o args= | grep -q "midijax train"; then kill "$pid"; sleep 30; fi; '
              "echo $$ > train.pid; exec env ")


def _expected_v4_8():
  z = "--zone=us-central2-b"
  create = ("gcloud compute tpus tpu-vm create midijax-v4 " + z +
            " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot")
  scp = ("gcloud compute tpus tpu-vm scp /tmp/midijax-midijax-v4.tar.gz "
         "midijax-v4:midijax-code.tar.gz " + z + " --worker=all")
  setup = ("gcloud compute tpus tpu-vm ssh midijax-v4 " + z + " --worker=all --command='" +
           SETUP_HEAD + "mkdir -p ~/midijax && tar -xzf ~/midijax-code.tar.gz -C ~/midijax; " +
           SETUP_TAIL + "'")
  train = ("gcloud compute tpus tpu-vm ssh midijax-v4 " + z + " --worker=all --command='" +
           TRAIN_HEAD + "TFDS_DATA_DIR=gs://midijax-test/tensorflow_datasets "
           ".venv/bin/midijax train --config=configs/tpu_v4_8.py "
           "--workdir=gs://midijax-test/runs/midijax-v4 --config.train.num_steps=1000'")
  describe = ("gcloud compute tpus tpu-vm describe midijax-v4 " + z + " --format='value(state)'")
  delete = "gcloud compute tpus tpu-vm delete midijax-v4 " + z + " --quiet"
  # First attempt, then the restart path: state check, delete, create, copy, install.
  return [create, scp, setup, train, describe, delete, create, scp, setup]


def _expected_v5e_16():
  z = "--zone=us-west4-a --project=my-project"
  create = ("gcloud compute tpus queued-resources create midijax-v5e " + z +
            " --node-id=midijax-v5e --accelerator-type=v5litepod-16 "
            "--runtime-version=v2-alpha-tpuv5-lite --spot")
  wait = ("gcloud compute tpus queued-resources describe midijax-v5e " + z +
          " --format='value(state.state)'")
  clone = ("if [ -d ~/midijax/.git ]; then git -C ~/midijax fetch -q --depth=1 origin main && "
           "git -C ~/midijax checkout -q -f FETCH_HEAD; else git clone -q --depth=1 "
           "--branch=main https://github.com/example/midijax.git ~/midijax; fi; ")
  setup = ("gcloud compute tpus tpu-vm ssh midijax-v5e " + z + " --worker=all --command='" +
           SETUP_HEAD + clone + SETUP_TAIL + "'")
  train = ("gcloud compute tpus tpu-vm ssh midijax-v5e " + z + " --worker=all --command='" +
           TRAIN_HEAD + "TFDS_DATA_DIR=gs://midijax-test/tensorflow_datasets "
           "MIDIJAX_NUM_PROCESSES=4 .venv/bin/midijax train --config=configs/tpu_v4_8.py "
           "--workdir=gs://midijax-test/runs/midijax-v5e --config.data.batch_size=128'")
  delete = ("gcloud compute tpus queued-resources delete midijax-v5e " + z + " --force --quiet")
  return [create, wait, setup, train, wait, delete, create, wait, setup]


V4_ARGS = ["up", "--name=midijax-v4", "--zone", "us-central2-b", "--accelerator_type=v4-8",
           "--spot", "--bucket=gs://midijax-test", "--config=configs/tpu_v4_8.py", "--dry_run",
           "--", "--config.train.num_steps=1000"]
V5E_ARGS = ["up", "--name=midijax-v5e", "--zone=us-west4-a", "--project=my-project",
            "--accelerator_type=v5litepod-16", "--queued", "--spot",
            "--bucket=gs://midijax-test/", "--config=configs/tpu_v4_8.py",
            "--repo=https://github.com/example/midijax.git", "--dry_run", "--",
            "--config.data.batch_size=128"]


def _tpu_dry_run(args):
  proc = _run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], env={"TMPDIR": "/tmp"})
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


@pytest.mark.parametrize("args, expected", [(V4_ARGS, _expected_v4_8()),
                                            (V5E_ARGS, _expected_v5e_16())],
                         ids=["v4-8", "v5e-16"])
def test_tpu_vm_dry_run_prints_the_gcloud_commands(args, expected):
  out = _tpu_dry_run(args)
  gcloud = [line for line in out.splitlines() if line.startswith("gcloud ")]
  assert gcloud == expected
  assert "resumes from the newest checkpoint" in out


def test_tpu_vm_dry_run_quotes_train_flags_for_the_remote_shell():
  tricky = ["--config.train.num_steps=7", "--config.data.name=it's here"]
  out = _tpu_dry_run(V4_ARGS[:-1] + tricky)
  train_line = next(line for line in out.splitlines()
                    if line.startswith("gcloud ") and "midijax train" in line)
  local_words = shlex.split(train_line)
  remote = next(w for w in local_words if w.startswith("--command="))[len("--command="):]
  remote_words = shlex.split(remote)
  assert remote_words[-4:] == ["--config=configs/tpu_v4_8.py",
                               "--workdir=gs://midijax-test/runs/midijax-v4", *tricky]


def test_tpu_vm_copies_the_checkout_with_git_ls_files():
  out = _tpu_dry_run(V4_ARGS)
  assert (f"(cd {REPO} && git ls-files -z --cached --others --exclude-standard | tar --null "
          "-czf /tmp/midijax-midijax-v4.tar.gz -T -)") in out.splitlines()


@pytest.mark.parametrize("args, message", [
    (["up", "--name=x", "--accelerator_type=v4-8", "--bucket=gs://b", "--config=c.py"],
     "--zone is required"),
    (["up", "--name=x", "--zone=z", "--accelerator_type=v4-8", "--config=c.py"], "--bucket"),
    (["up", "--name=x", "--zone=z", "--accelerator_type=v4-8", "--bucket=gs://b",
      "--config=c.py", "--spot", "--preemptible"], "exclude each other"),
    (["up", "--name=x", "--zone=z", "--accelerator_type=v4-8", "--bucket=gs://b",
      "--config=c.py", "--queued", "--preemptible"], "--spot"),
    (["launch", "--name=x"], "unknown action"),
    (["up", "--name=x", "--zone=z", "--bogus=1"], "unknown flag --bogus"),
])
def test_tpu_vm_rejects_bad_flags(args, message):
  proc = _run(["bash", str(LAUNCH / "tpu_vm.sh"), *args, "--dry_run"])
  assert proc.returncode == 2
  assert message in proc.stderr


def test_gcloud_parses_the_dry_run_commands(tmp_path):
  """Where the Cloud SDK is installed, its own parser accepts every printed command.

  Runs with an empty gcloud config (no account, prompts off): gcloud then stops at
  "no project" / "no active account", after parsing, and never reaches the network.
  """
  if shutil.which("gcloud") is None:
    pytest.skip("gcloud (Google Cloud SDK) not installed")
  lines = {line for args in (V4_ARGS, V5E_ARGS)
           for line in _tpu_dry_run(args).splitlines() if line.startswith("gcloud ")}
  env = {"CLOUDSDK_CONFIG": str(tmp_path), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
         "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
         "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"}
  # One command per gcloud verb and flag set is enough (the --command text is not parsed).
  seen, checked = set(), 0
  for line in sorted(lines):
    words = shlex.split(line)
    key = tuple(w.split("=")[0] for w in words if not w.startswith("--command="))
    if key in seen:
      continue
    seen.add(key)
    proc = _run(words, env=env)
    assert "unrecognized arguments" not in proc.stderr, (line, proc.stderr)
    assert "argument --" not in proc.stderr, (line, proc.stderr)
    assert proc.returncode != 0  # Stopped before doing anything: no project or account.
    checked += 1
  assert checked >= 8


# ----------------------------------------------------------------------------- GPU scripts


def test_multi_gpu_dry_run():
  proc = _run(["bash", str(LAUNCH / "multi_gpu.sh"), "--install", "--gpus", "0,1",
               "--config=configs/gpu_8.py", "--workdir=/scratch/mt", "--dry_run", "--",
               "--config.train.num_steps=5"])
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l != "python3 -m venv .venv"]  # No .venv yet.
  assert lines == [
      "# multi_gpu.sh --dry_run: nothing is run",
      ".venv/bin/python -m pip install -q -e .\\[cuda12\\]",
      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
      "CUDA_VISIBLE_DEVICES=0,1",
      ".venv/bin/midijax train --config=configs/gpu_8.py --workdir=/scratch/mt "
      "--config.train.num_steps=5",
  ]


def _no_scontrol_path(tmp_path):
  """PATH with bash and coreutils but, for the fallback parser, no scontrol."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for tool in ("bash", "head", "cat", "env", "printf", "sed"):
    found = shutil.which(tool)
    if found:
      (bin_dir / tool).symlink_to(found)
  return str(bin_dir)


@pytest.mark.parametrize("nodelist, first", [("gpu[03-04,07]", "gpu03"),
                                             ("node7,node8", "node7"),
                                             ("a100-[12-13],b1", "a100-12")])
def test_slurm_template_renders_the_distributed_env(tmp_path, nodelist, first):
  env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "3", "SLURM_JOB_ID": "4242",
         "SLURM_SUBMIT_DIR": "/shared/midijax", "PATH": _no_scontrol_path(tmp_path)}
  proc = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--workdir=/shared/runs/mt",
               "--dry_run", "--", "--config.train.num_steps=5"], env=env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      f"MIDIJAX_COORDINATOR_ADDRESS={first}:24242",
      "MIDIJAX_NUM_PROCESSES=3",
      "MIDIJAX_PROCESS_ID=$SLURM_PROCID (per task)",
      "srun --kill-on-bad-exit=1 /shared/midijax/.venv/bin/midijax train "
      "--config=configs/gpu_8.py --workdir=/shared/runs/mt --config.train.num_steps=5",
  ]


def test_slurm_template_sets_each_tasks_process_id(tmp_path):
  """A stand-in srun runs the tasks one after another, as SLURM would in parallel."""
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "srun").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      while [[ "$1" == --* ]]; do shift; done
      for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done
      """))
  (fake / "scontrol").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      [[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a\\ngpu-b\\n'
      """))
  (fake / "midijax").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      echo "task $MIDIJAX_PROCESS_ID/$MIDIJAX_NUM_PROCESSES at $MIDIJAX_COORDINATOR_ADDRESS: $*"
      """))
  for f in fake.iterdir():
    f.chmod(0o755)
  env = {"PATH": f"{fake}:{os.environ['PATH']}", "MIDIJAX_BIN": str(fake / "midijax"),
         "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
         "MIDIJAX_DIR": str(tmp_path)}
  proc = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config", "configs/gpu_8.py",
               "--workdir", "/shared/runs/mt"], env=env)
  assert proc.returncode == 0, proc.stderr
  tasks = [line for line in proc.stdout.splitlines() if line.startswith("task ")]
  assert tasks == [
      f"task {i}/2 at gpu-a:20007: train --config=configs/gpu_8.py --workdir=/shared/runs/mt"
      for i in range(2)]


# ----------------------------------------------------------------------------- aot


@pytest.mark.parametrize("spec, devices, hosts, topology, config", [
    ("tpu:v4-8", 4, 1, "v4:2x2x1", "megacore"),
    ("v4-32", 16, 4, "v4:2x2x4", "megacore"),
    ("tpu:v5p-8", 4, 1, "v5:2x2x1", "megacore"),
    ("tpu:v5litepod-8", 8, 1, "v5e:2x4", "default"),
    ("tpu:v5litepod-16", 16, 4, "v5e:4x4", "default"),
    ("tpu:v5e-256", 256, 64, "v5e:16x16", "default"),
    ("tpu:v6e-8", 8, 1, "v6e:2x4", "default"),
    ("tpu:v4:2x2x2", 8, 2, "v4:2x2x2", "megacore"),
])
def test_parse_tpu_topology(spec, devices, hosts, topology, config):
  t = aot.parse_topology(spec)
  assert (t.platform, t.num_devices, t.num_hosts, t.tpu_topology, t.chip_config) == (
      "tpu", devices, hosts, topology, config)


def test_parse_other_topologies():
  assert aot.parse_topology("cpu:8").num_devices == 8
  assert aot.parse_topology("local").platform == "local"
  two = aot.parse_topology("tpu:v5litepod-16", num_slices=2)
  assert (two.num_devices, two.num_hosts) == (32, 8)
  for bad, message in (("gpu:h100x8", "cannot compile without a GPU"),
                       ("tpu:v9-8", "unknown TPU generation"), ("v4-12", "chips"),
                       ("tpu:v4:2x2", "3 dimensions"), ("banana", "expected cpu:N")):
    with pytest.raises(ConfigError, match=message):
      aot.parse_topology(bad)


_AOT_SCRIPT = """
import json, sys
from midijax import cli
tiny = ["compile", "--config=configs/groove_tiny.py", "--config.model.vocab_size=205", "--json"]
for name, extra in (("fits", ["--memory_per_device=1"]),
                    ("too_small", ["--memory_per_device=0.0001"]),
                    ("fsdp", ["--config.mesh.ici_parallelism=(1,8,1)"])):
  print("AOT", name, cli.main([*tiny, "--topology=cpu:8", *extra]), flush=True)
print("AOT bad", cli.main(["compile", "--config=configs/groove_tiny.py", "--topology=cpu:8",
                           "--config.model.num_heads=3"]), flush=True)
# The quick start's model (bar positions, heads on the music's time, Muon) before its
# dataset is built: the builder config gives the encoding and its bar clock.
print("AOT unbuilt", cli.main(["compile", "--config=configs/groove_beats.py", "--json",
                               "--topology=cpu:8", "--config.data.data_dir=/nonexistent/tfds",
                               "--config.model.num_layers=1", "--config.data.seq_len=64"]),
      flush=True)
"""


@pytest.fixture(scope="module")
def aot_cpu8():
  """Runs `midijax compile` for cpu:8 five times in one subprocess with 8 devices."""
  proc = _run([sys.executable, "-c", _AOT_SCRIPT],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                   "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results, reports = {}, []
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      reports.append(json.loads(line))
    elif line.startswith("AOT "):
      _, name, status = line.split()
      results[name] = (int(status), reports[-1] if name != "bad" else None)
  return results, proc.stderr


def test_aot_cpu8_reports_memory_and_flops(aot_cpu8):
  results, _ = aot_cpu8
  status, r = results["fits"]
  assert status == 0 and r["fits"] is True
  assert r["num_devices"] == 8 and r["mesh_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert r["vocab_size"] == 205 and r["global_batch"] == 8 and r["seq_len"] == 64
  for field in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes",
                "param_bytes_per_device", "opt_state_bytes_per_device"):
    assert r[field] > 0, field
  # Data parallel: every device holds all parameters (float32) and Adam's two moments.
  assert r["param_bytes_per_device"] == 4 * r["num_params"]
  assert r["opt_state_bytes_per_device"] >= 2 * r["param_bytes_per_device"]
  assert r["argument_bytes"] >= r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
  assert r["alias_bytes"] > 0  # The train state is donated.
  assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] +
                              r["temp_bytes"] + r["code_bytes"])
  # The compiler's FLOPs include the softmax, norms and the optimizer; the model count
  # (6N + attention) is within a factor of two for this tiny model.
  assert 0.5 < r["compiler_flops"] / r["model_flops"] < 2.0


def test_aot_exit_status_says_when_it_does_not_fit(aot_cpu8):
  results, _ = aot_cpu8
  status, r = results["too_small"]
  assert status == 1 and r["fits"] is False


def test_aot_fsdp_splits_the_train_state(aot_cpu8):
  results, _ = aot_cpu8
  _, dp = results["fits"]
  _, fsdp = results["fsdp"]
  assert fsdp["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert fsdp["param_bytes_per_device"] < dp["param_bytes_per_device"] / 2
  assert fsdp["argument_bytes"] < dp["argument_bytes"]


def test_aot_compiles_a_bar_clock_model_before_its_dataset_is_built(aot_cpu8):
  import data_pipelines
  results, _ = aot_cpu8
  status, r = results["unbuilt"]
  assert status == 0, r
  assert r["vocab_size"] == data_pipelines.config_encoding("groove", "drums_beats").vocab_size
  assert r["optimizer"] == "muon"
  # Muon keeps one momentum per parameter (Adam's two for the non-matrix ones): less
  # optimizer state than AdamW's two moments for every parameter.
  assert r["param_bytes_per_device"] <= r["opt_state_bytes_per_device"] < (
      2 * r["param_bytes_per_device"])


def test_aot_bad_config_is_a_clear_error(aot_cpu8):
  results, stderr = aot_cpu8
  assert results["bad"][0] == 2
  assert "config.model.num_heads=3" in stderr


def test_aot_text_report():
  report = aot.CompileReport(
      topology="tpu:v4-8", device_kind="TPU v4", num_devices=4, num_hosts=1, num_slices=1,
      mesh_shape={"data": 1, "fsdp": 4, "tensor": 1}, global_batch=64, seq_len=2048,
      vocab_size=372, num_params=25_000_000, param_bytes_per_device=25_000_000,
      opt_state_bytes_per_device=50_000_000, argument_bytes=80_000_000,
      output_bytes=75_000_000, alias_bytes=75_000_000, temp_bytes=40 * aot.GIB, code_bytes=0,
      total_bytes=40 * aot.GIB + 80_000_000, memory_limit_bytes=32 * aot.GIB,
      memory_limit_source="table:v4", compiler_flops=7e12, model_flops=7e12,
      compile_seconds=1.0, fits=False)
  text = aot.format_report(report)
  assert "DOES NOT FIT" in text and "temporaries" in text and "32.000 GiB" in text


# TPU targets with libtpu: tests/test_tpu_compile.py.
def test_aot_without_libtpu_says_how_to_get_it():
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here")
  proc = _run([sys.executable, "-m", "midijax.cli", "compile", "--config=configs/groove_tiny.py",
               "--topology=tpu:v4-8"])
  assert proc.returncode == 2
  assert "needs libtpu" in proc.stderr and f"jax[tpu]=={JAX_PIN}" in proc.stderr


# ----------------------------------------------------------------------------- local launcher


def _local_launcher():
  spec = importlib.util.spec_from_file_location("local_multiprocess",
                                                LAUNCH / "local_multiprocess.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_local_launcher_process_setup():
  lm = _local_launcher()
  cmd = lm.process_command(1, 2, 4, 12345, ["--config=c.py", "--workdir=w"])
  assert cmd[0] == sys.executable and cmd[3] == "4" and cmd[4] == "train"
  assert cmd[-3:] == ["--coordinator_address=127.0.0.1:12345", "--num_processes=2",
                      "--process_id=1"]
  assert "jax_cpu_collectives_implementation" in cmd[2] and "gloo" in cmd[2]
  env = lm.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_x=1",
                        "MIDIJAX_PROCESS_ID": "3", "PATH": "/bin"})
  assert env["XLA_FLAGS"] == "--xla_x=1" and "MIDIJAX_PROCESS_ID" not in env
  assert env["JAX_PLATFORMS"] == "cpu" and str(REPO) in env["PYTHONPATH"]
  assert 0 < lm.free_port() < 65536


def test_local_launcher_propagates_a_failure(tmp_path):
  lm = _local_launcher()
  out = io.StringIO()
  status = lm.launch([f"--config={tmp_path}/missing.py", f"--workdir={tmp_path}/w"],
                     num_processes=2, devices_per_process=1, timeout=120, out=out)
  text = out.getvalue()
  assert status == 2, text
  # The first process to fail stops the other, which may not have printed anything yet.
  assert re.search(r"^\[p[01]\] midijax train: error: cannot load the config file", text, re.M)
  assert re.search(r"process [01] exited with status 2", text), text


def test_local_launcher_needs_train_flags():
  proc = _run([sys.executable, str(LAUNCH / "local_multiprocess.py"), "--num_processes=2"])
  assert proc.returncode == 2 and "give the train flags after --" in proc.stderr
