"""Objective music statistics: per-clip features, set comparison and decode validity.

Sections, in the order a clip's path through them goes:

  1. Music features: per-clip features computed from `Notes` with numpy (Yang & Lerch
     2020, "On the evaluation of generative models in music"; drum features after
     GrooVAE, Gillick et al. 2019, and the grooving similarity of Wu & Yang 2020).
  2. Set comparison: intra-set and inter-set distance distributions per feature, smoothed
     with a Gaussian KDE, compared by overlapping area (OA) and KL divergence.
  3. Grammar validity: the share of decoded token sequences that give valid MIDI.

numpy only (no JAX, no matplotlib). Reports and plots of these are `midijax.reports`;
evaluating a trained run end to end is `midijax.evaluation`.

Typical use::

  cmp = music_stats.compare_sets(generated_notes, real_notes)
  reports.write_reports(workdir / "eval", cmp, examples={"gen_0": generated_notes[0]})
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from midijax.notes import Notes

# =========================================================================================
# 1. Music features
# =========================================================================================

# Inter-onset intervals and note lengths share log-spaced bins: edges double every two
# bins from 20 ms to 2.56 s, so a 16th at 120 qpm (0.125 s) and a whole note (2 s) both
# fall in bins of similar relative width. 16 bins: [0, .02), [.02, .028), ... [2.56, inf).
DURATION_BIN_EDGES_S = np.concatenate([[0.0], 0.02 * 2.0 ** (np.arange(15) / 2), [np.inf]])
# MIDI velocities 1..127 in 8 bins of 16.
VELOCITY_BIN_EDGES = np.arange(0, 129, 16, dtype=np.float64)
PITCH_CLASS_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
NUM_DRUM_CLASSES = 9
# Onsets closer than this (seconds) count as one onset (a chord, a flam-free hit pair).
ONSET_TOLERANCE_S = 1e-3

FEATURE_GROUPS = ("pitched", "drums")


@dataclasses.dataclass(frozen=True)
class Feature:
  """Describes one per-clip feature.

  Attributes:
    name: key in the dicts `clip_features` returns.
    group: "pitched" (computed over non-drum notes) or "drums" (drum notes).
    unit: unit of each value (for vectors: of each element).
    size: 0 for a scalar, else the vector length.
    description: one line for reports.
  """
  name: str
  group: str
  unit: str
  size: int
  description: str


def _duration_bin_labels() -> tuple:
  e = DURATION_BIN_EDGES_S
  return tuple(f"<{e[i + 1]:.3g}s" if np.isfinite(e[i + 1]) else f">={e[i]:.3g}s"
               for i in range(len(e) - 1))


FEATURES = (
    # -- pitched (non-drum notes)
    Feature("note_count", "pitched", "notes", 0, "number of notes"),
    Feature("note_density", "pitched", "notes/s", 0, "notes per second of clip"),
    Feature("pitch_count", "pitched", "pitches", 0, "number of distinct MIDI pitches"),
    Feature("pitch_range", "pitched", "semitones", 0, "highest minus lowest pitch"),
    Feature("pitch_class_histogram", "pitched", "share", 12,
            "share of notes per pitch class (C..B)"),
    Feature("pitch_class_entropy", "pitched", "bits", 0,
            "entropy of the pitch-class histogram"),
    Feature("mean_pitch_interval", "pitched", "semitones", 0,
            "mean |pitch step| between consecutive notes in onset order"),
    Feature("mean_ioi", "pitched", "s", 0, "mean inter-onset interval of distinct onsets"),
    Feature("ioi_histogram", "pitched", "share", len(DURATION_BIN_EDGES_S) - 1,
            "inter-onset intervals of distinct onsets, log-spaced bins"),
    Feature("note_length_histogram", "pitched", "share", len(DURATION_BIN_EDGES_S) - 1,
            "note lengths, log-spaced bins"),
    Feature("velocity_histogram", "pitched", "share", len(VELOCITY_BIN_EDGES) - 1,
            "velocities in 8 bins of 16"),
    Feature("polyphony", "pitched", "notes", 0,
            "mean number of notes sounding at each distinct onset (the new ones included)"),
    Feature("polyphony_time", "pitched", "notes", 0,
            "mean number of notes sounding over the time at least one sounds"),
    Feature("groove_consistency", "pitched", "share", 0,
            "1 - mean pairwise XOR rate of per-bar 16th onset grids (Wu & Yang 2020)"),
    # -- drums (drum notes)
    Feature("drum_hit_density", "drums", "hits/s", 0, "drum hits per second of clip"),
    Feature("drum_class_hits", "drums", "hits", NUM_DRUM_CLASSES,
            "hits per GrooVAE drum class"),
    Feature("drum_velocity_histogram", "drums", "share", len(VELOCITY_BIN_EDGES) - 1,
            "drum velocities in 8 bins of 16"),
    Feature("drum_microtiming", "drums", "16ths", NUM_DRUM_CLASSES,
            "mean signed offset from the nearest 16th per class (+ = late)"),
    Feature("drum_microtiming_abs", "drums", "16ths", NUM_DRUM_CLASSES,
            "mean |offset| from the nearest 16th per class"),
    Feature("drum_microtiming_abs_mean", "drums", "16ths", 0,
            "mean |offset| from the nearest 16th over all hits"),
    Feature("drum_groove_consistency", "drums", "share", 0,
            "1 - mean pairwise XOR rate of per-bar 16th onset grids (Wu & Yang 2020)"),
    Feature("drum_velocity_groove_consistency", "drums", "share", 0,
            "1 - mean pairwise mean |velocity/127 difference| of per-bar 16th x class grids"),
)
FEATURES_BY_NAME = {f.name: f for f in FEATURES}


def drum_class_names() -> tuple:
  """The 9 GrooVAE class names (kick, snare, ...) from `midijax.encoding.drum_map`."""
  from midijax.encoding import drum_map  # pylint: disable=g-import-not-at-top
  return tuple(drum_map.GROOVAE_CLASS_NAMES)


def feature_labels(name: str) -> Optional[tuple]:
  """Element labels of a vector feature (None for scalars)."""
  if name == "pitch_class_histogram":
    return PITCH_CLASS_NAMES
  if name in ("ioi_histogram", "note_length_histogram"):
    return _duration_bin_labels()
  if name in ("velocity_histogram", "drum_velocity_histogram"):
    e = VELOCITY_BIN_EDGES.astype(int)
    return tuple(f"{max(a, 1)}-{b - 1}" for a, b in zip(e[:-1], e[1:]))
  if name.startswith(("drum_class", "drum_microtiming")) and FEATURES_BY_NAME[name].size:
    return drum_class_names()
  return None


def groovae_classes(pitch: np.ndarray) -> np.ndarray:
  """GrooVAE drum class (0..8) of each MIDI pitch, -1 where unmapped."""
  # Imported here: pitched-only evaluation need not load the encoding package.
  from midijax.encoding import drum_map  # pylint: disable=g-import-not-at-top
  return np.asarray(drum_map.pitch_to_groovae_class(np.asarray(pitch)), np.int64)


def seconds_to_quarters(times: np.ndarray, tempos: np.ndarray) -> np.ndarray:
  """Converts times (seconds) to quarter notes since time 0 through a tempo map.

  Args:
    times: float seconds, any shape.
    tempos: float64[k, 2] rows of (time seconds, qpm). The first tempo also holds
      before its time (a map whose first change is late still starts at time 0).

  Returns:
    float64 quarter notes, the shape of `times`.
  """
  times = np.asarray(times, np.float64)
  tempos = np.asarray(tempos, np.float64).reshape(-1, 2)
  if len(tempos) == 0:
    tempos = np.array([[0.0, 120.0]])
  tempos = tempos[np.argsort(tempos[:, 0], kind="stable")]
  t0 = tempos[:, 0].copy()
  qps = tempos[:, 1] / 60.0
  t0[0] = 0.0
  quarters_at = np.concatenate([[0.0], np.cumsum(np.diff(t0) * qps[:-1])])
  k = np.clip(np.searchsorted(t0, times, side="right") - 1, 0, None)
  return quarters_at[k] + (times - t0[k]) * qps[k]


def _local_qpm(times: np.ndarray, tempos: np.ndarray) -> np.ndarray:
  tempos = np.asarray(tempos, np.float64).reshape(-1, 2)
  tempos = tempos[np.argsort(tempos[:, 0], kind="stable")]
  k = np.clip(np.searchsorted(tempos[:, 0], times, side="right") - 1, 0, None)
  return tempos[k, 1]


def bar_quarters(notes: Notes) -> float:
  """Length of a bar in quarter notes from the first time signature (4/4 -> 4)."""
  ts = np.asarray(notes.time_signatures, np.float64).reshape(-1, 3)
  if len(ts) == 0:
    return 4.0
  numerator, denominator = ts[np.argmin(ts[:, 0]), 1:]
  return float(numerator * 4.0 / denominator)


def microtiming_offsets(notes: Notes) -> dict:
  """Offsets of each drum hit from the nearest 16th note of the clip's tempo grid.

  The grid starts at time 0 and follows `notes.tempos`.

  Returns:
    dict of arrays over drum notes in their stored order: "drum_class" (int, -1 where
    unmapped), "offset_16ths" (in [-0.5, 0.5], + = after the grid, in 16th notes),
    "offset_s" (the same in seconds at the local tempo), "step" (index of the nearest
    16th since time 0).
  """
  drums = notes.select(np.asarray(notes.is_drum, bool))
  pos = seconds_to_quarters(drums.start, drums.tempos) * 4.0
  step = np.round(pos)
  off = pos - step
  sixteenth_s = 60.0 / _local_qpm(drums.start, drums.tempos) / 4.0
  return {"drum_class": groovae_classes(drums.pitch), "offset_16ths": off,
          "offset_s": off * sixteenth_s, "step": step.astype(np.int64)}


def _normalized_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
  counts, _ = np.histogram(values, bins=edges)
  total = counts.sum()
  return counts / total if total else np.zeros(len(edges) - 1)


def _entropy_bits(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum()) if len(p) else 0.0


def _distinct_onsets(start: np.ndarray) -> np.ndarray:
  """Sorted onsets with those closer than ONSET_TOLERANCE_S merged (seconds)."""
  return np.unique(np.round(np.asarray(start, np.float64) / ONSET_TOLERANCE_S)) * ONSET_TOLERANCE_S


def _union_length(start: np.ndarray, end: np.ndarray) -> float:
  """Total length (seconds) of the union of the intervals [start, end)."""
  if len(start) == 0:
    return 0.0
  order = np.argsort(start, kind="stable")
  s, e = start[order], np.maximum(end[order], start[order])
  reach = np.maximum.accumulate(e)
  new = np.concatenate([[True], s[1:] > reach[:-1]])
  first = np.flatnonzero(new)
  seg_end = np.maximum.reduceat(e, first)
  return float((seg_end - s[first]).sum())


def _pairwise_mean_abs(grids: np.ndarray, chunk: int = 64) -> np.ndarray:
  """Mean |a - b| over cells for all row pairs i < j of float[n, d] (chunked for memory)."""
  n = len(grids)
  out = []
  for i0 in range(0, n, chunk):
    block = np.abs(grids[i0:i0 + chunk, None, :] - grids[None, :, :]).mean(-1)
    rows = np.arange(i0, min(i0 + chunk, n))[:, None]
    out.append(block[rows > np.arange(n)[None, :]])
  return np.concatenate(out) if out else np.zeros(0)


def _groove_consistency(step: np.ndarray, steps_per_bar: int) -> float:
  """1 - the mean pairwise XOR rate of per-bar binary 16th-note onset grids (Wu & Yang
  2020's grooving similarity); 1.0 with < 2 bars."""
  step = np.asarray(step, np.int64)
  step = step[step >= 0]
  if len(step) == 0:
    return 1.0
  bar, pos = np.divmod(step, steps_per_bar)
  n_bars = int(bar.max()) + 1
  if n_bars < 2:
    return 1.0
  grid = np.zeros((n_bars, steps_per_bar), np.float64)
  grid[bar, pos] = 1.0
  ones = grid.sum(1)
  inner = grid @ grid.T
  xor = (ones[:, None] + ones[None, :] - 2 * inner) / steps_per_bar
  return float(1.0 - xor[np.triu_indices(n_bars, 1)].mean())


def _velocity_grid(mt: dict, velocity: np.ndarray, steps_per_bar: int) -> np.ndarray:
  """`drum_bar_grid` from the drum notes' `microtiming_offsets` and velocities."""
  keep = (mt["step"] >= 0) & (mt["drum_class"] >= 0)
  bar, pos = np.divmod(mt["step"][keep], steps_per_bar)
  n_bars = int(bar.max()) + 1 if len(bar) else 0
  grid = np.zeros((n_bars, steps_per_bar, NUM_DRUM_CLASSES), np.float64)
  np.maximum.at(grid, (bar, pos, mt["drum_class"][keep]),
                np.asarray(velocity, np.float64)[keep] / 127.0)
  return grid


def drum_bar_grid(notes: Notes) -> np.ndarray:
  """The clip's drum hits bar by bar, as `drum_velocity_groove_consistency` compares them:
  float [bars, 16ths per bar, NUM_DRUM_CLASSES], the loudest velocity / 127 of each class
  at each 16th of each bar (0 without a hit); bars from time 0 on the clip's beat grid
  (`microtiming_offsets`), hits before 0 or of unmapped pitches left out."""
  drums = notes.select(np.asarray(notes.is_drum, bool))
  return _velocity_grid(microtiming_offsets(drums), drums.velocity, _steps_per_bar(notes))


def _pitched_features(notes: Notes, duration: float) -> dict:
  n = len(notes)
  f = {}
  f["note_count"] = float(n)
  f["note_density"] = n / duration if duration > 0 else 0.0
  if n == 0:
    for feat in FEATURES:
      if feat.group == "pitched" and feat.name not in f:
        f[feat.name] = np.zeros(feat.size) if feat.size else 0.0
    f["groove_consistency"] = 1.0
    return f
  pitch = notes.pitch.astype(np.int64)
  f["pitch_count"] = float(len(np.unique(pitch)))
  f["pitch_range"] = float(pitch.max() - pitch.min())
  pch = np.bincount(pitch % 12, minlength=12).astype(np.float64)
  f["pitch_class_histogram"] = pch / pch.sum()
  f["pitch_class_entropy"] = _entropy_bits(f["pitch_class_histogram"])
  order = np.lexsort((pitch, notes.start))
  f["mean_pitch_interval"] = float(np.abs(np.diff(pitch[order])).mean()) if n > 1 else 0.0
  onsets = _distinct_onsets(notes.start)
  ioi = np.diff(onsets)
  f["mean_ioi"] = float(ioi.mean()) if len(ioi) else 0.0
  f["ioi_histogram"] = _normalized_histogram(ioi, DURATION_BIN_EDGES_S)
  f["note_length_histogram"] = _normalized_histogram(notes.end - notes.start,
                                                     DURATION_BIN_EDGES_S)
  f["velocity_histogram"] = _normalized_histogram(notes.velocity, VELOCITY_BIN_EDGES)
  # Times on the onset tolerance grid so a note ending where another starts does not count
  # as sounding with it through float noise.
  q = ONSET_TOLERANCE_S
  s = np.sort(np.round(notes.start / q))
  e = np.sort(np.round(notes.end / q))
  u = np.round(onsets / q)
  sounding = np.searchsorted(s, u, side="right") - np.searchsorted(e, u, side="right")
  f["polyphony"] = float(sounding.mean())
  union = _union_length(notes.start, notes.end)
  f["polyphony_time"] = float(np.clip(notes.end - notes.start, 0, None).sum() / union
                              ) if union > 0 else 0.0
  step = np.round(seconds_to_quarters(notes.start, notes.tempos) * 4.0).astype(np.int64)
  f["groove_consistency"] = _groove_consistency(step, _steps_per_bar(notes))
  return f


def _steps_per_bar(notes: Notes) -> int:
  return max(1, int(round(bar_quarters(notes) * 4)))


def _drum_features(notes: Notes, duration: float) -> dict:
  n = len(notes)
  f = {"drum_hit_density": n / duration if duration > 0 else 0.0}
  if n == 0:
    for feat in FEATURES:
      if feat.group == "drums" and feat.name not in f:
        f[feat.name] = np.zeros(feat.size) if feat.size else 0.0
    f["drum_groove_consistency"] = 1.0
    f["drum_velocity_groove_consistency"] = 1.0
    return f
  mt = microtiming_offsets(notes)
  cls, off = mt["drum_class"], mt["offset_16ths"]
  mapped = cls >= 0
  counts = np.bincount(cls[mapped], minlength=NUM_DRUM_CLASSES).astype(np.float64)
  f["drum_class_hits"] = counts
  f["drum_velocity_histogram"] = _normalized_histogram(notes.velocity, VELOCITY_BIN_EDGES)
  safe = np.maximum(counts, 1.0)  # classes without hits report 0 offset
  f["drum_microtiming"] = np.bincount(cls[mapped], off[mapped], NUM_DRUM_CLASSES) / safe
  f["drum_microtiming_abs"] = np.bincount(cls[mapped], np.abs(off[mapped]),
                                          NUM_DRUM_CLASSES) / safe
  f["drum_microtiming_abs_mean"] = float(np.abs(off).mean())
  spb = _steps_per_bar(notes)
  f["drum_groove_consistency"] = _groove_consistency(mt["step"], spb)
  # Bars compared by their 16th x class grids of loudest velocity / 127 (mean |difference|).
  grid = _velocity_grid(mt, notes.velocity, spb)
  f["drum_velocity_groove_consistency"] = (
      float(1.0 - _pairwise_mean_abs(grid.reshape(len(grid), -1)).mean()) if len(grid) > 1
      else 1.0)
  return f


def clip_features(notes: Notes, *, duration: Optional[float] = None,
                  groups: Sequence[str] = FEATURE_GROUPS) -> dict:
  """Per-clip music statistics.

  Args:
    notes: one clip. Pitched features use its non-drum notes, drum features its drum
      notes; the beat grid is `notes.tempos` from time 0 and the bar is the first time
      signature's.
    duration: clip length in seconds for densities (default: end of the last note).
    groups: feature groups to compute ("pitched", "drums"); a group with no notes gets
      zeros (and consistency 1), so sets of clips always stack.

  Returns:
    {feature name: float64 scalar or vector}, see FEATURES for units. Deterministic and
    independent of the order notes are stored in.
  """
  for g in groups:
    if g not in FEATURE_GROUPS:
      raise ValueError(f"unknown feature group {g!r}; expected one of {FEATURE_GROUPS}")
  if duration is None:
    duration = notes.total_time
  is_drum = np.asarray(notes.is_drum, bool)
  out = {}
  if "pitched" in groups:
    out.update(_pitched_features(notes.select(~is_drum), float(duration)))
  if "drums" in groups:
    out.update(_drum_features(notes.select(is_drum), float(duration)))
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def infer_groups(clips: Sequence[Notes]) -> tuple:
  """Feature groups that apply to a set: "pitched" / "drums" if any clip has such notes."""
  drum = any(np.asarray(c.is_drum, bool).any() for c in clips)
  pitched = any((~np.asarray(c.is_drum, bool)).any() for c in clips)
  groups = tuple(g for g, on in (("pitched", pitched), ("drums", drum)) if on)
  return groups or ("pitched",)


def set_features(clips: Sequence[Notes], *, groups: Sequence[str],
                 duration: Optional[float] = None) -> dict:
  """Features of every clip, stacked: {name: float64[n_clips, *shape]}."""
  per_clip = [clip_features(c, duration=duration, groups=groups) for c in clips]
  names = [f.name for f in FEATURES if f.group in groups]
  return {k: np.stack([p[k] for p in per_clip]) if per_clip else np.zeros((0,))
          for k in names}


# =========================================================================================
# 2. Set comparison
# =========================================================================================

def pairwise_distances(a: np.ndarray, b: Optional[np.ndarray] = None) -> np.ndarray:
  """Euclidean distances between per-clip feature values.

  Args:
    a: float[n, ...] one feature of n clips.
    b: float[m, ...] or None.

  Returns:
    With b None, the intra-set distances of the n*(n-1)/2 pairs i < j (Yang & Lerch's
    exhaustive leave-one-out gives each pair twice, the same distribution). Otherwise the
    n*m inter-set distances.
  """
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  intra = b is None
  b = a if intra else np.asarray(b, np.float64).reshape(len(b), -1)
  # Row blocks keep the [rows, m, dims] difference array near 64 MB for large sets.
  rows = max(1, int(8e6 // max(1, len(b) * a.shape[1])))
  out = []
  for i0 in range(0, len(a), rows):
    d = np.linalg.norm(a[i0:i0 + rows, None, :] - b[None, :, :], axis=-1)
    if intra:  # pairs i < j, in row-major order
      i = np.arange(i0, i0 + len(d))[:, None]
      d = d[i < np.arange(len(b))[None, :]]
    out.append(d.reshape(-1))
  return np.concatenate(out) if out else np.zeros(0)


def scott_bandwidth(x: np.ndarray) -> float:
  """Scott's rule KDE bandwidth of samples x: std * n^(-1/5) (0 for fewer than 2)."""
  if len(x) < 2:
    return 0.0
  return float(np.std(x, ddof=1) * len(x) ** (-1.0 / 5.0))


def kde_on_grid(x: np.ndarray, grid: np.ndarray, bandwidth: Optional[float] = None) -> np.ndarray:
  """Gaussian KDE of samples `x` as probability mass per point of an even `grid`.

  Samples are linearly binned onto the grid and convolved with the kernel, which is
  O(len(x) + len(grid) * kernel) rather than O(len(x) * len(grid)). A bandwidth below
  half a grid step (zero-variance samples, a single sample) leaves the binned mass
  unsmoothed, so degenerate sets give a spike instead of a division by zero.

  Args:
    x: float samples (e.g. distances).
    grid: evenly spaced float points covering the samples.
    bandwidth: kernel std (units of x); default Scott's rule, std * n^(-1/5).

  Returns:
    float64[len(grid)], non-negative, sums to 1 (all zeros if x is empty).
  """
  x = np.asarray(x, np.float64).reshape(-1)
  g = len(grid)
  if len(x) == 0:
    return np.zeros(g)
  dx = float(grid[1] - grid[0]) if g > 1 else 1.0
  pos = np.clip((x - grid[0]) / dx, 0, g - 1)
  lo = np.minimum(np.floor(pos).astype(np.int64), max(g - 2, 0))
  w = pos - lo
  mass = np.bincount(lo, 1.0 - w, minlength=g) + np.bincount(np.minimum(lo + 1, g - 1), w,
                                                              minlength=g)
  h = scott_bandwidth(x) if bandwidth is None else float(bandwidth)
  sigma = h / dx
  if sigma >= 0.5:
    half = int(min(math.ceil(5 * sigma), g - 1))
    k = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    mass = np.convolve(mass, kernel / kernel.sum(), mode="full")[half:half + g]
  return mass / mass.sum()


def _shared_densities(x: np.ndarray, y: np.ndarray, grid_size: int):
  """KDEs of x and y on one grid that covers both (with 4 bandwidths of margin)."""
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  both = np.concatenate([x, y])
  lo, hi = float(both.min()), float(both.max())
  pad = max(4 * max(scott_bandwidth(x), scott_bandwidth(y)), 0.05 * (hi - lo),
            1e-6 * max(abs(lo), abs(hi), 1.0))
  grid = np.linspace(lo - pad, hi + pad, grid_size)
  return grid, kde_on_grid(x, grid), kde_on_grid(y, grid)


def overlap_area(x: np.ndarray, y: np.ndarray, grid_size: int = 2048) -> float:
  """Overlapping area of the KDEs of two samples, in [0, 1] (1 for identical samples).

  NaN if either sample is empty.
  """
  if np.size(x) == 0 or np.size(y) == 0:
    return float("nan")
  _, p, q = _shared_densities(x, y, grid_size)
  return float(min(np.minimum(p, q).sum(), 1.0))


def kl_divergence(x: np.ndarray, y: np.ndarray, grid_size: int = 2048,
                  eps: float = 1e-12) -> float:
  """KL(p_x || p_y) in nats between the KDEs of two samples (0 for identical samples).

  Where p_y vanishes under p_x's mass it is floored at `eps` per grid point, so the
  result stays finite (about -log(eps) = 27.6 nats for disjoint samples). NaN if either
  sample is empty.
  """
  if np.size(x) == 0 or np.size(y) == 0:
    return float("nan")
  _, p, q = _shared_densities(x, y, grid_size)
  on = p > 0
  return float(max((p[on] * np.log(p[on] / np.maximum(q[on], eps))).sum(), 0.0))


@dataclasses.dataclass
class SetComparison:
  """Features, distance distributions and statistics of a generated vs a real set.

  Attributes:
    groups: feature groups compared.
    generated, real: {feature: float64[n_clips, *shape]}.
    intra_generated, intra_real, inter: {feature: float64[n_pairs]} Euclidean distances.
    stats: {feature: {statistic: value}} (see `compare_sets`).
    summary: means over features of the headline statistics.
  """
  groups: tuple
  generated: dict
  real: dict
  intra_generated: dict
  intra_real: dict
  inter: dict
  stats: dict
  summary: dict

  def to_dict(self) -> dict:
    """JSON-ready statistics (NaN becomes None)."""
    return jsonable({"groups": list(self.groups), "summary": self.summary,
                      "features": self.stats})


def _mean_std(x: np.ndarray):
  if len(x) == 0:
    return float("nan"), float("nan")
  return float(np.mean(x)), float(np.std(x))


def _as_features(clips, groups, duration):
  if isinstance(clips, Mapping):
    return {k: np.asarray(v, np.float64) for k, v in clips.items()}
  return set_features(list(clips), groups=groups, duration=duration)


def compare_sets(generated: Union[Sequence[Notes], Mapping[str, np.ndarray]],
                 real: Union[Sequence[Notes], Mapping[str, np.ndarray]], *,
                 groups: Optional[Sequence[str]] = None,
                 duration: Optional[float] = None,
                 features: Optional[Sequence[str]] = None,
                 grid_size: int = 2048) -> SetComparison:
  """Compares a generated set with a real set feature by feature (Yang & Lerch 2020).

  For each feature: intra-set distances (all pairs within a set) and inter-set
  distances (every generated clip against every real clip) are smoothed with a Gaussian
  KDE. `oa` / `kl` compare intra(real) with inter: OA near 1 and KL near 0 mean
  generated clips sit among real clips as real clips sit among each other.
  `oa_generated` / `kl_generated` do the same for intra(generated).

  Passing the same object as both sets (`compare_sets(x, x)`) leaves the n zero
  self-distances out of inter (inter is then intra), so the result is the sanity
  baseline OA = 1, KL = 0.

  Args:
    generated, real: clips (`Notes`) or precomputed `set_features` dicts.
    groups: feature groups; default those that apply to `real` ("pitched" if it has
      non-drum notes, "drums" if drum notes). Needed when both sets are feature dicts
      only to pick the features.
    duration: clip length in seconds for densities (default: each clip's last note end).
    features: subset of feature names (default: all of `groups`).
    grid_size: KDE grid points.

  Returns:
    SetComparison. Per-feature stats: unit, group, generated_mean/std and real_mean/std
    (over clips; vectors element-wise), intra_generated_/intra_real_/inter_ mean and std
    of distances, oa, kl (nats), oa_generated, kl_generated, and pair counts.
  """
  same = generated is real
  if groups is None:
    if isinstance(real, Mapping):
      groups = tuple(g for g in FEATURE_GROUPS
                     if any(FEATURES_BY_NAME[k].group == g for k in real if k in FEATURES_BY_NAME))
    else:
      groups = infer_groups(list(real))
  groups = tuple(groups)
  gen_f = _as_features(generated, groups, duration)
  real_f = gen_f if same else _as_features(real, groups, duration)
  names = [f.name for f in FEATURES if f.group in groups and f.name in gen_f and f.name in real_f]
  if features is not None:
    unknown = set(features) - set(names)
    if unknown:
      raise ValueError(f"features not computed for groups {groups}: {sorted(unknown)}")
    names = [n for n in names if n in features]
  n_gen, n_real = len(next(iter(gen_f.values()))), len(next(iter(real_f.values())))
  if n_gen == 0 or n_real == 0:
    raise ValueError(f"both sets need clips (generated: {n_gen}, real: {n_real})")

  intra_g, intra_r, inter, stats = {}, {}, {}, {}
  for name in names:
    g, r = gen_f[name], real_f[name]
    intra_g[name] = pairwise_distances(g)
    intra_r[name] = intra_g[name] if same else pairwise_distances(r)
    # Self-comparison: inter is the off-diagonal pairs, i.e. intra itself (the same sample,
    # so the same KDE bandwidth; Scott's rule would narrow for a doubled copy).
    inter[name] = intra_g[name] if same else pairwise_distances(g, r)
    spec = FEATURES_BY_NAME[name]
    st = {"unit": spec.unit, "group": spec.group, "description": spec.description}
    reduce = (lambda v, fn: float(fn(v))) if spec.size == 0 else (
        lambda v, fn: fn(v, axis=0).tolist())
    st["generated_mean"], st["generated_std"] = reduce(g, np.mean), reduce(g, np.std)
    st["real_mean"], st["real_std"] = reduce(r, np.mean), reduce(r, np.std)
    for key, d in (("intra_generated", intra_g[name]), ("intra_real", intra_r[name]),
                   ("inter", inter[name])):
      st[f"{key}_mean"], st[f"{key}_std"] = _mean_std(d)
      st[f"{key}_pairs"] = int(len(d))
    st["oa"] = overlap_area(intra_r[name], inter[name], grid_size)
    st["kl"] = kl_divergence(intra_r[name], inter[name], grid_size)
    st["oa_generated"] = overlap_area(intra_g[name], inter[name], grid_size)
    st["kl_generated"] = kl_divergence(intra_g[name], inter[name], grid_size)
    stats[name] = st

  def nanmean(key):
    vals = [stats[n][key] for n in names if np.isfinite(stats[n][key])]
    return float(np.mean(vals)) if vals else float("nan")

  summary = {"n_generated": int(n_gen), "n_real": int(n_real), "n_features": len(names),
             "oa_mean": nanmean("oa"), "kl_mean": nanmean("kl"),
             "oa_generated_mean": nanmean("oa_generated"),
             "kl_generated_mean": nanmean("kl_generated")}
  return SetComparison(groups=groups, generated={n: gen_f[n] for n in names},
                       real={n: real_f[n] for n in names}, intra_generated=intra_g,
                       intra_real=intra_r, inter=inter, stats=stats, summary=summary)


# =========================================================================================
# 3. Grammar validity
# =========================================================================================

def notes_problems(result: Any) -> list:
  """Why a decode result is not valid MIDI content ([] when it is).

  Accepts `Notes` or a note-seq NoteSequence. Checks: pitches 0..127, velocities 1..127,
  programs 0..127, finite times, start >= 0 and end > start (zero-length notes cannot be
  written as separate note-on/note-off events).
  """
  if result is None:
    return ["decoder returned None"]
  if not isinstance(result, Notes):
    if hasattr(result, "notes") and hasattr(result, "tempos"):
      result = Notes.from_note_sequence(result)
    else:
      return [f"not Notes or NoteSequence: {type(result).__name__}"]
  problems = []
  checks = (
      ("pitch outside 0..127", (result.pitch < 0) | (result.pitch > 127)),
      ("velocity outside 1..127", (result.velocity < 1) | (result.velocity > 127)),
      ("program outside 0..127", (result.program < 0) | (result.program > 127)),
      ("non-finite time", ~np.isfinite(result.start) | ~np.isfinite(result.end)),
      ("negative start", result.start < 0),
      ("end <= start", result.end <= result.start),
  )
  for what, bad in checks:
    if np.any(bad):
      problems.append(f"{what} ({int(np.sum(bad))} notes)")
  return problems


def grammar_validity(items: Iterable[Any],
                     decode: Optional[Callable[[Any], Any]] = None) -> dict:
  """Share of decode results that are valid MIDI content.

  Args:
    items: decode results (`Notes` / NoteSequence / None, or an Exception the caller
      caught), or, with `decode`, the token-id sequences to decode.
    decode: optional callable ids -> `Notes` or NoteSequence; an exception it raises
      marks that sequence invalid.

  Returns:
    {"total", "valid", "rate" (valid / total, NaN when total is 0), "empty" (valid but
    without notes), "errors": {exception type or problem: count}}.
  """
  total = valid = empty = 0
  errors: dict = {}
  for item in items:
    total += 1
    if decode is not None:
      try:
        item = decode(item)
      except Exception as e:  # pylint: disable=broad-except  # any failure means invalid
        item = e
    if isinstance(item, BaseException):
      key = type(item).__name__
      errors[key] = errors.get(key, 0) + 1
      continue
    problems = notes_problems(item)
    if problems:
      for p in problems:
        key = p.split(" (")[0]
        errors[key] = errors.get(key, 0) + 1
      continue
    valid += 1
    if len(item.notes if not isinstance(item, Notes) else item) == 0:
      empty += 1
  return {"total": total, "valid": valid, "rate": valid / total if total else float("nan"),
          "empty": empty, "errors": dict(sorted(errors.items()))}



def jsonable(x):
  """Converts numpy values and NaN/inf (invalid JSON) to plain JSON values."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x
