"""midijax.reports: metrics.json, metrics.md and PNG plots; TensorBoard scalars."""
import json
import math
import pathlib
import struct

import numpy as np
import pytest

from clips import random_clip, sixteenth_hihat
from midijax import music_stats, reports
from midijax.notes import Notes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ reports

def _assert_png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_MAGIC, path
  width, height = struct.unpack(">II", data[16:24])
  assert width > 100 and height > 100


def test_reports_are_written(tmp_path):
  rng = np.random.default_rng(5)
  real = [Notes.from_arrays(
      np.concatenate([c.pitch, h.pitch]), np.concatenate([c.start, h.start]),
      np.concatenate([c.end, h.end]), is_drum=np.concatenate([c.is_drum, h.is_drum]), qpm=97)
          for c, h in ((random_clip(rng), sixteenth_hihat(shift_s=0.002 * i))
                       for i in range(6))]
  gen = [random_clip(rng, notes_per_s=6) for _ in range(5)]
  cmp = music_stats.compare_sets(gen, real)
  assert cmp.groups == ("pitched", "drums")
  validity = music_stats.grammar_validity([gen[0], None])
  out = reports.write_reports(tmp_path / "eval", cmp, validity=validity,
                         extra={"nll": {"bits_per_token": 1.25}},
                         examples={"real 0": real[0], "gen/0": gen[0]})
  doc = json.loads(out["metrics_json"].read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert doc["music_statistics"]["summary"]["n_real"] == 6
  assert doc["grammar_validity"]["rate"] == 0.5
  assert doc["nll"]["bits_per_token"] == 1.25
  assert set(doc["music_statistics"]["features"]) == set(cmp.stats)
  md = out["metrics_md"].read_text()
  assert "| pitch_class_entropy | bits |" in md and "## Grammar validity" in md
  assert "| nll/bits_per_token | 1.25 |" in md
  names = sorted(p.name for p in out["plots"])
  assert names == ["distances_drums.png", "distances_pitched.png", "features_drums.png",
                   "features_pitched.png", "pianoroll_00_real_0.png", "pianoroll_01_gen_0.png"]
  for p in out["plots"]:
    _assert_png(p)


def test_flat_scalars_are_finite_floats():
  rng = np.random.default_rng(6)
  clips = [random_clip(rng) for _ in range(4)]
  scalars = reports.flat_scalars(music_stats.compare_sets(clips, clips),
                            validity=music_stats.grammar_validity([clips[0]]))
  assert scalars["eval/music/oa_mean"] == pytest.approx(1.0)
  assert scalars["eval/validity/rate"] == 1.0
  assert all(isinstance(v, float) and math.isfinite(v) for v in scalars.values())


def test_beat_grid_and_continuation_figure(tmp_path):
  beats, bars = reports.beat_grid(4.0, qpm=120, meter=(4, 4))
  np.testing.assert_allclose(beats, np.arange(0, 4.01, 0.5))
  np.testing.assert_allclose(bars, [0.0, 2.0, 4.0])
  beats, bars = reports.beat_grid(3.0, qpm=120, meter=(6, 8))
  np.testing.assert_allclose(beats, [0.0, 0.75, 1.5, 2.25, 3.0])  # dotted quarters
  np.testing.assert_allclose(bars, [0.0, 1.5, 3.0])
  prompt = sixteenth_hihat(bars=1, qpm=97)
  later = lambda n: Notes.from_arrays(n.pitch, n.start + 60 / 97 * 4, n.end + 60 / 97 * 4,
                                      n.velocity, is_drum=True, qpm=97)
  conts = {"real": later(sixteenth_hihat(bars=2, qpm=97)),
           "generated 1": later(sixteenth_hihat(bars=2, qpm=97, shift_s=0.01)),
           "generated 2": later(sixteenth_hihat(bars=1, qpm=97, velocity=40))}
  path = reports.plot_continuations(prompt, conts, tmp_path / "roll.png",
                                    prompt_end=60 / 97 * 4, qpm=97, meter=(4, 4), title="t")
  _assert_png(path)
  rng = np.random.default_rng(0)
  _assert_png(reports.plot_continuations(random_clip(rng), {"real": random_clip(rng)},
                                         tmp_path / "piano.png", prompt_end=8.0))
