"""midijax.metric_writers: TensorBoard event files without TensorFlow, metrics.jsonl."""
import json
import os
import pathlib
import subprocess
import sys

from midijax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tensorboard_scalars_without_tensorflow(tmp_path):
  # A fresh interpreter: other tests may have imported tensorflow into this one.
  code = (
      "import sys, json\n"
      "from midijax import metric_writers as mw\n"
      f"path = mw.write_tensorboard_scalars({str(tmp_path)!r}, "
      "{'eval/oa_mean': 0.75, 'eval/validity/rate': 1.0}, 42, text={'eval/md': '| a |'})\n"
      "events = mw.read_tensorboard_events(path)\n"
      "vals = {v.tag: (e.step, v.metadata.plugin_data.plugin_name, list(v.tensor.float_val), "
      "[s.decode() for s in v.tensor.string_val]) for e in events for v in e.summary.value}\n"
      "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'version': events[0].file_version,"
      " 'vals': vals}))\n")
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, check=True, timeout=60)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["tf"] is False
  assert out["version"] == "brain.Event:2"
  assert out["vals"] == {"eval/oa_mean": [42, "scalars", [0.75], []],
                         "eval/validity/rate": [42, "scalars", [1.0], []],
                         "eval/md": [42, "text", [], ["| a |"]]}
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_metric_writer_rows_and_loss_plot(tmp_path):
  from etils import epath
  workdir = epath.Path(tmp_path)
  writer = metric_writers.MetricWriter(workdir)
  writer.write(1, {"train_loss": 2.0})
  writer.write(2, {"train_loss": 1.5, "eval_loss": 1.75})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "train_loss": 2.0},
                  {"step": 2, "train_loss": 1.5, "eval_loss": 1.75}]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert metric_writers.plot_losses(workdir).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A process that is not the chief writes nothing.
  quiet = metric_writers.MetricWriter(epath.Path(tmp_path / "other"), active=False)
  quiet.write(1, {"train_loss": 1.0})
  quiet.close()
  assert not (tmp_path / "other").exists()


def test_resumed_writer_drops_rows_after_the_restart_step(tmp_path):
  """A run killed after its last checkpoint logged steps it will log again on resuming."""
  from etils import epath
  workdir = epath.Path(tmp_path)
  first = metric_writers.MetricWriter(workdir)
  for step in range(1, 11):
    first.write(step, {"train_loss": 1.0 / step})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "train_lo')  # torn by a kill
  resumed = metric_writers.MetricWriter(workdir, resume_step=6)
  for step in range(7, 13):
    resumed.write(step, {"train_loss": 0.5})
  resumed.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert [r["train_loss"] for r in rows[:6]] == [1.0 / s for s in range(1, 7)]
