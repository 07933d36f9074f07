"""`performance`: the Music Transformer performance encoding, id-for-id Magenta's.

Events (Oore et al. 2018; Huang et al. 2018): NOTE_ON and NOTE_OFF for pitches 21..108,
TIME_SHIFT of 1..100 steps of 10 ms, VELOCITY in 32 bins. With PAD=0 and EOS=1 first this is
the 310-id vocabulary of Magenta's ``MidiPerformanceEncoder`` (MAESTRO): ids 0..309 equal
``PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100, min_pitch=21,
max_pitch=108).encode_event(e) + 2`` for the events of
``Performance(quantize_note_sequence_absolute(ns, 100), num_velocity_bins=32)``.

One stream for all instruments: drum vs pitched is not in the tokens (the dataset records it;
pass ``is_drum=True`` to decode drums).
"""
from __future__ import annotations

import collections
import math
from typing import Optional

import numpy as np

from midijax.encoding.base import Decoder, Encoding, event_stream, stream_length
from midijax.notes import Notes


def quantize_steps(seconds: np.ndarray, steps_per_second: int) -> np.ndarray:
  """note-seq's quantize_to_step: floor(seconds * steps_per_second + 0.5)."""
  return np.floor(np.asarray(seconds, np.float64) * steps_per_second + 0.5).astype(np.int64)


class PerformanceEncoding(Encoding):
  name = "performance"
  description = "Music Transformer / Magenta performance events (MAESTRO)"
  keeps = "onsets and offsets at 10 ms, velocity in 32 bins, pitches 21-108; one instrument"

  def __init__(self, num_velocity_bins: int = 32, steps_per_second: int = 100,
               max_shift_steps: int = 100, min_pitch: int = 21, max_pitch: int = 108):
    self.num_velocity_bins = num_velocity_bins
    self.steps_per_second = steps_per_second
    self.max_shift_steps = max_shift_steps
    self.min_pitch, self.max_pitch = min_pitch, max_pitch
    self.num_pitches = max_pitch - min_pitch + 1
    super().__init__(num_velocity_bins=num_velocity_bins, steps_per_second=steps_per_second,
                     max_shift_steps=max_shift_steps, min_pitch=min_pitch, max_pitch=max_pitch)
    self.note_on_base = self.body_offset
    self.note_off_base = self.note_on_base + self.num_pitches
    self.shift_base = self.note_off_base + self.num_pitches
    self.velocity_base = self.shift_base + max_shift_steps
    self.velocity_bin_size = math.ceil(127 / num_velocity_bins)

  def step_seconds(self, qpm: float = 120.0) -> float:
    """Seconds one time step lasts (whatever the tempo)."""
    return 1.0 / self.steps_per_second

  def time_steps(self, seconds, notes=None) -> np.ndarray:
    """int64 time steps of `seconds`, rounded as note-seq rounds them."""
    return quantize_steps(seconds, self.steps_per_second)

  def event_tokens(self):
    p = range(self.min_pitch, self.max_pitch + 1)
    yield from (f"NOTE_ON_{i}" for i in p)
    yield from (f"NOTE_OFF_{i}" for i in p)
    yield from (f"TIME_SHIFT_{i}" for i in range(1, self.max_shift_steps + 1))
    yield from (f"VELOCITY_{i}" for i in range(1, self.num_velocity_bins + 1))

  def velocity_bin(self, velocity: np.ndarray) -> np.ndarray:
    return (np.asarray(velocity, np.int64) - 1) // self.velocity_bin_size + 1

  def _events(self, notes: Notes):
    """(steps, event ids, velocity ids or -1) of the note-ons and note-offs, in stream order."""
    inr = (notes.pitch >= self.min_pitch) & (notes.pitch <= self.max_pitch)
    if not inr.all():  # Magenta raises on such notes; we drop them.
      notes = notes.select(inr)
    n = len(notes)
    # Magenta: notes sorted (stably) by (start_time, pitch), then onsets/offsets sorted by
    # (quantized step, note index, is_offset).
    order = np.lexsort((notes.pitch, notes.start))
    start = quantize_steps(notes.start[order], self.steps_per_second)
    end = quantize_steps(notes.end[order], self.steps_per_second)
    end = np.where(end == start, end + 1, end)
    pitch = notes.pitch[order].astype(np.int64) - self.min_pitch
    idx = np.arange(n)
    steps = np.concatenate([start, end])
    is_off = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    ev = np.lexsort((is_off, np.concatenate([idx, idx]), steps))
    pitch2 = np.concatenate([pitch, pitch])[ev]
    is_off = is_off[ev]
    event_ids = np.where(is_off == 1, self.note_off_base, self.note_on_base) + pitch2
    vbin = self.velocity_bin(notes.velocity[order])
    vel_ids = np.where(is_off == 1, -1, self.velocity_base - 1 + np.concatenate([vbin, vbin])[ev])
    return steps[ev], event_ids, vel_ids

  def _count(self, notes: Notes) -> int:
    steps, event_ids, vel_ids = self._events(notes)
    n_shift, need_vel = stream_length(steps, vel_ids, self.max_shift_steps)
    return int(n_shift.sum() + need_vel.sum() + len(steps))

  def _encode(self, notes: Notes, max_tokens: Optional[int]) -> np.ndarray:
    steps, event_ids, vel_ids = self._events(notes)
    return event_stream(steps, event_ids, vel_ids, self.shift_base, self.max_shift_steps,
                        max_tokens, self.name)

  def decoder(self, is_drum: bool = False, program: int = 0, qpm: float = 120.0,
              max_seconds: Optional[float] = None, **unused) -> "PerformanceDecoder":
    return PerformanceDecoder(self, is_drum, program, qpm, max_seconds)


class PerformanceDecoder(Decoder):
  """Performance ids -> notes: a note sounds from its NOTE_ON to the next NOTE_OFF of its
  pitch (first in, first out); notes never switched off end at the last step."""

  def __init__(self, enc: PerformanceEncoding, is_drum: bool, program: int, qpm: float,
               max_seconds: Optional[float]):
    super().__init__(max_seconds)
    self.enc, self.is_drum, self.program, self.qpm = enc, is_drum, program, qpm
    self.step, self.velocity = 0, 100
    self.open_notes = collections.defaultdict(collections.deque)  # pitch -> (step, velocity)
    self.rows = []  # (pitch, velocity, start step, end step)
    self.max_step = None if max_seconds is None else math.floor(
        max_seconds * enc.steps_per_second)

  @property
  def num_notes(self) -> int:
    return len(self.rows)

  def feed(self, ids) -> None:
    enc, max_step = self.enc, self.max_step
    step, velocity, open_notes, rows = self.step, self.velocity, self.open_notes, self.rows
    try:
      for k, i in enumerate(np.asarray(ids).tolist()):
        if i >= enc.velocity_base:
          velocity = 1 + (i - enc.velocity_base) * enc.velocity_bin_size
        elif i >= enc.shift_base:
          step += i - enc.shift_base + 1
        elif i >= enc.note_off_base:
          p = i - enc.note_off_base + enc.min_pitch
          q = open_notes.get(p)
          if q:
            s, v = q.popleft()
            if step > s:
              if max_step is not None and step > max_step:
                self._check_end(step / enc.steps_per_second, k)
              rows.append((p, v, s, step))
        else:
          p = i - enc.note_on_base + enc.min_pitch
          if max_step is not None and step + 1 > max_step:
            self._check_end((step + 1) / enc.steps_per_second, k)
          open_notes[p].append((step, velocity))
    finally:
      self.step, self.velocity = step, velocity

  def notes(self) -> Notes:
    out = list(self.rows)
    for p, q in self.open_notes.items():  # Notes never switched off end at the last step.
      for s, v in q:
        out.append((p, v, s, max(self.step, s + 1)))
    if self.max_step is not None and out and max(r[3] for r in out) > self.max_step:
      self._check_end(max(r[3] for r in out) / self.enc.steps_per_second, -1)
    out.sort(key=lambda r: (r[2], r[0]))
    a = np.array(out, np.int64).reshape(-1, 4)
    sec = 1.0 / self.enc.steps_per_second
    return Notes.from_arrays(a[:, 0], a[:, 2] * sec, a[:, 3] * sec, a[:, 1],
                             is_drum=self.is_drum, program=self.program, qpm=self.qpm)
