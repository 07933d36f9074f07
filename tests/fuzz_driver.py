"""Runs many `midijax` commands in one process and classifies each outcome (fuzz suite).

    python tests/fuzz_driver.py CASES.json RESULTS.jsonl

CASES.json is a list of {"id", "argv", "check", "encoding"}: for each case
`midijax.cli.main(argv)` runs in this process with stdout and stderr captured and a time
limit (SIGALRM), and its outcome is appended to RESULTS.jsonl as one JSON line, flushed.
A "start" line is written before each case, so a process killed by its memory cap (or a
crash in C) still names the case that killed it. tests/test_fuzz.py starts this under a
memory cap and a timeout; the cap is the parent's business, not this script's.

Outcomes: "ok" (exit 0 and the output passes `check`), "error" (exit 2 and stderr is
exactly one line ``midijax <cmd>: error: ...``). Anything else is a failure: "traceback"
(an exception escaped `main`), "memory" (MemoryError), "timeout", "bad_error" (exit 2 but
not one clean line), "bad_output" (exit 0 but the output is invalid), "exit_<n>".

Checks of an output ("check"):
  tokens: the token file of `midi2tokens`: a valid header (finite tempo and resolution in
    MIDI's range), every line a token of the encoding (name, id, or course text with
    numbers below 2**31), no more than the default max_tokens lines.
  midi: the MIDI file of `tokens2midi`: `midi_io.read_notes` reads it (finite times, at
    least one note) and `midi2tokens` with the same encoding turns it into tokens (the
    round-trip property).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import re
import resource
import signal
import sys
import time
import traceback

TIME_LIMIT_S = int(os.environ.get("MIDIJAX_FUZZ_CASE_SECONDS", "40"))
_COURSE = re.compile(r"(POSITION|NOTE_ON|DURATION)_([0-9]+)")
_HEADER = re.compile(r"# midijax encoding=(\w+) is_drum=([01]) ticks_per_quarter=([0-9]+) "
                     r"qpm=(\S+)")


class CaseTimeout(BaseException):
  """Raised by SIGALRM when a case runs past TIME_LIMIT_S (a BaseException, so a broad
  `except Exception` in the code under test cannot swallow it)."""


def _alarm(signum, frame):
  raise CaseTimeout()


def check_tokens(path: str, encoding: str) -> str:
  """'' when `path` is a valid token file of `encoding`, else what is wrong."""
  from midijax import encoding as encoding_lib
  from midijax.encoding import token_files
  from midijax.notes import MAX_TOKENS
  enc = encoding_lib.get(encoding)
  count = 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      tok = line.rstrip("\n")
      if lineno == 1 and tok.startswith("#"):
        m = _HEADER.fullmatch(tok)
        if not m or m.group(1) != encoding:
          return f"bad header {tok!r}"
        qpm, tpq = float(m.group(4)), int(m.group(3))
        if not (math.isfinite(qpm) and token_files.MIN_QPM <= qpm <= token_files.MAX_QPM):
          return f"header tempo {m.group(4)}"
        if not 1 <= tpq <= token_files.MAX_TICKS_PER_QUARTER:
          return f"header resolution {tpq}"
        continue
      count += 1
      if enc.token_id(tok) is not None:
        continue
      m = _COURSE.fullmatch(tok)
      if encoding == "triples" and m and int(m.group(2)) < 2**31:
        continue
      return f"line {lineno}: {tok[:60]!r} is not a {encoding} token"
  if count > MAX_TOKENS:
    return f"{count} tokens, above max_tokens"
  return ""


def check_midi(path: str, encoding: str, work: pathlib.Path) -> str:
  """'' when `path` reads back (notes, finite) and re-tokenizes, else what is wrong."""
  import numpy as np
  from midijax import cli, midi_io
  from midijax.errors import MidijaxError
  try:
    notes = midi_io.read_notes(path)
  except MidijaxError as e:
    return f"tokens2midi wrote a MIDI file midijax cannot read: {e}"
  if not (np.isfinite(notes.start).all() and np.isfinite(notes.end).all()):
    return "non-finite times read back"
  out, err = io.StringIO(), io.StringIO()
  tokens = str(work / f"roundtrip_{os.getpid()}.txt")  # batches run side by side
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(["midi2tokens", path, tokens, "--encoding", encoding])
  if rc != 0:
    return f"midi2tokens refused tokens2midi's output: {err.getvalue().strip()}"
  return check_tokens(tokens, encoding)


def run_case(case: dict, work: pathlib.Path) -> dict:
  from midijax import cli
  out, err = io.StringIO(), io.StringIO()
  start = time.perf_counter()
  signal.alarm(TIME_LIMIT_S)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = cli.main(list(case["argv"]))
    outcome = None
  except CaseTimeout:
    outcome, rc = "timeout", None
  except MemoryError:
    outcome, rc = "memory", None
  except SystemExit as e:  # argparse
    outcome, rc = None, e.code
  except BaseException:  # pylint: disable=broad-except
    outcome, rc = "traceback", None
    err.write(traceback.format_exc())
  finally:
    signal.alarm(0)
  seconds = time.perf_counter() - start
  stderr = err.getvalue()
  detail = ""
  if outcome is None:
    lines = stderr.strip().splitlines()
    command = case["argv"][0]
    if rc == 2:
      clean = len(lines) == 1 and lines[0].startswith(f"midijax {command}: error: ")
      outcome = "error" if clean else "bad_error"
      if clean and os.path.exists(case["argv"][2]):
        outcome, detail = "bad_error", "an output was written although the command failed"
    elif rc == 0:
      signal.alarm(TIME_LIMIT_S)
      try:
        check = case.get("check")
        if check == "tokens":
          detail = check_tokens(case["argv"][2], case["encoding"])
        elif check == "midi":
          detail = check_midi(case["argv"][2], case["encoding"], work)
      except CaseTimeout:
        detail = "checking the output timed out"
      except BaseException:  # pylint: disable=broad-except
        detail = "checking the output raised: " + traceback.format_exc()[-500:]
      finally:
        signal.alarm(0)
      outcome = "bad_output" if detail else "ok"
    else:
      outcome = f"exit_{rc}"
  for p in case["argv"][2:3]:  # outputs are not kept: the suite writes many
    with contextlib.suppress(OSError):
      if outcome in ("ok", "error"):
        os.remove(p)
  return {"id": case["id"], "outcome": outcome, "seconds": round(seconds, 3),
          "stderr": stderr[-2000:], "detail": detail,
          "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main(cases_path: str, results_path: str) -> None:
  from midijax import cli
  # `main` builds its argparse parser on every call, a third of a small case's time here;
  # one parser parses every case the same way.
  if hasattr(cli, "build_parser"):
    parser = cli.build_parser()
    cli.build_parser = lambda: parser
  cases = json.loads(pathlib.Path(cases_path).read_text())
  work = pathlib.Path(results_path).parent
  signal.signal(signal.SIGALRM, _alarm)
  with open(results_path, "a", buffering=1) as out:
    for case in cases:
      out.write(json.dumps({"id": case["id"], "start": True}) + "\n")
      out.write(json.dumps(run_case(case, work)) + "\n")
    heavy = sorted(m for m in ("tensorflow", "note_seq", "jax") if m in sys.modules)
    out.write(json.dumps({"done": True, "modules": heavy}) + "\n")


if __name__ == "__main__":
  main(*sys.argv[1:3])
