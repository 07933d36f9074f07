"""Hostile MIDI and token files for the fuzz suite (tests/test_fuzz.py), made from real ones.

    midi_cases(real_files, seed)  -> [(name, bytes)], at least 500
    token_cases(seed)             -> [(name, bytes, encoding)]
    random_token_cases(seed)      -> [(name, bytes, encoding)]: valid-token streams

Every list is the same for the same seed and inputs. The kinds of MIDI case (the name's
prefix): byte flips, truncation, garbage, non-MIDI files named .mid, empty files, header
fields (division 0, SMPTE, track counts, lengths), tempos (0, absurd, many), delta times
(huge, many, overflowing int32, over-long), running-status abuse, notes (no note-off,
ambiguous pairing, a million), tracks (thousands, 65,535), chunk / meta / sysex lengths,
time signatures, and structural mutations of real files (deltas scaled, tempos replaced,
tracks multiplied).
"""
from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

import numpy as np

Event = Tuple[int, bytes]  # (delta ticks, event bytes after the delta)


# ----------------------------------------------------------------------------- bytes
def vlq(n: int) -> bytes:
  """A variable-length quantity, as many bytes as `n` needs (MIDI allows 4)."""
  out = [n & 0x7F]
  n >>= 7
  while n:
    out.append(0x80 | (n & 0x7F))
    n >>= 7
  return bytes(reversed(out))


def header(fmt: int = 1, ntracks: int = 1, division: int = 480, length: int = 6) -> bytes:
  return b"MThd" + struct.pack(">I", length) + struct.pack(">HHH", fmt, ntracks, division)


def chunk(body: bytes, name: bytes = b"MTrk", length: int = None) -> bytes:
  return name + struct.pack(">I", len(body) if length is None else length) + body


def track(events: Sequence[Event], eot: bool = True) -> bytes:
  body = b"".join(vlq(d) + e for d, e in events)
  return chunk(body + (b"\x00\xff\x2f\x00" if eot else b""))


def midi(tracks: Sequence[bytes], division: int = 480, fmt: int = 1, ntracks: int = None) -> bytes:
  return header(fmt, len(tracks) if ntracks is None else ntracks, division) + b"".join(tracks)


def on(pitch: int = 60, vel: int = 100, ch: int = 0) -> bytes:
  return bytes([0x90 | ch, pitch & 0x7F, vel & 0x7F])


def off(pitch: int = 60, ch: int = 0) -> bytes:
  return bytes([0x80 | ch, pitch & 0x7F, 0])


def tempo(mspq: int) -> bytes:
  return b"\xff\x51\x03" + (mspq & 0xFFFFFF).to_bytes(3, "big")


def meta(kind: int, data: bytes, length: int = None) -> bytes:
  return bytes([0xFF, kind]) + vlq(len(data) if length is None else length) + data


def time_sig(num: int, dd: int) -> bytes:
  return meta(0x58, bytes([num, dd, 24, 8]))


def notes_track(n: int, gap: int = 10, dur: int = 5, ch: int = 0) -> List[Event]:
  evs = []
  for i in range(n):
    p = 36 + (i * 7) % 60
    evs += [(gap, on(p, 90, ch)), (dur, off(p, ch))]
  return evs


def running_status_notes(n: int) -> bytes:
  """One track of `n` notes in running status (6 bytes a note): note-on, then velocity 0."""
  body = bytearray(b"\x00\x90\x3c\x64\x01\x3c\x00")
  pair = bytearray()
  for i in range(60):
    p = 36 + i
    pair += bytes([0, p, 100, 1, p, 0])
  reps, rest = divmod(n - 1, 60)
  body += pair * reps + pair[:6 * rest]
  return chunk(bytes(body) + b"\x00\xff\x2f\x00")


# ----------------------------------------------------------------------------- real files
def parse_tracks(data: bytes) -> Tuple[int, List[List[Event]]]:
  """A real (well-formed) file's division and tracks as (delta, event bytes) lists."""
  import io
  import mido
  mf = mido.MidiFile(file=io.BytesIO(data))
  tracks = []
  for t in mf.tracks:
    evs = []
    for m in t:
      if m.type == "end_of_track":
        continue
      evs.append((m.time, bytes(m.bytes()) if m.is_meta or m.type == "sysex" else bytes(m.bin())))
    tracks.append(evs)
  return mf.ticks_per_beat, tracks


def rebuild(division: int, tracks: Sequence[Sequence[Event]], **kw) -> bytes:
  return midi([track(t) for t in tracks], division=division, **kw)


def _is_tempo(e: bytes) -> bool:
  return e[:2] == b"\xff\x51"


# ----------------------------------------------------------------------------- MIDI cases
def midi_cases(real: Sequence[bytes], seed: int = 0) -> List[Tuple[str, bytes]]:
  """At least 500 hostile MIDI files (name, bytes), made from the real files' bytes."""
  rng = np.random.default_rng(seed)
  cases: List[Tuple[str, bytes]] = []
  add = lambda name, data: cases.append((f"{len(cases):03d}_{name}", bytes(data)))
  pick = lambda: real[int(rng.integers(len(real)))]

  # Byte flips anywhere, in the header, in the first track header.
  for i in range(180):
    data = bytearray(pick())
    k = int(rng.integers(1, 40))
    for pos in rng.integers(0, len(data), k):
      data[pos] ^= int(rng.integers(1, 256))
    add(f"flip{k}", data)
  for i in range(20):
    data = bytearray(pick())
    pos = int(rng.integers(4, 22))
    data[pos] = int(rng.integers(0, 256))
    add(f"flip_header_{pos}", data)
  # Truncation.
  for i in range(60):
    data = pick()
    add("truncated", data[:int(rng.integers(1, len(data)))])
  # Garbage, with and without a valid header and track header.
  for i in range(30):
    body = rng.bytes(int(rng.integers(1, 5000)))
    kind = i % 3
    if kind == 0:
      add("garbage", body)
    elif kind == 1:
      add("garbage_after_header", header() + body)
    else:
      add("garbage_track", header() + chunk(body))
  # Not MIDI at all, named .mid; empty and tiny files.
  for name, data in [("text", b"hello, this is not a MIDI file\n"), ("json", b'{"a": 1}'),
                     ("png", b"\x89PNG\r\n\x1a\n" + rng.bytes(200)),
                     ("zip", b"PK\x03\x04" + rng.bytes(100)),
                     ("riff", b"RIFF\x00\x00\x00\x00WAVEfmt "),
                     ("tokens", b"NOTE_ON_60\nTIME_SHIFT_10\n"),
                     ("empty", b""), ("one_byte", b"M"), ("mthd_only", b"MThd"),
                     ("mthd_short", b"MThd\x00\x00\x00\x06\x00"), ("header_only", header()),
                     ("nul", b"\x00" * 1000)]:
    add(f"nonmidi_{name}", data)

  good = [(10, on()), (480, off())]
  # Header fields.
  for division in (0, 0xE728, 0xE250, 0xE764, 0xE878, 0x8001, 0xFF00, 0x8000, 1, 32767, 2, 3):
    add(f"division_{division:04x}", midi([track(good)], division=division))
  for fmt in (0, 2, 3, 0xFFFF):
    add(f"format_{fmt}", midi([track(good)], fmt=fmt))
  for n in (0, 2, 100, 65535):
    add(f"ntracks_claimed_{n}", midi([track(good)], ntracks=n))
  for length in (0, 5, 7, 100, 0xFFFFFFFF):
    add(f"header_length_{length}", header(length=length) + track(good))

  # Tempos.
  for name, evs in [
      ("zero_start", [(0, tempo(0))] + good),
      ("zero_middle", good + [(100, tempo(0))] + good),
      ("one_us", [(0, tempo(1))] + good),
      ("max", [(0, tempo(0xFFFFFF))] + good),
      ("zero_after_notes", notes_track(20) + [(0, tempo(0))]),
      ("many_absurd", [(1, tempo(1 if i % 2 else 0xFFFFFF)) for i in range(20000)] + good),
      ("many_same_tick", [(0, tempo(500000 + i)) for i in range(5000)] + good),
      ("short_meta", [(0, b"\xff\x51\x02\x07\xa1")] + good),
      ("empty_meta", [(0, b"\xff\x51\x00")] + good),
      ("long_meta", [(0, meta(0x51, bytes(10)))] + good)]:
    add(f"tempo_{name}", midi([track(evs)]))
  add("tempo_zero_track2", midi([track(good), track([(0, tempo(0))] + good)]))
  add("tempo_one_us_tpq32767", midi([track([(0, tempo(1))] + notes_track(50))], division=32767))
  add("tempo_max_tpq1", midi([track([(0, tempo(0xFFFFFF))] + notes_track(50))], division=1))

  # Delta times: huge, many, overflowing int32, longer than 4 bytes.
  big = 0x0FFFFFFF
  for n in (1, 2, 7, 8, 9, 16, 40):
    add(f"delta_huge_x{n}", midi([track([(big, on()), (10, off())] * n)]))
  add("delta_huge_two_98_bytes", midi([track([(big, on()), (big, off())])]))
  add("delta_huge_duration", midi([track([(0, on()), (big, off())])]))
  add("delta_huge_then_notes", midi([track([(big, tempo(500000))] + notes_track(100))]))
  add("delta_many_small", midi([track([(0x7F, b"\xff\x01\x00")] * 100000 + good)]))
  add("delta_many_shifts", midi([track(notes_track(2000, gap=100000))]))
  add("delta_hours_apart", midi([track([(0, on()), (10, off()), (7_000_000, on()), (10, off())])]))
  add("delta_5_bytes", header() + chunk(b"\x00" + on() + b"\x81\x80\x80\x80\x00" + off()
                                        + b"\x00\xff\x2f\x00"))
  add("delta_endless_vlq", header() + chunk(b"\x80" * 100000))
  add("delta_endless_vlq_4mb", header() + chunk(b"\xff" * (4 << 20)))
  for ticks in (2**28, 2**31 - 1, 2**31, 2**32):
    evs, left = [], ticks
    while left > 0:
      step = min(left, big)
      evs.append((step, b"\xff\x01\x00"))
      left -= step
    add(f"delta_to_tick_{ticks}", midi([track(evs + good)]))

  # Running status abuse.
  add("rs_at_track_start", header() + chunk(b"\x00\x3c\x64\x10\x3c\x00\x00\xff\x2f\x00"))
  add("rs_after_meta", header() + chunk(b"\x00\x90\x3c\x64\x00\xff\x01\x00\x10\x3c\x00"
                                        b"\x00\xff\x2f\x00"))
  add("rs_after_sysex", header() + chunk(b"\x00\x90\x3c\x64\x00\xf0\x01\xf7\x10\x3c\x00"
                                         b"\x00\xff\x2f\x00"))
  add("rs_across_tracks", header(ntracks=2) + chunk(b"\x00\x90\x3c\x64")
      + chunk(b"\x10\x3c\x00\x00\xff\x2f\x00"))
  for status in (0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF8, 0xFA, 0xFE):
    add(f"rs_system_{status:02x}", header() + chunk(
        b"\x00\x90\x3c\x64\x00" + bytes([status, 0x01, 0x02]) + b"\x10\x3c\x00\x00\xff\x2f\x00"))
  add("rs_data_bytes_only", header() + chunk(bytes(rng.integers(0, 128, 5000, np.uint8))))
  add("rs_long_run", header() + running_status_notes(20000))
  add("rs_status_in_data", header() + chunk(b"\x00\x90\x90\x90\x10\x80\x80\x00\x00\xff\x2f\x00"))
  add("rs_program_runs", header() + chunk(b"\x00\xc0\x01" + b"\x00\x02" * 3000 + b"\x00\x90\x3c\x64"
                                          b"\x10\x3c\x00\x00\xff\x2f\x00"))

  # Notes.
  add("notes_no_off", midi([track([(10, on(36 + i % 60)) for i in range(1000)])]))
  add("notes_off_only", midi([track([(10, off(36 + i % 60)) for i in range(1000)])]))
  add("notes_same_tick", midi([track([(0, on()), (0, off())] * 100 + good)]))
  add("notes_vel0_only", midi([track([(10, on(60, 0))] * 100)]))
  add("notes_overlap_same_tick", midi([track([(0, on()), (0, on()), (10, off()), (0, on()),
                                              (10, off()), (0, off())] * 500)]))
  add("notes_overlap_many", midi([track([(1, on())] * 3000 + [(0, off())] * 3000)]))
  add("notes_all_channels", midi([track([e for c in range(16) for e in
                                         [(1, on(60, 100, c)), (5, off(60, c))]])]))
  add("notes_pitch_extremes", midi([track([(0, on(0)), (10, off(0)), (0, on(127)),
                                           (10, off(127))])]))
  add("notes_drums_only", midi([track(notes_track(200, ch=9))]))
  add("notes_out_of_performance_range", midi([track([(0, on(5)), (10, off(5)), (0, on(120)),
                                                     (10, off(120))])]))
  add("notes_million", header() + running_status_notes(1_000_000))
  add("notes_2_1_million", header() + running_status_notes(2_100_000))
  add("notes_cc_million", header() + chunk(b"\x00\xb0\x40\x7f" + b"\x00\x40\x00\x00\x40\x7f"
                                            * 500_000 + b"\x00\x90\x3c\x64\x10\x80\x3c\x00"
                                            b"\x00\xff\x2f\x00"))
  add("notes_sustain_never_released", midi([track([(0, b"\xb0\x40\x7f")] + notes_track(50)
                                                  + [(2**27, b"\xb0\x07\x10")])]))
  add("notes_sustain_far_cc", midi([track([(0, b"\xb0\x40\x7f")] + notes_track(10)
                                          + [(big, b"\xb0\x40\x00")] * 4)]))

  # Tracks: thousands, 65,535, every channel and program.
  one = track(good)
  add("tracks_65535", midi([one] * 65535))
  add("tracks_4000", midi([one] * 4000))
  add("tracks_5000_x16ch", midi([track([e for c in range(16) for e in
                                        [(1, on(60, 100, c)), (5, off(60, c))]])] * 5000))
  add("tracks_programs_2048", midi([track([e for c in range(16) for p in range(128) for e in
                                           [(0, bytes([0xC0 | c, p])), (1, on(60, 100, c)),
                                            (1, off(60, c))]])]))
  add("tracks_empty_65535", midi([track([])] * 65535))
  add("tracks_junk_chunks", header(ntracks=2) + chunk(b"abcd", b"XXXX") * 1000 + one
      + chunk(b"", b"JUNK") + one)
  add("tracks_junk_chunks_many", header(ntracks=2) + chunk(b"", b"XXXX") * 200_000 + one)

  # Chunk, meta and sysex lengths.
  for length in (0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 20):
    add(f"chunk_length_{length}", header() + chunk(b"".join(vlq(d) + e for d, e in good)
                                                   + b"\x00\xff\x2f\x00", length=length))
  add("chunk_length_short_then_track", header(ntracks=2) + chunk(b"\x00\x90\x3c\x64", length=2)
      + one)
  for length in (0x0FFFFFFF, 0x7F, 100000, 0):
    add(f"meta_length_{length}", midi([track([(0, meta(0x01, b"abc", length=length))] + good)]))
    add(f"sysex_length_{length}", midi([track([(0, b"\xf0" + vlq(length) + b"\x01\x02\xf7")]
                                              + good)]))
  add("meta_text_100k", midi([track([(0, meta(0x01, b"x"))] * 100000 + good)]))
  add("meta_huge_text", midi([track([(0, meta(0x01, b"y" * (2 << 20)))] + good)]))
  add("meta_unknown_types", midi([track([(0, meta(k, b"zz")) for k in range(0x60, 0x7F)] + good)]))
  add("meta_eot_early", midi([track([(0, b"\xff\x2f\x00")] + good)]))

  # Time and key signatures.
  for num, dd in ((0, 2), (4, 0), (4, 7), (4, 8), (4, 31), (4, 255), (255, 2), (0, 255), (1, 7)):
    add(f"timesig_{num}_{dd}", midi([track([(0, time_sig(num, dd))] + notes_track(30))]))
  add("timesig_short", midi([track([(0, meta(0x58, b"\x04"))] + good)]))
  add("keysig_bad", midi([track([(0, meta(0x59, b"\x7f\x05"))] + good)]))

  # Structural mutations of real files.
  parsed = [parse_tracks(r) for r in real]
  for i in range(96):
    division, tracks = parsed[i % len(parsed)]
    kind = i % 12
    if kind == 0:
      f = int(rng.choice([1000, 100000, 10**7]))
      add(f"real_deltas_x{f}", rebuild(division, [[(min(d * f, 2**35), e) for d, e in t]
                                                  for t in tracks]))
    elif kind == 1:
      v = int(rng.choice([0, 1, 0xFFFFFF]))
      add(f"real_tempo_{v}", rebuild(division, [[(d, tempo(v) if _is_tempo(e) else e)
                                                 for d, e in t] for t in tracks]))
    elif kind == 2:
      add("real_insert_tempo0", rebuild(division, [[(0, tempo(0))] + t for t in tracks]))
    elif kind == 3:
      add("real_division", rebuild(int(rng.choice([0, 1, 32767, 0xE728])), tracks))
    elif kind == 4:
      add("real_no_note_offs", rebuild(division, [[(d, e) for d, e in t
                                                   if not (e[0] & 0xF0 == 0x80 or
                                                           (e[0] & 0xF0 == 0x90 and e[2] == 0))]
                                                  for t in tracks]))
    elif kind == 5:
      add("real_tracks_x30", rebuild(division, list(tracks) * 30))
    elif kind == 6:
      add("real_channel_9", rebuild(division, [[(d, bytes([0x99 if e[0] & 0xF0 == 0x90 else
                                                             0x89 if e[0] & 0xF0 == 0x80 else e[0]])
                                                 + e[1:]) for d, e in t] for t in tracks]))
    elif kind == 7:
      add("real_reversed", rebuild(division, [list(reversed(t)) for t in tracks]))
    elif kind == 8:
      t0 = [(0, tempo(int(rng.integers(0, 1 << 24))))]
      add("real_random_tempo", rebuild(division, [t0 + t for t in tracks]))
    elif kind == 9:
      add("real_timesig_0", rebuild(division, [[(0, time_sig(0, 0))] + t for t in tracks]))
    elif kind == 10:
      add("real_no_eot_wrong_lengths", header(ntracks=len(tracks)) + b"".join(
          chunk(b"".join(vlq(d) + e for d, e in t), length=len(t)) for t in tracks))
    else:
      data = bytearray(rebuild(division, tracks))
      for pos in rng.integers(14, len(data), 5):
        data[pos] = int(rng.choice([0x00, 0x7F, 0x80, 0x90, 0xF0, 0xFF]))
      add("real_status_flips", data)
  return cases


# ----------------------------------------------------------------------------- token cases
def token_cases(seed: int = 0) -> List[Tuple[str, bytes, str]]:
  """Hostile token files (name, bytes, encoding for --encoding, or '' for the header's)."""
  rng = np.random.default_rng(seed)
  cases: List[Tuple[str, bytes, str]] = []
  add = lambda name, data, enc="": cases.append((f"{len(cases):03d}_{name}", bytes(data), enc))
  h = lambda **kw: ("# midijax " + " ".join(f"{k}={v}" for k, v in {
      "encoding": "performance", "is_drum": 0, "ticks_per_quarter": 480, "qpm": 120,
      **kw}.items()) + "\n").encode()
  note = b"VELOCITY_20\nNOTE_ON_60\nTIME_SHIFT_50\nNOTE_OFF_60\n"
  triple = b"POSITION_0\nNOTE_ON_60\nDURATION_480\n"

  # Binary and non-UTF-8 input.
  add("binary_random", rng.bytes(20000))
  add("binary_no_nul", bytes(rng.integers(0x80, 0x100, 5000, np.uint8)))
  add("binary_late_nul", note * 3000 + b"\x00\x01\x02")
  add("binary_latin1_line", note + b"NOTE_ON_\xe960\n" + note)
  add("binary_png", b"\x89PNG\r\n\x1a\n" + rng.bytes(500))
  # Header fields.
  for key, values in [("encoding", ["foo", "", "PERFORMANCE"]),
                      ("is_drum", ["2", "yes", ""]),
                      ("ticks_per_quarter", ["0", "-1", "1.5", "99999999", "abc", "32768", "1",
                                             "\u0663"]),
                      ("qpm", ["abc", "0", "inf", "-inf", "nan", "-120", "1e400", "3.5", "6e7",
                               "6.1e7", "1e-300", "0x10"])]:
    for v in values:
      enc = "triples" if key == "ticks_per_quarter" else ""
      body = triple if enc else note
      add(f"header_{key}_{v}", h(encoding="triples", **{key: v}) + body if enc
          else h(**{key: v}) + body, enc)
  add("header_only", h())
  add("header_garbled", b"# midijax encoding performance qpm\n" + note)
  add("header_duplicate_keys", b"# midijax qpm=120 qpm=abc\n" + note)
  add("header_later_line", note + h(qpm="abc") + note)
  # Huge numbers.
  for name, line in [("duration_huge", b"DURATION_99999999999999999999999"),
                     ("duration_int64", b"DURATION_9223372036854775807"),
                     ("duration_2_28", b"DURATION_268435456"),
                     ("duration_empty", b"DURATION_"),
                     ("duration_zero", b"DURATION_0"),
                     ("duration_negative", b"DURATION_-5"),
                     ("duration_unicode", "DURATION_\u0663".encode()),
                     ("duration_fullwidth", "DURATION_\uff11\uff12".encode()),
                     ("duration_underscore", b"DURATION_1_000")]:
    add(f"triples_{name}", b"POSITION_0\nNOTE_ON_60\n" + line + b"\n" + triple, "triples")
  for name, line in [("position_huge", b"POSITION_999999999999999999"),
                     ("position_2_28", b"POSITION_268435455"),
                     ("position_int64", b"POSITION_9223372036854775807"),
                     ("pitch_128", b"POSITION_0\nNOTE_ON_128"),
                     ("pitch_huge", b"POSITION_0\nNOTE_ON_99999999999")]:
    add(f"triples_{name}", line + b"\nNOTE_ON_60\nDURATION_1\n" + triple, "triples")
  add("triples_far_apart", b"POSITION_0\nNOTE_ON_60\nDURATION_1\nPOSITION_1000000000\n"
      b"NOTE_ON_60\nDURATION_1\n", "triples")
  add("triples_long_at_max_tick", b"POSITION_268435000\nNOTE_ON_60\nDURATION_455\n", "triples")
  add("triples_hours", b"POSITION_7000000\nNOTE_ON_60\nDURATION_480\n", "triples")
  add("triples_tpq1_fast", h(encoding="triples", ticks_per_quarter=1, qpm="6e7")
      + b"POSITION_0\nNOTE_ON_60\nDURATION_1\nPOSITION_100000000\nNOTE_ON_62\nDURATION_5\n")
  add("triples_ids", h(encoding="triples") + b"2\n390\n518\n5\n400\n530\n")
  add("triples_names", h(encoding="triples") + b"POS_0\nNOTE_ON_60\nDUR_24\nPOS_384\n"
      b"NOTE_ON_62\nDUR_192\n")
  add("triples_ids_out_of_order", h(encoding="triples") + b"390\n2\n518\n518\n2\n")
  add("triples_starts_note_on", b"NOTE_ON_60\nPOSITION_0\nNOTE_ON_60\nDURATION_10\n", "triples")
  add("triples_partial_end", triple + b"POSITION_500\nNOTE_ON_62\n", "triples")
  add("triples_mixed", triple + b"POS_3\n17\n" + triple, "triples")
  for name, line in [("id_huge", b"99999999999999999999"), ("id_negative", b"-1"),
                     ("id_vocab_size", b"372"), ("id_max", b"371"), ("id_float", b"3.0"),
                     ("id_unicode", "\u0663\u0663".encode()), ("id_plus", b"+5"),
                     ("shift_huge", b"TIME_SHIFT_99999999999"), ("name_lower", b"note_on_60"),
                     ("pad", b"0"), ("eos_first", b"1"), ("bos", b"310"), ("conditioning", b"320")]:
    add(f"performance_{name}", line + b"\n" + note, "performance")
  # Long lines, line endings, encodings.
  add("line_300_bytes", b"NOTE_ON_60" + b" " * 290 + b"\n" + note)
  add("line_10mb_no_newline", b"A" * (10 << 20))
  add("line_cr_only", note.replace(b"\n", b"\r") * 10)
  add("line_crlf", note.replace(b"\n", b"\r\n") * 10)
  add("line_bom", b"\xef\xbb\xbf" + note)
  add("line_bom_header", b"\xef\xbb\xbf" + h() + note)
  add("line_tabs_spaces", b"\t  NOTE_ON_60  \t\n" + note)
  add("empty", b"")
  add("blank_lines", b"\n" * 1000)
  add("comments_only", b"# a comment\n" * 100)
  add("eos_then_tokens", note + b"EOS\n" + note + b"NOT_A_TOKEN\n")
  # Time past the limits.
  add("performance_shifts_past_2h", b"NOTE_ON_60\n" + b"TIME_SHIFT_100\n" * 7300 + b"NOTE_OFF_60\n",
      "performance")
  add("performance_note_after_2h", b"TIME_SHIFT_100\n" * 7300 + note, "performance")
  add("performance_open_notes", b"NOTE_ON_60\n" * 1000 + b"TIME_SHIFT_100\n" * 7300, "performance")
  add("drums_past_2h", b"TIME_SHIFT_100\n" * 7300 + b"DRUM_kick\n", "drums")
  add("performance_fast_tempo", h(qpm="6e7") + note * 200)
  # Many lines.
  add("lines_10m_ids", b"62\n" * 10_000_000, "performance")
  add("lines_1m_drum_hits", b"DRUM_kick\n" * 1_000_000, "drums")
  add("lines_2_1m_triples", triple * 700_001, "triples")
  return cases


def random_token_cases(seed: int = 0, per_encoding: int = 25) -> List[Tuple[str, bytes, str]]:
  """Streams of valid tokens (names or ids, random order and length) for each encoding,
  and random course text: what `tokens2midi` writes from them must read back."""
  from midijax import encoding
  rng = np.random.default_rng(seed)
  cases = []
  for name in ("performance", "drums", "triples"):
    enc = encoding.get(name)
    for i in range(per_encoding):
      n = int(rng.integers(1, 3000))
      ids = rng.integers(2, enc.bos_id, n)
      if i % 3 == 0:  # mostly notes: NOTE_ON / hits, with few shifts
        ids = np.where(rng.random(n) < 0.7, rng.integers(2, min(enc.bos_id, 90), n), ids)
      as_names = i % 2 == 0
      body = "".join((enc.vocab.names[j] if as_names else str(j)) + "\n" for j in ids.tolist())
      qpm = float(rng.choice([3.6, 30.0, 120.0, 1000.0, 5e4]))
      head = (f"# midijax encoding={name} is_drum={int(name == 'drums')} "
              f"ticks_per_quarter={int(rng.choice([1, 24, 480, 32767]))} qpm={qpm:g}\n")
      cases.append((f"random_{name}_{i:02d}", (head + body).encode(), ""))
  for i in range(per_encoding):
    n = int(rng.integers(1, 500))
    pos = np.sort(rng.integers(0, int(rng.choice([100, 10**4, 10**6])), n))
    dur = rng.integers(1, 5000, n)
    body = "".join(f"POSITION_{a}\nNOTE_ON_{p}\nDURATION_{d}\n" for a, p, d in zip(
        pos.tolist(), rng.integers(0, 128, n).tolist(), dur.tolist()))
    tpq = int(rng.choice([1, 96, 480, 32767]))
    cases.append((f"random_course_{i:02d}",
                  (f"# midijax encoding=triples is_drum=0 ticks_per_quarter={tpq} qpm=120\n"
                   + body).encode(), ""))
  return cases
