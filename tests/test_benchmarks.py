"""The README's quality benchmarks run end to end on a real (tiny) run and print what the
README reads from them: `benchmarks/groove_quality.py` (NLL against the n-gram baselines,
same windows) and `benchmarks/tune_sampling.py` (the C2ST over sampling settings and seeds).

Their numbers for the shipped configs take a 15-minute training run; here the run is
`tiny_run` (30 steps) and the checks are on the output's shape and its arithmetic.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import copy_groove_subset

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(script, *args):
  """Runs benchmarks/<script> with `args`; its stdout's JSON lines."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_groove_quality_scores_the_run_and_the_ngrams_on_the_same_windows(tiny_run,
                                                                          groove_tfds):
  (out,) = _bench("groove_quality.py", "--workdir", tiny_run, "--data_dir", groove_tfds,
                  "--skip_train", "--orders", "2,3", "--seq_len", "64")
  assert out["seq_len"] == 64 and out["eval_tokens"] > 0 and out["eval_notes"] > 0
  for family in ("witten_bell", "kneser_ney"):
    assert set(out["ngram"][family]) == {"2", "3"}
  best = out["best_ngram"]
  every = [r["nll_per_token"] for f in out["ngram"].values() for r in f.values()]
  assert best["nll_per_token"] == min(every)
  tf = out["transformer"]["nll_per_token"]
  assert out["transformer_below_best_ngram"] == round(1 - tf / best["nll_per_token"], 4)
  # Per note and per second are the same total NLL over other units.
  for unit in ("nll_per_note", "nll_per_second"):
    assert out["transformer"][unit] > 0 and best[unit] > 0


def test_tune_sampling_reports_each_setting_and_picks_the_best(tiny_run, groove_tfds):
  rows = _bench("tune_sampling.py", "--workdir", tiny_run, "--data_dir", groove_tfds,
                "--temperatures", "0.9", "--guidances", "0,0.5", "--lengths", "32",
                "--prompt_tokens", "16", "--folds", "2", "--seeds", "0,1")
  *settings, summary = rows
  assert [(r["temperature"], r["guidance"]) for r in settings] == [(0.9, 0.0), (0.9, 0.5)]
  for r in settings:
    c2st = r["c2st"]["32"]
    assert set(c2st["seeds"]) == {"0", "1"}
    assert abs(c2st["accuracy"] - sum(c2st["seeds"].values()) / 2) < 1e-3
    assert 0 <= c2st["accuracy"] <= 1 and c2st["ci"][0] <= c2st["ci"][1]
    assert set(c2st["classifiers"]) == {"logistic_regression", "boosted_trees"}
    assert c2st["validity"] == 1.0  # constrained samples all decode
    assert r["worst"] == c2st["accuracy"]
  assert summary["best"] == min(settings, key=lambda r: r["worst"])
  assert summary["windows"]["32"] > 0 and summary["prompt_tokens"] == 16


def test_c2st_anatomy_reports_chunks_shifts_presence_repetition_and_splits(tiny_run, groove_tfds):
  rows = _bench("c2st_anatomy.py", "--workdir", tiny_run, "--data_dir", groove_tfds,
                "--length", "64", "--chunk", "32", "--prompt_tokens", "16", "--folds", "2",
                "--repeats", "1", "--shifts", "3", "--bar_pairs", "2")
  by = {}
  for r in rows[:-1]:
    by.setdefault(r["c2st"], []).append(r)
  summary = rows[-1]
  assert [c["tokens"] for c in by["chunk"]] == [[0, 32], [32, 64]]
  assert summary["chunk_accuracy"] == [c["accuracy"] for c in by["chunk"]]
  assert summary["whole_accuracy"] == by["whole"][0]["accuracy"]
  assert [s["against"] for s in by["shifts"]] == ["generated", "train"]
  assert all(len(s["shifts"]) == 3 for s in by["shifts"])
  assert len(by["splits"]) == 1 and 0 <= by["splits"][0]["accuracy"] <= 1
  (rep,) = by["repetition"]
  for who in ("real", "generated"):
    r = rep[who]
    assert len(r["changed_cells"]) == 9 and min(r["changed_cells"].values()) >= 0
    assert len(r["bars_alike_by_pair"]) <= 2
    assert all(0 <= x <= 1 for x in r["bars_alike_by_pair"])
  (pres,) = by["presence"]
  assert pres["fields"] == ["any", "1-3", "mean"] and len(pres["classes"]) == 9
  for per_class in pres["classes"].values():
    assert set(per_class) == {"real", "generated", "train"}
    for any_hit, few, mean in per_class.values():
      assert 0 <= few <= any_hit <= 1 and mean >= 0
      assert (any_hit == 0) == (mean == 0)
  # The drummers' own continuations hit something.
  assert max(c["real"][0] for c in pres["classes"].values()) > 0


def test_c2st_references_put_real_drummers_in_the_models_place(tiny_run, groove_tfds):
  args = ("--workdir", tiny_run, "--data_dir", groove_tfds, "--lengths", "32",
          "--prompt_tokens", "16", "--folds", "2", "--seeds", "0,1")
  *rows, summary = _bench("c2st_references.py", *args)
  assert [r["reference"] for r in rows] == ["same_prefix", "nearest_prompt"]
  for r in rows:
    assert r["length"] == 32 and r["windows"] > 0 and r["reference_windows"] > 0
    assert abs(r["accuracy"] - sum(r["seeds"].values()) / 2) < 1e-3
    assert set(r["classifiers"]) == {"logistic_regression", "boosted_trees"}
    assert summary["summary"][r["reference"]]["32"] == r["accuracy"]
  # With the tested split as its own reference, each prompt's nearest prompt is itself: the
  # stand-ins are the real continuations, and no classifier can beat a coin.
  *rows, _ = _bench("c2st_references.py", *args, "--reference_split", "validation")
  nearest = rows[1]
  assert nearest["reference"] == "nearest_prompt"
  assert all(abs(x - 0.5) < 1e-9 for x in nearest["classifiers"].values()), nearest


@pytest.fixture(scope="module")
def beats_tiny_run(tmp_path_factory, groove_dir):
  """groove_tiny trained 10 steps on `drums_beats` (BAR tokens) built from 8 + 8 real beats,
  with the echo of earlier bars (`model.bar_echo`): its samplers carry the echo."""
  import configs.groove_tiny as groove_tiny
  import data_pipelines
  from midijax import train
  src = tmp_path_factory.mktemp("beats_src")
  copy_groove_subset(groove_dir, src, {"train": 8, "validation": 8}, beat_types=("beat",))
  tfds_dir = tmp_path_factory.mktemp("beats_tfds")
  data_pipelines.build("groove", "drums_beats", manual_dir=str(src), data_dir=str(tfds_dir),
                       num_shards=1)
  config = groove_tiny.get_config()
  config.data.builder_config = "drums_beats"
  config.data.data_dir = str(tfds_dir)
  config.model.bar_echo = 2
  config.train.update(num_steps=10, eval_every=10, checkpoint_every=10, log_every=10,
                      async_checkpointing=False)
  workdir = tmp_path_factory.mktemp("beats_run")
  train.train_and_evaluate(config, str(workdir))
  return workdir, tfds_dir


def test_c2st_anatomy_next_bar_continues_the_drummers_bars(beats_tiny_run):
  workdir, tfds_dir = beats_tiny_run
  rows = _bench("c2st_anatomy.py", "--workdir", workdir, "--data_dir", tfds_dir,
                "--length", "128", "--chunk", "128", "--prompt_tokens", "16", "--folds", "2",
                "--repeats", "1", "--shifts", "1", "--next_bar_at", "0,1",
                "--next_bar_context", "64", "--next_bar_tokens", "64")
  (nb,) = [r for r in rows if r.get("c2st") == "next_bar"]
  assert nb["context_tokens"] == 64 and [p["bar"] for p in nb["pairs"]] == [0, 1]
  for p in nb["pairs"]:
    assert p["windows"] >= 2
    assert 0 <= p["real"] <= 1 and 0 <= p["generated"] <= 1


def test_a_benchmark_given_a_missing_run_says_so_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  missing = tmp_path / "no_run"
  for script in ("tune_sampling.py", "c2st_anatomy.py", "c2st_references.py"):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--workdir",
                           str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if str(missing) in x]
    assert line.startswith(f"{script}: error: ")


def test_train_throughput_times_config_variants_side_by_side():
  args = ("--config", "configs/groove_tiny.py", "--steps", "2", "--warmup", "0",
          "--seq", "32", "--batch", "2")
  (row,) = _bench("train_throughput.py", *args, "--variant", "model.dropout_rate=0",
                  "--variant", "model.dropout_rate=0.1", "model.num_layers=1")
  assert set(row["variants"]) == {"model.dropout_rate=0",
                                  "model.dropout_rate=0.1 model.num_layers=1"}
  assert row["step_time_ratio_to_model.dropout_rate=0"]["model.dropout_rate=0.1 "
                                                         "model.num_layers=1"] > 0
  # A variant naming no config field: one line, exit 2.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), *args,
                         "--variant", "model.no_such_field=1"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "model.no_such_field" in proc.stderr.strip().splitlines()[-1]
