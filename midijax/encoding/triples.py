"""`triples`: the course project's POSITION / NOTE_ON / DURATION format.

Text form (what `midijax midi2tokens --encoding triples` writes and the course project read):
each note is three lines, ``POSITION_<tick>`` (absolute onset, MIDI ticks at the file's
resolution, e.g. 480 per quarter), ``NOTE_ON_<pitch>``, ``DURATION_<ticks>``, notes ordered by
onset then pitch. The text keeps onsets and durations exactly (to the tick); it has no
velocity (decoded as `velocity`) and no drum flag (a header comment records it).

Ids (what models train on) need a bounded vocabulary, so positions become TIME DELTAS from the
previous note's onset and both are quantized to a grid of `steps_per_quarter` steps per
quarter note (default 24: 16ths, 32nds and triplets land exactly):
``POS_<k>`` (k = 0..max_position_steps, delta in grid steps), ``NOTE_ON_<p>`` (0..127),
``DUR_<k>`` (k = 1..max_duration_steps). Deltas/durations past the maximum are clipped
(default 16 and 8 quarter notes). Deltas keep the vocabulary small and the model
translation-invariant in time; the grid keeps ids independent of the file's resolution.
"""
from __future__ import annotations

import re

import numpy as np

from midijax.encoding.base import Encoding
from midijax.errors import TokenError
from midijax.notes import Notes

_LINE = re.compile(r"^(POSITION|NOTE_ON|DURATION)_(-?\d+)$")


def seconds_to_ticks(seconds, tempos: np.ndarray, ticks_per_quarter: int) -> np.ndarray:
  """Seconds -> (fractional) MIDI ticks through a tempo map of (time s, qpm) rows."""
  t0, qpm = tempos[:, 0], tempos[:, 1]
  rate = qpm * ticks_per_quarter / 60.0  # ticks per second in each segment
  seg_tick = np.concatenate([[0.0], np.cumsum(np.diff(t0) * rate[:-1])])
  s = np.asarray(seconds, np.float64)
  i = np.clip(np.searchsorted(t0, s, side="right") - 1, 0, len(t0) - 1)
  return seg_tick[i] + (s - t0[i]) * rate[i]


class TriplesEncoding(Encoding):
  name = "triples"
  description = "course project's POSITION / NOTE_ON / DURATION triples"

  def __init__(self, steps_per_quarter: int = 24, max_position_steps: int = 384,
               max_duration_steps: int = 192, velocity: int = 100):
    self.steps_per_quarter = steps_per_quarter
    self.max_position_steps = max_position_steps
    self.max_duration_steps = max_duration_steps
    self.velocity = velocity
    self.keeps = (f"onset/duration on a 1/{steps_per_quarter}-quarter grid (text: exact ticks), "
                  "pitch; no velocity")
    super().__init__(steps_per_quarter=steps_per_quarter, max_position_steps=max_position_steps,
                     max_duration_steps=max_duration_steps, velocity=velocity)
    self.pos_base = self.body_offset
    self.pitch_base = self.pos_base + max_position_steps + 1
    self.dur_base = self.pitch_base + 128  # DUR_k has id dur_base + k - 1

  def event_tokens(self):
    yield from (f"POS_{k}" for k in range(self.max_position_steps + 1))
    yield from (f"NOTE_ON_{p}" for p in range(128))
    yield from (f"DUR_{k}" for k in range(1, self.max_duration_steps + 1))

  # -- exact ticks (text) ---------------------------------------------------------------------
  def note_ticks(self, notes: Notes):
    """(onset ticks, duration ticks, pitch) int arrays ordered by (onset, pitch)."""
    tpq = notes.ticks_per_quarter
    on = np.rint(seconds_to_ticks(notes.start, notes.tempos, tpq)).astype(np.int64)
    off = np.rint(seconds_to_ticks(notes.end, notes.tempos, tpq)).astype(np.int64)
    order = np.lexsort((notes.pitch, on))
    return on[order], np.maximum(off - on, 1)[order], notes.pitch[order].astype(np.int64)

  def notes_to_text(self, notes: Notes) -> str:
    on, dur, pitch = self.note_ticks(notes)
    return "".join(f"POSITION_{a}\nNOTE_ON_{p}\nDURATION_{d}\n" for a, p, d in zip(
        on.tolist(), pitch.tolist(), dur.tolist()))

  def parse_text(self, text: str, lenient: bool = False, stats=None):
    """Course text -> (onset ticks, pitch, duration ticks) arrays. Bad lines raise TokenError
    naming the line, or with `lenient` are skipped (counted in stats['skipped'])."""
    rows, cur, skipped = [], {}, 0
    expect = ("POSITION", "NOTE_ON", "DURATION")
    for lineno, line in enumerate(text.splitlines(), 1):
      tok = line.strip()
      if not tok or tok.startswith("#"):
        continue
      m = _LINE.match(tok)
      kind = m.group(1) if m else None
      ok = m is not None and kind == expect[len(cur)]
      if ok:
        v = int(m.group(2))
        ok = (v >= 0) and (kind != "NOTE_ON" or v <= 127) and (kind != "DURATION" or v > 0)
      if not ok:
        if not lenient:
          want = expect[len(cur)]
          raise TokenError(f"line {lineno}: {tok!r} is not a valid {want}_<n> token "
                           "(triples are POSITION_<tick>, NOTE_ON_<0-127>, DURATION_<ticks>)")
        skipped += 1
        cur = {}
        continue
      cur[kind] = v
      if len(cur) == 3:
        rows.append((cur["POSITION"], cur["NOTE_ON"], cur["DURATION"]))
        cur = {}
    if stats is not None:
      stats["skipped"] = skipped + (1 if cur else 0)
    a = np.array(rows, np.int64).reshape(-1, 3)
    return a[:, 0], a[:, 1], a[:, 2]

  def text_to_notes(self, text: str, lenient: bool = False, stats=None, qpm: float = 120.0,
                    ticks_per_quarter: int = 480, is_drum: bool = False, **unused) -> Notes:
    on, pitch, dur = self.parse_text(text, lenient, stats)
    sec = 60.0 / (qpm * ticks_per_quarter)
    return Notes.from_arrays(pitch, on * sec, (on + dur) * sec, self.velocity, is_drum=is_drum,
                             qpm=qpm, ticks_per_quarter=ticks_per_quarter)

  def from_text(self, text: str, lenient: bool = False, stats=None,
                ticks_per_quarter: int = 480) -> np.ndarray:
    """Course text (or vocabulary names / ids, one a line) -> ids."""
    if "POSITION_" in text:
      notes = self.text_to_notes(text, lenient, stats, ticks_per_quarter=ticks_per_quarter)
      return self.encode(notes)
    return super().from_text(text, lenient, stats)

  def to_text(self, ids, ticks_per_quarter: int = 480) -> str:
    """ids -> course text (absolute ticks at `ticks_per_quarter`)."""
    return self.notes_to_text(self.decode_notes(ids, ticks_per_quarter=ticks_per_quarter))

  # -- ids ------------------------------------------------------------------------------------
  def _encode(self, notes: Notes) -> np.ndarray:
    if len(notes) == 0:
      return np.zeros(0, np.int32)
    on, dur, pitch = self.note_ticks(notes)
    scale = self.steps_per_quarter / notes.ticks_per_quarter
    q_on = np.rint(on * scale).astype(np.int64)
    q_dur = np.clip(np.rint(dur * scale).astype(np.int64), 1, self.max_duration_steps)
    delta = np.clip(np.diff(q_on, prepend=0), 0, self.max_position_steps)
    out = np.stack([self.pos_base + delta, self.pitch_base + pitch, self.dur_base + q_dur - 1], 1)
    return out.reshape(-1).astype(np.int32)

  def _decode(self, ids: np.ndarray, qpm: float = 120.0, ticks_per_quarter: int = 480,
              is_drum: bool = False, **unused) -> Notes:
    """Reads POS, NOTE_ON, DUR in order; a token out of that order drops the partial note."""
    rows, state, step, cur = [], 0, 0, []
    for i in ids.tolist():
      kind = 0 if i < self.pitch_base else (1 if i < self.dur_base else 2)
      if kind != state:
        state, cur = 0, []
        if kind != 0:
          continue
      if kind == 0:
        step += i - self.pos_base
        cur = [step]
      elif kind == 1:
        cur.append(i - self.pitch_base)
      else:
        rows.append((cur[0], cur[1], i - self.dur_base + 1))
      state = (state + 1) % 3
    a = np.array(rows, np.int64).reshape(-1, 3)
    sec = 60.0 / (qpm * self.steps_per_quarter)
    return Notes.from_arrays(a[:, 1], a[:, 0] * sec, (a[:, 0] + a[:, 2]) * sec, self.velocity,
                             is_drum=is_drum, qpm=qpm, ticks_per_quarter=ticks_per_quarter)
