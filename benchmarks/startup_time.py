#!/usr/bin/env python3
"""Start-up time of the light `midijax` commands: wall clock of whole runs, and imports.

Times `midijax --help`, `encodings`, `midi2tokens` (a real Groove file, default
`performance` encoding) and `tokens2midi` (the token file midi2tokens wrote), each as a
fresh `python -m midijax.cli` process, `--runs` times, and sums the top-level entries of
`python -X importtime` for each. Prints one JSON line per command.

    python benchmarks/startup_time.py [--runs 5] [--midi ../shared/data/groove/...mid]
"""
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # benchmarks/tokenize.py would shadow the stdlib's tokenize

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

DATA = pathlib.Path(os.environ.get("MIDIJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def first_groove_file() -> pathlib.Path:
  files = sorted((DATA / "groove" / "drummer1" / "session1").glob("*.mid"))
  if not files:
    print(f"startup_time: no Groove files under {DATA}/groove/drummer1/session1; give --midi",
          file=sys.stderr)
    sys.exit(2)  # a user error, as the midijax command reports one
  return files[0]


def import_ms(args, env, cwd) -> float:
  """Summed top-level import times (ms) of one run, from -X importtime."""
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "midijax.cli", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, check=True)
  total = 0
  for line in proc.stderr.splitlines():
    if not line.startswith("import time:"):
      continue
    parts = line.split("|")
    if len(parts) == 3 and parts[2].startswith(" ") and not parts[2].startswith("  "):
      try:
        total += int(parts[1])
      except ValueError:  # the header line
        pass
  return total / 1000


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", type=int, default=5, help="timed runs per command")
  ap.add_argument("--midi", default="", help="MIDI file for midi2tokens")
  args = ap.parse_args(argv)
  midi = pathlib.Path(args.midi) if args.midi else first_groove_file()
  # The allocator re-exec is off for these commands anyway; keep imports comparable.
  env = {**os.environ, "MIDIJAX_ALLOCATOR": "system",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  with tempfile.TemporaryDirectory() as tmp:
    commands = {"--help": ["--help"], "encodings": ["encodings"],
                "midi2tokens": ["midi2tokens", str(midi), "t.txt"],
                "tokens2midi": ["tokens2midi", "t.txt", "t.mid"]}
    subprocess.run([sys.executable, "-m", "midijax.cli", *commands["midi2tokens"]], cwd=tmp,
                   env=env, check=True, capture_output=True)
    for name, cmd in commands.items():
      walls = []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "midijax.cli", *cmd], cwd=tmp, env=env,
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
      print(json.dumps({
          "bench": "startup_time", "command": f"midijax {name}", "runs": args.runs,
          "wall_s_best": round(min(walls), 3), "wall_s_median": round(statistics.median(walls), 3),
          "imports_ms": round(import_ms(cmd, env, tmp), 1), "midi": midi.name,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
          "load_average_1min": round(os.getloadavg()[0], 2),
          "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
  main()
