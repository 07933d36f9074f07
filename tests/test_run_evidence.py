"""`midijax evaluate` and `midijax export-listening` on a tiny trained groove model."""
import csv
import json
import wave

import numpy as np
import pytest

from midijax import cli


def test_evaluate_writes_reports_and_is_deterministic(tiny_run, groove_tfds, tmp_path):
  args = ["evaluate", "--workdir", str(tiny_run), "--split", "test", "--num_samples", "6",
          "--max_tokens", "40", "--data_dir", str(groove_tfds)]
  assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
  assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
  a = json.loads((tmp_path / "a" / "metrics.json").read_text())
  b = json.loads((tmp_path / "b" / "metrics.json").read_text())
  assert a == b  # same checkpoint, same seed: identical numbers
  nll = a["nll"]
  assert 0 < nll["nll_per_token"] < 10 and nll["nll_per_note"] > nll["nll_per_token"]
  assert abs(nll["perplexity"] - np.exp(nll["nll_per_token"])) < 1e-3 * nll["perplexity"]
  assert 0.0 <= a["grammar_validity"]["rate"] <= 1.0
  assert "drum_hit_density" in a["music_statistics"]["features"]
  pngs = list((tmp_path / "a").glob("*.png"))
  assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  assert "| feature |" in (tmp_path / "a" / "metrics.md").read_text()
  assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


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
  out = tmp_path / "listen"
  assert cli.main(["export-listening", "--run", f"tiny={tiny_run}", "--num_clips", "2",
                   "--seconds", "4", "--out", str(out), "--data_dir", str(groove_tfds)]) == 0
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
  assert manifest["generation"]["runs"] == {"tiny": str(tiny_run)}
