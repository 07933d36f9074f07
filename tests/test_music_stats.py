"""midijax.music_stats: music features with known answers, set comparison, validity."""
import math

import numpy as np
import pytest

from clips import KICK, c_major_scale, random_clip, sixteenth_hihat
from midijax import music_stats
from midijax.notes import Notes


# ------------------------------------------------------------------ clip features

def test_c_major_scale_known_answers():
  f = music_stats.clip_features(c_major_scale(), duration=3.5)
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
  edges = music_stats.DURATION_BIN_EDGES_S
  k = np.searchsorted(edges, 0.4, side="right") - 1
  assert f["note_length_histogram"][k] == 1.0
  # Quarter notes on beats 0..6 in 4/4: bar 1 lacks beat 4 -> 1 of 16 positions differ.
  assert f["groove_consistency"] == pytest.approx(1 - 1 / 16)


def test_polyphony_counts_chords_and_held_notes():
  # Two triads (0-1 s and 1-2 s) over a bass note held 0-2 s.
  pitches = [60, 64, 67, 62, 65, 69, 36]
  start = [0, 0, 0, 1, 1, 1, 0]
  end = [1, 1, 1, 2, 2, 2, 2]
  f = music_stats.clip_features(Notes.from_arrays(pitches, start, end))
  assert f["polyphony"] == pytest.approx(4.0)  # 3 new + the bass, at both onsets
  assert f["polyphony_time"] == pytest.approx(4.0)
  assert f["mean_ioi"] == pytest.approx(1.0)


def test_straight_sixteenth_hihat_has_zero_microtiming():
  f = music_stats.clip_features(sixteenth_hihat(qpm=97.0), groups=("drums",))
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
  mt = music_stats.microtiming_offsets(sixteenth_hihat(qpm=120.0, shift_s=0.010))
  np.testing.assert_allclose(mt["offset_16ths"], 0.08, atol=1e-9)
  np.testing.assert_allclose(mt["offset_s"], 0.010, atol=1e-12)
  f = music_stats.clip_features(sixteenth_hihat(qpm=120.0, shift_s=-0.010), groups=("drums",))
  assert f["drum_microtiming"][2] == pytest.approx(-0.08)
  assert f["drum_microtiming_abs"][2] == pytest.approx(0.08)


def test_seconds_to_quarters_follows_tempo_changes():
  tempos = np.array([[0.0, 120.0], [2.0, 60.0]])  # 4 quarters in 2 s, then 1 per second
  q = music_stats.seconds_to_quarters(np.array([0.0, 1.0, 2.0, 3.0, 4.5]), tempos)
  np.testing.assert_allclose(q, [0, 2, 4, 5, 6.5])


def test_groove_consistency_of_two_known_bars():
  # Bar 0: kicks on the 4 beats; bar 1: kicks on beats 1 and 3 -> 2 of 16 positions differ.
  sixteenth = 0.125
  steps = [0, 4, 8, 12, 16, 24]
  start = np.array(steps) * sixteenth
  n = Notes.from_arrays([KICK] * 6, start, start + 0.05, 100, is_drum=True, qpm=120)
  f = music_stats.clip_features(n, groups=("drums",))
  assert f["drum_groove_consistency"] == pytest.approx(1 - 2 / 16)
  # Velocity grids over 16 x 9 cells: two cells hold 100/127 in one bar only.
  assert f["drum_velocity_groove_consistency"] == pytest.approx(1 - 2 * (100 / 127) / 144)


def test_drum_bar_grid_holds_each_bars_hits():
  sixteenth = 0.125
  steps = [0, 4, 8, 12, 16, 24]
  start = np.array(steps) * sixteenth
  velocity = np.array([100, 90, 100, 90, 127, 64])
  n = Notes.from_arrays([KICK] * 6, start, start + 0.05, velocity, is_drum=True, qpm=120)
  grid = music_stats.drum_bar_grid(n)
  assert grid.shape == (2, 16, music_stats.NUM_DRUM_CLASSES)
  kick = music_stats.drum_class_names().index("kick")
  np.testing.assert_allclose(grid[0, [0, 4, 8, 12], kick], np.array([100, 90, 100, 90]) / 127)
  np.testing.assert_allclose(grid[1, [0, 8], kick], np.array([127, 64]) / 127)
  assert np.count_nonzero(grid) == 6
  # The same grids the velocity consistency compares: 1 - mean |bar 0 - bar 1|.
  f = music_stats.clip_features(n, groups=("drums",))
  assert f["drum_velocity_groove_consistency"] == pytest.approx(
      1 - np.abs(grid[0] - grid[1]).mean())
  assert music_stats.drum_bar_grid(Notes.from_arrays([], [], [], [], is_drum=True)).shape[0] == 0


def test_features_are_deterministic_and_order_independent():
  rng = np.random.default_rng(0)
  clip = random_clip(rng)
  drums = sixteenth_hihat(shift_s=0.003)
  both = Notes.from_arrays(
      np.concatenate([clip.pitch, drums.pitch]), np.concatenate([clip.start, drums.start]),
      np.concatenate([clip.end, drums.end]), np.concatenate([clip.velocity, drums.velocity]),
      is_drum=np.concatenate([clip.is_drum, drums.is_drum]), qpm=97.0)
  perm = rng.permutation(len(both))
  a = music_stats.clip_features(both)
  b = music_stats.clip_features(both)
  c = music_stats.clip_features(both.select(perm))
  assert a.keys() == b.keys() == c.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a[k], c[k], rtol=0, atol=1e-12, err_msg=k)


def test_empty_clip_gives_zeros():
  f = music_stats.clip_features(Notes.empty())
  assert f["note_count"] == 0 and f["note_density"] == 0
  np.testing.assert_array_equal(f["pitch_class_histogram"], np.zeros(12))
  np.testing.assert_array_equal(f["drum_class_hits"], np.zeros(9))
  assert all(np.all(np.isfinite(v)) for v in f.values())


# ------------------------------------------------------------------ set comparison

def test_kde_matches_a_direct_gaussian_sum():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 0.5, 300)
  grid = np.linspace(-1, 5, 2048)
  h = music_stats.scott_bandwidth(x)
  direct = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / h) ** 2).sum(1)
  direct /= direct.sum()
  np.testing.assert_allclose(music_stats.kde_on_grid(x, grid), direct, atol=2e-5)


def test_overlap_and_kl_edge_cases():
  x = np.random.default_rng(2).gamma(2.0, 1.0, 200)
  assert music_stats.overlap_area(x, x) == pytest.approx(1.0, abs=1e-12)
  assert music_stats.kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
  # Zero-variance samples: no crash; identical spikes overlap fully, distant ones not at all.
  assert music_stats.overlap_area(np.ones(5), np.ones(7)) == pytest.approx(1.0)
  assert music_stats.overlap_area(np.zeros(4), np.full(4, 5.0)) == pytest.approx(0.0, abs=1e-9)
  kl = music_stats.kl_divergence(np.zeros(4), np.full(4, 5.0))
  assert math.isfinite(kl) and kl > 20
  assert music_stats.overlap_area([1.0], [1.0]) == pytest.approx(1.0)
  assert math.isnan(music_stats.overlap_area([], [1.0]))


def test_set_compared_with_itself_has_oa_one_and_kl_zero():
  rng = np.random.default_rng(3)
  clips = [random_clip(rng) for _ in range(12)]
  cmp = music_stats.compare_sets(clips, clips)
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
  similar = music_stats.compare_sets(like_real, real)
  different = music_stats.compare_sets(dense, real)
  assert similar.stats["note_density"]["oa"] > 0.6
  assert different.stats["note_density"]["oa"] < 0.1
  assert different.stats["note_density"]["kl"] > similar.stats["note_density"]["kl"]
  st = different.stats["note_density"]
  assert st["inter_pairs"] == 400 and st["intra_real_pairs"] == 190
  assert st["generated_mean"] > 5 * st["real_mean"]
  # Precomputed feature dicts give the same numbers.
  again = music_stats.compare_sets(music_stats.set_features(dense, groups=("pitched",)),
                          music_stats.set_features(real, groups=("pitched",)))
  assert again.stats["note_density"]["oa"] == st["oa"]


# ------------------------------------------------------------------ grammar validity

def test_grammar_validity_counts_valid_decodes():
  good = c_major_scale()
  bad_pitch = Notes.from_arrays([200], [0.0], [1.0])
  reversed_note = Notes.from_arrays([60], [1.0], [0.5])
  items = [good, good.to_note_sequence(), Notes.empty(), None, bad_pitch, reversed_note]
  v = music_stats.grammar_validity(items)
  assert v["total"] == 6 and v["valid"] == 3 and v["empty"] == 1
  assert v["rate"] == pytest.approx(0.5)
  assert v["errors"] == {"decoder returned None": 1, "end <= start": 1,
                         "pitch outside 0..127": 1}

  def decode(ids):
    if ids[0] < 0:
      raise KeyError("bad token")
    return Notes.from_arrays(ids, np.arange(len(ids)), np.arange(len(ids)) + 0.5)

  v = music_stats.grammar_validity([[60, 62], [-1], [64]], decode=decode)
  assert (v["valid"], v["total"], v["errors"]) == (2, 3, {"KeyError": 1})
