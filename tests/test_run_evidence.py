"""`midijax evaluate` and `midijax export-listening` on a tiny trained groove model."""
import csv
import json
import wave

import numpy as np
import pytest

from midijax import cli


# The tiny data has 4 test pieces: the C2ST runs on the 16 training pieces, 3 folds.
C2ST_FLAGS = ["--c2st_prompts", "24", "--c2st_lengths", "16,48", "--c2st_prompt_tokens", "16",
              "--c2st_folds", "3"]


def test_evaluate_writes_reports_and_is_deterministic(tiny_run, groove_tfds, tmp_path):
  from midijax import metric_writers
  args = ["evaluate", "--workdir", str(tiny_run), "--split", "train", "--num_samples", "6",
          "--max_tokens", "40", "--data_dir", str(groove_tfds), *C2ST_FLAGS]
  assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
  assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
  a = json.loads((tmp_path / "a" / "metrics.json").read_text())
  b = json.loads((tmp_path / "b" / "metrics.json").read_text())
  for doc in (a, b):  # wall-clock seconds differ from run to run
    for r in doc["c2st"].values():
      r.pop("sample_s")
  assert a == b  # same checkpoint, same seed: identical numbers
  nll = a["nll"]
  assert 0 < nll["nll_per_token"] < 10 and nll["nll_per_note"] > nll["nll_per_token"]
  assert nll["seconds"] > 0 and nll["nll_per_second"] == pytest.approx(
      nll["nll_per_token"] * nll["tokens"] / nll["seconds"])
  assert abs(nll["perplexity"] - np.exp(nll["nll_per_token"])) < 1e-3 * nll["perplexity"]
  assert nll["eval_context"] == 0  # the run's config: non-overlapping windows
  assert 0.0 <= a["grammar_validity"]["rate"] <= 1.0
  assert "drum_hit_density" in a["music_statistics"]["features"]
  # The run's config.sample settings are used when no flag overrides them.
  assert (a["temperature"], a["top_k"], a["top_p"]) == (1.0, 0, 1.0)
  assert set(a["c2st"]) == {"16", "48"}
  for n, r in a["c2st"].items():
    assert r["continuation_tokens"] == int(n) and r["prompt_tokens"] == 16
    assert r["n_windows"] == r["n_real"] == r["n_generated"] and r["n_windows"] >= 10
    assert r["n_folds"] == 3 and r["n_prompts"] == r["n_pieces"] >= 3
    assert r["constrained_validity"]["rate"] == 1.0  # constrained samples always decode
    assert r["generated_seconds_mean"] > 0 and r["real_seconds_mean"] > 0
    for c in r["classifiers"].values():
      assert 0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1
    assert r["accuracy"] == max(c["accuracy"] for c in r["classifiers"].values())
  pngs = list((tmp_path / "a").glob("*.png"))
  assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  md = (tmp_path / "a" / "metrics.md").read_text()
  assert "| feature |" in md and "## Classifier two-sample test: 48-token continuations" in md
  events = [e for f in (tiny_run / "tensorboard").glob("events.out.tfevents.*")
            for e in metric_writers.read_tensorboard_events(f)]
  tags = {v.tag for e in events for v in e.summary.value}
  assert "eval_train/c2st_48/accuracy" in tags and "eval_train/nll_per_second" in tags


def test_eval_context_scores_the_same_targets_with_context(tiny_run, groove_tfds):
  from midijax import evaluation, runs
  model, _, config, _ = runs.load_run(tiny_run)
  config.data.data_dir = str(groove_tfds)
  plain = evaluation.split_nll(model, config, "train")
  with config.unlocked():
    config.data.eval_context = 32
  ctx = evaluation.split_nll(model, config, "train")
  assert ctx["eval_context"] == 32 and plain["eval_context"] == 0
  assert ctx["tokens"] == plain["tokens"] and ctx["notes"] == plain["notes"]
  assert ctx["nll_per_token"] != plain["nll_per_token"]  # same targets, more history


@pytest.mark.parametrize("flags, message", [
    (["--c2st_prompts", "4"], "too few prompts for 3-fold cross-validation"),
    (["--c2st_lengths", "100000"], "has 0 windows of 16 + 100000 event tokens"),
    (["--c2st_features", "pitched"], "makes only drum notes"),
    (["--c2st_prompt_tokens", "200"], "do not fit the 64-token context the model was"),
    (["--eval_context", "64"], "--eval_context=64: must be >= 0 and leave room"),
])
def test_evaluate_c2st_errors_are_one_line_and_keep_reports(tiny_run, groove_tfds, tmp_path,
                                                            capsys, flags, message):
  out = tmp_path / "eval"
  out.mkdir()
  (out / "metrics.json").write_text("{}")  # an earlier report must survive the error
  args = ["evaluate", "--workdir", str(tiny_run), "--split", "train", "--data_dir",
          str(groove_tfds), "--out", str(out), *C2ST_FLAGS, *flags]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
  assert err.startswith("midijax evaluate: error:")
  assert (out / "metrics.json").read_text() == "{}"


def test_evaluate_without_checkpoint_is_one_clear_line(tmp_path, capsys):
  assert cli.main(["evaluate", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert str(tmp_path) in err and "Traceback" not in err


@pytest.mark.slow
def test_export_listening_from_a_trained_run(tiny_run, groove_tfds, tmp_path):
  import shutil
  from conftest import IN_CI
  if not shutil.which("fluidsynth"):
    if IN_CI:
      pytest.fail("fluidsynth missing under CI=true")
    pytest.skip("fluidsynth not installed (bash launch/setup.sh --system)")
  # The checkpoint the export uses (the best) evaluated first: its C2ST goes in the manifest.
  assert cli.main(["evaluate", "--workdir", str(tiny_run), "--best", "--split", "train",
                   "--num_samples", "4", "--max_tokens", "24", "--data_dir", str(groove_tfds),
                   "--c2st_prompts", "24", "--c2st_lengths", "16", "--c2st_prompt_tokens",
                   "16", "--c2st_folds", "3"]) == 0
  out = tmp_path / "listen"
  assert cli.main(["export-listening", "--run", f"tiny={tiny_run}", "--num_clips", "2",
                   "--seconds", "4", "--out", str(out), "--data_dir", str(groove_tfds),
                   "--top_p", "0.9", "--guidance", "0.5"]) == 0
  key = list(csv.DictReader(open(out / "key.csv")))
  assert {r["condition"] for r in key} >= {"tiny", "real"}
  wavs = list((out / "rater" / "audio").glob("*.wav"))
  assert wavs
  for w in wavs:
    with wave.open(str(w)) as f:
      frames = f.readframes(f.getnframes())
      seconds = f.getnframes() / f.getframerate()
      x = np.frombuffer(frames, np.int16).astype(np.float64)
    row = next(r for r in key if r["id"] == w.stem)
    if row["role"] != "prompt":
      assert abs(seconds - 4.0) < 0.05
    if row["condition"] == "real" and row["role"] != "prompt":
      assert np.sqrt(np.mean(x ** 2)) > 100, f"real clip {w.name} is silent"
  # Rater-facing files never name a run, a workdir or a real file.
  for f in (out / "rater").rglob("*"):
    if f.suffix in (".html", ".json", ".js", ".css"):
      text = f.read_text()
      assert str(tiny_run) not in text and "tiny" not in text
  manifest = json.loads((out / "manifest.json").read_text())
  gen = manifest["generation"]
  assert gen["runs"] == {"tiny": str(tiny_run)} and gen["real_split"] == "test"
  # The run's config.sample settings, with the flags given overriding its fields.
  assert gen["sampling"]["tiny"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9,
                                     "guidance": 0.5}
  quality = gen["quality"]["tiny"]
  assert quality["eval"] and quality["split"] == "train" and quality["nll_per_token"] > 0
  assert set(quality["c2st"]) == {"16"}
  c = quality["c2st"]["16"]
  assert c["ci_low"] <= c["accuracy"] <= c["ci_high"] and c["prompt_tokens"] == 16
