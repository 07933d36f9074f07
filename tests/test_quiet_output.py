"""Quiet, honest stderr: the `midijax` commands print only their own log and real problems.

Runs `build-data` (with one corrupt file among real GMD files), `train` (groove_tiny, a few
steps), `generate` and `evaluate` as a user would, each in a fresh process with stderr
redirected to a file, in an environment without the test suite's TF_CPP_MIN_LOG_LEVEL (so
`midijax.process_env.configure` is what keeps TensorFlow and XLA quiet). Every stderr line
must be midijax's build summary (which names the skipped file) or its report path; no
progress-bar escapes. On a terminal (a pseudo-terminal here) the progress bars stay.
"""
import csv
import fcntl
import importlib.util
import os
import pathlib
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import copy_groove_subset
from midijax import process_env

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a user's shell would not have: the suite's own settings (conftest.py) and anything
# `process_env.configure` sets, so its defaults are what is tested (among them
# JAX_PLATFORMS=cpu where the test extra installed libtpu on this CPU-only machine).
_DROP = {"TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD",
         *process_env.QUIET_ENV,
         *process_env.NO_TERMINAL_ENV}


def _user_env():
  env = {k: v for k, v in os.environ.items() if k not in _DROP}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
  return env


def _midijax(args, stderr_path: pathlib.Path, timeout=900):
  with open(stderr_path, "w") as err:
    proc = subprocess.run([sys.executable, "-m", "midijax.cli", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                          env=_user_env())
  return proc, stderr_path.read_text()


# midijax's own lines: the build summary and the report path (data_pipelines/common.py).
OWN_LINES = (
    re.compile(r"^groove/drums: \d+ files in [\d.]+ s \(.*\): \d+ ok, \d+ skipped, .*"),
    re.compile(r"^Report: \S+build_report\.json$"),
)


def _unexpected(stderr: str):
  return [line for line in stderr.splitlines()
          if line.strip() and not any(p.match(line) for p in OWN_LINES)]


@pytest.fixture(scope="module")
def groove_with_a_bad_file(groove_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("quiet_src") / "groove"
  rows = copy_groove_subset(groove_dir, root, {"train": 8, "validation": 2, "test": 2})
  (root / "drummer9").mkdir()
  (root / "drummer9" / "corrupt.mid").write_bytes(b"MThd" + bytes(64))
  with open(root / "info.csv", "a", newline="") as f:
    csv.DictWriter(f, fieldnames=list(rows[0])).writerow(
        {**rows[0], "id": "drummer9/corrupt", "midi_filename": "drummer9/corrupt.mid"})
  return root


def test_commands_write_only_their_own_lines_to_stderr(groove_with_a_bad_file, tmp_path):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  proc, err = _midijax(["build-data", "groove", "--manual_dir", str(groove_with_a_bad_file),
                        "--data_dir", str(data_dir)], tmp_path / "build.err")
  assert proc.returncode == 0, err
  assert "\x1b[" not in err and "\r" not in err, err  # No progress-bar escapes in a file.
  assert _unexpected(err) == [], err
  assert re.search(r"12 ok, 1 skipped.*skipped: 1 x bad MIDI header", err), err

  runs = {
      "train": ["train", "--config=configs/groove_tiny.py", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", "--config.train.num_steps=4",
                "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                "--config.train.log_every=2"],
      "generate": ["generate", "--workdir", str(workdir), "--num_samples", "2",
                   "--max_tokens", "32", "--seed", "0", "--out", str(tmp_path / "samples")],
      "evaluate": ["evaluate", "--workdir", str(workdir), "--num_samples", "2",
                   "--max_tokens", "32", "--c2st_prompts", "0"],
  }
  for name, args in runs.items():
    proc, err = _midijax(args, tmp_path / f"{name}.err")
    assert proc.returncode == 0, (name, err[-3000:])
    assert _unexpected(err) == [], (name, err)
    assert proc.stdout.strip(), name  # What the user asked for goes to stdout.
  assert list((tmp_path / "samples").glob("*.mid"))


def test_progress_bars_stay_on_a_terminal(groove_with_a_bad_file, tmp_path):
  """build-data with stderr on a pseudo-terminal: TFDS's bars are drawn there."""
  master, slave = pty.openpty()
  # 24 rows x 120 columns: tqdm draws nothing on a terminal of width 0 (a new pty's size).
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
  proc = subprocess.Popen(
      [sys.executable, "-m", "midijax.cli", "build-data", "groove", "--manual_dir",
       str(groove_with_a_bad_file), "--data_dir", str(tmp_path / "tfds")],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave, env=_user_env())
  os.close(slave)
  chunks = []
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    try:
      data = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal.
      break
    if not data:
      break
    chunks.append(data)
  os.close(master)
  assert proc.wait(timeout=60) == 0
  text = b"".join(chunks).decode(errors="replace")
  assert "Generating splits" in text and "\r" in text, text[-2000:]


def test_configure_sets_defaults_only():
  env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
  with open(os.devnull, "w") as not_a_terminal:
    added = process_env.configure(env, stderr=not_a_terminal)
  assert env["TF_CPP_MIN_LOG_LEVEL"] == "0"  # The user's choice wins.
  for libtpu_only in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD"):  # the next test
    added.pop(libtpu_only, None)
  assert added == {"TF_ENABLE_ONEDNN_OPTS": "0", "TQDM_DISABLE": "1"} and env["TQDM_DISABLE"] == "1"
  master, slave = pty.openpty()
  try:
    with os.fdopen(slave, "w") as terminal:
      env = {}
      process_env.configure(env, stderr=terminal)
  finally:
    os.close(master)
  assert "TQDM_DISABLE" not in env and env["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_configure_keeps_jax_off_libtpu_without_an_accelerator():
  """With libtpu installed (test extra) on a machine without TPU or GPU, JAX gets
  JAX_PLATFORMS=cpu; a TPU_* variable or an explicit JAX_PLATFORMS leaves it alone."""
  if process_env.accelerator_attached():
    pytest.skip("this machine has an accelerator")
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  env = {}
  process_env.configure(env, stderr=sys.stderr)
  assert env.get("JAX_PLATFORMS") == ("cpu" if has_libtpu else None)
  assert env.get("ALLOW_MULTIPLE_LIBTPU_LOAD") == ("1" if has_libtpu else None)
  # What a parent process that imported JAX passes on (jax._src.cloud_tpu_init) is no TPU.
  env = {"TPU_SKIP_MDS_QUERY": "1", "TPU_LIBRARY_PATH": "/x/libtpu.so"}
  process_env.configure(env, stderr=sys.stderr)
  assert env.get("JAX_PLATFORMS") == ("cpu" if has_libtpu else None)
  for given in ({"JAX_PLATFORMS": "tpu"}, {"TPU_ACCELERATOR_TYPE": "v4-8"}):
    env = dict(given)
    process_env.configure(env, stderr=sys.stderr)
    assert env.get("JAX_PLATFORMS") == given.get("JAX_PLATFORMS")
  if has_libtpu:  # What a user sees: no libtpu start-up lines, CPU devices.
    proc = subprocess.run([sys.executable, "-c",
                           "from midijax import process_env; process_env.configure(); "
                           "import jax; print(jax.devices()[0].platform)"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=_user_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert proc.stderr == "", proc.stderr
