"""`Notes`: the columnar note list that flows between midijax's stages.

A MIDI file is read once into `Notes` (numpy columns, times in float64 seconds), encodings
turn `Notes` into token ids with vectorised numpy, and decodings return a note-seq
`NoteSequence` (the format note-seq writes to MIDI). `Notes.from_note_sequence` and
`Notes.to_note_sequence` convert between the two without loss.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# Re-exported: the limits `time_problem` checks, and readers and encoders (midijax/limits.py).
from midijax.limits import MAX_SECONDS, MAX_TICK, MAX_TOKENS  # pylint: disable=unused-import

DEFAULT_QPM = 120.0


@dataclasses.dataclass
class Notes:
  """Notes and the control changes and tempo/meter maps that go with them.

  Note columns (length n): `pitch`, `velocity` (1..127), `start`/`end` (seconds, float64),
  `program` (0..127), `is_drum`, `instrument` (index of the source track/instrument).
  Control-change columns (length m): `cc_time` (seconds), `cc_number`, `cc_value`,
  `cc_instrument`, `cc_program`, `cc_is_drum`.
  `tempos`: float64[k, 2] rows of (time seconds, quarter notes per minute).
  `time_signatures`: float64[j, 3] rows of (time seconds, numerator, denominator).
  `ticks_per_quarter`: the source file's resolution (MIDI ticks per quarter note).
  """
  pitch: np.ndarray
  velocity: np.ndarray
  start: np.ndarray
  end: np.ndarray
  program: np.ndarray
  is_drum: np.ndarray
  instrument: np.ndarray
  cc_time: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float64))
  cc_number: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  cc_value: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  cc_instrument: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  cc_program: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  cc_is_drum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
  tempos: np.ndarray = dataclasses.field(
      default_factory=lambda: np.array([[0.0, DEFAULT_QPM]], np.float64))
  time_signatures: np.ndarray = dataclasses.field(
      default_factory=lambda: np.array([[0.0, 4, 4]], np.float64))
  ticks_per_quarter: int = 480
  source: Optional[str] = None

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_arrays(cls, pitch, start, end, velocity=None, *, is_drum=False, program=0,
                  instrument=0, qpm: float = DEFAULT_QPM, **kw) -> "Notes":
    """Builds `Notes` from plain sequences; scalars broadcast over all notes."""
    pitch = np.asarray(pitch, np.int32)
    n = len(pitch)
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (n,)).copy()
    velocity = full(100 if velocity is None else velocity, np.int32)
    kw.setdefault("tempos", np.array([[0.0, qpm]], np.float64))
    return cls(pitch=pitch, velocity=velocity, start=np.asarray(start, np.float64),
               end=np.asarray(end, np.float64), program=full(program, np.int32),
               is_drum=full(is_drum, bool), instrument=full(instrument, np.int32), **kw)

  @classmethod
  def empty(cls) -> "Notes":
    return cls.from_arrays([], [], [])

  @classmethod
  def from_note_sequence(cls, ns) -> "Notes":
    """Columns from a note-seq NoteSequence (notes kept in the sequence's order)."""
    notes = ns.notes
    cc = ns.control_changes
    tempos = np.array([[t.time, t.qpm] for t in ns.tempos], np.float64).reshape(-1, 2)
    if len(tempos) == 0:
      tempos = np.array([[0.0, DEFAULT_QPM]], np.float64)
    ts = np.array([[t.time, t.numerator, t.denominator] for t in ns.time_signatures],
                  np.float64).reshape(-1, 3)
    if len(ts) == 0:
      ts = np.array([[0.0, 4, 4]], np.float64)
    return cls(
        pitch=np.array([n.pitch for n in notes], np.int32),
        velocity=np.array([n.velocity for n in notes], np.int32),
        start=np.array([n.start_time for n in notes], np.float64),
        end=np.array([n.end_time for n in notes], np.float64),
        program=np.array([n.program for n in notes], np.int32),
        is_drum=np.array([n.is_drum for n in notes], bool),
        instrument=np.array([n.instrument for n in notes], np.int32),
        cc_time=np.array([c.time for c in cc], np.float64),
        cc_number=np.array([c.control_number for c in cc], np.int32),
        cc_value=np.array([c.control_value for c in cc], np.int32),
        cc_instrument=np.array([c.instrument for c in cc], np.int32),
        cc_program=np.array([c.program for c in cc], np.int32),
        cc_is_drum=np.array([c.is_drum for c in cc], bool),
        tempos=tempos, time_signatures=ts,
        ticks_per_quarter=int(ns.ticks_per_quarter or 480),
        source=ns.filename or None)

  def to_note_sequence(self):
    """A note-seq NoteSequence with these notes, control changes, tempos and meters."""
    from note_seq.protobuf import music_pb2
    ns = music_pb2.NoteSequence()
    ns.ticks_per_quarter = int(self.ticks_per_quarter)
    if self.source:
      ns.filename = str(self.source)
    for t, qpm in self.tempos:
      ns.tempos.add(time=float(t), qpm=float(qpm))
    for t, num, den in self.time_signatures:
      ns.time_signatures.add(time=float(t), numerator=int(num), denominator=int(den))
    for i in range(len(self)):
      ns.notes.add(pitch=int(self.pitch[i]), velocity=int(self.velocity[i]),
                   start_time=float(self.start[i]), end_time=float(self.end[i]),
                   program=int(self.program[i]), is_drum=bool(self.is_drum[i]),
                   instrument=int(self.instrument[i]))
    for i in range(len(self.cc_time)):
      ns.control_changes.add(time=float(self.cc_time[i]), control_number=int(self.cc_number[i]),
                             control_value=int(self.cc_value[i]),
                             instrument=int(self.cc_instrument[i]),
                             program=int(self.cc_program[i]), is_drum=bool(self.cc_is_drum[i]))
    ns.total_time = self.total_time
    return ns

  # ------------------------------------------------------------------ views
  def __len__(self) -> int:
    return int(self.pitch.shape[0])

  @property
  def total_time(self) -> float:
    """End of the last note, seconds."""
    return float(self.end.max()) if len(self) else 0.0

  @property
  def qpm(self) -> float:
    """The first tempo (quarter notes per minute)."""
    return float(self.tempos[0, 1])

  def select(self, mask) -> "Notes":
    """The notes where `mask` is true (control changes and maps kept)."""
    fields = {f: getattr(self, f)[mask] for f in _NOTE_FIELDS}
    return dataclasses.replace(self, **fields)

  def sorted(self) -> "Notes":
    """Notes ordered by (start, pitch, end); a canonical order for comparisons."""
    order = np.lexsort((self.end, self.pitch, self.start))
    return self.select(order)

  def tuples(self, decimals: int = 9):
    """Sorted (pitch, velocity, start, end, program, is_drum) tuples, times rounded."""
    s = self.sorted()
    return [(int(p), int(v), round(float(a), decimals), round(float(b), decimals), int(pr), bool(d))
            for p, v, a, b, pr, d in zip(s.pitch, s.velocity, s.start, s.end, s.program, s.is_drum)]


def time_problem(notes: Notes, max_seconds: Optional[float] = MAX_SECONDS) -> Optional[str]:
  """Why the notes' times cannot be encoded or written, or None when they can.

  Args:
    notes: the notes to check.
    max_seconds: the latest end allowed (seconds); None: no limit.
  Returns:
    A reason (a phrase, then details in parentheses) for a start or end that is not finite,
    is negative, ends before it starts or ends after `max_seconds`; None otherwise.
  """
  if len(notes) == 0:
    return None
  start, end = notes.start, notes.end
  if not (np.isfinite(start).all() and np.isfinite(end).all()):
    return "note times that are not finite numbers"
  if start.min() < 0:
    return f"notes that start before time 0 (at {start.min():g} s)"
  if (end < start).any():
    return "notes that end before they start"
  last = float(end.max())
  if max_seconds is not None and last > max_seconds:
    return (f"music longer than the max_seconds limit (the last note ends at {last:.1f} s; "
            f"limit {max_seconds:g} s)")
  return None


_NOTE_FIELDS = ("pitch", "velocity", "start", "end", "program", "is_drum", "instrument")
