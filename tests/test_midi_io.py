"""MIDI I/O: the fast reader equals note-seq's on the whole real corpus; bad files fail clearly."""
import multiprocessing as mp
import os

import mido
import numpy as np
import pytest

from midijax import encoding, midi_io
from midijax.errors import MidiReadError
from midijax.notes import Notes


def _compare_file(path: str):
  """Returns a list of problems for one file (empty when both readers agree)."""
  import note_seq
  from note_seq import performance_lib
  problems = []
  fast = midi_io.read_notes(path, allow_empty=True)
  ns = midi_io.read_note_sequence(path)
  ref = Notes.from_note_sequence(ns)
  # Times compared to 1e-9 s (rounded to 9 decimals).
  if fast.tuples() != ref.tuples():
    problems.append("notes differ")
  sus_ns = note_seq.apply_sustain_control_changes(ns)
  if midi_io.apply_sustain(fast).tuples() != Notes.from_note_sequence(sus_ns).tuples():
    problems.append("sustained notes differ")
  if "/piano/" in path:
    enc = encoding.get("performance")
    fast_ids = enc.encode(midi_io.read_notes(path, sustain=True))
    onehot = note_seq.PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100,
                                                min_pitch=21, max_pitch=108)
    q = note_seq.quantize_note_sequence_absolute(sus_ns, 100)
    ref_ids = np.array([onehot.encode_event(e) + 2
                        for e in performance_lib.Performance(q, num_velocity_bins=32)])
    if not np.array_equal(fast_ids, ref_ids):
      problems.append(f"performance ids differ ({len(fast_ids)} vs {len(ref_ids)})")
  return path, problems


@pytest.mark.slow
def test_fast_reader_matches_note_seq_on_all_shared_data(groove_files, piano_files):
  """Both readers give the same notes (1e-9 s) on every file, with and without sustain, and
  the performance ids from the fast path equal Magenta's reference on every piano file."""
  files = [str(f) for f in piano_files + groove_files]
  assert len(files) >= 1200
  ctx = mp.get_context("fork")
  with ctx.Pool(os.cpu_count() or 2) as pool:
    results = pool.map(_compare_file, files, chunksize=8)
  bad = [(p, probs) for p, probs in results if probs]
  assert not bad, f"{len(bad)} files differ, e.g. {bad[:3]}"


def test_drums_identified_by_is_drum(groove_files):
  notes = midi_io.read_notes(groove_files[0])
  assert notes.is_drum.all() and len(notes) > 0


def test_sustain_extends_piano_notes(piano_files):
  path = next(f for f in piano_files if "maestro" in str(f))
  raw = midi_io.read_notes(path)
  sus = midi_io.read_notes(path, sustain=True)
  assert len(sus) <= len(raw)
  assert sus.end.sum() > raw.end.sum()


@pytest.fixture
def bad_files(tmp_path, groove_files):
  good = groove_files[0].read_bytes()
  files = {
      "missing": tmp_path / "missing.mid",
      "empty": tmp_path / "empty.mid",
      "random": tmp_path / "random.mid",
      "truncated": tmp_path / "truncated.mid",
      "no_notes": tmp_path / "no_notes.mid",
  }
  files["empty"].write_bytes(b"")
  files["random"].write_bytes(np.random.default_rng(0).bytes(3000))
  files["truncated"].write_bytes(good[: len(good) // 2])
  mf = mido.MidiFile()
  track = mido.MidiTrack()
  track.append(mido.MetaMessage("set_tempo", tempo=500000, time=0))
  mf.tracks.append(track)
  mf.save(files["no_notes"])
  return files


@pytest.mark.parametrize("kind,reason", [
    ("missing", "file not found"),
    ("empty", "empty file"),
    ("random", "not a MIDI file"),
    ("truncated", "cannot parse MIDI"),
    ("no_notes", "no notes"),
])
@pytest.mark.parametrize("reader", ["symusic", "note_seq"])
def test_bad_files_raise_clear_error(bad_files, kind, reason, reader):
  path = bad_files[kind]
  with pytest.raises(MidiReadError) as e:
    midi_io.read_notes(path, reader=reader)
  assert str(path) in str(e.value) and reason in str(e.value)


def test_huge_file_refused(groove_files):
  with pytest.raises(MidiReadError, match="above the 100-byte limit"):
    midi_io.read_notes(groove_files[0], max_bytes=100)


def test_write_midi_drums_on_channel_10_with_tempo_and_meter(tmp_path, groove_files):
  notes = midi_io.read_notes(groove_files[0])
  out = midi_io.write_midi(notes, tmp_path / "sub" / "out.mid")
  mf = mido.MidiFile(out)
  channels = {m.channel for t in mf.tracks for m in t if m.type == "note_on"}
  assert channels == {9}
  assert any(m.type == "set_tempo" for t in mf.tracks for m in t)
  assert any(m.type == "time_signature" for t in mf.tracks for m in t)
  back = midi_io.read_notes(out)
  assert back.is_drum.all() and len(back) == len(notes)
  np.testing.assert_allclose(back.sorted().start, notes.sorted().start, atol=2e-3)


# ----------------------------------------------------------------------------- hostile files
import hostile_files as hf  # noqa: E402  (tests/ is on sys.path under pytest)

_NOTE = [(10, hf.on()), (480, hf.off())]


@pytest.mark.parametrize("reader", ["symusic", "note_seq"])
@pytest.mark.parametrize("data,reason", [
    (hf.midi([hf.track(_NOTE)], division=0), "time division of 0 ticks per quarter note"),
    (hf.midi([hf.track(_NOTE)], division=0xE728), "SMPTE time division is not supported "
                                                   "(25 frames a second x 40 ticks a frame"),
    (hf.midi([hf.track([(0, hf.tempo(0))] + _NOTE)]), "tempo of 0 microseconds per quarter note"),
    (hf.midi([hf.track(_NOTE)])[:12], "truncated MIDI header"),
    (hf.header(length=2) + hf.track(_NOTE), "bad MIDI header"),
    (hf.midi([hf.track(_NOTE)] * 4100), "more instrument tracks than the limit"),
])
def test_times_that_cannot_be_computed_are_refused(tmp_path, reader, data, reason):
  """Division 0, SMPTE timing and tempo 0 (pretty_midi divides by them) are clear errors
  from both readers, as are headers too short to read and absurd track counts."""
  path = tmp_path / "bad.mid"
  path.write_bytes(data)
  with pytest.raises(MidiReadError, match=reason.replace("(", r"\(")):
    midi_io.read_notes(path, reader=reader)


@pytest.mark.parametrize("data,reason", [
    (hf.midi([hf.track([(0, hf.time_sig(0, 2))] + _NOTE)]), r"bad time signature \(0/4"),
    (hf.midi([hf.track([(0, hf.time_sig(4, 255))] + _NOTE)]), r"bad time signature \(4/0"),
    (hf.midi([hf.track([(0x0FFFFFFF, hf.on()), (10, hf.off())] * 9)]), "past tick 2147483647"),
])
def test_symusic_reader_refuses_bad_meters_and_tick_overflow(tmp_path, data, reason):
  path = tmp_path / "bad.mid"
  path.write_bytes(data)
  with pytest.raises(MidiReadError, match=reason):
    midi_io.read_notes(path)


def test_limits_are_checked_and_configurable(tmp_path):
  """max_seconds (after the sustain pedal), max_notes and the note_seq reader's own limits."""
  path = tmp_path / "long.mid"
  path.write_bytes(hf.midi([hf.track([(0, hf.on()), (10, hf.off()), (3 * 3600 * 192, hf.on()),
                                      (10, hf.off())])], division=96))
  for reader in ("symusic", "note_seq"):
    with pytest.raises(MidiReadError, match=r"max_seconds limit \(the last note ends at 10800.1"):
      midi_io.read_notes(path, reader=reader)
    assert midi_io.read_notes(path, reader=reader, max_seconds=None).total_time > 10800
  with pytest.raises(MidiReadError, match=r"more notes than the limit \(2 notes; limit 1"):
    midi_io.read_notes(path, max_notes=1, max_seconds=None)
  # A sustain pedal held down to a control change far away lengthens the notes past the limit.
  pedal = tmp_path / "pedal.mid"
  pedal.write_bytes(hf.midi([hf.track([(0, b"\xb0\x40\x7f")] + _NOTE
                                      + [(8000 * 960, b"\xb0\x40\x00")])]))
  assert midi_io.read_notes(pedal).total_time < 1
  with pytest.raises(MidiReadError, match="max_seconds"):
    midi_io.read_notes(pedal, sustain=True)
  # The note_seq reader: 4 MB by default, and pretty_midi's own 10 M ticks.
  big = tmp_path / "big.mid"
  big.write_bytes(hf.header() + hf.running_status_notes(800_000))
  with pytest.raises(MidiReadError, match="above the 4194304-byte limit"):
    midi_io.read_notes(big, reader="note_seq")
  assert len(midi_io.read_notes(big)) == 800_000
  far = tmp_path / "far.mid"
  far.write_bytes(hf.midi([hf.track([(0x0FFFFFFF, hf.on()), (10, hf.off())])]))
  with pytest.raises(MidiReadError, match="more ticks than the note_seq reader's limit"):
    midi_io.read_notes(far, reader="note_seq", max_seconds=None)


@pytest.mark.parametrize("mspq,division", [(1, 32767), (0xFFFFFF, 1)])
def test_absurd_tempos_read_finite_and_alike(tmp_path, mspq, division):
  path = tmp_path / "tempo.mid"
  path.write_bytes(hf.midi([hf.track([(0, hf.tempo(mspq))] + hf.notes_track(20))],
                           division=division))
  fast = midi_io.read_notes(path, max_seconds=None)
  ref = midi_io.read_notes(path, reader="note_seq", max_seconds=None)
  assert np.isfinite(fast.end).all() and fast.tuples() == ref.tuples()


def test_exact_pairing_replay_refuses_malformed_bytes(tmp_path, groove_files):
  """The pure-Python replay of pretty_midi's pairing (used for ambiguous files) turns bytes
  that end early or run a variable-length number past 4 bytes into a clear error."""
  data = groove_files[0].read_bytes()
  with pytest.raises(MidiReadError, match="cannot parse MIDI"):
    midi_io._pretty_notes_from_bytes(tmp_path / "x.mid", data[:len(data) // 2])
  with pytest.raises(MidiReadError, match="longer than 4 bytes"):
    midi_io._pretty_notes_from_bytes(tmp_path / "x.mid",
                                     hf.header() + hf.chunk(b"\xff\xff\xff\xff\xff\x00"))
  notes, _ = midi_io._pretty_notes_from_bytes(tmp_path / "x.mid", data)
  assert len(notes) == len(midi_io.read_notes(groove_files[0]))


def test_sustain_matches_note_seq_on_random_pedalling():
  """apply_sustain equals note-seq's on random notes and pedal events over 4 instruments,
  including pedals pressed and never lifted (which used to raise IndexError)."""
  import note_seq
  rng = np.random.default_rng(0)
  for case in range(60):
    k, c = int(rng.integers(1, 200)), int(rng.integers(1, 60))
    start = np.round(rng.uniform(0, 10, k), 2)
    notes = Notes.from_arrays(rng.integers(60, 64, k), start,
                              start + np.round(rng.uniform(0.01, 2, k), 2))
    notes.instrument = rng.integers(0, 4, k).astype(np.int32)
    notes.cc_time = np.round(rng.uniform(0, 12, c), 1)
    notes.cc_number = np.full(c, 64, np.int32)
    values = rng.choice([0, 127], c) if case % 3 else np.full(c, 127)
    notes.cc_value = values.astype(np.int32)
    notes.cc_instrument = rng.integers(0, 4, c).astype(np.int32)
    notes.cc_program = np.zeros(c, np.int32)
    notes.cc_is_drum = np.zeros(c, bool)
    ref = note_seq.apply_sustain_control_changes(notes.to_note_sequence())
    assert midi_io.apply_sustain(notes).tuples() == Notes.from_note_sequence(ref).tuples(), case
