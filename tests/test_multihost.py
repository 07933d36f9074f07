"""Multi-host training for real: 2 processes x 4 CPU devices against 1 process x 8.

On a tiny groove dataset built from 12 files of the real corpus:

(a) `launch/local_multiprocess.py` starts 2 processes, each with 4 CPU devices and gloo
    collectives, running the real `midijax train` (jax.distributed, per-process data
    shards, global arrays, Orbax checkpoints written by both processes);
(b) one process with 8 CPU devices trains the same config on the same global batches:
    row-for-row the concatenation of what the two processes read
    (`DataSource(config, process_index=p, process_count=2)`), since each process draws
    from its own share of the split;
    both runs' losses in metrics.jsonl must agree within `LOSS_RTOL`;
(c) the checkpoint the 2-process run wrote restores in one process: `runs.load_run`
    gives the same parameters as run (b)'s, and training resumes from it for one more step.
"""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import copy_groove_subset

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 6
# Same data, same initial parameters; the only difference is the order of float32
# reductions (gloo all-reduce across processes vs. one process). Observed: equal to
# 1e-6 or better after 6 Adam steps.
LOSS_RTOL = 1e-4
PARAM_ATOL = 1e-4

CONFIG = """\
from configs import groove_tiny


def get_config():
  config = groove_tiny.get_config()
  config.data.data_dir = {data_dir!r}
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.max_eval_batches = 2
  config.model.update(num_layers=1, emb_dim=32, qkv_dim=32, num_heads=2, mlp_dim=64,
                      max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)
  config.train.update(num_steps={num_steps}, warmup_steps=2, log_every=1,
                      eval_every={num_steps}, checkpoint_every={num_steps},
                      peak_flops_per_device=1e10)
  # Data parallel over all 8 devices of both processes.
  config.mesh.ici_parallelism = (-1, 1, 1)
  config.mesh.dcn_parallelism = (1, 1, 1)
  return config
"""

# One process with 8 CPU devices; reads the batches the 2-process run's processes read.
ONE_PROCESS = """\
import importlib.util, json, sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from midijax import input_pipeline, train

config_path, workdir, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("tiny_config", config_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.train.num_steps = num_steps
EMULATED = 2


class TwoProcessBatches:
  # The data of a 2-process run, in one process: process p's rows at [p*R, (p+1)*R).
  def __init__(self, config):
    self.sources = [input_pipeline.DataSource(config, process_index=p, process_count=EMULATED)
                    for p in range(EMULATED)]
    self.vocab_size = self.sources[0].vocab_size

  def save_vocab(self, path):
    self.sources[0].save_vocab(path)

  def train_batches(self, start_step):
    its = [iter(s.train_batches(start_step)) for s in self.sources]
    while True:
      parts = [next(it) for it in its]
      yield {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

  def eval_batches(self):
    for parts in zip(*(s.eval_batches() for s in self.sources)):
      yield {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


result = train.train_and_evaluate(config, workdir, data=TwoProcessBatches(config))
print("RESULT=" + json.dumps({k: float(v) for k, v in result.items()}), flush=True)
"""

# One process with 8 CPU devices: load both runs' final parameters with runs.load_run.
LOAD_RUN = """\
import sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
from flax import nnx
import numpy as np
from midijax import runs

def params(workdir):
  model, _, _, step = runs.load_run(workdir)
  state = nnx.state(model, nnx.Param)
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                jax.tree_util.tree_leaves_with_path(state)}

step_a, a = params(sys.argv[1])
step_b, b = params(sys.argv[2])
assert step_a == step_b, (step_a, step_b)
assert a.keys() == b.keys()
worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
print(f"LOADED step={step_a} leaves={len(a)} max_abs_diff={worst}", flush=True)
"""


def _copy_groove(groove_dir: pathlib.Path, dest: pathlib.Path):
  """8 train, 2 validation and 2 test files (beats) with a trimmed info.csv."""
  copy_groove_subset(groove_dir, dest, {"train": 8, "validation": 2, "test": 2},
                     beat_types=("beat",))



def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _run(args, timeout=300):
  proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=_env(),
                        timeout=timeout)
  assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
  return proc.stdout


def _losses(workdir: pathlib.Path):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
  evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
  return train, evals


@pytest.fixture(scope="module")
def runs(groove_dir, tmp_path_factory):
  """Builds the tiny dataset, then trains it with 2 processes and with 1 (8 devices each)."""
  import data_pipelines  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("multihost")
  _copy_groove(groove_dir, root / "src")
  data_pipelines.build("groove", "drums", manual_dir=str(root / "src"),
                       data_dir=str(root / "tfds"), num_shards=2, num_workers=2)
  config = root / "tiny_config.py"
  config.write_text(CONFIG.format(data_dir=str(root / "tfds"), num_steps=NUM_STEPS))
  two, one = root / "two_processes", root / "one_process"
  two_out = _run([sys.executable, str(REPO / "launch" / "local_multiprocess.py"),
                  "--num_processes=2", "--devices_per_process=4", "--timeout=240", "--",
                  f"--config={config}", f"--workdir={two}"])
  one_out = _run([sys.executable, "-c", ONE_PROCESS, str(config), str(one), str(NUM_STEPS)])
  return {"root": root, "config": config, "two": two, "one": one, "two_out": two_out,
          "one_out": one_out}


def test_two_processes_train_like_one(runs):
  assert "[p0] " in runs["two_out"] and "[p1] " in runs["two_out"]
  two_train, two_eval = _losses(runs["two"])
  one_train, one_eval = _losses(runs["one"])
  assert sorted(two_train) == list(range(1, NUM_STEPS + 1)) == sorted(one_train)
  for step in two_train:
    np.testing.assert_allclose(two_train[step], one_train[step], rtol=LOSS_RTOL,
                               err_msg=f"train loss at step {step}")
  assert list(two_eval) == list(one_eval) == [NUM_STEPS]
  np.testing.assert_allclose(two_eval[NUM_STEPS], one_eval[NUM_STEPS], rtol=LOSS_RTOL)
  # It learned something.
  assert two_train[NUM_STEPS] < two_train[1] and two_eval[NUM_STEPS] < two_train[1]


def test_two_process_checkpoint_loads_in_one_process(runs):
  steps = sorted(int(p.name) for p in (runs["two"] / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == NUM_STEPS
  out = _run([sys.executable, "-c", LOAD_RUN, str(runs["two"]), str(runs["one"])])
  line = next(l for l in out.splitlines() if l.startswith("LOADED "))
  assert f"step={NUM_STEPS}" in line
  assert float(line.split("max_abs_diff=")[1]) < PARAM_ATOL, line


def test_two_process_run_resumes_in_one_process(runs):
  resumed = runs["root"] / "resumed"
  shutil.copytree(runs["two"], resumed)
  out = _run([sys.executable, "-c", ONE_PROCESS, str(runs["config"]), str(resumed),
              str(NUM_STEPS + 1)])
  assert f"resuming from step {NUM_STEPS}" in out
  result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT="))[7:])
  assert result["step"] == NUM_STEPS + 1
  train_losses, _ = _losses(resumed)
  assert NUM_STEPS + 1 in train_losses and np.isfinite(train_losses[NUM_STEPS + 1])
