"""`drums`: drum hits for Groove MIDI Dataset performances, keeping the drummer's microtiming.

Events: DRUM_<x> hits (no note-offs: a drum hit has no meaningful length), VELOCITY in 32
bins, TIME_SHIFT of 1..100 steps. `x` is one of GrooVAE's 9 classes (``pitch_map="groovae"``,
default; see drum_map.py) or any MIDI pitch 0..127 (``pitch_map="none"``). Pitched
(non-drum) notes are ignored. Decoded hits last `hit_seconds` and are written on the drum
channel.

Time is counted in one of three units (`time_unit`):

* ``"seconds"`` (default): steps of 10 ms (`steps_per_second`), Magenta's performance
  clock. Timing is kept to 10 ms, not snapped to a grid; where the beat falls depends on
  the tempo, which the model has to infer from the hits.
* ``"beats"``: steps of 1/`steps_per_quarter` quarter note (default 48: 12 steps a 16th,
  10.4 ms at 120 bpm) through the file's tempo map. Microtiming is kept as a fraction of
  the beat and the beat grid is exact at any tempo: a bar of 4/4 is always 192 steps, so
  the model can keep its place in the bar over long continuations. Decoding needs the
  tempo (`qpm`), as MIDI files and the Groove metadata give it. Tempo-invariant, so time
  stretching is not an augmentation for it.
* ``"grid"``: TIME_SHIFT counts 16th notes (1/`grid_per_quarter` quarter note) and each
  hit's microtiming is an OFFSET_<k> token: k steps of 1/`steps_per_quarter` quarter note
  from its nearest grid point (k in [-6, 5] for 16ths at 48 steps a quarter; negative =
  ahead of the beat), as GrooVAE splits a performance into a grid score and its offsets.
  An offset stays in force until the next OFFSET token, as a velocity does. With time
  shifts in beats, a model keeps its place in the bar only if it sums every shift without
  error, and a shift too short or too long moves all that follows off the grid; with grid
  shifts, microtiming never accumulates. Decoding needs the tempo, as for "beats".

With ``bar_tokens=True`` (time in beats only), a BAR token marks every bar line of the
file's first meter, time shifts split there, so the position in the bar is the sum of
the shifts since the last BAR rather than since the piece began (REMI's bar events,
Huang & Yang 2020). BAR takes no time: decoding skips it.

With ``velocity_after=True`` (not with time_unit="grid"), each hit is written as its DRUM
token followed by its own VELOCITY token, [shifts..., DRUM, VELOCITY], instead of a
velocity change in force before the hit. A model then predicts a hit's loudness knowing
which drum it is (a ghost note on the snare, an accent on the hi-hat) rather than before
choosing the drum. Decoding gives each hit the VELOCITY right after it (a hit with none,
as at the end of a cut stream, keeps the velocity in force).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from midijax.encoding import drum_map
from midijax.encoding.base import (Decoder, Encoding, TokenLimitError, event_stream,
                                   stream_length)
from midijax.encoding.performance import quantize_steps
from midijax.encoding.triples import seconds_to_ticks
from midijax.notes import Notes

TIME_UNITS = ("seconds", "beats", "grid")


class DrumsEncoding(Encoding):
  name = "drums"
  description = "drum hits with 10 ms microtiming (Groove MIDI Dataset)"

  def __init__(self, pitch_map: str = "groovae", num_velocity_bins: int = 32,
               steps_per_second: int = 100, max_shift_steps: int = 100,
               hit_seconds: float = 0.1, time_unit: str = "seconds",
               steps_per_quarter: int = 48, grid_per_quarter: int = 4,
               bar_tokens: bool = False, velocity_after: bool = False):
    if pitch_map not in ("groovae", "none"):
      raise ValueError(f"pitch_map must be 'groovae' or 'none', got {pitch_map!r}")
    if time_unit not in TIME_UNITS:
      raise ValueError(f"time_unit must be one of {', '.join(TIME_UNITS)}, got {time_unit!r}")
    if int(steps_per_quarter) < 1 or int(steps_per_second) < 1:
      raise ValueError("steps_per_quarter and steps_per_second must be >= 1")
    if int(grid_per_quarter) < 1 or int(steps_per_quarter) % int(grid_per_quarter):
      raise ValueError(f"grid_per_quarter must divide steps_per_quarter "
                       f"({steps_per_quarter}), got {grid_per_quarter}")
    if bar_tokens and time_unit != "beats":
      raise ValueError(f"bar_tokens needs time_unit='beats', not {time_unit!r}")
    if velocity_after and time_unit == "grid":
      raise ValueError("velocity_after needs time_unit 'seconds' or 'beats', not 'grid'")
    self.bar_tokens = bool(bar_tokens)
    self.velocity_after = bool(velocity_after)
    self.time_unit = time_unit
    self.steps_per_quarter = int(steps_per_quarter)
    self.grid_per_quarter = int(grid_per_quarter)
    # Grid mode: offset steps per grid step; offsets run from -half to sub - half - 1.
    self.sub_steps = self.steps_per_quarter // self.grid_per_quarter
    self.num_offsets = self.sub_steps if time_unit == "grid" else 0
    self.pitch_map = pitch_map
    self.num_velocity_bins = num_velocity_bins
    self.steps_per_second = steps_per_second
    self.max_shift_steps = max_shift_steps
    self.hit_seconds = hit_seconds
    self.num_drums = 9 if pitch_map == "groovae" else 128
    clock = {"seconds": "10 ms", "beats": f"1/{self.steps_per_quarter} quarter note",
             "grid": f"1/{4 * self.grid_per_quarter} notes plus offsets of "
                     f"1/{self.steps_per_quarter} quarter note"}[time_unit]
    self.keeps = ("drum hits at %s, velocity in %d bins, %s" %
                  (clock, num_velocity_bins, "GrooVAE's 9 drum classes"
                   if pitch_map == "groovae" else "all 128 drum pitches"))
    # Options at their defaults stay out of the config, so vocabularies written before
    # `time_unit` existed load unchanged.
    beats = {"time_unit": time_unit, "steps_per_quarter": self.steps_per_quarter}
    if time_unit == "grid":
      beats["grid_per_quarter"] = self.grid_per_quarter
    if self.bar_tokens:
      beats["bar_tokens"] = True
    extra = dict(beats) if time_unit != "seconds" else {}
    if self.velocity_after:
      extra["velocity_after"] = True
    super().__init__(pitch_map=pitch_map, num_velocity_bins=num_velocity_bins,
                     steps_per_second=steps_per_second, max_shift_steps=max_shift_steps,
                     hit_seconds=hit_seconds, **extra)
    self.drum_base = self.body_offset
    self.shift_base = self.drum_base + self.num_drums
    self.velocity_base = self.shift_base + max_shift_steps
    self.velocity_bin_size = int(np.ceil(127 / num_velocity_bins))
    self.offset_base = self.velocity_base + num_velocity_bins  # OFFSET_<lowest> (grid)
    self.min_offset = -(self.sub_steps // 2)
    self.bar_id = self.offset_base + self.num_offsets if self.bar_tokens else -1

  def event_tokens(self):
    if self.pitch_map == "groovae":
      yield from (f"DRUM_{n}" for n in drum_map.GROOVAE_CLASS_NAMES)
    else:
      yield from (f"DRUM_{p}" for p in range(128))
    yield from (f"TIME_SHIFT_{i}" for i in range(1, self.max_shift_steps + 1))
    yield from (f"VELOCITY_{i}" for i in range(1, self.num_velocity_bins + 1))
    lo = -(self.sub_steps // 2)
    yield from (f"OFFSET_{k}" for k in range(lo, lo + self.num_offsets))
    if self.bar_tokens:
      yield "BAR"

  def bar_clock(self) -> Optional[np.ndarray]:
    if not self.bar_tokens:
      return None
    clock = np.zeros(self.vocab_size, np.int32)
    clock[self.shift_base:self.velocity_base] = np.arange(1, self.max_shift_steps + 1)
    clock[self.bar_id] = -1
    return clock

  def echo_tables(self) -> Optional[dict]:
    if not self.bar_tokens or self.velocity_after:
      return None
    classes = np.full(self.vocab_size, -1, np.int32)
    classes[self.drum_base:self.shift_base] = np.arange(self.num_drums)
    velocities = np.full(self.vocab_size, -1.0, np.float32)
    velocities[self.velocity_base:self.offset_base] = (
        np.arange(1, self.num_velocity_bins + 1) / self.num_velocity_bins)
    return {"classes": classes, "velocities": velocities, "cell": self.steps_per_quarter // 4}

  def step_seconds(self, qpm: float = 120.0) -> float:
    """Seconds one time step (one TIME_SHIFT_1) lasts, at `qpm` unless time is in seconds."""
    if self.time_unit == "beats":
      return 60.0 / (float(qpm) * self.steps_per_quarter)
    if self.time_unit == "grid":
      return 60.0 / (float(qpm) * self.grid_per_quarter)
    return 1.0 / self.steps_per_second

  def time_steps(self, seconds, notes: Notes) -> np.ndarray:
    """int64 time steps of `seconds` (times of `notes`' clock, rounded to the nearest;
    grid: the nearest grid point)."""
    if self.time_unit == "grid":
      return self._grid_and_offset(seconds, notes)[0]
    if self.time_unit == "beats":
      return self._fine_steps(seconds, notes)
    return quantize_steps(seconds, self.steps_per_second)

  def _grid_and_offset(self, seconds, notes: Notes):
    """(grid step, offset) int64 arrays: the nearest grid point of each time and the
    offset from it in 1/steps_per_quarter quarter notes, in [-sub/2, sub/2)."""
    fine = self._fine_steps(seconds, notes)
    grid = np.floor_divide(fine - self.min_offset, self.sub_steps)
    return grid, fine - grid * self.sub_steps

  def _fine_steps(self, seconds, notes: Notes) -> np.ndarray:
    tempos = np.asarray(notes.tempos, np.float64).reshape(-1, 2)
    if len(tempos) == 0:
      tempos = np.array([[0.0, 120.0]])
    tempos = tempos[np.argsort(tempos[:, 0], kind="stable")]
    tempos[0, 0] = 0.0  # the first tempo holds from time 0
    ticks = seconds_to_ticks(seconds, tempos, self.steps_per_quarter)
    return np.floor(ticks + 0.5).astype(np.int64)

  def drum_index(self, pitch: np.ndarray) -> np.ndarray:
    """Token offset of each pitch's drum (-1 when the pitch has no class)."""
    if self.pitch_map == "groovae":
      return drum_map.pitch_to_groovae_class(pitch)
    return np.asarray(pitch, np.int32)

  def _events(self, notes: Notes):
    """(steps, hit ids, velocity ids, offset ids or None) of the drum hits, in stream
    order (grid: ordered by grid step, then true time, then drum)."""
    notes = notes.select(notes.is_drum) if not notes.is_drum.all() else notes
    drum = self.drum_index(notes.pitch).astype(np.int64)
    ok = drum >= 0
    drum = drum[ok]
    vbin = (notes.velocity[ok].astype(np.int64) - 1) // self.velocity_bin_size + 1
    if self.time_unit == "grid":
      step, offset = self._grid_and_offset(notes.start[ok], notes)
      order = np.lexsort((drum, offset, step))
      off_ids = self.offset_base + offset[order] - self.min_offset
    else:
      step = self.time_steps(notes.start[ok], notes)
      order = np.lexsort((drum, step))
      off_ids = None
    step, hit_ids = step[order], self.drum_base + drum[order]
    vel_ids = self.velocity_base - 1 + vbin[order]
    if self.bar_tokens and len(step):
      # A BAR (no velocity) at each bar line up to the last hit, before the hits there.
      num, den = (notes.time_signatures[0, 1:3] if len(notes.time_signatures) else (4, 4))
      bar = max(int(round(float(num) * 4.0 / float(den) * self.steps_per_quarter)), 1)
      bars = np.arange(0, int(step[-1]) + 1, bar, dtype=np.int64)
      step = np.concatenate([bars, step])
      first = np.concatenate([np.zeros(len(bars), np.int64), np.ones(len(hit_ids), np.int64)])
      order = np.lexsort((first, step))  # stable: hits keep their order
      step = step[order]
      hit_ids = np.concatenate([np.full(len(bars), self.bar_id, np.int64), hit_ids])[order]
      vel_ids = np.concatenate([np.full(len(bars), -1, np.int64), vel_ids])[order]
    return step, hit_ids, vel_ids, off_ids

  def _offset_changes(self, off_ids: np.ndarray) -> np.ndarray:
    """int64 [E]: 1 where a hit needs an OFFSET token (its offset differs from the one in
    force; OFFSET_0 is in force at the start)."""
    prev = np.concatenate([[self.offset_base - self.min_offset], off_ids[:-1]])
    return (off_ids != prev).astype(np.int64)

  def _count(self, notes: Notes) -> int:
    steps, hit_ids, vel_ids, off_ids = self._events(notes)
    if self.velocity_after:
      n_shift, _ = stream_length(steps, np.full(len(steps), -1), self.max_shift_steps)
      return int(n_shift.sum() + 2 * len(steps) - (vel_ids < 0).sum())
    n_shift, need_vel = stream_length(steps, vel_ids, self.max_shift_steps)
    need_off = self._offset_changes(off_ids).sum() if off_ids is not None else 0
    return int(n_shift.sum() + need_vel.sum() + need_off + len(steps))

  def _encode(self, notes: Notes, max_tokens: Optional[int]) -> np.ndarray:
    steps, hit_ids, vel_ids, off_ids = self._events(notes)
    if self.velocity_after:
      return self._encode_velocity_after(steps, hit_ids, vel_ids, max_tokens)
    if off_ids is None:
      return event_stream(steps, hit_ids, vel_ids, self.shift_base, self.max_shift_steps,
                          max_tokens, self.name)
    # Grid: each hit is [shifts..., VELOCITY?, OFFSET?, DRUM]. The stream without offsets
    # is event_stream's; offsets go in front of the hits that change them.
    need_off = self._offset_changes(off_ids)
    if max_tokens is not None:
      n_shift, need_vel = stream_length(steps, vel_ids, self.max_shift_steps)
      total = int(n_shift.sum() + need_vel.sum() + need_off.sum() + len(steps))
      if total > max_tokens:
        raise TokenLimitError(total, max_tokens, self.name)
    base = event_stream(steps, hit_ids, vel_ids, self.shift_base, self.max_shift_steps,
                        None, self.name)
    hit_pos = np.flatnonzero(base < self.shift_base)  # the DRUM tokens, one per hit
    where = hit_pos[need_off.astype(bool)]
    return np.insert(base, where, off_ids[need_off.astype(bool)]).astype(np.int32)

  def _encode_velocity_after(self, steps, hit_ids, vel_ids, max_tokens):
    """[shifts..., DRUM, VELOCITY] per hit ([shifts..., BAR] per bar line)."""
    no_vel = np.full(len(steps), -1, np.int64)
    n_shift, _ = stream_length(steps, no_vel, self.max_shift_steps)
    has_vel = vel_ids >= 0  # hits; BAR has none
    if max_tokens is not None:
      total = int(n_shift.sum() + len(steps) + has_vel.sum())
      if total > max_tokens:
        raise TokenLimitError(total, max_tokens, self.name)
    base = event_stream(steps, hit_ids, no_vel, self.shift_base, self.max_shift_steps,
                        None, self.name)
    event_pos = np.cumsum(n_shift + 1) - 1  # each event's own token in `base`
    return np.insert(base, event_pos[has_vel] + 1, vel_ids[has_vel]).astype(np.int32)

  def decoder(self, qpm: float = 120.0, max_seconds: Optional[float] = None,
              **unused) -> "DrumsDecoder":
    return DrumsDecoder(self, qpm, max_seconds)


class DrumsDecoder(Decoder):
  """Drum ids -> hits of `hit_seconds` on the drum channel (vectorised per chunk)."""

  def __init__(self, enc: DrumsEncoding, qpm: float, max_seconds: Optional[float]):
    super().__init__(max_seconds)
    self.enc, self.qpm = enc, qpm
    self.step = 0  # time step after the ids fed so far
    self.velocity = 100  # the velocity in force after them
    self.offset = 0  # grid: the offset in force after them (steps_per_quarter units)
    self.owed = False  # velocity_after: the last hit fed still waits for its VELOCITY
    self.pitch, self.start, self.vel = [], [], []  # arrays, one per chunk

  @property
  def num_notes(self) -> int:
    return sum(len(p) for p in self.pitch)

  def feed(self, ids) -> None:
    enc = self.enc
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
      return
    is_shift = (ids >= enc.shift_base) & (ids < enc.velocity_base)
    step = self.step + np.cumsum(np.where(is_shift, ids - enc.shift_base + 1, 0))
    is_vel = (ids >= enc.velocity_base) & (ids < enc.offset_base)
    # Velocity in force at each position: the last VELOCITY token at or before it.
    last_vel = np.maximum.accumulate(np.where(is_vel, np.arange(len(ids)), -1))
    vel_bin = ids[np.maximum(last_vel, 0)] - enc.velocity_base
    velocity = np.where(last_vel >= 0, 1 + vel_bin * enc.velocity_bin_size, self.velocity)
    hit = np.flatnonzero(ids < enc.shift_base)
    hit_velocity = velocity[hit]
    if enc.velocity_after:
      # Each hit's own VELOCITY follows it, possibly at the start of the next chunk.
      if self.owed and is_vel[0]:
        self.vel[-1][-1] = velocity[0]
      self.owed = bool(len(hit)) and hit[-1] == len(ids) - 1
      nxt = np.minimum(hit + 1, len(ids) - 1)
      hit_velocity = np.where((hit + 1 < len(ids)) & is_vel[nxt], velocity[nxt], hit_velocity)
    start = step[hit] * enc.step_seconds(self.qpm)
    offset = np.full(len(ids), self.offset, np.int64)
    if enc.num_offsets:
      is_off = (ids >= enc.offset_base) & (ids < enc.offset_base + enc.num_offsets)
      last_off = np.maximum.accumulate(np.where(is_off, np.arange(len(ids)), -1))
      offset = np.where(last_off >= 0, ids[np.maximum(last_off, 0)] - enc.offset_base +
                        enc.min_offset, self.offset)
      # An offset ahead of the first grid point would fall before time 0.
      start = np.maximum(start + offset[hit] * 60.0 / (self.qpm * enc.steps_per_quarter), 0.0)
    if self.max_seconds is not None and len(hit):
      late = np.flatnonzero(start + enc.hit_seconds > self.max_seconds)
      if len(late):
        self._check_end(float(start[late[0]] + enc.hit_seconds), int(hit[late[0]]))
    d = ids[hit] - enc.drum_base
    self.pitch.append(drum_map.GROOVAE_CANONICAL_PITCH[d] if enc.pitch_map == "groovae" else d)
    self.start.append(start)
    self.vel.append(hit_velocity)
    self.step, self.velocity, self.offset = int(step[-1]), int(velocity[-1]), int(offset[-1])

  def notes(self) -> Notes:
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    start = cat(self.start, np.float64)
    return Notes.from_arrays(cat(self.pitch, np.int32), start, start + self.enc.hit_seconds,
                             cat(self.vel, np.int32), is_drum=True, qpm=self.qpm)
