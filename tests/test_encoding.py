"""Encodings: round trips on real files, Magenta's vocabulary, the triples text format."""
import dataclasses
import json

import numpy as np
import pytest

from midijax import encoding, midi_io
from midijax.encoding import drum_map
from midijax.errors import ConfigError, TokenError
from midijax.notes import Notes


def _match_notes(src: Notes, dec: Notes, onset_tol: float, dur_tol=None, vel_tol=None):
  """Every source note has a decoded note of the same pitch with onset within `onset_tol`."""
  a, b = src.sorted(), dec.sorted()
  assert len(a) == len(b), (len(a), len(b))
  for p in np.unique(a.pitch):
    sa, sb = a.select(a.pitch == p), b.select(b.pitch == p)
    assert len(sa) == len(sb), f"pitch {p}: {len(sa)} vs {len(sb)}"
    np.testing.assert_allclose(np.sort(sb.start), np.sort(sa.start), atol=onset_tol)
    if dur_tol is not None:
      oa, ob = np.lexsort((sa.end, sa.start)), np.lexsort((sb.end, sb.start))
      np.testing.assert_allclose((sb.end - sb.start)[ob], (sa.end - sa.start)[oa], atol=dur_tol)
    if vel_tol is not None:
      oa, ob = np.lexsort((sa.velocity, sa.start)), np.lexsort((sb.velocity, sb.start))
      assert np.all(np.abs(sb.velocity[ob] - sa.velocity[oa]) < vel_tol)


def test_performance_vocab_is_magentas():
  import note_seq
  enc = encoding.get("performance")
  onehot = note_seq.PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100,
                                              min_pitch=21, max_pitch=108)
  assert onehot.num_classes + 2 == 310 == enc.bos_id
  names = {0: "NOTE_ON", 1: "NOTE_OFF", 2: "TIME_SHIFT", 3: "VELOCITY"}
  for i in range(onehot.num_classes):
    ev = onehot.decode_event(i)
    assert enc.vocab.names[i + 2] == f"{names[ev.event_type - 1]}_{ev.event_value}"
  assert enc.vocab.names[:2] == ["PAD", "EOS"]


def test_performance_round_trip_piano(piano_files):
  enc = encoding.get("performance")
  for path in piano_files[:3] + piano_files[-2:]:
    notes = midi_io.read_notes(path, sustain=True)
    dec = enc.decode_notes(enc.encode(notes))
    # Onsets within one 10 ms step (rounding), lengths within two steps; velocity in a bin.
    _match_notes(notes, dec, onset_tol=0.0051, dur_tol=0.0101, vel_tol=4)
    assert not dec.is_drum.any()


def test_performance_matches_magenta_on_note_sequence(piano_files):
  import note_seq
  from note_seq import performance_lib
  enc = encoding.get("performance")
  onehot = note_seq.PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100,
                                              min_pitch=21, max_pitch=108)
  path = next(f for f in piano_files if "excerpts" in str(f))
  ns = note_seq.apply_sustain_control_changes(midi_io.read_note_sequence(path))
  q = note_seq.quantize_note_sequence_absolute(ns, 100)
  ref = [onehot.encode_event(e) + 2 for e in performance_lib.Performance(q, num_velocity_bins=32)]
  np.testing.assert_array_equal(enc.encode(ns), ref)


def test_long_gaps_use_several_time_shifts():
  enc = encoding.get("performance")
  notes = Notes.from_arrays([60, 62], [0.0, 2.505], [0.5, 3.0], [80, 80])
  names = enc.to_text(enc.encode(notes)).split()
  assert names == ["VELOCITY_20", "NOTE_ON_60", "TIME_SHIFT_50", "NOTE_OFF_60", "TIME_SHIFT_100",
                   "TIME_SHIFT_100", "TIME_SHIFT_1", "NOTE_ON_62", "TIME_SHIFT_49", "NOTE_OFF_62"]


@pytest.mark.parametrize("pitch_map", ["groovae", "none"])
def test_drums_round_trip_groove(groove_files, pitch_map):
  enc = encoding.get("drums", pitch_map=pitch_map)
  for path in groove_files[:: len(groove_files) // 12]:
    notes = midi_io.read_notes(path)
    dec = enc.decode_notes(enc.encode(notes))
    assert dec.is_drum.all()
    if pitch_map == "groovae":
      cls = drum_map.pitch_to_groovae_class(notes.pitch)
      notes = notes.select(cls >= 0)
      notes.pitch = drum_map.GROOVAE_CANONICAL_PITCH[drum_map.pitch_to_groovae_class(notes.pitch)]
    _match_notes(notes, dec, onset_tol=0.0051, vel_tol=4)


@pytest.mark.parametrize("unit", ["beats", "grid"])
def test_drums_in_beats_round_trip_groove(groove_files, unit):
  """time_unit beats / grid: onsets within half a step (1/96 quarter) at the file's tempo."""
  enc = encoding.get("drums", time_unit=unit)
  for path in groove_files[:: len(groove_files) // 12]:
    notes = midi_io.read_notes(path)
    ids = enc.encode(notes)
    assert enc.count_tokens(notes) == len(ids)
    dec = enc.decode_notes(ids, qpm=notes.qpm)
    notes = notes.select(drum_map.pitch_to_groovae_class(notes.pitch) >= 0)
    notes.pitch = drum_map.GROOVAE_CANONICAL_PITCH[drum_map.pitch_to_groovae_class(notes.pitch)]
    _match_notes(notes, dec, onset_tol=60.0 / notes.qpm / 96 + 1e-9, vel_tol=4)


def _shift_steps(enc, ids):
  shifts = ids[(ids >= enc.shift_base) & (ids < enc.velocity_base)]
  return shifts - enc.shift_base + 1


@pytest.mark.parametrize("unit,bar_steps", [("beats", 192), ("grid", 16)])
def test_drums_in_beats_are_tempo_invariant(unit, bar_steps):
  """The same bar at 90 and 150 qpm gives the same ids (a 4/4 bar is 192 steps of 1/48
  quarter, or 16 grid steps); in seconds it does not. Vocabularies in seconds keep their
  old config (no new keys)."""
  beats, secs = encoding.get("drums", time_unit=unit), encoding.get("drums")
  assert "time_unit" not in secs.config and beats.config["time_unit"] == unit
  assert encoding.from_config(beats.config).config == beats.config
  quarters = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])  # 8ths, then a bar line
  ids = {}
  for qpm in (90.0, 150.0):
    start = quarters * 60.0 / qpm + 0.003 * np.arange(9) % 0.006  # a little microtiming
    notes = Notes.from_arrays(np.where(np.arange(9) % 2, 42, 36), start, start + 0.05,
                              np.full(9, 90), is_drum=True, qpm=qpm)
    ids[qpm] = (beats.encode(notes), secs.encode(notes))
    back = beats.decode_notes(ids[qpm][0], qpm=qpm)
    np.testing.assert_allclose(back.start, notes.start, atol=60.0 / qpm / 96)
    assert _shift_steps(beats, ids[qpm][0]).sum() == bar_steps
  np.testing.assert_array_equal(ids[90.0][0], ids[150.0][0])
  assert not np.array_equal(ids[90.0][1], ids[150.0][1])
  from midijax.encoding import grammar
  for qpm in (90.0, 150.0):
    table = grammar.get_tables(beats, qpm=qpm).seconds
    one_step = 60.0 / qpm / (48 if unit == "beats" else 4)
    assert table[beats.shift_base] == pytest.approx(one_step)
  with pytest.raises(ConfigError, match="time_unit"):
    encoding.get("drums", time_unit="ticks")


def test_drums_on_the_grid_keep_offsets_apart_from_time():
  """grid: a hit 2/48 of a quarter late is TIME_SHIFT to its 16th plus OFFSET_2; the next
  hit on the grid needs OFFSET_0 again, and the shifts still sum to whole 16ths, so a
  wrong offset never moves later hits. An early hit at time 0 decodes at 0, not before."""
  enc = encoding.get("drums", time_unit="grid")
  qpm = 120.0
  fine = 60.0 / qpm / 48
  start = np.array([0.0, 0.125 + 2 * fine, 0.25, 0.5 - 3 * fine])
  notes = Notes.from_arrays([36, 42, 38, 42], start, start + 0.05, [100] * 4, is_drum=True,
                            qpm=qpm)
  names = enc.to_text(enc.encode(notes)).split()
  assert names == ["VELOCITY_25", "DRUM_kick", "TIME_SHIFT_1", "OFFSET_2", "DRUM_closed_hihat",
                   "TIME_SHIFT_1", "OFFSET_0", "DRUM_snare", "TIME_SHIFT_2", "OFFSET_-3",
                   "DRUM_closed_hihat"]
  np.testing.assert_allclose(enc.decode_notes(enc.encode(notes), qpm=qpm).start, start,
                             atol=1e-9)
  early = enc.decode_notes(enc.from_text("OFFSET_-6\nDRUM_kick\n"), qpm=qpm)
  assert early.start.tolist() == [0.0]
  with pytest.raises(ConfigError, match="grid_per_quarter"):
    encoding.get("drums", time_unit="grid", grid_per_quarter=5)


@pytest.mark.parametrize("meter,bar", [((4, 4), 192), ((3, 4), 144), ((6, 8), 144)])
def test_bar_tokens_mark_every_bar_line(meter, bar):
  """bar_tokens: a BAR at each bar line of the file's meter (before the hits there), time
  shifts split at it, nothing else changes: decoding skips BAR."""
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True)
  plain = encoding.get("drums", time_unit="beats")
  qpm = 100.0
  quarters = np.arange(0, 3 * bar // 48 + 1, 1.0)[:-1] + 0.25  # off the bar lines
  quarters = np.concatenate([[0.0], quarters, [bar // 48 * 2]])  # and two on them
  start = np.sort(quarters) * 60.0 / qpm
  notes = Notes.from_arrays(np.full(len(start), 36), start, start + 0.05,
                            np.full(len(start), 90), is_drum=True, qpm=qpm)
  notes = dataclasses.replace(notes, time_signatures=np.array([[0.0, *meter]], np.float64))
  ids = enc.encode(notes)
  assert enc.count_tokens(notes) == len(ids)
  steps = np.where((ids >= enc.shift_base) & (ids < enc.velocity_base), ids - enc.shift_base + 1, 0)
  at = np.cumsum(steps)[ids == enc.bar_id]
  last = int(np.round(start[-1] * qpm / 60 * 48))
  assert at.tolist() == list(range(0, last + 1, bar))
  # A BAR comes before a hit on its bar line.
  assert ids[0] == enc.bar_id and ids[np.flatnonzero(ids == enc.bar_id)[-1] + 1] < enc.shift_base
  np.testing.assert_allclose(enc.decode_notes(ids, qpm=qpm).start,
                             plain.decode_notes(plain.encode(notes), qpm=qpm).start)
  with pytest.raises(ConfigError, match="bar_tokens"):
    encoding.get("drums", bar_tokens=True)


def test_velocity_after_the_drum_round_trips_groove(groove_files):
  """velocity_after: every hit is [DRUM, its VELOCITY] (BAR has none); the hits, times and
  velocities decode as drums_beats' do, also fed in chunks that split a hit from its
  velocity; count_tokens is the stream's length."""
  plain = encoding.get("drums", time_unit="beats", bar_tokens=True)
  after = encoding.get("drums", time_unit="beats", bar_tokens=True, velocity_after=True)
  assert after.config["velocity_after"] and "velocity_after" not in plain.config
  assert after.vocab.names == plain.vocab.names
  for path in groove_files[:: len(groove_files) // 8]:
    notes = midi_io.read_notes(path)
    ids = after.encode(notes)
    assert after.count_tokens(notes) == len(ids)
    is_drum = ids < after.shift_base
    is_vel = (ids >= after.velocity_base) & (ids < after.offset_base)
    assert is_drum.sum() == is_vel.sum() > 0
    assert np.all(is_vel[np.flatnonzero(is_drum) + 1]) and not is_vel[0]
    want = plain.decode_notes(plain.encode(notes), qpm=notes.qpm)
    got = after.decode_notes(ids, qpm=notes.qpm)
    np.testing.assert_array_equal(got.pitch, want.pitch)
    np.testing.assert_allclose(got.start, want.start)
    np.testing.assert_array_equal(got.velocity, want.velocity)
    cut = int(np.flatnonzero(is_drum)[3]) + 1  # the 4th hit's velocity starts a chunk
    dec = after.decoder(qpm=notes.qpm)
    for chunk in (ids[:cut], ids[cut:cut + 5], ids[cut + 5:]):
      dec.feed(chunk)
    np.testing.assert_array_equal(dec.notes().velocity, want.velocity)
  # A hit left without its velocity (a stream cut after the drum) keeps the one in force.
  tail = after.decode_notes(after.from_text("DRUM_kick\nVELOCITY_20\nDRUM_snare\n"))
  assert tail.velocity.tolist() == [1 + 19 * after.velocity_bin_size] * 2
  with pytest.raises(ConfigError, match="velocity_after"):
    encoding.get("drums", time_unit="grid", velocity_after=True)


@pytest.mark.parametrize("unit,steps", [("beats", 8 * 48), ("grid", 8 * 4)])
def test_drums_in_beats_prompt_ends_on_the_cut(unit, steps):
  """encode_prompt pads with time shifts up to the cut, counted in beats at the tempo map."""
  enc = encoding.get("drums", time_unit=unit)
  qpm = 100.0
  start = np.array([0.0, 0.6, 1.2])
  notes = Notes.from_arrays([36, 38, 36], start, start + 0.1, [80, 80, 80], is_drum=True,
                            qpm=qpm)
  cut = 8 * 60.0 / qpm  # two bars of 4/4
  ids = encoding.encode_prompt(enc, notes, cut)
  assert _shift_steps(enc, ids).sum() == steps


def test_groovae_table():
  assert drum_map.pitch_to_groovae_class([36, 38, 37, 40, 42, 22, 44, 46, 26, 43, 58, 47, 45, 50,
                                          48, 49, 52, 55, 57, 51, 53, 59, 60]).tolist() == \
      [0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7, 8, 8, 8, -1]


def test_triples_text_is_the_course_format(groove_files):
  enc = encoding.get("triples")
  notes = midi_io.read_notes(groove_files[1])
  text = enc.notes_to_text(notes)
  lines = text.split()
  assert len(lines) == 3 * len(notes)
  assert lines[0].startswith("POSITION_") and lines[1].startswith("NOTE_ON_") and \
      lines[2].startswith("DURATION_")
  back = enc.text_to_notes(text, qpm=notes.qpm, ticks_per_quarter=notes.ticks_per_quarter,
                           is_drum=True)
  # Exact to the tick (480 per quarter): onsets within half a tick.
  half_tick = 0.5 * 60.0 / (notes.qpm * notes.ticks_per_quarter)
  _match_notes(notes, back, onset_tol=half_tick + 1e-9)
  assert back.is_drum.all()


def test_triples_example_from_the_issue():
  enc = encoding.get("triples")
  notes = enc.text_to_notes("POSITION_0\nNOTE_ON_60\nDURATION_480\n")
  assert notes.tuples()[0][:4] == (60, 100, 0.0, 0.5)
  ids = enc.from_text("POSITION_0\nNOTE_ON_60\nDURATION_480\n")
  assert enc.to_text(ids) == "POSITION_0\nNOTE_ON_60\nDURATION_480\n"
  assert [enc.vocab.names[i] for i in ids] == ["POS_0", "NOTE_ON_60", "DUR_24"]


def test_triples_ids_round_trip_piano(piano_files):
  enc = encoding.get("triples")
  notes = midi_io.read_notes(piano_files[0], sustain=True)
  dec = enc.decode_notes(enc.encode(notes), qpm=notes.qpm)
  grid = 60.0 / (notes.qpm * 24)  # one grid step in seconds at the file's first tempo
  if len(notes.tempos) == 1:
    _match_notes(notes, dec, onset_tol=grid / 2 + 1e-6)
  else:
    assert len(dec) == len(notes)


def test_invalid_tokens_name_the_line_and_lenient_counts():
  enc = encoding.get("performance")
  with pytest.raises(TokenError, match="line 2: 'NOTE_ON_7'"):
    enc.from_text("NOTE_ON_60\nNOTE_ON_7\nNOTE_OFF_60\n")
  stats = {}
  ids = enc.from_text("NOTE_ON_60\nNOTE_ON_7\nNOTE_OFF_60\n", lenient=True, stats=stats)
  assert len(ids) == 2 and stats["skipped"] == 1


def test_conditioning_block_and_vocab_json(tmp_path):
  for name in encoding.ENCODINGS:
    enc = encoding.get(name)
    sid = enc.condition_id("style", "funk")
    assert enc.vocab.names[sid] == "STYLE_funk" and sid > enc.bos_id
    assert enc.vocab.names[enc.condition_id("tempo", "104")] == "TEMPO_100-110"
    seq = enc.with_specials([enc.bos_id - 1], {"style": "rock", "type": "fill"})
    assert seq[0] == enc.bos_id and seq[-1] == enc.eos_id
    np.testing.assert_array_equal(enc.strip_specials(seq), [enc.bos_id - 1])
    enc.save_vocab(tmp_path / f"{name}.json")
    again = encoding.load_vocab(tmp_path / f"{name}.json")
    assert again.vocab.names == enc.vocab.names and again.config == enc.config
    assert json.loads((tmp_path / f"{name}.json").read_text())["size"] == enc.vocab_size
  with pytest.raises(TokenError, match="valid: afrobeat, afrocuban"):
    enc.condition_id("style", "polka")
  with pytest.raises(ConfigError, match="unknown encoding"):
    encoding.get("remi")


# ----------------------------------------------------------------------------- limits
from midijax.encoding.base import TimeLimitError, TokenLimitError  # noqa: E402


@pytest.mark.parametrize("name", ["performance", "drums", "triples"])
def test_count_tokens_is_the_length_of_encode(name, groove_files, piano_files):
  enc = encoding.get(name)
  for path in groove_files[:3] + piano_files[:2]:
    notes = midi_io.read_notes(path, sustain=True)
    ids = enc.encode(notes)
    assert enc.count_tokens(notes) == len(ids)
    if not len(ids):  # drums of a piano file
      continue
    want = rf"\({len(ids)} {name} tokens; limit {len(ids) - 1}\)"
    with pytest.raises(TokenLimitError, match=want):
      enc.encode(notes, max_tokens=len(ids) - 1)


def test_encode_refuses_before_allocating():
  """Two notes 30 years apart would be ~1e9 time shifts: refused after counting them, with
  no allocation in proportion (the issue: a 98-byte file asked for gigabytes)."""
  import tracemalloc
  notes = Notes.from_arrays([60, 62], [0.0, 1e9], [0.5, 1e9 + 1], [80, 80])
  for name in ("performance", "drums"):
    enc = encoding.get(name)
    if name == "drums":
      notes.is_drum[:] = True
      notes.pitch[:] = 36
    tracemalloc.start()
    with pytest.raises(TokenLimitError) as e:
      enc.encode(notes, max_seconds=None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.count > 10**9 and e.value.limit == 2_000_000 and peak < 1 << 20
    with pytest.raises(TokenError, match="max_seconds limit"):
      enc.encode(notes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_encode_refuses_times_that_are_not_finite_or_negative(bad):
  notes = Notes.from_arrays([60], [bad], [1.0])
  for name in encoding.ENCODINGS:
    with pytest.raises(TokenError, match="cannot encode note"):
      encoding.get(name).encode(notes)


@pytest.mark.parametrize("name", ["performance", "drums", "triples"])
def test_decoders_stream_in_chunks(name, groove_files, piano_files):
  """Feeding a decoder chunk by chunk gives the notes of one decode; a time limit names the
  id (its index in the chunk) that passes it."""
  enc = encoding.get(name)
  notes = midi_io.read_notes(piano_files[0] if name != "drums" else groove_files[0])
  ids = enc.encode(notes)
  whole = enc.decode_notes(ids, qpm=notes.qpm)
  d = enc.decoder(qpm=notes.qpm)
  for a in range(0, len(ids), 97):
    d.feed(ids[a:a + 97])
  assert d.notes().tuples() == whole.tuples() and d.num_notes == len(whole)
  limit = float(np.median(whole.end))
  d = enc.decoder(qpm=notes.qpm, max_seconds=limit)
  with pytest.raises(TimeLimitError) as e:
    d.feed(ids)
  assert e.value.seconds > limit and 0 <= e.value.index < len(ids)


def test_token_ids_are_ascii_digits_in_range():
  enc = encoding.get("performance")
  assert enc.token_id("62") == 62 and enc.token_id("NOTE_ON_60") == enc.vocab["NOTE_ON_60"]
  for tok in ("\u0663", "372", "-1", "1_0", "+5", "99999999999999999999", "3.0", ""):
    assert enc.token_id(tok) is None, tok
  with pytest.raises(TokenError, match="line 1: '\u0663' is not a performance token"):
    enc.from_text("\u0663\n")


@pytest.mark.parametrize("line,reason", [
    ("DURATION_99999999999999999999999", "needs a whole number of at most 12 digits"),
    ("DURATION_0", "at least 1 tick"), ("DURATION_-5", "needs a whole number"),
    ("DURATION_268435000", "past tick 268435455"), ("NOTE_ON_60", "not a valid DURATION_<n>"),
])
def test_course_text_bounds_each_line(line, reason):
  enc = encoding.get("triples")
  text = f"POSITION_500\nNOTE_ON_60\n{line}\n"
  with pytest.raises(TokenError, match=f"line 3: .*{reason}"):
    enc.text_to_notes(text)
  stats = {}
  assert len(enc.text_to_notes(text + "POSITION_0\nNOTE_ON_1\nDURATION_2\n", lenient=True,
                               stats=stats)) == 1 and stats["skipped"] == 1
