"""Classifier two-sample test (C2ST): can a classifier tell generated clips from real ones?

A C2ST (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests") trains a
classifier to label feature vectors "real" or "generated" and scores it on clips it did
not see. With as many real as generated clips, 50% held-out accuracy means the two sets
cannot be told apart by these features; 100% means every clip gives itself away.

Sections, in the order a clip's path through them goes:

  1. Clips: `cut_windows` cuts full pieces into windows (bars, seconds or tokens) with a
     group id per piece; `continuation_clip` decodes a continuation on its piece's clock.
  2. Feature vectors: `clip_feature_matrix` turns clips into a float matrix with column
     names: midijax's per-clip features flattened, plus, for drums, per-class onset
     density, microtiming and velocity statistics and a bar-level syncopation measure;
     for pitched clips, pitch, polyphony, inter-onset and velocity statistics.
  3. The test: `c2st` cross-validates logistic regression and gradient-boosted trees
     (scikit-learn) with prompts grouped across folds, and reports accuracy with a
     binomial interval, a p-value against chance and the most telling features.
  4. Reports: `c2st_scalars` (TensorBoard) and `c2st_markdown` (metrics.md).

Typical use: for prompt i, its real continuation and a generated one, each decoded
after the same context (the piece up to the continuation) on the piece's clock::

  real = [two_sample.continuation_clip(enc, context[i], real_ids[i], qpm=qpm[i])
          for i in range(n)]                   # (notes, seconds) pairs; same for generated
  r = two_sample.clip_feature_matrix([c for c, _ in real], kind="drums",
                                     durations=[d for _, d in real])
  g = two_sample.clip_feature_matrix(...)      # the generated clips, the same way
  result = two_sample.c2st(r.values, g.values, real_groups=np.arange(n),
                           generated_groups=np.arange(n), feature_names=r.names)
  result["accuracy"]                           # strongest classifier; 0.5 = cannot tell
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from midijax import music_stats
from midijax.errors import MidijaxError
from midijax.notes import Notes

CLASSIFIERS = ("logistic_regression", "boosted_trees")
FEATURE_KINDS = ("drums", "pitched")
NUM_DRUM_CLASSES = 9
# Onsets closer than this (seconds) are one onset, as in midijax.music_stats.
ONSET_TOLERANCE_S = 1e-3


class TwoSampleError(MidijaxError):
  """The clips or features cannot support the test (too few prompts, no usable features,
  features that do not fit the clips); the message is one line."""


# =========================================================================================
# 1. Clips
# =========================================================================================


@dataclasses.dataclass
class Windows:
  """Clips cut from pieces.

  Attributes:
    clips: one `Notes` per window. Time 0 is a bar line of the piece's own beat grid
      (tempo map and meter carried over), so microtiming and metrical positions are
      measured against the drummer's grid.
    durations: float64 [n], seconds of music each window covers (for densities).
    groups: int64 [n], index of the piece each window comes from (the grouping key that
      keeps a piece out of both train and test folds).
    starts: float64 [n], seconds into the piece where each window begins.
    ids: token windows only: int32 event ids of each window, else None.
  """
  clips: list
  durations: np.ndarray
  groups: np.ndarray
  starts: np.ndarray
  ids: Optional[list] = None

  def __len__(self) -> int:
    return len(self.clips)


def quarters_to_seconds(quarters, tempos: np.ndarray) -> np.ndarray:
  """Inverse of `music_stats.seconds_to_quarters`: quarter notes since 0 -> seconds.

  Args:
    quarters: float quarter notes, any shape.
    tempos: float64[k, 2] rows of (time seconds, qpm); the first tempo holds from 0.
  """
  tempos = np.asarray(tempos, np.float64).reshape(-1, 2)
  if len(tempos) == 0:
    tempos = np.array([[0.0, 120.0]])
  tempos = tempos[np.argsort(tempos[:, 0], kind="stable")]
  t0 = tempos[:, 0].copy()
  t0[0] = 0.0
  q0 = music_stats.seconds_to_quarters(t0, tempos)
  q = np.asarray(quarters, np.float64)
  k = np.clip(np.searchsorted(q0, q, side="right") - 1, 0, None)
  return t0[k] + (q - q0[k]) * 60.0 / tempos[k, 1]


def shift_clock(notes: Notes, offset: float) -> Notes:
  """The notes with `offset` seconds subtracted from every time; the tempo and time
  signature in force at `offset` move to time 0. Keeps the beat grid's phase only when
  `offset` is a bar line (or a 16th) of that grid."""
  def moved(rows):
    rows = np.asarray(rows, np.float64)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    before = np.flatnonzero(rows[:, 0] <= offset)
    first = rows[before[-1]] if len(before) else rows[0]
    later = rows[rows[:, 0] > offset]
    out = np.concatenate([first[None], later])
    out[:, 0] = np.concatenate([[0.0], later[:, 0] - offset])
    return out

  return dataclasses.replace(
      notes, start=notes.start - offset, end=notes.end - offset,
      cc_time=notes.cc_time - offset, tempos=moved(notes.tempos),
      time_signatures=moved(notes.time_signatures))


def bar_line_at_or_before(notes: Notes, seconds: float) -> float:
  """Time (seconds) of the last bar line at or before `seconds` on the notes' grid (the
  tempo map from time 0 and the first time signature)."""
  bar_q = music_stats.bar_quarters(notes)
  q = float(music_stats.seconds_to_quarters(np.array([seconds]), notes.tempos)[0])
  # A hair of tolerance so a time on a bar line (in float noise) is its own bar line.
  bar = np.floor(q / bar_q + 1e-9)
  return float(quarters_to_seconds(np.array([bar * bar_q]), notes.tempos)[0])


def _window(notes: Notes, start: float, end: float) -> Notes:
  """Notes with onsets in [start, end), clock shifted so `start` is time 0."""
  keep = (notes.start >= start - 1e-9) & (notes.start < end - 1e-9)
  clip = notes.select(keep)
  cc = (notes.cc_time >= start) & (notes.cc_time < end)
  clip = dataclasses.replace(clip, **{f: getattr(notes, f)[cc] for f in (
      "cc_time", "cc_number", "cc_value", "cc_instrument", "cc_program", "cc_is_drum")})
  return shift_clock(clip, start)


def cut_windows(pieces: Sequence[Notes], *, bars: Optional[float] = None,
                seconds: Optional[float] = None, tokens: Optional[int] = None,
                encoding=None, hop: Optional[float] = None,
                max_per_piece: Optional[int] = None, min_notes: int = 1,
                qpm: Optional[float] = None) -> Windows:
  """Cuts full pieces into windows, several per piece, each tagged with its piece.

  Give exactly one of `bars`, `seconds` or `tokens`:

  * `bars`: windows of that many bars starting on bar lines (the piece's tempo map and
    first time signature), one every `hop` bars (default `bars`: no overlap).
  * `seconds`: windows of that many seconds starting on bar lines; the next starts on
    the first bar line at or after `hop` seconds (default `seconds`) later.
  * `tokens`: windows of that many event ids of `encoding` (one every `hop` ids, default
    `tokens`), each decoded on the piece's clock with `continuation_clip` (the ids
    before it are its context).

  Args:
    pieces: full pieces (their own clocks).
    bars, seconds, tokens: window length (see above).
    encoding: a `midijax.encoding.Encoding`, for `tokens`.
    hop: step between window starts, in the window's unit.
    max_per_piece: keep at most this many windows of each piece (the first ones).
    min_notes: drop windows with fewer notes.
    qpm: `tokens` only: the tempo ids are decoded at (default: each piece's first tempo).

  Returns:
    `Windows` in piece order. Bar and second windows that would end after a piece's last
    onset are not cut (every window is full length).

  Raises:
    TwoSampleError: no piece is long enough for one window.
  """
  given = [k for k, v in (("bars", bars), ("seconds", seconds), ("tokens", tokens))
           if v is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of bars, seconds, tokens (got {given or 'none'})")
  if tokens is not None:
    return _token_windows(pieces, encoding, int(tokens), hop, max_per_piece, min_notes, qpm)
  length = float(bars if bars is not None else seconds)
  step = float(hop) if hop is not None else length
  if length <= 0 or step <= 0:
    raise ValueError(f"window length and hop must be > 0 (got {length}, {step})")
  clips, durations, groups, starts = [], [], [], []
  for g, piece in enumerate(pieces):
    if len(piece) == 0:
      continue
    last_onset = float(piece.start.max())
    bar_q = music_stats.bar_quarters(piece)
    kept, b, t0 = 0, 0.0, 0.0
    while max_per_piece is None or kept < max_per_piece:
      if bars is not None:
        t0, t1 = quarters_to_seconds(np.array([b, b + length]) * bar_q, piece.tempos)
        b += step
      else:
        t1 = t0 + length
      if t1 > last_onset:
        break
      clip = _window(piece, float(t0), float(t1))
      if len(clip) >= min_notes:
        clips.append(clip)
        durations.append(float(t1 - t0))
        groups.append(g)
        starts.append(float(t0))
        kept += 1
      if bars is None:
        # Next start: the first bar line at or after t0 + hop.
        nxt = bar_line_at_or_before(piece, t0 + step)
        if nxt < t0 + step - 1e-9:
          q = music_stats.seconds_to_quarters(np.array([nxt]), piece.tempos)[0] + bar_q
          nxt = float(quarters_to_seconds(np.array([q]), piece.tempos)[0])
        t0 = nxt
  if not clips:
    unit = "bars" if bars is not None else "seconds"
    raise TwoSampleError(f"no piece (of {len(pieces)}) is long enough for a window of "
                         f"{length:g} {unit} with at least {min_notes} notes")
  return Windows(clips, np.asarray(durations, np.float64), np.asarray(groups, np.int64),
                 np.asarray(starts, np.float64))


def seconds_per_token(encoding, qpm: float = 120.0) -> np.ndarray:
  """float64 [vocab]: seconds of music each id moves time forward (the grammar's table)."""
  from midijax.encoding import grammar  # pylint: disable=g-import-not-at-top
  return grammar.get_tables(encoding, qpm=qpm).seconds.astype(np.float64)


def continuation_clip(encoding, context_ids, continuation_ids, *, qpm: float = 120.0,
                      is_drum: Optional[bool] = None, token_seconds=None,
                      time_signature: Optional[tuple] = None):
  """Decodes a continuation on the clock of what came before it.

  Decoding a continuation alone starts its clock at its first id, which puts the beat
  grid at an arbitrary phase. Decoding context + continuation together keeps the piece's
  clock (a context that starts where the piece starts keeps the drummer's grid); the
  notes the continuation starts are then moved back by a whole number of bars.

  Args:
    encoding: the `midijax.encoding.Encoding` of the ids.
    context_ids: ids before the continuation (BOS and conditioning are skipped); give the
      same context to a prompt's real and generated continuations.
    continuation_ids: the continuation's ids (stops at EOS).
    qpm: tempo the ids are decoded at (the piece's tempo when known).
    is_drum: passed to the decoder when not None.
    token_seconds: optional float [vocab] seconds each id advances (default: from the
      encoding's grammar at `qpm`; pass it to save rebuilding it per clip).
    time_signature: (numerator, denominator) of the piece's meter (default: the
      decoder's, 4/4); sets the bar lines and the metrical grid of the features.

  Returns:
    (notes, duration): the notes whose onsets the continuation adds, with time 0 on the
    bar line at or before the context's end; and the seconds of music the continuation
    covers (from the context's end to the time after its last id).
  """
  kw = {"qpm": float(qpm)}
  if is_drum is not None:
    kw["is_drum"] = is_drum
  context = encoding.strip_specials(context_ids)
  cont = encoding.strip_specials(continuation_ids)
  ids = np.concatenate([context, cont]).astype(np.int32)
  advance = seconds_per_token(encoding, qpm) if token_seconds is None else token_seconds
  t_context = float(advance[context.astype(np.int64)].sum())
  t_end = t_context + float(advance[cont.astype(np.int64)].sum())
  both = encoding.decode_notes(ids, **kw)
  before = encoding.decode_notes(context, **kw)
  if time_signature is not None:
    num, den = (int(x) for x in time_signature)
    both = dataclasses.replace(both, time_signatures=np.array([[0.0, num, den]], np.float64))
  notes = both.select(_onsets_not_in(both, before))
  origin = bar_line_at_or_before(notes, t_context)
  return shift_clock(notes, origin), max(t_end - t_context, 0.0)


def _onsets_not_in(a: Notes, b: Notes) -> np.ndarray:
  """bool mask over `a`: notes whose (pitch, onset) is not matched one-for-one in `b`."""
  def keys(n):
    return np.round(n.start / ONSET_TOLERANCE_S).astype(np.int64) * 128 + n.pitch
  ka, kb = keys(a), keys(b)
  order = np.argsort(ka, kind="stable")
  sorted_a = ka[order]
  # Rank of each note among equal keys in `a`; the first count-in-`b` of them are old.
  rank = np.arange(len(sorted_a)) - np.searchsorted(sorted_a, sorted_a, side="left")
  ub, cb = np.unique(kb, return_counts=True)
  count_b = np.zeros(len(sorted_a), np.int64)
  if len(ub):
    pos = np.minimum(np.searchsorted(ub, sorted_a), len(ub) - 1)
    count_b = np.where(ub[pos] == sorted_a, cb[pos], 0)
  mask = np.empty(len(ka), bool)
  mask[order] = rank >= count_b
  return mask


def _token_windows(pieces, encoding, tokens, hop, max_per_piece, min_notes, qpm):
  if encoding is None:
    raise ValueError("token windows need `encoding`")
  if tokens <= 0:
    raise ValueError(f"tokens must be > 0 (got {tokens})")
  step = int(hop) if hop is not None else tokens
  clips, durations, groups, starts, windows = [], [], [], [], []
  tables = {}
  for g, piece in enumerate(pieces):
    ids = np.asarray(encoding.encode(piece), np.int32)
    piece_qpm = float(qpm or piece.qpm)
    if piece_qpm not in tables:
      tables[piece_qpm] = seconds_per_token(encoding, piece_qpm)
    advance = tables[piece_qpm]
    kept = 0
    for s in range(0, len(ids) - tokens + 1, step):
      if max_per_piece is not None and kept >= max_per_piece:
        break
      clip, duration = continuation_clip(encoding, ids[:s], ids[s:s + tokens], qpm=piece_qpm,
                                         is_drum=bool(np.asarray(piece.is_drum).all()),
                                         token_seconds=advance)
      if len(clip) < min_notes:
        continue
      clips.append(clip)
      durations.append(duration)
      groups.append(g)
      starts.append(float(advance[ids[:s].astype(np.int64)].sum()))
      windows.append(ids[s:s + tokens])
      kept += 1
  if not clips:
    raise TwoSampleError(f"no piece (of {len(pieces)}) is long enough for a window of "
                         f"{tokens} {encoding.name} tokens with at least {min_notes} notes")
  return Windows(clips, np.asarray(durations, np.float64), np.asarray(groups, np.int64),
                 np.asarray(starts, np.float64), windows)


# =========================================================================================
# 2. Feature vectors
# =========================================================================================


@dataclasses.dataclass
class FeatureMatrix:
  """Clips as rows of numbers.

  Attributes:
    values: float64 [n_clips, n_features].
    names: column names; vector features become `name[label]` columns (e.g.
      `drum_onset_density[kick]`, `pitch_class_histogram[C#]`).
    kind: "drums" or "pitched".
  """
  values: np.ndarray
  names: tuple
  kind: str


def _meter(notes: Notes) -> tuple:
  """(numerator, denominator) of the first time signature (4/4 without one)."""
  ts = np.asarray(notes.time_signatures, np.float64).reshape(-1, 3)
  if len(ts) == 0:
    return 4, 4
  num, den = ts[np.argmin(ts[:, 0]), 1:]
  return int(num), int(den)


def _beat_steps(numerator: int, denominator: int) -> int:
  """16ths per beat: a quarter in x/4, an 8th in x/8, a dotted quarter in 6/8, 9/8, 12/8."""
  if denominator == 8 and numerator % 3 == 0 and numerator > 3:
    return 6
  return max(1, 16 // max(denominator, 1))


def metrical_weights(steps_per_bar: int, numerator: int = 4, denominator: int = 4
                     ) -> np.ndarray:
  """Longuet-Higgins & Lee (1984) metrical weights of the 16th positions of one bar.

  The downbeat weighs 0 and each level down the metrical hierarchy one less. In 4/4:
  0 (downbeat), -1 (half bar), -2 (beats 2 and 4), -3 (8th off-beats), -4 (16th
  off-beats), the 16th-level profile Witek et al. (2014) also use for drum breaks.
  Bars with a power-of-two number of beats halve down to the beat; others (3/4, 5/4)
  put every beat at -1. Below the beat, beats halve (compound beats of 6/8, 9/8, 12/8
  first split in three 8ths).

  Returns:
    float64 [steps_per_bar] weights (<= 0).
  """
  spb = int(steps_per_bar)
  beat = _beat_steps(numerator, denominator)
  if spb % beat:
    beat = 1
  beats = spb // beat
  pos = np.arange(spb)
  w = np.zeros(spb)
  b = pos // beat
  on_beat = pos % beat == 0
  if beats & (beats - 1) == 0:
    top = beats.bit_length() - 1
    # Beat index b > 0 sits `top - (trailing zeros of b)` levels down.
    tz = np.array([(int(x) & -int(x)).bit_length() - 1 if x else top for x in b])
    w[on_beat] = -(top - tz[on_beat])
  else:
    top = 1
    w[on_beat & (b > 0)] = -1.0
  assigned = on_beat.copy()
  size, level, within = beat, top, pos % beat
  while size > 1:
    factor = 3 if (size == beat and beat % 3 == 0) else 2 if size % 2 == 0 else size
    size //= factor
    level += 1
    new = ~assigned & (within % size == 0)
    w[new] = -level
    assigned |= new
  return w


def syncopation_per_bar(step: np.ndarray, weights: np.ndarray) -> float:
  """Mean, over bars with onsets, of the Longuet-Higgins & Lee syncopation in the bar.

  A syncopation is an onset followed, before the next onset, by a silent position of
  higher metrical weight; it scores the highest such weight minus the onset's, and a
  pattern's syncopation is the sum (LHL 1984's monophonic measure; Witek et al. 2014
  build their polyphonic drum-break index on the same weights and sums). Here it runs on
  one onset stream (all hits merged, or one class). The clip's last onset scores nothing
  (what follows it is unknown). Each syncopation counts in the bar of its onset.

  Args:
    step: int 16th-note index of each onset since time 0 (duplicates are one onset).
    weights: `metrical_weights` of one bar.
  """
  step = np.unique(np.asarray(step, np.int64))
  step = step[step >= 0]
  if len(step) == 0:
    return 0.0
  spb = len(weights)
  w = weights[np.arange(int(step.max()) + 1) % spb]
  total = np.zeros(int(step.max()) // spb + 1)
  p, q = step[:-1], step[1:]
  gap = q > p + 1
  if gap.any():
    # Highest weight over each gap's silent positions p+1 .. q-1: reduceat over
    # interleaved [start, end) bounds, keeping every other result.
    bounds = np.stack([p[gap] + 1, q[gap]], 1).ravel()
    rest = np.maximum.reduceat(np.append(w, 0.0), bounds)[::2]
    np.add.at(total, p[gap] // spb, np.maximum(rest - w[p[gap]], 0.0))
  return float(total[np.unique(step // spb)].mean())


def _stats(x: np.ndarray) -> tuple:
  return (float(x.mean()), float(x.std())) if len(x) else (0.0, 0.0)


def _labels(name: str, size: int) -> tuple:
  labels = None
  if name in music_stats.FEATURES_BY_NAME:
    labels = music_stats.feature_labels(name)
  elif name in _LABELS:
    labels = _LABELS[name]
  elif size == NUM_DRUM_CLASSES:
    labels = music_stats.drum_class_names()
  if labels is None or len(labels) != size:
    labels = tuple(str(i) for i in range(size))
  return labels


_LABELS = {"drum_metrical_share": ("downbeat", "beat", "beat_half", "finer")}


def flatten_features(features: dict) -> tuple:
  """{name: scalar or vector} -> (names, values): vectors become `name[label]` columns."""
  names, values = [], []
  for k, v in features.items():
    v = np.asarray(v, np.float64)
    if v.ndim == 0:
      names.append(k)
      values.append(float(v))
    else:
      names += [f"{k}[{lab}]" for lab in _labels(k, len(v))]
      values += [float(x) for x in v]
  return names, values


def drum_features(notes: Notes, duration: float) -> dict:
  """The C2ST's drum features of one clip: midijax's per-clip drum features
  (`music_stats.clip_features`) plus

  * `drum_onset_density` [9]: hits per second of each GrooVAE class.
  * `drum_microtiming_mean`, `drum_microtiming_std`: signed offset of all hits from the
    nearest 16th (in 16ths, + = late; grid from time 0 on the clip's tempo map), and
    `drum_microtiming_std_class` [9] per class (the per-class mean and mean |offset|
    are `drum_microtiming` and `drum_microtiming_abs`, the overall mean |offset|
    `drum_microtiming_abs_mean`).
  * `drum_velocity_mean`, `drum_velocity_std` (MIDI velocity 1..127) and
    `drum_velocity_class` [9]: mean velocity per class (0 for a class without hits).
  * `drum_syncopation`, `drum_syncopation_class` [9]: Longuet-Higgins & Lee syncopation
    per bar of the onset pattern (all hits; each class alone), the mean over bars with
    hits (see `metrical_weights`, `syncopation_per_bar`).
  * `drum_metrical_share` [downbeat, beat, beat_half, finer]: share of the velocity on
    the downbeat, the other beats, the first split of the beat (4/4: 8th off-beats) and
    finer positions (4/4: 16th off-beats).

  Args:
    notes: a clip; only its drum notes are used. Time 0 is a bar line.
    duration: seconds of music the clip covers (for densities).

  Returns:
    {name: float64 scalar or vector}; a clip without drum hits gets zeros.
  """
  drums = notes.select(np.asarray(notes.is_drum, bool))
  out = dict(music_stats.clip_features(drums, duration=duration, groups=("drums",)))
  mt = music_stats.microtiming_offsets(drums)
  cls, off, step = mt["drum_class"], mt["offset_16ths"], mt["step"]
  vel = drums.velocity.astype(np.float64)
  mapped = cls >= 0
  counts = np.bincount(cls[mapped], minlength=NUM_DRUM_CLASSES).astype(np.float64)
  safe = np.maximum(counts, 1.0)  # classes without hits report 0
  out["drum_onset_density"] = (counts / duration if duration > 0
                               else np.zeros(NUM_DRUM_CLASSES))
  out["drum_microtiming_mean"], out["drum_microtiming_std"] = _stats(off)
  mean_c = np.bincount(cls[mapped], off[mapped], NUM_DRUM_CLASSES) / safe
  sq_c = np.bincount(cls[mapped], off[mapped] ** 2, NUM_DRUM_CLASSES) / safe
  out["drum_microtiming_std_class"] = np.sqrt(np.maximum(sq_c - mean_c ** 2, 0.0))
  out["drum_velocity_mean"], out["drum_velocity_std"] = _stats(vel)
  out["drum_velocity_class"] = np.bincount(cls[mapped], vel[mapped], NUM_DRUM_CLASSES) / safe
  num, den = _meter(drums)
  spb = max(1, int(round(music_stats.bar_quarters(drums) * 4)))
  weights = metrical_weights(spb, num, den)
  out["drum_syncopation"] = syncopation_per_bar(step, weights)
  out["drum_syncopation_class"] = np.array(
      [syncopation_per_bar(step[cls == c], weights) for c in range(NUM_DRUM_CLASSES)])
  pos = np.mod(step, spb)
  beat = _beat_steps(num, den) if spb % _beat_steps(num, den) == 0 else 1
  beat_w = weights[::beat].min() if spb else 0.0  # weakest beat's weight
  level = np.where(pos == 0, 0, np.where(pos % beat == 0, 1,
                                         np.where(weights[pos] == beat_w - 1, 2, 3)))
  share = np.bincount(level.astype(np.int64), vel, 4)
  out["drum_metrical_share"] = share / share.sum() if share.sum() > 0 else np.zeros(4)
  return out


def pitched_features(notes: Notes, duration: float) -> dict:
  """The C2ST's pitched features of one clip (its non-drum notes): midijax's per-clip
  pitched features (`music_stats.clip_features`, which include pitch range, polyphony and
  the mean inter-onset interval) plus `pitch_mean`, `pitch_std`, `pitch_lowest`,
  `pitch_highest` (MIDI pitch), `onset_density` (distinct onsets/s), `ioi_std`,
  `ioi_median` (s, between distinct onsets), `note_length_mean`, `note_length_std` (s),
  `velocity_mean`, `velocity_std` and `polyphony_max` (most notes sounding at once).
  Zeros for a clip without pitched notes."""
  pitched = notes.select(~np.asarray(notes.is_drum, bool))
  out = dict(music_stats.clip_features(pitched, duration=duration, groups=("pitched",)))
  pitch = pitched.pitch.astype(np.float64)
  out["pitch_mean"], out["pitch_std"] = _stats(pitch)
  out["pitch_lowest"] = float(pitch.min()) if len(pitch) else 0.0
  out["pitch_highest"] = float(pitch.max()) if len(pitch) else 0.0
  onsets = np.unique(np.round(pitched.start / ONSET_TOLERANCE_S)) * ONSET_TOLERANCE_S
  out["onset_density"] = len(onsets) / duration if duration > 0 else 0.0
  ioi = np.diff(onsets)
  out["ioi_std"] = float(ioi.std()) if len(ioi) else 0.0
  out["ioi_median"] = float(np.median(ioi)) if len(ioi) else 0.0
  out["note_length_mean"], out["note_length_std"] = _stats(pitched.end - pitched.start)
  out["velocity_mean"], out["velocity_std"] = _stats(pitched.velocity.astype(np.float64))
  if len(pitched):
    # +1 at each onset, -1 at each end, ends first where they tie with an onset.
    t = np.round(np.concatenate([pitched.start, pitched.end]) / ONSET_TOLERANCE_S)
    d = np.concatenate([np.ones(len(pitched)), -np.ones(len(pitched))])
    order = np.lexsort((d, t))
    out["polyphony_max"] = float(np.cumsum(d[order]).max())
  else:
    out["polyphony_max"] = 0.0
  return out


def infer_kind(clips: Sequence[Notes]) -> str:
  """"drums" when at least half of the clips' notes are drum notes, else "pitched"."""
  drum = sum(int(np.asarray(c.is_drum, bool).sum()) for c in clips)
  total = sum(len(c) for c in clips)
  return "drums" if total and drum * 2 >= total else "pitched"


def clip_feature_matrix(clips: Sequence[Notes], *, kind: str = "auto",
                        durations: Optional[Sequence[float]] = None) -> FeatureMatrix:
  """Feature vectors of clips for the C2ST.

  Args:
    clips: the clips (for drums, time 0 on a bar line of the beat grid: see
      `cut_windows` and `continuation_clip`).
    kind: "drums" (`drum_features`), "pitched" (`pitched_features`) or "auto" (the kind
      most of the clips' notes are).
    durations: seconds of music per clip, for densities (default: each clip's last note
      end, as `music_stats.clip_features`).

  Returns:
    `FeatureMatrix` [len(clips), d]; every call with the same kind has the same columns.

  Raises:
    TwoSampleError: no clips, an unknown kind, or no clip has a note of the kind asked
      for (e.g. drum features on piano clips).
  """
  if kind == "auto":
    kind = infer_kind(clips)
  if kind not in FEATURE_KINDS:
    raise TwoSampleError(f"unknown feature kind {kind!r}; expected one of "
                         f"{', '.join(FEATURE_KINDS)} or 'auto'")
  if len(clips) == 0:
    raise TwoSampleError("no clips to compute features of")
  want_drum = kind == "drums"
  if not any((np.asarray(c.is_drum, bool) == want_drum).any() for c in clips):
    raise TwoSampleError(
        f"{'drum' if want_drum else 'pitched'} features asked for, but none of the "
        f"{len(clips)} clips has a "
        f"{'drum' if want_drum else 'pitched (non-drum)'} note")
  if durations is None:
    durations = [c.total_time for c in clips]
  if len(durations) != len(clips):
    raise ValueError(f"{len(durations)} durations for {len(clips)} clips")
  fn = drum_features if want_drum else pitched_features
  names, rows = None, []
  for clip, dur in zip(clips, durations):
    n, v = flatten_features(fn(clip, float(dur)))
    names = names or tuple(n)
    rows.append(v)
  return FeatureMatrix(np.asarray(rows, np.float64), names, kind)


# =========================================================================================
# 3. The test
# =========================================================================================


def _make_classifier(name: str, seed: int):
  # Imported here: scikit-learn takes seconds to import and only the C2ST needs it.
  from sklearn.ensemble import HistGradientBoostingClassifier  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  if name == "logistic_regression":
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
  if name == "boosted_trees":
    return HistGradientBoostingClassifier(random_state=seed)
  raise TwoSampleError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")


def _check_inputs(real, generated, real_groups, generated_groups, feature_names):
  real = np.asarray(real, np.float64)
  generated = np.asarray(generated, np.float64)
  for label, x in (("real", real), ("generated", generated)):
    if x.ndim != 2:
      raise TwoSampleError(f"{label} features must be a [clips, features] matrix, got "
                           f"shape {x.shape}")
  if real.shape[1] != generated.shape[1]:
    raise TwoSampleError(f"real clips have {real.shape[1]} features, generated clips "
                         f"{generated.shape[1]}")
  names = tuple(str(n) for n in feature_names)
  if len(names) != real.shape[1]:
    raise TwoSampleError(f"{len(names)} feature names for {real.shape[1]} features")
  if real.shape[1] == 0:
    raise TwoSampleError("the feature set is empty (0 features)")
  rg = np.asarray(real_groups).ravel()
  gg = np.asarray(generated_groups).ravel()
  if len(rg) != len(real) or len(gg) != len(generated):
    raise TwoSampleError(f"groups ({len(rg)} real, {len(gg)} generated) must give one "
                         f"prompt per clip ({len(real)} real, {len(generated)} generated)")
  bad = ~np.isfinite(np.concatenate([real, generated])).all(0)
  if bad.any():
    raise TwoSampleError("features are not finite (NaN or inf): "
                         + ", ".join(np.asarray(names)[bad][:5]))
  return real, generated, rg, gg, names


def binomial_summary(correct: int, n: int, confidence: float = 0.95) -> dict:
  """Accuracy of `correct` of `n` with its Wilson score interval (two-sided, at
  `confidence`) and the one-sided binomial test's p-value of accuracy > 0.5
  (scipy.stats.binomtest)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ci = stats.binomtest(correct, n, 0.5).proportion_ci(confidence_level=confidence,
                                                      method="wilson")
  p = stats.binomtest(correct, n, 0.5, alternative="greater").pvalue
  return {"accuracy": correct / n, "correct": int(correct), "n": int(n),
          "ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(p)}


def permutation_drops(predict, x: np.ndarray, y: np.ndarray, repeats: int,
                      rng: np.random.Generator, max_cells: int = 1 << 22) -> np.ndarray:
  """Permutation importance: the drop in accuracy of `predict` (rows -> labels) on (x, y)
  when one column is shuffled, `repeats` times per column.

  The same quantity as `sklearn.inspection.permutation_importance` with
  scoring="accuracy", computed with one `predict` call per block of columns rather than
  one per column and repeat: that is about 2,000 calls per classifier for 84 features,
  5 repeats and 5 folds, whose fixed cost per call dominated the C2ST's run time on a
  2-core machine.

  Returns:
    float64 [n_features, repeats].
  """
  n, d = x.shape
  base = float((predict(x) == y).mean())
  drops = np.zeros((d, repeats))
  per_col = n * repeats
  cols = max(1, max_cells // max(per_col * d, 1))
  for j0 in range(0, d, cols):
    js = range(j0, min(d, j0 + cols))
    block = np.repeat(x[None], len(js) * repeats, 0)  # [len(js) * repeats, n, d]
    for k, j in enumerate(js):
      for r in range(repeats):
        block[k * repeats + r, :, j] = x[rng.permutation(n), j]
    hit = predict(block.reshape(-1, d)).reshape(len(js), repeats, n) == y
    drops[j0:j0 + len(js)] = base - hit.mean(-1)
  return drops


def _cross_validate(name, x, y, folds, feature_names, *, seed, top_features,
                    importance_repeats, confidence) -> dict:
  """One classifier's held-out predictions over `folds`, scored (see `c2st`)."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  prob = np.zeros(len(y))
  pred = np.zeros(len(y), bool)
  fold_acc = []
  imp_sum = np.zeros(x.shape[1])
  imp_sq = np.zeros(x.shape[1])
  for i, (train, test) in enumerate(folds):
    model = _make_classifier(name, seed)
    model.fit(x[train], y[train])
    # Prompts are dealt to folds whole, so a training fold can hold more of one set than
    # its test fold. A model leans to its training majority (the test minority) and would
    # score below chance on equal sets; deciding "generated" when p > the training share
    # of generated clips undoes that prior shift (class weights would too, but make the
    # trees' binning ~10x slower).
    threshold = float(y[train].mean())
    prob[test] = model.predict_proba(x[test])[:, 1]
    pred[test] = prob[test] > threshold
    fold_acc.append(float((pred[test] == y[test]).mean()))
    if importance_repeats > 0 and top_features > 0:
      drops = permutation_drops(lambda v, m=model, th=threshold: m.predict_proba(v)[:, 1] > th,
                                x[test], y[test], importance_repeats,
                                np.random.default_rng([seed, i]))
      # Weighted by fold size, so the mean is the pooled drop in held-out accuracy.
      imp_sum += drops.mean(1) * len(test)
      imp_sq += (drops ** 2).mean(1) * len(test)
  r = binomial_summary(int((pred == y).sum()), len(y), confidence)
  r["auc"] = float(roc_auc_score(y, prob))
  r["fold_accuracy"] = fold_acc
  r["top_features"] = []
  if importance_repeats > 0 and top_features > 0:
    mean = imp_sum / len(y)
    std = np.sqrt(np.maximum(imp_sq / len(y) - mean ** 2, 0.0))
    # Which way each telling feature leans: its mean over the real and the generated clips.
    r["top_features"] = [
        {"name": feature_names[j], "importance": float(mean[j]), "std": float(std[j]),
         "real_mean": float(x[y == 0, j].mean()), "generated_mean": float(x[y == 1, j].mean())}
        for j in np.argsort(-mean, kind="stable")[:top_features]]
  return r


def c2st(real, generated, *, real_groups, generated_groups, feature_names,
         n_folds: int = 5, seed: int = 0, classifiers: Sequence[str] = CLASSIFIERS,
         top_features: int = 5, importance_repeats: int = 5, min_per_class: int = 10,
         confidence: float = 0.95) -> dict:
  """Classifier two-sample test: held-out accuracy at telling generated from real clips.

  Every clip is predicted once, by a classifier trained on the other folds
  (`StratifiedGroupKFold`, shuffled with `seed`: all clips of a prompt, real and
  generated, fall in one fold, and folds keep the real/generated balance). When the sets
  differ in size, a seeded draw first cuts the larger to the smaller's size, so chance
  is exactly 50%.

  Give each group as many real as generated clips (a prompt's real and generated
  continuations). A group of one set only, held out, leaves its neighbours in feature
  space tilted to the other set in training, and cross-validation then scores below
  chance on identical sets (44%, interval 38-50%, for GMD real against real with a coin
  per clip); "unbalanced_groups" counts such groups.

  Args:
    real, generated: float [n, d] feature matrices with the same columns.
    real_groups, generated_groups: [n] prompt (or piece) id of each row (ints or
      strings); a prompt's real and generated continuations share an id.
    feature_names: the d column names.
    n_folds: k of the k-fold cross-validation.
    seed: drives the subsampling, the folds, the trees and the permutations.
    classifiers: any of "logistic_regression" (standardized features, L2, C=1) and
      "boosted_trees" (scikit-learn's `HistGradientBoostingClassifier`, defaults).
    top_features: how many of the most telling features to report.
    importance_repeats: shuffles per feature per fold for permutation importance (the
      drop in held-out accuracy when a feature's column is shuffled); 0 skips it.
    min_per_class: fewest clips of each set the test accepts.
    confidence: level of the binomial interval.

  Returns:
    JSON-able dict: "n_real", "n_generated" (rows used; "n_real_given",
    "n_generated_given" before balancing), "n_prompts", "unbalanced_groups", "n_folds",
    "seed", "n_features",
    "constant_features" (names dropped: constant over all clips), "chance" (0.5),
    "interval" ("wilson"), "confidence", "classifiers": {name: {"accuracy", "correct",
    "n", "ci_low", "ci_high", "p_value" (one-sided binomial test of accuracy > 0.5),
    "auc" (ROC AUC of the held-out probabilities), "fold_accuracy" [k], "top_features":
    [{"name", "importance", "std", "real_mean", "generated_mean"}]}}, "strongest" (the
    classifier with the highest
    accuracy) and "accuracy" (its accuracy).

  Raises:
    TwoSampleError: fewer prompts than folds, fewer than `min_per_class` clips in a set,
      an empty or all-constant feature set, non-finite values, mismatched shapes.
  """
  # pylint: disable=g-import-not-at-top
  import threadpoolctl  # scikit-learn's own dependency
  from sklearn.model_selection import StratifiedGroupKFold
  # pylint: enable=g-import-not-at-top
  real, generated, rg, gg, names = _check_inputs(real, generated, real_groups,
                                                 generated_groups, feature_names)
  if n_folds < 2:
    raise TwoSampleError(f"the C2ST needs at least 2 folds, got n_folds={n_folds}")
  for name in classifiers:
    if name not in CLASSIFIERS:
      raise TwoSampleError(f"unknown classifier {name!r}; expected one of "
                           f"{', '.join(CLASSIFIERS)}")
  floor = max(min_per_class, n_folds)
  if min(len(real), len(generated)) < floor:
    raise TwoSampleError(f"too few clips for the C2ST: {len(real)} real and "
                         f"{len(generated)} generated, needs at least {floor} of each")
  rng = np.random.default_rng(seed)
  n = min(len(real), len(generated))
  keep_r = np.sort(rng.permutation(len(real))[:n])
  keep_g = np.sort(rng.permutation(len(generated))[:n])
  x = np.concatenate([real[keep_r], generated[keep_g]])
  y = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
  _, groups = np.unique(np.concatenate([rg[keep_r], gg[keep_g]]).astype(str),
                        return_inverse=True)
  n_groups = int(groups.max()) + 1
  per_group = np.zeros((n_groups, 2), np.int64)
  np.add.at(per_group, (groups, y), 1)
  unbalanced = int((per_group[:, 0] != per_group[:, 1]).sum())
  if n_groups < n_folds:
    raise TwoSampleError(f"too few prompts for {n_folds}-fold cross-validation: "
                         f"{n_groups} distinct prompts, needs at least {n_folds}")
  varying = x.max(0) > x.min(0)
  if not varying.any():
    raise TwoSampleError(f"all {len(names)} features are constant over the clips: "
                         f"nothing to tell the sets apart by")
  constant = [nm for nm, v in zip(names, varying) if not v]
  kept_names = [nm for nm, v in zip(names, varying) if v]
  x = x[:, varying]

  folds = list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
               .split(x, y, groups))
  for i, (train, test) in enumerate(folds):
    if len(np.unique(y[train])) < 2 or len(test) == 0:
      raise TwoSampleError(f"fold {i + 1} of {n_folds} has no real or no generated clips "
                           f"to train on; use more prompts or fewer folds")

  # One OpenMP thread for the trees: on a few thousand rows threads buy nothing, and on a
  # busy machine their spin-waiting made each fit 10-50x slower.
  with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
    results = {name: _cross_validate(name, x, y, folds, kept_names, seed=seed,
                                     top_features=top_features,
                                     importance_repeats=importance_repeats,
                                     confidence=confidence)
               for name in classifiers}
  strongest = max(results, key=lambda k: results[k]["accuracy"]) if results else None
  return {
      "n_real": int(n), "n_generated": int(n), "n_real_given": int(len(real)),
      "n_generated_given": int(len(generated)), "n_prompts": n_groups,
      "unbalanced_groups": unbalanced,
      "n_folds": int(n_folds), "seed": int(seed), "n_features": len(names),
      "constant_features": constant, "chance": 0.5, "interval": "wilson",
      "confidence": float(confidence), "classifiers": results, "strongest": strongest,
      "accuracy": results[strongest]["accuracy"] if strongest else None,
  }


# =========================================================================================
# 4. Reports
# =========================================================================================


def c2st_scalars(result: dict, prefix: str = "c2st") -> dict:
  """Flat {name: float} of a `c2st` result, for TensorBoard and metrics.json:
  `<prefix>/<classifier>/{accuracy,ci_low,ci_high,p_value,auc}` and `<prefix>/accuracy`
  (the strongest classifier's)."""
  out = {}
  for name, r in result["classifiers"].items():
    for k in ("accuracy", "ci_low", "ci_high", "p_value", "auc"):
      out[f"{prefix}/{name}/{k}"] = float(r[k])
  if result.get("accuracy") is not None:
    out[f"{prefix}/accuracy"] = float(result["accuracy"])
  return out


def c2st_markdown(result: dict, title: str = "Classifier two-sample test") -> str:
  """A metrics.md section for a `c2st` result: a row per classifier, then how to read it."""
  pct = lambda v: f"{100 * v:.1f}%"
  level = f"{100 * result['confidence']:g}%"
  lines = [
      f"## {title}", "",
      f"{result['n_real']} real and {result['n_generated']} generated clips, "
      f"{result['n_prompts']} prompts, {result['n_folds']}-fold cross-validation grouped by "
      f"prompt, {result['n_features']} features, seed {result['seed']}.", "",
      f"| classifier | accuracy | {level} interval | p (> 50%) | AUC | most telling features |",
      "|---|---|---|---|---|---|"]
  for name, r in result["classifiers"].items():
    feats = ", ".join(
        f"{f['name']} ({f['importance']:+.3f}" + (
            f"; real {f['real_mean']:.3g}, generated {f['generated_mean']:.3g})"
            if "real_mean" in f else ")")
        for f in r["top_features"] if f["importance"] > 0)
    lines.append(f"| {name} | {pct(r['accuracy'])} ({r['correct']}/{r['n']}) | "
                 f"{pct(r['ci_low'])} to {pct(r['ci_high'])} | {r['p_value']:.3g} | "
                 f"{r['auc']:.3f} | {feats.replace('|', '/') or '-'} |")
  lines += ["", "50% means the classifier cannot tell generated clips from real ones; 100% "
            "means every clip gives itself away. Interval: Wilson score; p: one-sided "
            "binomial test of accuracy above 50%. A feature's importance is the drop in "
            "held-out accuracy when its column is shuffled (features that drop nothing "
            "are not listed), followed by its mean over the real and the generated clips.", ""]
  return "\n".join(lines)
