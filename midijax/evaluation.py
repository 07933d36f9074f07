"""Evaluation: objective music statistics, set comparison, validity and reports.

Sections, in the order a clip's path through them goes:

  1. Music statistics: per-clip features computed from `Notes` with numpy (Yang & Lerch
     2020, "On the evaluation of generative models in music"; drum features after
     GrooVAE, Gillick et al. 2019, and the grooving similarity of Wu & Yang 2020).
  2. Set comparison: intra-set and inter-set distance distributions per feature, smoothed
     with a Gaussian KDE, compared by overlapping area (OA) and KL divergence.
  3. Grammar validity: the share of decoded token sequences that give valid MIDI.
  4. Reports: `metrics.json`, `metrics.md`, PNG plots (Agg, no pyplot state) and
     TensorBoard event files written with the `tensorboard` package's record writer
     (tensorflow is never imported).

Model log-likelihood evaluation lives in its own section, beside these.

Typical use::

  cmp = evaluation.compare_sets(generated_notes, real_notes)
  evaluation.write_reports(workdir / "eval", cmp, examples={"gen_0": generated_notes[0]})
  evaluation.write_tensorboard_scalars(workdir, evaluation.flat_scalars(cmp), step)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import socket
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from midijax.notes import Notes

PathLike = Union[str, os.PathLike]

# =========================================================================================
# 1. Music statistics
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


def _groove_consistency(step: np.ndarray, steps_per_bar: int,
                        cls: Optional[np.ndarray] = None,
                        velocity: Optional[np.ndarray] = None) -> float:
  """1 - mean pairwise distance between per-bar 16th-note grids; 1.0 with < 2 bars.

  Without `cls`: binary onset grids over positions and the distance is the XOR rate
  (Wu & Yang 2020's grooving similarity). With `cls` and `velocity`: grids over
  (position, class) holding the loudest velocity / 127 and the mean absolute difference.
  """
  step = np.asarray(step, np.int64)
  keep = step >= 0
  if cls is not None:
    keep &= cls >= 0
  step = step[keep]
  if len(step) == 0:
    return 1.0
  bar, pos = np.divmod(step, steps_per_bar)
  n_bars = int(bar.max()) + 1
  if n_bars < 2:
    return 1.0
  if cls is None:
    grid = np.zeros((n_bars, steps_per_bar), np.float64)
    grid[bar, pos] = 1.0
    ones = grid.sum(1)
    inner = grid @ grid.T
    xor = (ones[:, None] + ones[None, :] - 2 * inner) / steps_per_bar
    dist = xor[np.triu_indices(n_bars, 1)]
  else:
    grid = np.zeros((n_bars, steps_per_bar, NUM_DRUM_CLASSES), np.float64)
    np.maximum.at(grid, (bar, pos, cls[keep]), velocity[keep] / 127.0)
    dist = _pairwise_mean_abs(grid.reshape(n_bars, -1))
  return float(1.0 - dist.mean())


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
  f["drum_velocity_groove_consistency"] = _groove_consistency(
      mt["step"], spb, cls=cls, velocity=notes.velocity.astype(np.float64))
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


def _scott_bandwidth(x: np.ndarray) -> float:
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
  h = _scott_bandwidth(x) if bandwidth is None else float(bandwidth)
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
  pad = max(4 * max(_scott_bandwidth(x), _scott_bandwidth(y)), 0.05 * (hi - lo),
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
    return _jsonable({"groups": list(self.groups), "summary": self.summary,
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


# =========================================================================================
# 4. Reports
# =========================================================================================

def _jsonable(x):
  """Converts numpy values and NaN/inf (invalid JSON) to plain JSON values."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x


def metrics_dict(comparison: Optional[SetComparison] = None, *,
                 validity: Optional[Mapping] = None,
                 extra: Optional[Mapping] = None) -> dict:
  """The JSON document `write_reports` writes as metrics.json."""
  out = {}
  if comparison is not None:
    out["music_statistics"] = comparison.to_dict()
  if validity is not None:
    out["grammar_validity"] = _jsonable(dict(validity))
  if extra:
    out.update(_jsonable(dict(extra)))
  return out


def _fmt(v, digits=3) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x, 2) for x in v) + "]"
  if isinstance(v, float):
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
  return str(v)


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def metrics_markdown(comparison: Optional[SetComparison] = None, *,
                     validity: Optional[Mapping] = None,
                     extra: Optional[Mapping] = None) -> str:
  """Markdown tables: per-feature OA/KL and means, validity, extra scalars."""
  lines = []
  if comparison is not None:
    s = comparison.summary
    lines += ["## Music statistics", "",
              f"{s['n_generated']} generated vs {s['n_real']} real clips, "
              f"{s['n_features']} features. OA: overlapping area of the intra(real) and "
              "inter-set distance KDEs (1 = indistinguishable); KL: KL(intra || inter) in "
              "nats (0 = indistinguishable).", "",
              "| feature | unit | generated mean ± std | real mean ± std | intra real | "
              "inter | OA | KL | OA (intra gen) | KL (intra gen) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in comparison.stats.items():
      def ms(a, b):
        if isinstance(a, list):
          return f"{_fmt(a)}"
        return f"{_fmt(a)} ± {_fmt(b)}"
      lines.append("| " + " | ".join(_md_cell(c) for c in (
          name, st["unit"], ms(st["generated_mean"], st["generated_std"]),
          ms(st["real_mean"], st["real_std"]),
          ms(st["intra_real_mean"], st["intra_real_std"]),
          ms(st["inter_mean"], st["inter_std"]), _fmt(st["oa"]), _fmt(st["kl"]),
          _fmt(st["oa_generated"]), _fmt(st["kl_generated"]))) + " |")
    lines += ["", f"Mean OA {_fmt(s['oa_mean'])}, mean KL {_fmt(s['kl_mean'])} nats "
              f"(intra generated: OA {_fmt(s['oa_generated_mean'])}, "
              f"KL {_fmt(s['kl_generated_mean'])}).", ""]
  if validity is not None:
    lines += ["## Grammar validity", "", "| total | valid | rate | empty | errors |",
              "|---|---|---|---|---|",
              "| " + " | ".join(_md_cell(c) for c in (
                  validity["total"], validity["valid"], _fmt(validity["rate"]),
                  validity.get("empty", 0),
                  ", ".join(f"{k}: {v}" for k, v in validity.get("errors", {}).items())
                  or "none")) + " |", ""]
  if extra:
    lines += ["## Other metrics", "", "| metric | value |", "|---|---|"]
    for k, v in flatten_scalars(extra).items():
      lines.append(f"| {_md_cell(k)} | {_fmt(v, 4)} |")
    lines.append("")
  return "\n".join(lines)


def flatten_scalars(tree: Mapping, prefix: str = "") -> dict:
  """{"a/b/c": float} for every finite number in a nested mapping (lists skipped)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten_scalars(v, key))
    elif isinstance(v, (bool, np.bool_)):
      out[key] = float(v)
    elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
      out[key] = float(v)
  return out


def flat_scalars(comparison: Optional[SetComparison] = None, *,
                 validity: Optional[Mapping] = None, prefix: str = "eval") -> dict:
  """Headline scalars for TensorBoard: OA/KL per feature, summary means, validity rate."""
  out = {}
  if comparison is not None:
    for k, v in comparison.summary.items():
      out[f"{prefix}/music/{k}"] = float(v)
    for name, st in comparison.stats.items():
      for key in ("oa", "kl", "generated_mean"):
        if isinstance(st[key], float):
          out[f"{prefix}/music/{name}/{key}"] = st[key]
  if validity is not None:
    out[f"{prefix}/validity/rate"] = float(validity["rate"])
  return {k: v for k, v in out.items() if math.isfinite(v)}


def agg_figure(width: float, height: float):
  """A matplotlib Figure (inches) on an Agg canvas."""
  # Figure + Agg canvas directly: no pyplot global state, no GUI backend, thread-safe.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


_KDE_COLORS = ("tab:blue", "tab:orange", "tab:green")


def _figure_legend(fig, entries) -> None:
  # One legend per figure: a legend in each of ~15 panels doubles the drawing time.
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  fig.legend(handles=[Patch(color=c, label=l) for c, l in entries], loc="upper center",
             ncol=len(entries), fontsize=9, frameon=False)


def _adjust_grid(fig) -> None:
  # Fixed margins: tight_layout would draw the whole grid once more (twice the time).
  rows = max(1, round(fig.get_figheight() / 3.0))
  fig.subplots_adjust(left=0.05, right=0.98, wspace=0.3, hspace=0.85,
                      top=1 - 0.8 / (3.0 * rows), bottom=0.75 / (3.0 * rows))


def _grid_axes(fig, n: int, cols: int = 4):
  rows = max(1, math.ceil(n / cols))
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  for ax in axes[n:]:
    ax.set_visible(False)
  return axes[:n]


def plot_feature_histograms(comparison: SetComparison, path: PathLike,
                            group: Optional[str] = None) -> pathlib.Path:
  """One PNG: per feature, real vs generated values (histograms; mean ± std bars for vectors)."""
  names = [n for n in comparison.stats if group is None or FEATURES_BY_NAME[n].group == group]
  cols = 4
  fig = agg_figure(4.2 * cols, 3.0 * max(1, math.ceil(len(names) / cols)))
  for ax, name in zip(_grid_axes(fig, len(names), cols), names):
    g, r = comparison.generated[name], comparison.real[name]
    spec = FEATURES_BY_NAME[name]
    if spec.size == 0:
      both = np.concatenate([g, r])
      lo, hi = float(both.min()), float(both.max())
      bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
      ax.hist(r, bins=bins, alpha=0.55, density=True, color="tab:blue")
      ax.hist(g, bins=bins, alpha=0.55, density=True, color="tab:orange")
      ax.set_xlabel(spec.unit)
    else:
      x = np.arange(spec.size)
      ax.bar(x - 0.2, r.mean(0), 0.4, yerr=r.std(0), color="tab:blue", alpha=0.8)
      ax.bar(x + 0.2, g.mean(0), 0.4, yerr=g.std(0), color="tab:orange", alpha=0.8)
      labels = feature_labels(name)
      if labels is not None:
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
      ax.set_ylabel(spec.unit)
    ax.set_title(name, fontsize=9)
  n_gen, n_real = len(next(iter(comparison.generated.values()))), len(
      next(iter(comparison.real.values())))
  _figure_legend(fig, [("tab:blue", f"real (n={n_real})"),
                       ("tab:orange", f"generated (n={n_gen})")])
  _adjust_grid(fig)
  path = pathlib.Path(path)
  fig.savefig(path)
  return path


def plot_distance_kdes(comparison: SetComparison, path: PathLike,
                       group: Optional[str] = None, grid_size: int = 512) -> pathlib.Path:
  """One PNG: per feature, KDEs of intra(real), intra(generated) and inter distances."""
  names = [n for n in comparison.stats if group is None or FEATURES_BY_NAME[n].group == group]
  cols = 4
  fig = agg_figure(4.2 * cols, 3.0 * max(1, math.ceil(len(names) / cols)))
  for ax, name in zip(_grid_axes(fig, len(names), cols), names):
    series = (("intra real", comparison.intra_real[name]),
              ("intra generated", comparison.intra_generated[name]),
              ("inter", comparison.inter[name]))
    nonempty = [d for _, d in series if len(d)]
    if nonempty:
      both = np.concatenate(nonempty)
      lo, hi = float(both.min()), float(both.max())
      pad = max(0.05 * (hi - lo), 3 * max(_scott_bandwidth(d) for _, d in series),
                1e-6 * max(abs(hi), 1.0))
      grid = np.linspace(lo - pad, hi + pad, grid_size)
      for (label, d), color in zip(series, _KDE_COLORS):
        if len(d):
          ax.plot(grid, kde_on_grid(d, grid) / (grid[1] - grid[0]), color=color)
    st = comparison.stats[name]
    ax.set_title(f"{name}\nOA {_fmt(st['oa'])}  KL {_fmt(st['kl'])}", fontsize=8)
    ax.set_xlabel(f"distance ({FEATURES_BY_NAME[name].unit})", fontsize=7)
  _figure_legend(fig, list(zip(_KDE_COLORS, ("intra real", "intra generated", "inter"))))
  _adjust_grid(fig)
  path = pathlib.Path(path)
  fig.savefig(path)
  return path


def plot_pianoroll(notes: Notes, path: PathLike, *, title: Optional[str] = None,
                   seconds: Optional[float] = None) -> pathlib.Path:
  """Piano-roll PNG of one clip: pitched notes as bars, drum hits as dots per GrooVAE class.

  Args:
    notes: the clip.
    path: PNG to write.
    title: shown above the roll (plain text).
    seconds: x-axis length (default: end of the last note).
  """
  from matplotlib.collections import LineCollection  # pylint: disable=g-import-not-at-top
  is_drum = np.asarray(notes.is_drum, bool)
  pitched, drums = notes.select(~is_drum), notes.select(is_drum)
  n_axes = int(len(pitched) > 0) + int(len(drums) > 0) or 1
  fig = agg_figure(10, 2.2 + 1.8 * n_axes)
  axes = fig.subplots(n_axes, 1, squeeze=False).reshape(-1)
  end = seconds if seconds else max(notes.total_time, 1e-3)
  i = 0
  if len(pitched) or not len(drums):
    ax = axes[i]
    i += 1
    if len(pitched):
      segs = np.stack([np.stack([pitched.start, pitched.pitch], -1),
                       np.stack([pitched.end, pitched.pitch], -1)], 1)
      colors = np.zeros((len(pitched), 4))
      colors[:, 2] = 0.6
      colors[:, 3] = 0.35 + 0.65 * pitched.velocity / 127.0
      ax.add_collection(LineCollection(segs, colors=colors, linewidths=3))
      ax.set_ylim(pitched.pitch.min() - 2, pitched.pitch.max() + 2)
    ax.set_ylabel("MIDI pitch")
    ax.set_xlim(0, end)
  if len(drums):
    ax = axes[i]
    cls, names = groovae_classes(drums.pitch), drum_class_names()
    ax.scatter(drums.start, cls, s=6 + 30 * drums.velocity / 127.0, c="tab:red",
               alpha=0.8, marker="o")
    # Row -1 holds pitches outside the GrooVAE map.
    ax.set_yticks(range(-1, len(names)), ("other",) + names, fontsize=7)
    ax.set_ylim(-1.5, len(names))
    ax.set_ylabel("drum class")
    ax.set_xlim(0, end)
  axes[-1].set_xlabel("time (s)")
  if title:
    axes[0].set_title(title, fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path)
  return path


def write_reports(out_dir: PathLike, comparison: Optional[SetComparison] = None, *,
                  validity: Optional[Mapping] = None, extra: Optional[Mapping] = None,
                  examples: Optional[Mapping[str, Notes]] = None,
                  max_examples: int = 4) -> dict:
  """Writes metrics.json, metrics.md and PNG plots into `out_dir`.

  Args:
    out_dir: created if missing.
    comparison: from `compare_sets` (feature histograms and distance KDE plots per group).
    validity: from `grammar_validity`.
    extra: other JSON-able metrics (e.g. NLL) merged into metrics.json and listed in
      metrics.md.
    examples: {name: clip} for piano-roll images (the first `max_examples`).

  Returns:
    {"metrics_json", "metrics_md", "plots": [paths]}.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  doc = metrics_dict(comparison, validity=validity, extra=extra)
  json_path = out / "metrics.json"
  json_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
  md_path = out / "metrics.md"
  md_path.write_text("# Evaluation\n\n" + metrics_markdown(
      comparison, validity=validity, extra=extra))
  plots = []
  if comparison is not None:
    for group in comparison.groups:
      plots.append(plot_feature_histograms(comparison, out / f"features_{group}.png", group))
      plots.append(plot_distance_kdes(comparison, out / f"distances_{group}.png", group))
  for k, (name, clip) in enumerate(list((examples or {}).items())[:max_examples]):
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]
    plots.append(plot_pianoroll(clip, out / f"pianoroll_{k:02d}_{safe}.png", title=str(name)))
  return {"metrics_json": json_path, "metrics_md": md_path, "plots": plots}


class SummaryWriter:
  """Writes TensorBoard event files with tensorboard's own record writer and protos.

  tensorboard's `EventFileWriter` opens files through `tf.io.gfile`, which imports all of
  tensorflow (seconds of start-up); this writer opens a local file and uses only
  `RecordWriter` (framing and CRCs) and the summary protos, so tensorflow never loads.
  """

  def __init__(self, logdir: PathLike, filename_suffix: str = ""):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2 = event_pb2
    os.makedirs(logdir, exist_ok=True)
    self.path = pathlib.Path(logdir) / (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        f".{os.getpid()}.{id(self)}{filename_suffix}")
    self._writer = RecordWriter(open(self.path, "wb"))
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._writer.write(event.SerializeToString())

  def _summary(self, step: int, value) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=[value])))

  def scalar(self, tag: str, value: float, step: int) -> None:
    """One scalar (the "scalars" plugin's rank-0 float tensor form)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
    from tensorboard.plugins.scalar import metadata
    meta = metadata.create_summary_metadata(display_name="", description="")
    meta.data_class = summary_pb2.DATA_CLASS_SCALAR
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)])
    tensor.tensor_shape.SetInParent()
    self._summary(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta))

  def text(self, tag: str, markdown: str, step: int) -> None:
    """One Markdown text (the "text" plugin; TensorBoard renders tables)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
    from tensorboard.plugins.text import metadata
    meta = metadata.create_summary_metadata(display_name="", description="")
    meta.data_class = summary_pb2.DATA_CLASS_TENSOR
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[markdown.encode("utf-8")])
    tensor.tensor_shape.SetInParent()
    self._summary(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    if not self._writer.closed:
      self._writer.close()

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_tensorboard_scalars(logdir: PathLike, scalars: Mapping[str, float], step: int,
                              *, text: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  """Writes `scalars` (tag -> value) and optional Markdown `text` at `step`; returns the file."""
  with SummaryWriter(logdir) as w:
    for tag, value in scalars.items():
      w.scalar(tag, value, step)
    for tag, md in (text or {}).items():
      w.text(tag, md, step)
  return w.path


def read_tensorboard_events(path: PathLike) -> list:
  """Parses an event file written by `SummaryWriter` into Event protos (for tests/tools)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = pathlib.Path(path).read_bytes()
  events, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return events


# =========================================================================================
# 5. Model likelihood: a count-based n-gram baseline
# =========================================================================================


class NgramModel:
  """Interpolated Witten-Bell n-gram language model over token ids (a baseline for NLL).

  p(w | h) = (c(h, w) + T(h) * p(w | h')) / (c(h) + T(h)), with h' the history one token
  shorter, T(h) the number of distinct tokens seen after h, and an add-one unigram at the
  bottom, so every id of the vocabulary has nonzero probability. Contexts never cross the
  start of a sequence (shorter histories are used there).
  """

  def __init__(self, order: int, vocab_size: int):
    if order < 1:
      raise ValueError(f"order must be >= 1, got {order}")
    self.order, self.vocab_size = order, vocab_size
    # counts[k]: dict history(tuple of k ids) -> dict next id -> count
    self.counts = [dict() for _ in range(order)]

  def fit(self, sequences: Iterable[Sequence[int]]) -> "NgramModel":
    for seq in sequences:
      seq = [int(t) for t in seq]
      for i, w in enumerate(seq):
        for k in range(min(self.order - 1, i) + 1):
          h = tuple(seq[i - k:i])
          d = self.counts[k].setdefault(h, {})
          d[w] = d.get(w, 0) + 1
    self._totals = [{h: (sum(d.values()), len(d)) for h, d in ck.items()} for ck in self.counts]
    return self

  def prob(self, history: Sequence[int], w: int) -> float:
    """p(w | the last order-1 ids of history)."""
    uni_total, _ = self._totals[0].get((), (0, 0))
    p = (self.counts[0].get((), {}).get(w, 0) + 1) / (uni_total + self.vocab_size)
    history = tuple(int(t) for t in history[max(0, len(history) - self.order + 1):])
    for k in range(1, len(history) + 1):
      h = history[len(history) - k:]
      tot = self._totals[k].get(h)
      if tot is None:
        break
      c_h, types = tot
      p = (self.counts[k][h].get(w, 0) + types * p) / (c_h + types)
    return p

  def nll(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
          ) -> tuple:
    """(sum of NLL in nats, sum of weights) over batch rows, each row one sequence whose
    target t has history inputs[:t+1] (the same windows the Transformer is scored on)."""
    total, count = 0.0, 0.0
    for x, y, wts in zip(np.asarray(inputs), np.asarray(targets), np.asarray(weights)):
      for t in np.flatnonzero(wts > 0):
        total -= math.log(self.prob(x[:t + 1], int(y[t]))) * float(wts[t])
        count += float(wts[t])
    return total, count


# =========================================================================================
# 6. Evaluating a run: `midijax evaluate --workdir RUN`
# =========================================================================================


def note_token_mask(enc, ids: np.ndarray) -> np.ndarray:
  """True where an id starts a note (NOTE_ON / DRUM hit): the unit of NLL per note."""
  names = np.array([n.startswith(("NOTE_ON_", "DRUM_")) for n in enc.vocab.names])
  return names[np.asarray(ids)]


def split_nll(model, config, split: str) -> dict:
  """Mean NLL per token (nats) and per note, perplexity and accuracy over a whole split,
  on the deterministic non-overlapping eval windows (same numbers on every run)."""
  import jax
  from flax import nnx
  from midijax import input_pipeline, train
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.max_eval_batches = -1  # the whole split, always
  data = input_pipeline.DataSource(config)
  graphdef, params = nnx.split(model)
  eval_fn = jax.jit(lambda p, b: train.eval_step(p, b, graphdef=graphdef))
  batches = list(data.eval_batches(split))
  summary = train.evaluate(eval_fn, params, iter(batches), lambda b: b)
  notes = sum(float((note_token_mask(data.encoding, b["targets"]) * b["weights"]).sum())
              for b in batches)
  loss_sum = summary["loss"] * summary["tokens"]
  return {"nll_per_token": summary["loss"], "perplexity": summary["perplexity"],
          "accuracy": summary["accuracy"], "tokens": summary["tokens"], "notes": notes,
          "nll_per_note": loss_sum / max(notes, 1.0)}


def _prefix_length(enc, ids: np.ndarray) -> int:
  ids = np.asarray(ids)
  special = ids >= enc.bos_id
  return int(np.argmin(special)) if not special.all() else len(ids)


def _decode_clip(enc, ids, is_drum: bool) -> Notes:
  return enc.decode_notes(ids, is_drum=is_drum)


def evaluate_workdir(workdir, *, split: str = "test", num_samples: int = 64,
                     max_new_tokens: Optional[int] = None, step: Optional[int] = None,
                     best: bool = False, seed: int = 0, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, data_dir: Optional[str] = None,
                     out_dir=None, log=print) -> dict:
  """NLL on `split`, music statistics of samples vs real clips, grammar validity; writes
  `eval/<step>/metrics.json`, `metrics.md`, plots, and TensorBoard scalars.

  Samples are conditioned on the prefixes (BOS + conditioning) of real clips of the split,
  and real clips are cut to the same number of event tokens, so both sets are alike in
  length and conditions. Returns the metrics dict.
  """
  from midijax import checkpoint as ckpt_lib
  from midijax import input_pipeline, sampling, train
  model, enc, config, step = train.load_run(workdir, step=step, best=best)
  if data_dir:
    config.data.data_dir = data_dir
  workdir_p = ckpt_lib.workdir_path(workdir)
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(str(workdir_p / "eval" / str(step)))
  out.mkdir(parents=True, exist_ok=True)
  is_drum = config.data.name == "groove" or enc.name == "drums"
  t0 = time.perf_counter()
  nll = split_nll(model, config, split)
  log(f"{split}: NLL {nll['nll_per_token']:.4f} nats/token, {nll['nll_per_note']:.4f} "
      f"nats/note, perplexity {nll['perplexity']:.3f} ({nll['tokens']:,.0f} tokens, "
      f"{time.perf_counter() - t0:.1f} s)")

  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, split)
  n_new = int(max_new_tokens or min(config.data.seq_len, config.model.max_len) - 8)
  pieces = [store.piece(i) for i in range(len(store))]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(pieces))[:num_samples]
  real, prompts = [], []
  for i in order:
    p = pieces[i]
    k = _prefix_length(enc, p)
    prompts.append(p[:k])
    real.append(_decode_clip(enc, p[k:k + n_new], is_drum))
  generated, unconstrained_ids = [], []
  by_len: dict = {}
  for j, pr in enumerate(prompts):
    by_len.setdefault(len(pr), []).append(j)
  t0 = time.perf_counter()
  for length, rows in sorted(by_len.items()):
    batch = np.stack([prompts[j] for j in rows]).astype(np.int32)
    for constrained in (True, False):
      res = sampling.sample_tokens(model, batch, encoding=enc, max_new_tokens=n_new, seed=seed,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   constrained=constrained)
      toks = np.asarray(res["tokens"])[:, length:]
      for row in toks:
        row = row[:np.argmax(row == enc.eos_id)] if (row == enc.eos_id).any() else row
        row = row[row != enc.pad_id]
        if constrained:
          generated.append(_decode_clip(enc, row, is_drum))
        else:
          unconstrained_ids.append(row)
  log(f"sampled {len(generated)} constrained + {len(unconstrained_ids)} unconstrained clips of "
      f"up to {n_new} tokens in {time.perf_counter() - t0:.1f} s")
  from midijax.encoding import grammar
  validity = grammar_validity(
      unconstrained_ids, decode=lambda ids: _strict_decode(enc, ids, is_drum, grammar))
  comparison = compare_sets(generated, real)
  examples = {f"generated_{i}": g for i, g in enumerate(generated[:2])}
  examples.update({f"real_{i}": r for i, r in enumerate(real[:2])})
  extra = {"step": step, "split": split, "num_samples": len(generated),
           "tokens_per_clip": n_new, "nll": nll, "seed": seed, "temperature": temperature,
           "top_k": top_k, "top_p": top_p}
  write_reports(out, comparison, validity=validity, extra=extra, examples=examples)
  scalars = {f"eval_{split}/{k}": v for k, v in nll.items()}
  scalars[f"eval_{split}/unconstrained_validity"] = validity["rate"]
  scalars.update({f"eval_{split}/{k}": v for k, v in flat_scalars(comparison).items()})
  write_tensorboard_scalars(pathlib.Path(str(workdir_p / "tensorboard")), scalars, step)
  log(f"wrote {out}/metrics.json, metrics.md and plots")
  return json.loads((out / "metrics.json").read_text())


def _strict_decode(enc, ids, is_drum, grammar):
  """Decodes ids, raising when they break the encoding's grammar (invalid for the record)."""
  bad = int(grammar.grammar_violations(np.asarray(ids, np.int32), enc))
  if bad:
    raise GrammarViolation(f"{bad} tokens break the {enc.name} grammar")
  return _decode_clip(enc, ids, is_drum)


class GrammarViolation(ValueError):
  pass
