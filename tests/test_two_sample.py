"""Tests for midijax.two_sample: the classifier two-sample test on real Groove MIDI clips.

Sanity checks of the test itself: two random halves of real clips sit at chance, and real
clips against corrupted copies (timing shuffled, velocity made constant) are told apart.
"""
import csv
import dataclasses
import json

import numpy as np
import pytest

from midijax import midi_io, music_stats
from midijax import two_sample as ts
from midijax.errors import MidijaxError
from midijax.notes import Notes

TIMING_FEATURES = ("microtiming", "syncopation", "groove_consistency", "metrical_share")


@pytest.fixture(scope="module")
def gmd_pieces(groove_dir):
  """Real GMD performances of the validation and test splits that last 20 s or more."""
  with open(groove_dir / "info.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f)
            if r["split"] in ("validation", "test") and float(r["duration"]) >= 20]
  return [midi_io.read_notes(groove_dir / r["midi_filename"]) for r in rows]


@pytest.fixture(scope="module")
def gmd_windows(gmd_pieces):
  """4-bar windows, at most 4 per piece (about 360 clips), grouped by piece."""
  return ts.cut_windows(gmd_pieces, bars=4, max_per_piece=4, min_notes=8)


@pytest.fixture(scope="module")
def gmd_features(gmd_windows):
  return ts.clip_feature_matrix(gmd_windows.clips, kind="drums",
                                durations=gmd_windows.durations)


def paired_halves(groups, seed):
  """Two bool masks: each piece's clips dealt at random, half to A and half to B (one
  dropped from an odd count), as a prompt's real and generated continuation share a
  group. Groups of one set only make cross-validation anti-learn: on real-vs-real with
  a fair coin per clip, logistic regression scored 44% (interval 38-50%)."""
  rng = np.random.default_rng(seed)
  a, b = np.zeros(len(groups), bool), np.zeros(len(groups), bool)
  for g in np.unique(groups):
    idx = rng.permutation(np.flatnonzero(groups == g))
    half = len(idx) // 2
    a[idx[:half]] = True
    b[idx[half:2 * half]] = True
  return a, b


def shuffled_timing(clip: Notes, duration: float, rng) -> Notes:
  """Every hit (class and velocity kept) moved to a uniformly random time in the clip."""
  start = rng.uniform(0.0, duration, len(clip))
  return dataclasses.replace(clip, start=start, end=start + (clip.end - clip.start))


def constant_velocity(clip: Notes) -> Notes:
  """Every hit at the clip's mean velocity (timing and classes kept)."""
  v = int(round(float(clip.velocity.mean())))
  return dataclasses.replace(clip, velocity=np.full(len(clip), v, np.int32))


def c2st_against(features, windows, corrupted, seed=0, **kw):
  """C2ST of half of each piece's clips against corrupted copies of its other half."""
  a, b = paired_halves(windows.groups, seed)
  return ts.c2st(features.values[a], corrupted.values[b], real_groups=windows.groups[a],
                 generated_groups=windows.groups[b], feature_names=features.names,
                 seed=seed, **kw)


# ------------------------------------------------------------------ metrical weights, syncopation

def test_metrical_weights_follow_longuet_higgins_lee():
  np.testing.assert_array_equal(
      ts.metrical_weights(16, 4, 4),
      [0, -4, -3, -4, -2, -4, -3, -4, -1, -4, -3, -4, -2, -4, -3, -4])
  # 3/4: three beats at -1, then 8ths, then 16ths.
  np.testing.assert_array_equal(ts.metrical_weights(12, 3, 4),
                                [0, -3, -2, -3, -1, -3, -2, -3, -1, -3, -2, -3])
  # 6/8: two dotted-quarter beats, each split in three 8ths, then 16ths.
  np.testing.assert_array_equal(ts.metrical_weights(12, 6, 8),
                                [0, -3, -2, -3, -2, -3, -1, -3, -2, -3, -2, -3])


def test_syncopation_known_patterns():
  w = ts.metrical_weights(16)
  # Straight quarters (and a last downbeat): no onset is followed by a stronger rest.
  assert ts.syncopation_per_bar(np.array([0, 4, 8, 12, 16]), w) == 0.0
  # Son clave's first bar (onsets 0, 3, 6, 10, 12): 3 -> rest on beat 2 (-2 - -4 = 2),
  # 6 -> rest on the half bar (-1 - -3 = 2); 10 and 12 meet no stronger rest before 12, 16.
  assert ts.syncopation_per_bar(np.array([0, 3, 6, 10, 12, 16]), w) == pytest.approx(
      (4 + 0) / 2)
  # An anticipated downbeat: the last 16th of bar 1 (-4) held over bar 2's silent downbeat
  # (0) scores 4 in bar 1; bar 2's only onset is the clip's last: (4 + 0) / 2 bars.
  assert ts.syncopation_per_bar(np.array([0, 15, 18]), w) == pytest.approx(2.0)


# ------------------------------------------------------------------ clips

def test_bar_windows_keep_the_drummers_grid(gmd_pieces, gmd_windows):
  w = gmd_windows
  assert len(w) >= 300 and np.bincount(w.groups).max() == 4
  for i in range(0, len(w), 37):
    piece, clip = gmd_pieces[w.groups[i]], w.clips[i]
    # The window holds exactly the piece's onsets in [start, start + duration).
    inside = (piece.start >= w.starts[i] - 1e-9) & (piece.start < w.starts[i] + w.durations[i]
                                                   - 1e-9)
    np.testing.assert_allclose(np.sort(clip.start + w.starts[i]), np.sort(piece.start[inside]),
                               atol=1e-9)
    # Starting on a bar line keeps every hit's offset from the 16th grid.
    whole = music_stats.microtiming_offsets(piece.select(inside))["offset_16ths"]
    cut = music_stats.microtiming_offsets(clip)["offset_16ths"]
    np.testing.assert_allclose(np.sort(cut), np.sort(whole), atol=1e-6)
    # 4 bars of 4/4 at the piece's tempo.
    assert w.durations[i] == pytest.approx(16 * 60.0 / piece.qpm)


def test_second_windows_start_on_bar_lines(gmd_pieces):
  pieces = gmd_pieces[:4]
  w = ts.cut_windows(pieces, seconds=5.0, hop=7.0, max_per_piece=3)
  assert len(w) > 4 and (w.durations == 5.0).all()
  for i in range(len(w)):
    piece = pieces[w.groups[i]]
    bar = 4 * 60.0 / piece.qpm  # GMD pieces: one tempo, 4/4
    k = w.starts[i] / bar
    assert k == pytest.approx(round(k), abs=1e-6)
    if i and w.groups[i - 1] == w.groups[i]:
      # The next window starts on the first bar line at least `hop` seconds later.
      gap = w.starts[i] - w.starts[i - 1]
      assert 7.0 - 1e-6 <= gap < 7.0 + bar


def test_token_windows_decode_on_the_pieces_clock(gmd_pieces):
  from midijax import encoding
  enc = encoding.get("drums")
  pieces = gmd_pieces[:2]
  w = ts.cut_windows(pieces, tokens=128, encoding=enc)
  full = enc.decode_notes(enc.encode(pieces[0]), qpm=pieces[0].qpm)
  rebuilt = []
  for i in np.flatnonzero(w.groups == 0):
    assert len(w.ids[i]) == 128
    origin = ts.bar_line_at_or_before(full, w.starts[i])
    assert origin <= w.starts[i] + 1e-6
    rebuilt += [(int(p), round(float(s) + origin, 5)) for p, s in
                zip(w.clips[i].pitch, w.clips[i].start)]
  expected = [(int(p), round(float(s), 5)) for p, s in zip(full.pitch, full.start)]
  # Back-to-back windows give back the decoded piece up to its last full window.
  assert rebuilt == expected[:len(rebuilt)] and len(rebuilt) > 0.8 * len(expected)


def test_windows_error_when_no_piece_is_long_enough(gmd_pieces):
  with pytest.raises(ts.TwoSampleError, match="long enough"):
    ts.cut_windows(gmd_pieces[:3], bars=10_000)


# ------------------------------------------------------------------ feature vectors

def test_drum_feature_matrix(gmd_windows, gmd_features):
  f = gmd_features
  assert f.values.shape == (len(gmd_windows), len(f.names)) and f.kind == "drums"
  assert len(set(f.names)) == len(f.names) and np.isfinite(f.values).all()
  col = {n: f.values[:, i] for i, n in enumerate(f.names)}
  classes = music_stats.drum_class_names()
  density = np.stack([col[f"drum_onset_density[{c}]"] for c in classes], 1)
  # Per-class densities add up to the hit density (every GMD hit maps to a class here,
  # up to unmapped pitches), and match the existing per-class hit counts.
  assert (density.sum(1) <= col["drum_hit_density"] + 1e-9).all()
  hits = np.stack([col[f"drum_class_hits[{c}]"] for c in classes], 1)
  np.testing.assert_allclose(density * gmd_windows.durations[:, None], hits, atol=1e-9)
  assert (col["drum_velocity_mean"] > 0).all() and (col["drum_velocity_std"] > 0).any()
  assert (col["drum_syncopation"] >= 0).all() and (col["drum_syncopation"] > 0).any()
  np.testing.assert_allclose(sum(col[f"drum_metrical_share[{k}]"] for k in
                                 ("downbeat", "beat", "beat_half", "finer")), 1.0)


def test_pitched_features_on_real_piano(piano_files):
  clip = midi_io.read_notes(piano_files[0], sustain=True)
  f = ts.clip_feature_matrix([clip], kind="auto")
  assert f.kind == "pitched"
  col = dict(zip(f.names, f.values[0]))
  assert col["pitch_highest"] - col["pitch_lowest"] == col["pitch_range"] > 0
  assert col["polyphony_max"] >= col["polyphony"] >= 1 and col["ioi_std"] > 0
  with pytest.raises(ts.TwoSampleError, match="drum features asked for, but none"):
    ts.clip_feature_matrix([clip], kind="drums")


# ------------------------------------------------------------------ the test

def test_real_vs_real_sits_at_chance(gmd_windows, gmd_features):
  a, b = paired_halves(gmd_windows.groups, seed=0)
  res = ts.c2st(gmd_features.values[a], gmd_features.values[b],
                real_groups=gmd_windows.groups[a], generated_groups=gmd_windows.groups[b],
                feature_names=gmd_features.names, seed=0, importance_repeats=1)
  json.dumps(res)  # plain JSON for metrics.json
  assert res["chance"] == 0.5 and res["n_real"] == res["n_generated"] >= 120
  for name, r in res["classifiers"].items():
    assert r["ci_low"] <= 0.5 <= r["ci_high"], (name, r)
    assert r["n"] == 2 * res["n_real"] and len(r["fold_accuracy"]) == 5
    assert len(r["top_features"]) == 5


def test_shuffled_timing_is_told_apart(gmd_windows, gmd_features):
  rng = np.random.default_rng(1)
  corrupted = ts.clip_feature_matrix(
      [shuffled_timing(c, d, rng) for c, d in zip(gmd_windows.clips, gmd_windows.durations)],
      kind="drums", durations=gmd_windows.durations)
  res = c2st_against(gmd_features, gmd_windows, corrupted, classifiers=("boosted_trees",),
                     importance_repeats=2)
  r = res["classifiers"]["boosted_trees"]
  assert r["accuracy"] >= 0.9 and r["p_value"] < 1e-6, r
  assert any(k in r["top_features"][0]["name"] for k in TIMING_FEATURES), r["top_features"]


def test_constant_velocity_is_told_apart(gmd_windows, gmd_features):
  corrupted = ts.clip_feature_matrix([constant_velocity(c) for c in gmd_windows.clips],
                                     kind="drums", durations=gmd_windows.durations)
  res = c2st_against(gmd_features, gmd_windows, corrupted, classifiers=("boosted_trees",),
                     importance_repeats=2)
  r = res["classifiers"]["boosted_trees"]
  assert r["accuracy"] >= 0.9, r
  assert "velocity" in r["top_features"][0]["name"], r["top_features"]
  assert res["strongest"] == "boosted_trees" and res["accuracy"] == r["accuracy"]
  # Each telling feature's mean over either set, as the classifier saw them (equal sets,
  # so no clip is dropped).
  a, b = paired_halves(gmd_windows.groups, 0)
  top = r["top_features"][0]
  j = list(gmd_features.names).index(top["name"])
  assert top["real_mean"] == pytest.approx(gmd_features.values[a, j].mean())
  assert top["generated_mean"] == pytest.approx(corrupted.values[b, j].mean())
  # Reports: TensorBoard scalars and a metrics.md section.
  scalars = ts.c2st_scalars(res, prefix="c2st_128")
  assert scalars == {"c2st_128/accuracy": r["accuracy"], **{
      f"c2st_128/boosted_trees/{k}": r[k] for k in ("accuracy", "ci_low", "ci_high",
                                                    "p_value", "auc")}}
  md = ts.c2st_markdown(res)
  assert "| boosted_trees |" in md and "95% interval" in md
  assert r["top_features"][0]["name"] in md
  assert f"real {top['real_mean']:.3g}, generated {top['generated_mean']:.3g}" in md


def test_same_seed_same_result(gmd_windows, gmd_features):
  n = 120
  kw = dict(real_groups=gmd_windows.groups[:n], generated_groups=gmd_windows.groups[n:2 * n],
            feature_names=gmd_features.names, classifiers=("logistic_regression",), seed=3,
            importance_repeats=1)
  x = gmd_features.values
  assert ts.c2st(x[:n], x[n:2 * n], **kw) == ts.c2st(x[:n], x[n:2 * n], **kw)


def test_permutation_drops_agree_with_scikit_learn(gmd_windows, gmd_features):
  from sklearn.inspection import permutation_importance
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  cols = [gmd_features.names.index(n) for n in
          ("drum_velocity_mean", "drum_hit_density", "drum_microtiming_std",
           "drum_syncopation", "drum_velocity_std")]
  x = gmd_features.values[:, cols]
  y = (x[:, 0] > np.median(x[:, 0])).astype(int)  # the first column decides the label
  model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[::2], y[::2])
  ours = ts.permutation_drops(model.predict, x[1::2], y[1::2], 30,
                              np.random.default_rng(0)).mean(1)
  theirs = permutation_importance(model, x[1::2], y[1::2], scoring="accuracy", n_repeats=30,
                                  random_state=0).importances_mean
  np.testing.assert_allclose(ours, theirs, atol=0.03)
  assert ours[0] > 0.2 and np.argmax(ours) == 0


# ------------------------------------------------------------------ errors

def test_errors_are_one_line_midijax_errors(gmd_windows, gmd_features):
  x, g, names = gmd_features.values, gmd_windows.groups, gmd_features.names
  assert issubclass(ts.TwoSampleError, MidijaxError)
  cases = {
      # 4 prompts for 5 folds.
      "too few prompts": dict(real=x[:40], generated=x[40:80], real_groups=np.arange(40) % 4,
                              generated_groups=np.arange(40) % 4),
      # 6 clips per set, below the minimum of 10.
      "too few clips": dict(real=x[:6], generated=x[6:12], real_groups=g[:6],
                            generated_groups=g[6:12]),
      "empty": dict(real=x[:40, :0], generated=x[40:80, :0], real_groups=g[:40],
                    generated_groups=g[40:80], feature_names=()),
      "constant": dict(real=np.ones((40, 3)), generated=np.ones((40, 3)), real_groups=g[:40],
                       generated_groups=g[40:80], feature_names=("a", "b", "c")),
      "not finite": dict(real=np.where(np.arange(x.shape[1]) == 2, np.nan, x[:40]),
                         generated=x[40:80], real_groups=g[:40], generated_groups=g[40:80]),
  }
  messages = {"too few prompts": "too few prompts for 5-fold", "too few clips": "too few clips",
              "empty": "feature set is empty", "constant": "constant",
              "not finite": "not finite"}
  for case, kw in cases.items():
    kw.setdefault("feature_names", names)
    with pytest.raises(ts.TwoSampleError, match=messages[case]) as e:
      ts.c2st(**kw)
    assert "\n" not in str(e.value), case
