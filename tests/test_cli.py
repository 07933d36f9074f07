"""The `midijax` command as a user runs it: round trips, --help, clear errors."""
import re
import subprocess
import sys

import numpy as np
import pytest

from midijax import cli, midi_io


def run(*args, check=True):
  """Runs `python -m midijax.cli ARGS` in a subprocess; returns the CompletedProcess."""
  proc = subprocess.run([sys.executable, "-m", "midijax.cli", *map(str, args)],
                        capture_output=True, text=True)
  if check and proc.returncode != 0:
    raise AssertionError(proc.stderr)
  return proc


def test_help_explains_every_subcommand():
  out = run("--help").stdout
  for name in ("midi2tokens", "tokens2midi", "encodings"):
    assert name in out
    sub = run(name, "--help").stdout
    assert "usage: midijax " + name in sub


def test_help_lists_every_command_with_its_flags():
  out = run("--help").stdout
  assert set(cli.COMMANDS) == set(cli.COMMAND_ORDER)
  for name in cli.COMMAND_ORDER:
    assert f"  midijax {name} [-h]" in out, name  # the command's flags, one usage each
    assert name in cli.__doc__, name
  for flag in ("--workdir", "--config.FIELD", "--topology", "--prompt_bars", "--manual_dir",
               "--key", "--lenient", "--ids"):
    assert flag in out, flag
  for name in ("train", "compile"):
    assert "--config.FIELD" in run(name, "--help").stdout


def test_unknown_config_field_is_named(tmp_path):
  proc = run("train", "--config=configs/groove_tiny.py", f"--workdir={tmp_path / 'run'}",
             "--config.train.num_steps=3", "--config.train.num_stepz=5", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "--config.train.num_stepz" in proc.stderr and "num_steps" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = run("compile", "--config=configs/groove_tiny.py", "--config.trian.num_steps=5",
             check=False)
  assert proc.returncode == 2 and "--config.trian.num_steps" in proc.stderr
  assert "config.train" in proc.stderr  # the suggestion
  proc = run("train", "--config=configs/groove_tiny.py", f"--workdir={tmp_path / 'run'}",
             "--config.train.num_steps=many", check=False)
  assert proc.returncode == 2 and "--config.train.num_steps=many" in proc.stderr
  proc = run("train", f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path}",
             check=False)
  assert proc.returncode == 2 and "cannot load the config file" in proc.stderr
  assert not (tmp_path / "run").exists()
  # Only train and compile read a config file.
  proc = run("encodings", "--config.train.num_steps=3", check=False)
  assert proc.returncode == 2 and "only train and compile" in proc.stderr


@pytest.mark.parametrize("encoding", ["drums", "performance", "triples"])
def test_round_trip_groove(tmp_path, groove_files, encoding):
  src = groove_files[5]
  txt, mid = tmp_path / "t.txt", tmp_path / "t.mid"
  assert cli.main(["midi2tokens", str(src), str(txt), "--encoding", encoding]) == 0
  assert cli.main(["tokens2midi", str(txt), str(mid)]) == 0
  a, b = midi_io.read_notes(src), midi_io.read_notes(mid)
  assert b.is_drum.all()
  if encoding != "drums":  # drums maps pitches to 9 classes
    assert sorted(a.pitch.tolist()) == sorted(b.pitch.tolist())
  np.testing.assert_allclose(np.sort(b.start), np.sort(a.start), atol=0.006)


def test_round_trip_maestro_performance_ids(tmp_path, piano_files):
  src = next(f for f in piano_files if "maestro" in str(f))
  txt, mid = tmp_path / "t.txt", tmp_path / "t.mid"
  run("midi2tokens", src, txt, "--ids", "--sustain")
  assert all(line.isdigit() for line in txt.read_text().splitlines()[1:])
  run("tokens2midi", txt, mid)
  a, b = midi_io.read_notes(src, sustain=True), midi_io.read_notes(mid)
  assert len(a) == len(b) and not b.is_drum.any()
  np.testing.assert_allclose(np.sort(b.start), np.sort(a.start), atol=0.006)


def test_course_triples_file_without_header(tmp_path):
  txt = tmp_path / "course.txt"
  txt.write_text("POSITION_0\nNOTE_ON_60\nDURATION_480\nPOSITION_480\nNOTE_ON_64\nDURATION_240\n")
  run("tokens2midi", txt, tmp_path / "c.mid", "--encoding", "triples", "--tempo", "60")
  notes = midi_io.read_notes(tmp_path / "c.mid")
  assert notes.tuples() == [(60, 100, 0.0, 1.0, 0, False), (64, 100, 1.0, 1.5, 0, False)]


def test_errors_are_one_clear_line_and_keep_existing_output(tmp_path, groove_files):
  bad = tmp_path / "bad.mid"
  bad.write_bytes(b"MThd\x00\x00\x00\x06garbage")
  out = tmp_path / "out.txt"
  out.write_text("precious\n")
  proc = run("midi2tokens", bad, out, check=False)
  assert proc.returncode == 2
  assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
  assert out.read_text() == "precious\n"
  tokens = tmp_path / "tokens.txt"
  tokens.write_text("NOTE_ON_60\nTIME_SHIFT_10\nNOT_A_TOKEN\n")
  mid = tmp_path / "keep.mid"
  mid.write_bytes(b"old")
  proc = run("tokens2midi", tokens, mid, check=False)
  assert proc.returncode == 2 and "line 3" in proc.stderr and "Traceback" not in proc.stderr
  assert mid.read_bytes() == b"old"
  proc = run("tokens2midi", tokens, mid, "--lenient")
  assert "1 invalid tokens skipped" in proc.stdout


def test_encodings_lists_sizes():
  out = run("encodings").stdout
  assert "performance" in out and "372" in out and "drums" in out and "triples" in out


# ----------------------------------------------------------------------------- token files
def test_triples_ids_and_names_round_trip(tmp_path, groove_files):
  """The help's "names or integer ids" holds for triples too: ids, vocabulary names and the
  course text all turn back into the same notes."""
  src = groove_files[5]
  mids = []
  for flags in ([], ["--ids"]):
    txt, mid = tmp_path / f"t{len(flags)}.txt", tmp_path / f"t{len(flags)}.mid"
    assert cli.main(["midi2tokens", str(src), str(txt), "--encoding", "triples", *flags]) == 0
    assert cli.main(["tokens2midi", str(txt), str(mid)]) == 0
    mids.append(midi_io.read_notes(mid))
  names = tmp_path / "names.txt"
  lines = (tmp_path / "t1.txt").read_text().splitlines()
  from midijax import encoding
  enc = encoding.get("triples")
  names.write_text("\n".join([lines[0]] + [enc.vocab.names[int(i)] for i in lines[1:]]) + "\n")
  assert cli.main(["tokens2midi", str(names), str(tmp_path / "n.mid")]) == 0
  assert midi_io.read_notes(tmp_path / "n.mid").tuples() == mids[1].tuples()
  assert sorted(mids[0].pitch.tolist()) == sorted(mids[1].pitch.tolist())
  assert "integer ids" in run("tokens2midi", "--help").stdout


@pytest.mark.parametrize("text,message", [
    ("# midijax encoding=triples is_drum=0 ticks_per_quarter=480 qpm=inf\nPOSITION_0\n",
     "line 1: header field qpm: tempo inf is outside what MIDI can hold"),
    ("# midijax encoding=triples is_drum=0 ticks_per_quarter=1.5 qpm=120\nPOSITION_0\n",
     "line 1: header field ticks_per_quarter: '1.5' is not a whole number"),
    ("POSITION_0\nNOTE_ON_60\nDURATION_99999999999999999999999\n", "line 3: "),
    ("POSITION_0\nNOTE_ON_60\nDURATION_1\nPOSITION_1000000000\n", "line 4: .* past tick 268435455"),
    ("# comment only\n", "no notes to write"),
])
def test_token_file_errors_name_the_line(tmp_path, text, message):
  path = tmp_path / "t.txt"
  path.write_text(text)
  proc = run("tokens2midi", path, tmp_path / "o.mid", "--encoding", "triples", check=False)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
  assert re.search(message, proc.stderr), proc.stderr
  assert not (tmp_path / "o.mid").exists()


def test_binary_token_file_is_a_clean_error(tmp_path):
  path = tmp_path / "b.txt"
  path.write_bytes(bytes(range(256)) * 10)
  for flags in ([], ["--lenient"]):
    proc = run("tokens2midi", path, tmp_path / "o.mid", *flags, check=False)
    assert proc.returncode == 2 and "binary data" in proc.stderr and "Traceback" not in proc.stderr


def test_token_files_stream(tmp_path):
  """A 40 MB token file that fails on line 1 is not read whole: memory stays at the block
  size (the issue: 890 MB)."""
  import tracemalloc
  from midijax.encoding import token_files
  from midijax.errors import MidijaxError
  path = tmp_path / "big.txt"
  path.write_bytes(b"NOT_A_TOKEN\n" * 3_500_000)
  tracemalloc.start()
  with pytest.raises(MidijaxError, match="line 1: 'NOT_A_TOKEN'"):
    token_files.read_tokens(path)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 8 << 20


def test_midi2tokens_limits_are_flags(tmp_path, groove_files):
  src, out = groove_files[5], tmp_path / "t.txt"
  for flags, message in [(["--max_tokens", "500"], "more tokens than the max_tokens limit"),
                         (["--max_tokens", "10"], "more notes than the limit"),
                         (["--max_seconds", "1"], "music longer than the max_seconds limit")]:
    proc = run("midi2tokens", src, out, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and not out.exists()
  proc = run("midi2tokens", src, out, "--max_seconds", "0", check=False)
  assert proc.returncode == 2 and "not a positive number" in proc.stderr
