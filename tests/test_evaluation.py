"""Tests for midijax.evaluation: music statistics with known answers, set comparison, reports."""
import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from midijax import evaluation as ev
from midijax.notes import Notes

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KICK, CLOSED_HH = 36, 42  # GrooVAE classes 0 and 2


def c_major_scale(qpm=120.0) -> Notes:
  pitches = [60, 62, 64, 65, 67, 69, 71]
  start = np.arange(7) * 0.5
  return Notes.from_arrays(pitches, start, start + 0.4, 90, qpm=qpm)


def sixteenth_hihat(bars=4, qpm=97.0, shift_s=0.0, velocity=80) -> Notes:
  sixteenth = 60.0 / qpm / 4
  start = np.arange(16 * bars) * sixteenth + shift_s
  return Notes.from_arrays(np.full(len(start), CLOSED_HH), start, start + 0.05, velocity,
                           is_drum=True, qpm=qpm)


def random_clip(rng, notes_per_s=4.0, seconds=8.0) -> Notes:
  n = max(2, int(rng.poisson(notes_per_s * seconds)))
  start = np.sort(rng.uniform(0, seconds, n))
  return Notes.from_arrays(rng.integers(48, 84, n), start, start + rng.uniform(0.1, 0.8, n),
                           rng.integers(30, 120, n))


# ------------------------------------------------------------------ clip features

def test_c_major_scale_known_answers():
  f = ev.clip_features(c_major_scale(), duration=3.5)
  np.testing.assert_allclose(f["pitch_class_entropy"], math.log2(7), atol=1e-12)
  hist = f["pitch_class_histogram"]
  np.testing.assert_allclose(hist[[0, 2, 4, 5, 7, 9, 11]], 1 / 7)
  np.testing.assert_array_equal(hist[[1, 3, 6, 8, 10]], 0)
  assert f["pitch_range"] == 11 and f["pitch_count"] == 7 and f["note_count"] == 7
  assert f["note_density"] == pytest.approx(2.0)
  assert f["mean_ioi"] == pytest.approx(0.5)
  assert f["mean_pitch_interval"] == pytest.approx(11 / 6)
  assert f["polyphony"] == 1.0 and f["polyphony_time"] == pytest.approx(1.0)
  # Every 0.4 s note falls in the [0.32, 0.453) s length bin.
  edges = ev.DURATION_BIN_EDGES_S
  k = np.searchsorted(edges, 0.4, side="right") - 1
  assert f["note_length_histogram"][k] == 1.0
  # Quarter notes on beats 0..6 in 4/4: bar 1 lacks beat 4 -> 1 of 16 positions differ.
  assert f["groove_consistency"] == pytest.approx(1 - 1 / 16)


def test_polyphony_counts_chords_and_held_notes():
  # Two triads (0-1 s and 1-2 s) over a bass note held 0-2 s.
  pitches = [60, 64, 67, 62, 65, 69, 36]
  start = [0, 0, 0, 1, 1, 1, 0]
  end = [1, 1, 1, 2, 2, 2, 2]
  f = ev.clip_features(Notes.from_arrays(pitches, start, end))
  assert f["polyphony"] == pytest.approx(4.0)  # 3 new + the bass, at both onsets
  assert f["polyphony_time"] == pytest.approx(4.0)
  assert f["mean_ioi"] == pytest.approx(1.0)


def test_straight_sixteenth_hihat_has_zero_microtiming():
  f = ev.clip_features(sixteenth_hihat(qpm=97.0), groups=("drums",))
  np.testing.assert_allclose(f["drum_microtiming"], 0.0, atol=1e-9)
  np.testing.assert_allclose(f["drum_microtiming_abs"], 0.0, atol=1e-9)
  assert f["drum_microtiming_abs_mean"] == pytest.approx(0.0, abs=1e-9)
  hits = np.zeros(9)
  hits[2] = 64
  np.testing.assert_array_equal(f["drum_class_hits"], hits)
  assert f["drum_groove_consistency"] == 1.0
  assert f["drum_velocity_groove_consistency"] == 1.0
  assert "pitch_class_entropy" not in f


def test_late_hits_have_the_known_offset():
  # 10 ms late at 120 qpm: a 16th is 125 ms, so +0.08 16ths.
  mt = ev.microtiming_offsets(sixteenth_hihat(qpm=120.0, shift_s=0.010))
  np.testing.assert_allclose(mt["offset_16ths"], 0.08, atol=1e-9)
  np.testing.assert_allclose(mt["offset_s"], 0.010, atol=1e-12)
  f = ev.clip_features(sixteenth_hihat(qpm=120.0, shift_s=-0.010), groups=("drums",))
  assert f["drum_microtiming"][2] == pytest.approx(-0.08)
  assert f["drum_microtiming_abs"][2] == pytest.approx(0.08)


def test_seconds_to_quarters_follows_tempo_changes():
  tempos = np.array([[0.0, 120.0], [2.0, 60.0]])  # 4 quarters in 2 s, then 1 per second
  q = ev.seconds_to_quarters(np.array([0.0, 1.0, 2.0, 3.0, 4.5]), tempos)
  np.testing.assert_allclose(q, [0, 2, 4, 5, 6.5])


def test_groove_consistency_of_two_known_bars():
  # Bar 0: kicks on the 4 beats; bar 1: kicks on beats 1 and 3 -> 2 of 16 positions differ.
  sixteenth = 0.125
  steps = [0, 4, 8, 12, 16, 24]
  start = np.array(steps) * sixteenth
  n = Notes.from_arrays([KICK] * 6, start, start + 0.05, 100, is_drum=True, qpm=120)
  f = ev.clip_features(n, groups=("drums",))
  assert f["drum_groove_consistency"] == pytest.approx(1 - 2 / 16)
  # Velocity grids over 16 x 9 cells: two cells hold 100/127 in one bar only.
  assert f["drum_velocity_groove_consistency"] == pytest.approx(1 - 2 * (100 / 127) / 144)


def test_features_are_deterministic_and_order_independent():
  rng = np.random.default_rng(0)
  clip = random_clip(rng)
  drums = sixteenth_hihat(shift_s=0.003)
  both = Notes.from_arrays(
      np.concatenate([clip.pitch, drums.pitch]), np.concatenate([clip.start, drums.start]),
      np.concatenate([clip.end, drums.end]), np.concatenate([clip.velocity, drums.velocity]),
      is_drum=np.concatenate([clip.is_drum, drums.is_drum]), qpm=97.0)
  perm = rng.permutation(len(both))
  a = ev.clip_features(both)
  b = ev.clip_features(both)
  c = ev.clip_features(both.select(perm))
  assert a.keys() == b.keys() == c.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a[k], c[k], rtol=0, atol=1e-12, err_msg=k)


def test_empty_clip_gives_zeros():
  f = ev.clip_features(Notes.empty())
  assert f["note_count"] == 0 and f["note_density"] == 0
  np.testing.assert_array_equal(f["pitch_class_histogram"], np.zeros(12))
  np.testing.assert_array_equal(f["drum_class_hits"], np.zeros(9))
  assert all(np.all(np.isfinite(v)) for v in f.values())


# ------------------------------------------------------------------ set comparison

def test_kde_matches_a_direct_gaussian_sum():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 0.5, 300)
  grid = np.linspace(-1, 5, 2048)
  h = ev._scott_bandwidth(x)  # pylint: disable=protected-access
  direct = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / h) ** 2).sum(1)
  direct /= direct.sum()
  np.testing.assert_allclose(ev.kde_on_grid(x, grid), direct, atol=2e-5)


def test_overlap_and_kl_edge_cases():
  x = np.random.default_rng(2).gamma(2.0, 1.0, 200)
  assert ev.overlap_area(x, x) == pytest.approx(1.0, abs=1e-12)
  assert ev.kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
  # Zero-variance samples: no crash; identical spikes overlap fully, distant ones not at all.
  assert ev.overlap_area(np.ones(5), np.ones(7)) == pytest.approx(1.0)
  assert ev.overlap_area(np.zeros(4), np.full(4, 5.0)) == pytest.approx(0.0, abs=1e-9)
  kl = ev.kl_divergence(np.zeros(4), np.full(4, 5.0))
  assert math.isfinite(kl) and kl > 20
  assert ev.overlap_area([1.0], [1.0]) == pytest.approx(1.0)
  assert math.isnan(ev.overlap_area([], [1.0]))


def test_set_compared_with_itself_has_oa_one_and_kl_zero():
  rng = np.random.default_rng(3)
  clips = [random_clip(rng) for _ in range(12)]
  cmp = ev.compare_sets(clips, clips)
  assert cmp.groups == ("pitched",)
  for name, st in cmp.stats.items():
    assert st["oa"] == pytest.approx(1.0, abs=1e-9), name
    assert st["kl"] == pytest.approx(0.0, abs=1e-9), name
  assert cmp.summary["oa_mean"] == pytest.approx(1.0)


def test_compare_sets_separates_different_sets():
  rng = np.random.default_rng(4)
  real = [random_clip(rng, notes_per_s=2.0) for _ in range(20)]
  like_real = [random_clip(rng, notes_per_s=2.0) for _ in range(20)]
  dense = [random_clip(rng, notes_per_s=12.0) for _ in range(20)]
  similar = ev.compare_sets(like_real, real)
  different = ev.compare_sets(dense, real)
  assert similar.stats["note_density"]["oa"] > 0.6
  assert different.stats["note_density"]["oa"] < 0.1
  assert different.stats["note_density"]["kl"] > similar.stats["note_density"]["kl"]
  st = different.stats["note_density"]
  assert st["inter_pairs"] == 400 and st["intra_real_pairs"] == 190
  assert st["generated_mean"] > 5 * st["real_mean"]
  # Precomputed feature dicts give the same numbers.
  again = ev.compare_sets(ev.set_features(dense, groups=("pitched",)),
                          ev.set_features(real, groups=("pitched",)))
  assert again.stats["note_density"]["oa"] == st["oa"]


# ------------------------------------------------------------------ grammar validity

def test_grammar_validity_counts_valid_decodes():
  good = c_major_scale()
  bad_pitch = Notes.from_arrays([200], [0.0], [1.0])
  reversed_note = Notes.from_arrays([60], [1.0], [0.5])
  items = [good, good.to_note_sequence(), Notes.empty(), None, bad_pitch, reversed_note]
  v = ev.grammar_validity(items)
  assert v["total"] == 6 and v["valid"] == 3 and v["empty"] == 1
  assert v["rate"] == pytest.approx(0.5)
  assert v["errors"] == {"decoder returned None": 1, "end <= start": 1,
                         "pitch outside 0..127": 1}

  def decode(ids):
    if ids[0] < 0:
      raise KeyError("bad token")
    return Notes.from_arrays(ids, np.arange(len(ids)), np.arange(len(ids)) + 0.5)

  v = ev.grammar_validity([[60, 62], [-1], [64]], decode=decode)
  assert (v["valid"], v["total"], v["errors"]) == (2, 3, {"KeyError": 1})


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
  cmp = ev.compare_sets(gen, real)
  assert cmp.groups == ("pitched", "drums")
  validity = ev.grammar_validity([gen[0], None])
  out = ev.write_reports(tmp_path / "eval", cmp, validity=validity,
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


def test_tensorboard_scalars_without_tensorflow(tmp_path):
  # A fresh interpreter: other tests may have imported tensorflow into this one.
  code = (
      "import sys, json\n"
      "from midijax import evaluation as ev\n"
      f"path = ev.write_tensorboard_scalars({str(tmp_path)!r}, "
      "{'eval/oa_mean': 0.75, 'eval/validity/rate': 1.0}, 42, text={'eval/md': '| a |'})\n"
      "events = ev.read_tensorboard_events(path)\n"
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


def test_flat_scalars_are_finite_floats():
  rng = np.random.default_rng(6)
  clips = [random_clip(rng) for _ in range(4)]
  scalars = ev.flat_scalars(ev.compare_sets(clips, clips),
                            validity=ev.grammar_validity([clips[0]]))
  assert scalars["eval/music/oa_mean"] == pytest.approx(1.0)
  assert scalars["eval/validity/rate"] == 1.0
  assert all(isinstance(v, float) and math.isfinite(v) for v in scalars.values())
