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

import math
import re
from typing import Optional

import numpy as np

from midijax.encoding.base import (Decoder, Encoding, TimeLimitError, TokenLimitError,
                                   quote_token)
from midijax.errors import TokenError
from midijax.notes import MAX_SECONDS, MAX_TICK, MAX_TOKENS, Notes

# A course-text line: the kind and a number of ASCII digits (at most 12: more is refused).
_LINE = re.compile(r"(POSITION|NOTE_ON|DURATION)_([0-9]{1,12})")
_KIND = re.compile(r"(POSITION|NOTE_ON|DURATION)_")
COURSE_ORDER = ("POSITION", "NOTE_ON", "DURATION")


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

  def notes_to_text(self, notes: Notes, *, max_tokens: Optional[int] = MAX_TOKENS,
                    max_seconds: Optional[float] = MAX_SECONDS) -> str:
    """Course text: three lines a note (limits as for `encode`)."""
    on, dur, pitch = self.course_rows(notes, max_tokens=max_tokens, max_seconds=max_seconds)
    return "".join(f"POSITION_{a}\nNOTE_ON_{p}\nDURATION_{d}\n" for a, p, d in zip(
        on.tolist(), pitch.tolist(), dur.tolist()))

  def course_rows(self, notes: Notes, *, max_tokens: Optional[int] = MAX_TOKENS,
                  max_seconds: Optional[float] = MAX_SECONDS):
    """`note_ticks` after the checks of `encode`: (onset ticks, duration ticks, pitch)."""
    notes = self._checked(notes, max_seconds)
    if max_tokens is not None and 3 * len(notes) > max_tokens:
      raise TokenLimitError(3 * len(notes), max_tokens, self.name)
    return self.note_ticks(notes)

  def course_parser(self, *, lenient: bool = False, qpm: float = 120.0,
                    ticks_per_quarter: int = 480,
                    max_seconds: Optional[float] = None) -> "CourseText":
    """A `CourseText` reader of POSITION / NOTE_ON / DURATION lines."""
    return CourseText(lenient=lenient, qpm=qpm, ticks_per_quarter=ticks_per_quarter,
                      max_seconds=max_seconds)

  def parse_text(self, text: str, lenient: bool = False, stats=None):
    """Course text -> (onset ticks, pitch, duration ticks) arrays. Bad lines raise TokenError
    naming the line, or with `lenient` are skipped (counted in stats['skipped'])."""
    parser = self.course_parser(lenient=lenient)
    for lineno, line in enumerate(text.splitlines(), 1):
      parser.feed(line.strip(), lineno)
    if stats is not None:
      stats["skipped"] = parser.skipped_total
    a = parser.rows()
    return a[:, 0], a[:, 1], a[:, 2]

  def text_to_notes(self, text: str, lenient: bool = False, stats=None, qpm: float = 120.0,
                    ticks_per_quarter: int = 480, is_drum: bool = False, **unused) -> Notes:
    parser = self.course_parser(lenient=lenient, qpm=qpm, ticks_per_quarter=ticks_per_quarter)
    for lineno, line in enumerate(text.splitlines(), 1):
      parser.feed(line.strip(), lineno)
    if stats is not None:
      stats["skipped"] = parser.skipped_total
    return parser.notes(self.velocity, is_drum=is_drum)

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
  def _count(self, notes: Notes) -> int:
    return 3 * len(notes)

  def _encode(self, notes: Notes, max_tokens: Optional[int]) -> np.ndarray:
    if max_tokens is not None and 3 * len(notes) > max_tokens:
      raise TokenLimitError(3 * len(notes), max_tokens, self.name)
    if len(notes) == 0:
      return np.zeros(0, np.int32)
    on, dur, pitch = self.note_ticks(notes)
    scale = self.steps_per_quarter / notes.ticks_per_quarter
    q_on = np.rint(on * scale).astype(np.int64)
    q_dur = np.clip(np.rint(dur * scale).astype(np.int64), 1, self.max_duration_steps)
    delta = np.clip(np.diff(q_on, prepend=0), 0, self.max_position_steps)
    out = np.stack([self.pos_base + delta, self.pitch_base + pitch, self.dur_base + q_dur - 1], 1)
    return out.reshape(-1).astype(np.int32)

  def decoder(self, qpm: float = 120.0, ticks_per_quarter: int = 480, is_drum: bool = False,
              max_seconds: Optional[float] = None, **unused) -> "TriplesDecoder":
    return TriplesDecoder(self, qpm, ticks_per_quarter, is_drum, max_seconds)


class TriplesDecoder(Decoder):
  """Triples ids -> notes: reads POS, NOTE_ON, DUR in order; a token out of that order drops
  the partial note."""

  def __init__(self, enc: TriplesEncoding, qpm: float, ticks_per_quarter: int, is_drum: bool,
               max_seconds: Optional[float]):
    super().__init__(max_seconds)
    self.enc, self.qpm, self.tpq, self.is_drum = enc, qpm, ticks_per_quarter, is_drum
    self.rows, self.state, self.step, self.cur = [], 0, 0, []
    self.sec = 60.0 / (qpm * enc.steps_per_quarter)  # seconds per grid step

  @property
  def num_notes(self) -> int:
    return len(self.rows)

  def feed(self, ids) -> None:
    enc, rows = self.enc, self.rows
    state, step, cur = self.state, self.step, self.cur
    limit = None if self.max_seconds is None else self.max_seconds / self.sec
    try:
      for k, i in enumerate(np.asarray(ids).tolist()):
        kind = 0 if i < enc.pitch_base else (1 if i < enc.dur_base else 2)
        if kind != state:
          state, cur = 0, []
          if kind != 0:
            continue
        if kind == 0:
          step += i - enc.pos_base
          cur = [step]
        elif kind == 1:
          cur.append(i - enc.pitch_base)
        else:
          dur = i - enc.dur_base + 1
          if limit is not None and cur[0] + dur > limit:
            self._check_end((cur[0] + dur) * self.sec, k)
          rows.append((cur[0], cur[1], dur))
        state = (state + 1) % 3
    finally:
      self.state, self.step, self.cur = state, step, cur

  def notes(self) -> Notes:
    a = np.array(self.rows, np.int64).reshape(-1, 3)
    return Notes.from_arrays(a[:, 1], a[:, 0] * self.sec, (a[:, 0] + a[:, 2]) * self.sec,
                             self.enc.velocity, is_drum=self.is_drum, qpm=self.qpm,
                             ticks_per_quarter=self.tpq)


class CourseText:
  """Reads course text (POSITION_<tick>, NOTE_ON_<pitch>, DURATION_<ticks>) a line at a time.

  `feed(token, lineno)` each line (blank lines and '#' comments are ignored). A line that
  breaks the grammar, a pitch past 127, a duration of 0, or a note ending past tick MAX_TICK
  (MIDI's 28-bit delta limit) raises TokenError naming the line, or with `lenient` is
  skipped (`skipped` counts it) and drops the partial note. A note ending past
  `max_seconds` (at `qpm` and `ticks_per_quarter`) raises TimeLimitError.
  """

  def __init__(self, *, lenient: bool = False, qpm: float = 120.0,
               ticks_per_quarter: int = 480, max_seconds: Optional[float] = None):
    if not (math.isfinite(qpm) and qpm > 0) or int(ticks_per_quarter) < 1:
      raise TokenError(f"bad tempo or resolution (qpm={qpm}, ticks_per_quarter="
                       f"{ticks_per_quarter})")
    self.lenient, self.qpm, self.tpq = lenient, float(qpm), int(ticks_per_quarter)
    self.max_seconds = max_seconds
    self.sec = 60.0 / (self.qpm * self.tpq)  # seconds per tick
    self._rows, self.cur, self.skipped = [], [], 0

  @property
  def num_notes(self) -> int:
    return len(self._rows)

  @property
  def skipped_total(self) -> int:
    """Lines skipped, plus one for a note left unfinished at the end."""
    return self.skipped + (1 if self.cur else 0)

  def feed(self, tok: str, lineno: int) -> None:
    if not tok or tok.startswith("#"):
      return
    want = COURSE_ORDER[len(self.cur)]
    problem = self._problem(tok, want)
    if problem is not None:
      if not self.lenient:
        raise TokenError(f"line {lineno}: {problem}")
      self.skipped += 1
      self.cur = []
      return
    self.cur.append(int(tok[len(want) + 1:]))
    if len(self.cur) == 3:
      on, pitch, dur = self.cur
      self.cur = []
      if self.max_seconds is not None and (on + dur) * self.sec > self.max_seconds:
        raise TimeLimitError((on + dur) * self.sec, self.max_seconds, lineno=lineno)
      self._rows.append((on, pitch, dur))

  def _problem(self, tok: str, want: str) -> Optional[str]:
    """Why `tok` cannot come next (`want` is the kind expected), or None."""
    m = _LINE.fullmatch(tok)
    if m is None or m.group(1) != want:
      kind = _KIND.match(tok)
      if kind and kind.group(1) == want:
        return f"{quote_token(tok)}: {want}_ needs a whole number of at most 12 digits"
      return (f"{quote_token(tok)} is not a valid {want}_<n> token (triples are "
              "POSITION_<tick>, NOTE_ON_<0-127>, DURATION_<ticks>, in that order)")
    v = int(m.group(2))
    if want == "NOTE_ON" and v > 127:
      return f"{quote_token(tok)}: pitches go from 0 to 127"
    if want == "DURATION" and v == 0:
      return f"{quote_token(tok)}: a duration is at least 1 tick"
    start = self.cur[0] if want == "DURATION" else 0
    if start + v > MAX_TICK:
      what = "position" if want == "POSITION" else f"note's end (tick {start + v})"
      return (f"{quote_token(tok)}: the {what} is past tick {MAX_TICK}, the most a MIDI file can "
              "hold")
    return None

  def rows(self) -> np.ndarray:
    """int64 [n, 3]: (onset tick, pitch, duration ticks) of the notes read."""
    return np.array(self._rows, np.int64).reshape(-1, 3)

  def notes(self, velocity: int = 100, is_drum: bool = False) -> Notes:
    a = self.rows()
    return Notes.from_arrays(a[:, 1], a[:, 0] * self.sec, (a[:, 0] + a[:, 2]) * self.sec,
                             velocity, is_drum=is_drum, qpm=self.qpm,
                             ticks_per_quarter=self.tpq)
