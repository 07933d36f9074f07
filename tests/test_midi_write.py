"""midi_io.write_midi, the one MIDI writer: note-seq's bytes without importing note-seq."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from midijax import encoding, midi_io
from midijax.notes import Notes

REPO = pathlib.Path(__file__).resolve().parents[1]


def note_seq_bytes(notes: Notes, tmp_path) -> bytes:
  """What note-seq writes for `notes` (the reference)."""
  import note_seq
  ns = notes.to_note_sequence()
  if not ns.tempos:
    ns.tempos.add(time=0.0, qpm=120.0)
  if not ns.time_signatures:
    ns.time_signatures.add(time=0.0, numerator=4, denominator=4)
  path = tmp_path / "note_seq.mid"
  note_seq.midi_io.note_sequence_to_midi_file(ns, str(path))
  return path.read_bytes()


def assert_same_bytes(notes: Notes, tmp_path):
  ours = midi_io.write_midi(notes, tmp_path / "ours.mid").read_bytes()
  assert ours == note_seq_bytes(notes, tmp_path)


def test_real_drum_files_match_note_seq(groove_files, tmp_path):
  for path in groove_files[:12:3]:
    notes = midi_io.read_notes(path)
    assert notes.is_drum.all() and len(notes)
    assert_same_bytes(notes, tmp_path)
    # Decoded drums (what `generate` writes): GrooVAE classes back on GM drum pitches.
    drums = encoding.get("drums")
    assert_same_bytes(drums.decode_notes(drums.encode(notes), is_drum=True, qpm=notes.qpm),
                      tmp_path)


def test_real_piano_files_match_note_seq(piano_files, tmp_path):
  for path in [f for f in piano_files if "maestro" in str(f)][:1] + [
      f for f in piano_files if "giantmidi" in str(f)][:1]:
    notes = midi_io.read_notes(path)  # sustain pedal control changes included
    assert len(notes.cc_time) and not notes.is_drum.any()
    head = notes.select(notes.start < 30.0)
    assert_same_bytes(head, tmp_path)
    perf = encoding.get("performance")
    assert_same_bytes(perf.decode_notes(perf.encode(midi_io.apply_sustain(head))), tmp_path)


def test_tempo_maps_meters_and_tracks_match_note_seq(tmp_path):
  notes = Notes.from_arrays(
      [60, 64, 36, 67, 42, 70], [0.0, 0.5, 0.25, 1.75, 2.0, 3.1], [0.4, 1.0, 0.3, 2.5, 2.1, 3.3],
      [90, 80, 100, 70, 60, 127], is_drum=[False, False, True, False, True, False],
      program=[0, 0, 0, 40, 0, 40], instrument=[0, 0, 9, 2, 9, 2])
  notes = dataclasses.replace(
      notes, tempos=np.array([[0.0, 97.0], [1.5, 140.0], [0.0, 97.0], [2.75, 60.5]]),
      time_signatures=np.array([[0.0, 3, 4], [2.0, 6, 8]]), ticks_per_quarter=96,
      cc_time=np.array([0.1, 1.9]), cc_number=np.array([64, 64]),
      cc_value=np.array([127, 0]), cc_instrument=np.array([2, 2]),
      cc_program=np.array([40, 40]), cc_is_drum=np.array([False, False]))
  assert_same_bytes(notes, tmp_path)
  # No tempo at time 0, no meter, no resolution: note-seq's defaults.
  late = dataclasses.replace(notes, tempos=np.array([[1.0, 150.0]]),
                             time_signatures=np.zeros((0, 3)), ticks_per_quarter=0)
  assert_same_bytes(late, tmp_path)
  assert_same_bytes(Notes.empty(), tmp_path)


def test_writing_imports_no_note_seq(groove_files, tmp_path):
  # A fresh interpreter: other tests import note_seq into this one.
  code = ("import json, sys\n"
          "from midijax import midi_io\n"
          f"notes = midi_io.read_notes({str(groove_files[0])!r})\n"
          f"midi_io.write_midi(notes, {str(tmp_path / 'out.mid')!r})\n"
          "print(json.dumps(sorted(m for m in ('note_seq', 'bokeh', 'pandas', 'tensorflow', "
          "'jax') if m in sys.modules)))\n")
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=REPO, check=True, timeout=120)
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
  assert (tmp_path / "out.mid").read_bytes()[:4] == b"MThd"


def test_an_existing_file_is_replaced_whole(tmp_path, groove_files):
  out = tmp_path / "x.mid"
  out.write_bytes(b"old")
  midi_io.write_midi(midi_io.read_notes(groove_files[0]), out)
  assert out.read_bytes()[:4] == b"MThd" and not (tmp_path / "x.mid.tmp").exists()


def test_note_sequence_input_still_written(tmp_path, groove_files):
  notes = midi_io.read_notes(groove_files[1])
  out = midi_io.write_midi(notes.to_note_sequence(), tmp_path / "ns.mid")
  assert out.read_bytes() == midi_io.write_midi(notes, tmp_path / "n.mid").read_bytes()
