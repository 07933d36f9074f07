"""MIDI in and out: a fast symusic reader, note-seq's reference reader, note-seq's writer.

Reading returns `Notes` (float64 seconds). Two readers give the same notes:

* ``reader="symusic"`` (default, used for tokenizing): symusic's C++ parser loads ticks,
  and this module turns them into seconds and notes the way pretty_midi (note-seq's parser)
  does: ticks -> seconds in float64 from the tempo map; zero-length notes (note-on and
  note-off on the same tick) dropped; a note-off ends every sounding note of that pitch
  on that channel that started before it (pretty_midi's rule), not just the oldest one.
* ``reader="note_seq"``: ``note_seq.midi_file_to_note_sequence``; the reference.

Both agree on every file of the test corpus. A file that cannot be read, or is over a
limit, raises `MidiReadError` (one line naming the file and the reason) before anything
in proportion to its size is built: the limits of midijax/limits.py keep any one file's
time and memory bounded. Files whose times cannot be computed (time division 0, SMPTE
timing, tempo 0) are refused, so every time read is finite.

Sustain pedal (CC 64) can be applied to extend piano notes exactly as
``note_seq.apply_sustain_control_changes`` does (`apply_sustain`).

Writing (`write_midi`) produces note-seq's bytes (``note_sequence_to_midi_file``) through
the same pretty_midi calls, without importing note-seq: drums on MIDI channel 10 (index 9),
tempo map and time signatures set.
"""
from __future__ import annotations

import io
import os
import pathlib
from typing import Optional, Tuple, Union

import numpy as np

from midijax import limits
from midijax import notes as notes_lib
from midijax.errors import MidiReadError
from midijax.notes import Notes

PathLike = Union[str, os.PathLike]
SUSTAIN_CC = 64

# Limits that keep reading bounded in time and memory whatever a file holds (each is a
# keyword of `read_notes`, or fixed where no real file comes near it): see midijax/limits.py.
DEFAULT_MAX_BYTES = limits.MAX_BYTES
NOTE_SEQ_MAX_BYTES = limits.NOTE_SEQ_MAX_BYTES
NOTE_SEQ_MAX_TICK = limits.NOTE_SEQ_MAX_TICK
MAX_TRACKS = limits.MAX_TRACKS
MAX_CONTROL_CHANGES = limits.MAX_CONTROL_CHANGES
# symusic holds ticks in int32: a track running past this tick has wrapped around.
MAX_SYMUSIC_TICK = 2**31 - 1


def _check_file(path: PathLike, max_bytes: int) -> Tuple[pathlib.Path, bytes]:
  """The file's path and bytes after the checks every reader shares.

  Refuses (MidiReadError) a missing, empty, oversized or non-MIDI file, a header with time
  division 0 or SMPTE timing, and a file that could hold more than MAX_TRACKS instrument
  tracks.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise MidiReadError(p, "file not found")
  if not p.is_file():
    raise MidiReadError(p, "not a regular file")
  size = p.stat().st_size
  if size == 0:
    raise MidiReadError(p, "empty file (0 bytes)")
  if size > max_bytes:
    raise MidiReadError(p, f"file is {size} bytes, above the {max_bytes}-byte limit (max_bytes)")
  with open(p, "rb") as f:
    data = f.read(max_bytes + 1)
  if data[:4] != b"MThd":
    raise MidiReadError(p, "not a MIDI file (no 'MThd' header)")
  if len(data) < 14:
    raise MidiReadError(p, f"truncated MIDI header ({len(data)} bytes)")
  header_len = int.from_bytes(data[4:8], "big")
  if header_len < 6:
    raise MidiReadError(p, f"bad MIDI header (its length is {header_len}, not 6)")
  division = int.from_bytes(data[12:14], "big")
  if division == 0:
    raise MidiReadError(p, "time division of 0 ticks per quarter note (a corrupt header)")
  if division & 0x8000:
    fps, per_frame = 256 - (division >> 8), division & 0xFF
    raise MidiReadError(p, f"SMPTE time division is not supported ({fps} frames a second x "
                           f"{per_frame} ticks a frame; midijax reads ticks per quarter note)")
  tracks = _max_instrument_tracks(data, header_len)
  if tracks > MAX_TRACKS:
    raise MidiReadError(p, f"more instrument tracks than the limit (up to {tracks} track x "
                           f"channel x program combinations; limit {MAX_TRACKS})")
  return p, data


_NOTE_ON = [bytes([0x90 | c]) for c in range(16)]
_PROGRAM = [bytes([0xC0 | c]) for c in range(16)]


def _tracks_bound(data: bytes, start: int, end: int, chunks: int) -> int:
  """Upper bound on the instrument tracks `chunks` MTrk chunks within data[start:end] give.

  A parser makes one track per (chunk, channel, program) that plays a note. Running status
  does not cross chunks, so each such track's first note-on has its own status byte 0x9c,
  and each program after a channel's first needs a program-change status byte 0xCc. Bytes
  that only look like these (in delta times, meta or sysex data) make the bound larger,
  never smaller.
  """
  total = 0
  for c in range(16):
    on = data.count(_NOTE_ON[c], start, end)
    if on:
      total += min(on, chunks * 128, chunks + data.count(_PROGRAM[c], start, end))
  return total


def _max_instrument_tracks(data: bytes, header_len: int) -> int:
  """An upper bound on the instrument tracks a parser makes of the file (cheap: byte counts).

  The whole file counted as one region first (fast); when that bound is high, chunk by
  chunk. Parsers read up to the header's track count of MTrk chunks, skipping other chunks.
  """
  ntracks = int.from_bytes(data[10:12], "big")
  first = 8 + header_len
  bound = _tracks_bound(data, first, len(data), max(ntracks, 1))
  if bound <= MAX_TRACKS:
    return bound
  bound, pos, seen, steps = 0, first, 0, 0
  while pos + 8 <= len(data) and seen < ntracks and bound <= MAX_TRACKS:
    steps += 1
    if steps > 4 * 65536:  # more chunks than any real file: count the rest as one chunk
      return bound + _tracks_bound(data, pos, len(data), ntracks - seen)
    end = min(len(data), pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "big"))
    if data[pos:pos + 4] == b"MTrk":
      seen += 1
      bound += _tracks_bound(data, pos + 8, end, 1)
    pos = end
  return bound


def read_notes(path: PathLike, *, reader: str = "symusic", sustain: bool = False,
               max_bytes: Optional[int] = None, allow_empty: bool = False,
               max_seconds: Optional[float] = notes_lib.MAX_SECONDS,
               max_notes: Optional[int] = notes_lib.MAX_TOKENS) -> Notes:
  """Reads a .mid/.midi file into `Notes`.

  Args:
    path: the MIDI file.
    reader: "symusic" (fast, default) or "note_seq" (reference).
    sustain: apply sustain-pedal (CC 64) note extension, as for piano performances.
    max_bytes: refuse files larger than this many bytes (default DEFAULT_MAX_BYTES, or
      NOTE_SEQ_MAX_BYTES for the note_seq reader).
    allow_empty: return empty `Notes` instead of raising for a file with no notes.
    max_seconds: refuse a file whose last note ends later (seconds; after `sustain`);
      None: no limit.
    max_notes: refuse a file with more notes; None: no limit.

  Raises:
    MidiReadError: missing, empty, oversized, corrupt or truncated file, a header or
      tempo the file's times cannot be computed from (division 0, SMPTE, tempo 0), a file
      over a limit, or no notes.
  """
  if reader == "symusic":
    p, data = _check_file(path, DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    notes = _read_symusic(p, data, max_notes)
  elif reader == "note_seq":
    p, data = _check_file(path, NOTE_SEQ_MAX_BYTES if max_bytes is None else max_bytes)
    ns = _note_sequence(p, data)
    if max_notes is not None and len(ns.notes) > max_notes:
      raise MidiReadError(p, _over_notes(len(ns.notes), max_notes))
    notes = Notes.from_note_sequence(ns)
  else:
    raise ValueError(f"unknown reader {reader!r}; use 'symusic' or 'note_seq'")
  notes.source = str(p)
  if len(notes) == 0 and not allow_empty:
    raise MidiReadError(p, "the file contains no notes")
  problem = notes_lib.time_problem(notes, None)
  if problem is None and sustain:
    notes = apply_sustain(notes)
  problem = problem or notes_lib.time_problem(notes, max_seconds)
  if problem is not None:
    raise MidiReadError(p, problem)
  return notes


def _over_notes(n: int, limit: int) -> str:
  # midi2tokens and the builders pass max_tokens here: every note kept makes a token.
  return f"more notes than the limit ({n} notes; limit {limit}, from max_tokens or max_notes)"


def read_note_sequence(path: PathLike, *, max_bytes: Optional[int] = None):
  """note-seq's reader (pretty_midi underneath): the reference NoteSequence.

  The same as ``note_seq.midi_file_to_note_sequence``, after the checks of `_check_file`
  and two of its own that keep memory bounded: `max_bytes` (default NOTE_SEQ_MAX_BYTES) and
  NOTE_SEQ_MAX_TICK. Raises MidiReadError for a file it cannot read.
  """
  p, data = _check_file(path, NOTE_SEQ_MAX_BYTES if max_bytes is None else max_bytes)
  return _note_sequence(p, data)


def _note_sequence(p: pathlib.Path, data: bytes):
  """note-seq's NoteSequence of a checked file's bytes (mido -> pretty_midi -> note-seq)."""
  import mido
  import note_seq
  import pretty_midi
  # note_seq.midi_file_to_note_sequence parses with pretty_midi.PrettyMIDI(BytesIO(data)),
  # which parses with mido.MidiFile(file=..., charset="latin1"): the same three steps, with
  # the tick and tempo checks between the first two.
  try:
    midi = mido.MidiFile(file=io.BytesIO(data), charset="latin1")
  except Exception as e:  # mido raises OSError, EOFError, ValueError, KeyError, ...
    raise MidiReadError(p, f"cannot parse MIDI ({type(e).__name__}: {e})") from None
  last_tick = 0
  for i, track in enumerate(midi.tracks):
    tick = 0
    for msg in track:
      tick += msg.time
      # pretty_midi takes tempos from the first track only.
      if i == 0 and msg.type == "set_tempo" and msg.tempo == 0:
        raise MidiReadError(p, f"tempo of 0 microseconds per quarter note (at tick {tick})")
    last_tick = max(last_tick, tick)
  if last_tick > NOTE_SEQ_MAX_TICK:
    raise MidiReadError(p, f"more ticks than the note_seq reader's limit (the last event is "
                           f"at tick {last_tick}; limit {NOTE_SEQ_MAX_TICK}; the symusic "
                           "reader has no such limit)")
  try:
    pm = pretty_midi.PrettyMIDI(mido_object=midi)
    ns = note_seq.midi_to_note_sequence(pm)
  except Exception as e:  # note-seq wraps mido/pretty_midi errors in several types.
    raise MidiReadError(p, f"cannot parse MIDI ({type(e).__name__}: {e})") from None
  ns.filename = str(p)
  return ns


# --------------------------------------------------------------------------- symusic path
def _tick_to_seconds_fn(tempo_ticks: np.ndarray, mspq: np.ndarray, tpq: int):
  """Returns f(ticks int64 array) -> float64 seconds for a piecewise-constant tempo map.

  Mirrors pretty_midi: 120 qpm before the first tempo event; seconds per tick of each
  segment is 60 / (qpm * tpq) with qpm = 6e7 / microseconds-per-quarter. `tpq` and every
  `mspq` must be positive.
  """
  if len(tempo_ticks) == 0 or tempo_ticks[0] != 0:
    tempo_ticks = np.concatenate([[0], tempo_ticks])
    mspq = np.concatenate([[500000], mspq])
  # Keep the last tempo given on a tick (several may share one tick).
  keep = np.append(tempo_ticks[1:] != tempo_ticks[:-1], True)
  tempo_ticks, mspq = tempo_ticks[keep].astype(np.int64), mspq[keep].astype(np.float64)
  scale = 60.0 / ((6e7 / mspq) * tpq)
  # pretty_midi starts no new segment for a tempo equal to the last one; starting one would
  # change float64 rounding (and so note order and quantization) in the last bits.
  new_seg = np.append(True, scale[1:] != scale[:-1])
  tempo_ticks, mspq, scale = tempo_ticks[new_seg], mspq[new_seg], scale[new_seg]
  seg_start = np.concatenate([[0.0], np.cumsum(np.diff(tempo_ticks) * scale[:-1])])

  def f(ticks):
    ticks = np.asarray(ticks, np.int64)
    i = np.searchsorted(tempo_ticks, ticks, side="right") - 1
    return seg_start[i] + (ticks - tempo_ticks[i]) * scale[i]

  qpm = 6e7 / mspq
  return f, tempo_ticks, qpm


def _check_score(p: pathlib.Path, score, max_notes: Optional[int]) -> None:
  """Refuses a parsed score whose times cannot be computed or that is over a limit."""
  tracks = score.tracks
  num_notes = sum(len(t.notes) for t in tracks)
  if max_notes is not None and num_notes > max_notes:
    raise MidiReadError(p, _over_notes(num_notes, max_notes))
  num_controls = sum(len(t.controls) for t in tracks)
  if num_controls > MAX_CONTROL_CHANGES:
    raise MidiReadError(p, f"more control changes than the limit ({num_controls}; limit "
                           f"{MAX_CONTROL_CHANGES})")
  tempos = score.tempos.numpy()
  zero = np.flatnonzero(tempos["mspq"] <= 0)
  if len(zero):
    raise MidiReadError(p, f"tempo of {int(tempos['mspq'][zero[0]])} microseconds per quarter "
                           f"note (at tick {int(tempos['time'][zero[0]])})")
  ts = score.time_signatures.numpy()
  bad = np.flatnonzero((ts["numerator"] == 0) | (ts["denominator"] == 0))
  if len(bad):
    raise MidiReadError(p, f"bad time signature ({int(ts['numerator'][bad[0]])}/"
                           f"{int(ts['denominator'][bad[0]])} at tick {int(ts['time'][bad[0]])})")
  # symusic adds delta times in int32; a negative tick means a track ran past 2**31 ticks.
  negative = (tempos["time"] < 0).any() or (ts["time"] < 0).any() or any(
      (t.notes.numpy()["time"] < 0).any() or (t.controls.numpy()["time"] < 0).any()
      for t in tracks)
  if negative:
    raise MidiReadError(p, f"event times past tick {MAX_SYMUSIC_TICK} (corrupt delta times)")


def _read_symusic(p: pathlib.Path, data: bytes, max_notes: Optional[int] = None) -> Notes:
  import symusic
  try:
    score = symusic.Score(str(p))
  except Exception as e:  # symusic raises RuntimeError("MiniMidi: ...") for corrupt data.
    raise MidiReadError(p, f"cannot parse MIDI ({e})") from None
  _check_score(p, score, max_notes)
  tpq = int(score.ticks_per_quarter)
  tempos = score.tempos.numpy()
  to_sec, tempo_ticks, qpm = _tick_to_seconds_fn(tempos["time"], tempos["mspq"], tpq)

  exact = None
  if len(data) <= EXACT_PAIRING_MAX_BYTES:
    for track in score.tracks:
      nt = track.notes.numpy()
      on = nt["time"].astype(np.int64)
      if _needs_exact_pairing(on, on + nt["duration"], nt["pitch"].astype(np.int64)):
        exact = _pretty_notes_from_bytes(p, data)
        break
  cols = {k: [] for k in ("pitch", "velocity", "start", "end", "program", "is_drum", "inst")}
  ccs = {k: [] for k in ("time", "number", "value", "program", "is_drum", "inst")}
  for ti, track in enumerate(score.tracks):
    nt = track.notes.numpy()
    on = nt["time"].astype(np.int64)
    dur = nt["duration"].astype(np.int64)
    pitch = nt["pitch"].astype(np.int64)
    vel = nt["velocity"].astype(np.int32)
    keep = dur > 0  # pretty_midi drops notes whose on and off share a tick.
    on, off, pitch, vel = on[keep], (on + dur)[keep], pitch[keep], vel[keep]
    # pretty_midi: a note-off ends every sounding note of its pitch that started before it.
    key_on = (pitch << 40) | on
    key_off = np.sort((pitch << 40) | off)
    j = np.searchsorted(key_off, key_on, side="right")
    ok = j < len(key_off)
    ok[ok] &= (key_off[j[ok]] >> 40) == pitch[ok]
    end = np.where(ok, key_off[np.minimum(j, len(key_off) - 1)] & ((1 << 40) - 1), 0)
    on, end, pitch, vel = on[ok], end[ok], pitch[ok], vel[ok]
    # pretty_midi appends a note to its instrument when the note is closed.
    order = np.lexsort((on, end))
    n = len(order)
    cols["pitch"].append(pitch[order].astype(np.int32))
    cols["velocity"].append(vel[order])
    cols["start"].append(on[order])
    cols["end"].append(end[order])
    cols["program"].append(np.full(n, track.program, np.int32))
    cols["is_drum"].append(np.full(n, track.is_drum, bool))
    cols["inst"].append(np.full(n, ti, np.int32))
    ct = track.controls.numpy()
    m = len(ct["time"])
    ccs["time"].append(ct["time"].astype(np.int64))
    ccs["number"].append(ct["number"].astype(np.int32))
    ccs["value"].append(ct["value"].astype(np.int32))
    ccs["program"].append(np.full(m, track.program, np.int32))
    ccs["is_drum"].append(np.full(m, track.is_drum, bool))
    ccs["inst"].append(np.full(m, ti, np.int32))

  if exact is not None:
    nrows = np.array(exact[0], np.int64).reshape(-1, 7)
    crows = np.array(exact[1], np.int64).reshape(-1, 6)
    for k, c in zip(("pitch", "velocity", "start", "end", "program", "is_drum", "inst"), nrows.T):
      cols[k] = [c]
    for k, c in zip(("time", "number", "value", "program", "is_drum", "inst"), crows.T):
      ccs[k] = [c]
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
  ts = score.time_signatures.numpy()
  time_sigs = np.stack([to_sec(ts["time"]), ts["numerator"].astype(np.float64),
                        ts["denominator"].astype(np.float64)], axis=1) if len(ts["time"]) else \
      np.array([[0.0, 4, 4]])
  return Notes(
      pitch=cat(cols["pitch"], np.int32), velocity=cat(cols["velocity"], np.int32),
      start=to_sec(cat(cols["start"], np.int64)), end=to_sec(cat(cols["end"], np.int64)),
      program=cat(cols["program"], np.int32), is_drum=cat(cols["is_drum"], bool),
      instrument=cat(cols["inst"], np.int32),
      cc_time=to_sec(cat(ccs["time"], np.int64)), cc_number=cat(ccs["number"], np.int32),
      cc_value=cat(ccs["value"], np.int32), cc_instrument=cat(ccs["inst"], np.int32),
      cc_program=cat(ccs["program"], np.int32), cc_is_drum=cat(ccs["is_drum"], bool),
      tempos=np.stack([to_sec(tempo_ticks), qpm], axis=1),
      time_signatures=time_sigs, ticks_per_quarter=tpq)


def _needs_exact_pairing(on: np.ndarray, off: np.ndarray, pitch: np.ndarray) -> bool:
  """Whether symusic's first-in-first-out pairing can hide pretty_midi's result.

  pretty_midi's outcome depends on the file order of a note-on and a note-off of one pitch
  on one tick only when notes of that pitch overlap; symusic keeps no such order. True when
  a pitch both overlaps itself and has a note-on and a note-off on one tick.
  """
  order = np.lexsort((on, pitch))
  ps, os_ = pitch[order], on[order]
  # Two notes of a pitch starting on one tick count as overlapping too.
  overlap = (ps[1:] == ps[:-1]) & (os_[1:] < np.maximum(off[order][:-1], os_[:-1] + 1))
  if not overlap.any():
    return False
  risky = np.unique(ps[1:][overlap])
  same_tick = np.intersect1d((pitch << 40) | on, (pitch << 40) | off) >> 40
  return bool(np.intersect1d(risky, same_tick).size)


# The exact pairing below is pure Python (about 2 us per byte of file); larger files, which
# note-seq's own reader refuses by default anyway, keep symusic's pairing.
EXACT_PAIRING_MAX_BYTES = NOTE_SEQ_MAX_BYTES


class _Malformed(Exception):
  """A file's bytes do not follow the MIDI event grammar (where symusic let them pass)."""


def _read_vlq(data: bytes, pos: int):
  """A variable-length quantity (at most 4 bytes, as MIDI allows) and the position after it."""
  value = 0
  for _ in range(4):
    b = data[pos]
    pos += 1
    value = (value << 7) | (b & 0x7F)
    if b < 0x80:
      return value, pos
  raise _Malformed(f"a variable-length number longer than 4 bytes at byte {pos - 4}")


def _pretty_notes_from_bytes(p: pathlib.Path, data: bytes):
  """pretty_midi's note pairing replayed on the file's own event order (exact, pure Python).

  Used only for the rare files where symusic's pairing is ambiguous. Returns note rows
  (pitch, velocity, start tick, end tick, program, is_drum, instrument) and control-change
  rows (tick, number, value, program, is_drum, instrument); an instrument is a
  (track, channel) pair. Raises MidiReadError for bytes that end early or break the event
  grammar.
  """
  try:
    return _replay_pretty_pairing(data)
  except (_Malformed, IndexError) as e:
    where = str(e) if isinstance(e, _Malformed) else "an event runs past the end of the file"
    raise MidiReadError(p, f"cannot parse MIDI ({where})") from None


def _replay_pretty_pairing(data: bytes):
  """The body of `_pretty_notes_from_bytes`; raises IndexError or _Malformed on bad bytes."""
  ntracks = int.from_bytes(data[10:12], "big")
  pos = 8 + int.from_bytes(data[4:8], "big")
  notes, ccs, inst_ids = [], [], {}
  for track in range(ntracks):
    while pos + 8 <= len(data) and data[pos:pos + 4] != b"MTrk":
      pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "big")
    if pos + 8 > len(data):
      break
    end = min(len(data), pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "big"))
    pos += 8
    tick, status = 0, 0
    program = [0] * 16
    open_notes = {}
    while pos < end:
      delta, pos = _read_vlq(data, pos)
      tick += delta
      b = data[pos]
      if b >= 0x80:
        status = b
        pos += 1
      if status == 0xFF:
        pos += 1
        length, pos = _read_vlq(data, pos)
        pos += length
        continue
      if status in (0xF0, 0xF7):
        length, pos = _read_vlq(data, pos)
        pos += length
        continue
      kind, ch = status & 0xF0, status & 0x0F
      if kind in (0xC0, 0xD0):
        if kind == 0xC0:
          program[ch] = data[pos]
        pos += 1
        continue
      d1, d2 = data[pos], data[pos + 1]
      pos += 2
      if kind == 0x90 and d2 > 0:
        open_notes.setdefault((ch, d1), []).append((tick, d2))
      elif kind == 0x80 or kind == 0x90:
        lst = open_notes.get((ch, d1))
        if lst is None:
          continue
        close = [n for n in lst if n[0] != tick]
        keep = [n for n in lst if n[0] == tick]
        inst = inst_ids.setdefault((track, ch), len(inst_ids))
        for s, v in close:
          notes.append((d1, v, s, tick, program[ch], ch == 9, inst))
        if close and keep:
          open_notes[(ch, d1)] = keep
        else:
          del open_notes[(ch, d1)]
      elif kind == 0xB0:
        inst = inst_ids.setdefault((track, ch), len(inst_ids))
        ccs.append((tick, d1, d2, program[ch], ch == 9, inst))
    pos = end
  return notes, ccs


# --------------------------------------------------------------------------- sustain pedal
def apply_sustain(notes: Notes, control_number: int = SUSTAIN_CC) -> Notes:
  """Extends notes held by the sustain pedal, as note_seq.apply_sustain_control_changes.

  Per instrument: a note released while the pedal is down (value >= 64) keeps sounding until
  the pedal lifts; a new note-on of the same pitch while the pedal is down ends every
  sounding note of that pitch (a note so ended on its own start tick is removed). Notes still
  held when the events run out end at the last event. Drum notes are not changed. Events at
  one time are ordered pedal-down, pedal-up, note-on, note-off, as note-seq does. Vectorised
  per instrument. Returns new `Notes` (the input is not modified).
  """
  sel = (notes.cc_number == control_number) & ~notes.cc_is_drum
  if not sel.any() or len(notes) == 0:
    return notes
  cc_t, cc_on, cc_i = notes.cc_time[sel], notes.cc_value[sel] >= 64, notes.cc_instrument[sel]
  pitched = ~notes.is_drum
  # note-seq ends still-sustained notes at the time of the very last event it sorted.
  last_time = max(notes.start[pitched].max(initial=0.0), notes.end[pitched].max(initial=0.0),
                  cc_t.max())
  end = notes.end.copy()
  removed = np.zeros(len(notes), bool)
  # Each instrument's notes and pedal events as slices of stable sorts (in their original
  # order), so a file of thousands of instruments costs no more than one of a few.
  note_idx = np.flatnonzero(pitched)
  note_idx = note_idx[np.argsort(notes.instrument[note_idx], kind="stable")]
  note_ins = notes.instrument[note_idx]
  cc_order = np.argsort(cc_i, kind="stable")
  cc_sorted = cc_i[cc_order]
  for ins in np.unique(cc_i):
    a, b = np.searchsorted(note_ins, ins, "left"), np.searchsorted(note_ins, ins, "right")
    idx = note_idx[a:b]
    if len(idx) == 0:
      continue
    sel = cc_order[np.searchsorted(cc_sorted, ins, "left"):np.searchsorted(cc_sorted, ins, "right")]
    t, on = cc_t[sel], cc_on[sel]
    # Pedal state after all pedal events at each distinct time: up if any pedal-up there.
    times, inv = np.unique(t, return_inverse=True)
    any_off = np.zeros(len(times), bool)
    np.logical_or.at(any_off, inv, ~on)
    down_after = ~any_off
    off_times = times[any_off]

    def pedal_down(x):
      k = np.searchsorted(times, x, side="right") - 1
      return np.where(k >= 0, down_after[np.maximum(k, 0)], False)

    s, e, p = notes.start[idx], notes.end[idx], notes.pitch[idx]
    # Release: the note-off if the pedal is up then, else the next pedal-up (or the end).
    k = np.searchsorted(off_times, e, side="right")
    # (A pedal never lifted holds its notes to the last event.)
    later_off = np.where(k < len(off_times), off_times[np.minimum(k, len(off_times) - 1)],
                         last_time) if len(off_times) else np.full(len(e), last_time)
    release = np.where(pedal_down(e), later_off, e)
    # Truncation: the next note-on of the same pitch, in event order, made while the pedal is
    # down (note-ons are processed in (time, sequence order)).
    order = np.lexsort((np.arange(len(idx)), s, p))
    ps, ss = p[order], s[order]
    flag = pedal_down(ss)
    n = len(order)
    cand = np.where(flag, np.arange(n), n)
    nxt = np.minimum.accumulate(cand[::-1])[::-1]  # first flagged at or after i
    nxt = np.append(nxt[1:], n)                     # ... strictly after i
    valid = nxt < n
    j = np.minimum(nxt, n - 1)
    valid &= ps[j] == ps
    trunc = np.full(n, np.inf)
    trunc[valid] = ss[j[valid]]
    trunc_sorted = np.empty(n)
    trunc_sorted[order] = trunc
    new_end = np.minimum(release, trunc_sorted)
    gone = (trunc_sorted <= release) & (trunc_sorted == s)
    end[idx] = new_end
    removed[idx[gone]] = True
  out = Notes(**{**notes.__dict__, "end": end})
  return out.select(~removed) if removed.any() else out


# --------------------------------------------------------------------------- writing
# note-seq's defaults (note_seq.constants): the resolution of a sequence without one, and
# the tempo of a sequence without a tempo at time 0.
NOTE_SEQ_PPQ = 220
NOTE_SEQ_QPM = 120.0


def notes_to_pretty_midi(notes: Notes):
  """A `pretty_midi.PrettyMIDI` of `notes`, made as note-seq makes one.

  The same pretty_midi calls, in the same order, as
  `note_seq.midi_io.note_sequence_to_pretty_midi(notes.to_note_sequence())`, done from the
  columns so that writing MIDI never imports note_seq (its package import loads its
  plotting stack, bokeh and pandas: seconds of start-up). tests/test_midi_write.py checks
  that the written bytes equal note-seq's. An empty tempo or meter map gets 120 qpm / 4/4
  at time 0.
  """
  import pretty_midi  # pylint: disable=g-import-not-at-top
  tempos = [(float(t), float(q)) for t, q in np.asarray(notes.tempos).reshape(-1, 2)]
  tempos = tempos or [(0.0, NOTE_SEQ_QPM)]
  meters = [(float(t), int(n), int(d))
            for t, n, d in np.asarray(notes.time_signatures).reshape(-1, 3)]
  meters = meters or [(0.0, 4, 4)]
  initial = next((tempo for tempo in tempos if tempo[0] == 0), None)
  pm = pretty_midi.PrettyMIDI(resolution=int(notes.ticks_per_quarter) or NOTE_SEQ_PPQ,
                              initial_tempo=initial[1] if initial else NOTE_SEQ_QPM)
  # Instrument 0 also carries the meters (pretty_midi writes them in the first track).
  instrument = pretty_midi.Instrument(0)
  pm.instruments.append(instrument)
  for t, numerator, denominator in meters:
    pm.time_signature_changes.append(pretty_midi.TimeSignature(numerator, denominator, t))
  for tempo in tempos:
    if tempo == initial:
      continue
    # pretty_midi has no public way to add a tempo change; note-seq appends a tick scale.
    # pylint: disable=protected-access
    pm._tick_scales.append((pm.time_to_tick(tempo[0]), 60.0 / (pm.resolution * tempo[1])))
    pm._update_tick_to_time(0)
    # pylint: enable=protected-access
  events: dict = {}

  def track(instrument_id, program, is_drum) -> dict:
    key = (int(instrument_id), int(program), bool(is_drum))
    return events.setdefault(key, {"notes": [], "controls": []})

  for i in range(len(notes)):
    track(notes.instrument[i], notes.program[i], notes.is_drum[i])["notes"].append(
        pretty_midi.Note(int(notes.velocity[i]), int(notes.pitch[i]), float(notes.start[i]),
                         float(notes.end[i])))
  for i in range(len(notes.cc_time)):
    track(notes.cc_instrument[i], notes.cc_program[i], notes.cc_is_drum[i])["controls"].append(
        pretty_midi.ControlChange(int(notes.cc_number[i]), int(notes.cc_value[i]),
                                  float(notes.cc_time[i])))
  for (instrument_id, program, is_drum) in sorted(events):
    # As note-seq: instrument ids above 0 get a track of their own; id 0 (and below) fill
    # the first track.
    if instrument_id > 0:
      name = "Drums" if is_drum else pretty_midi.program_to_instrument_name(program)
      instrument = pretty_midi.Instrument(program, is_drum, name)
      pm.instruments.append(instrument)
    else:
      instrument.is_drum = is_drum
    instrument.program = program
    instrument.notes = events[(instrument_id, program, is_drum)]["notes"]
    instrument.pitch_bends = []
    instrument.control_changes = events[(instrument_id, program, is_drum)]["controls"]
  return pm


def write_midi(seq, path: PathLike) -> pathlib.Path:
  """Writes `Notes` (or a note-seq NoteSequence) to a MIDI file; the one MIDI writer.

  The bytes are note-seq's (`notes_to_pretty_midi`): drum notes on MIDI channel 10 (index
  9), the tempo map and meters written (120 qpm, 4/4 when there are none). Parent folders
  are created. The file is written to a temporary name and renamed, so an existing file is
  never left half-written.
  """
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + ".tmp")
  if isinstance(seq, Notes):
    notes_to_pretty_midi(seq).write(str(tmp))
  else:  # A NoteSequence: note_seq is loaded already; its writer keeps every field.
    import note_seq  # pylint: disable=g-import-not-at-top
    if not seq.tempos:
      seq.tempos.add(time=0.0, qpm=NOTE_SEQ_QPM)
    if not seq.time_signatures:
      seq.time_signatures.add(time=0.0, numerator=4, denominator=4)
    note_seq.sequence_proto_to_midi_file(seq, str(tmp))
  os.replace(tmp, p)
  return p
