#!/usr/bin/env python3
"""Tokenizer throughput: midijax's per-file kernel vs note-seq's reference (and MidiTok REMI).

For each corpus (groove: ../shared/data/groove/*/*/*.mid; piano: maestro + giantmidi) and each
encoding, on one core, prints one JSON line with:
  * `parse+encode` files/s and tokens/s: whole MIDI file -> ids (symusic reader; sustain for
    piano in `performance`), the number compared with MidiTok REMI's load+encode;
  * `encode` tokens/s: ids from already-parsed notes alone;
and next to them note-seq's reference pipeline on the same files producing the same
`performance` ids (midi_file_to_note_sequence -> apply_sustain_control_changes ->
quantize_note_sequence_absolute(ns, 100) -> Performance -> PerformanceOneHotEncoding), with
`ratio` fields = midijax / reference. With --peer_python (a venv that has miditok, see
../shared/peers/README.md) it also runs ../shared/peers/tokenize_peers.py in the same run and
reports midijax files/s / MidiTok REMI load+encode files/s.

    python benchmarks/tokenize.py [--data ../shared/data] [--passes 3] [--peer_python /tmp/peervenv/bin/python]
"""
import os as _os
import sys as _sys

# This file is named like the standard library's `tokenize`; keep its folder off sys.path so
# `import tokenize` (used by linecache, inspect, ...) finds the real module.
_here = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
_sys.modules.pop("tokenize", None)

import argparse  # noqa: E402
import glob  # noqa: E402
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from midijax import encoding, midi_io  # noqa: E402


def corpus(data: pathlib.Path):
  groove = sorted(glob.glob(str(data / "groove" / "*" / "*" / "*.mid")))
  piano = sorted(glob.glob(str(data / "piano" / "maestro" / "**" / "*.midi"), recursive=True)
                 + glob.glob(str(data / "piano" / "maestro" / "**" / "*.mid"), recursive=True)
                 + glob.glob(str(data / "piano" / "giantmidi" / "*.mid")))
  return {"groove": groove, "piano": piano}


def time_midijax(files, enc, sustain):
  """Returns (parse+encode seconds, encode-only seconds, tokens)."""
  t_total = t_enc = 0.0
  tokens = 0
  for f in files:
    t0 = time.perf_counter()
    notes = midi_io.read_notes(f, allow_empty=True)
    t1 = time.perf_counter()
    # Like the reference's "encode", ours includes applying the sustain pedal.
    ids = enc.encode(midi_io.apply_sustain(notes) if sustain else notes)
    t2 = time.perf_counter()
    t_total += t2 - t0
    t_enc += t2 - t1
    tokens += len(ids)
  return t_total, t_enc, tokens


def time_reference(files):
  """note-seq + Magenta performance encoding; returns (parse+encode s, encode s, tokens)."""
  import note_seq
  from note_seq import performance_lib
  onehot = note_seq.PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100,
                                              min_pitch=21, max_pitch=108)
  t_total = t_enc = 0.0
  tokens = 0
  for f in files:
    t0 = time.perf_counter()
    ns = note_seq.midi_file_to_note_sequence(f)
    t1 = time.perf_counter()
    try:
      s = note_seq.apply_sustain_control_changes(ns)
      q = note_seq.quantize_note_sequence_absolute(s, 100)
      ids = [onehot.encode_event(e) + 2 for e in performance_lib.Performance(q, num_velocity_bins=32)]
    except Exception:  # a pitch outside 21..108: Magenta refuses the file
      ids = []
    t2 = time.perf_counter()
    t_total += t2 - t0
    t_enc += t2 - t1
    tokens += len(ids)
  return t_total, t_enc, tokens


def med(xs):
  return statistics.median(xs)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="corpus root")
  ap.add_argument("--passes", type=int, default=3, help="passes over the files (median reported)")
  ap.add_argument("--reference_passes", type=int, default=1, help="passes of the slow reference")
  ap.add_argument("--limit", type=int, default=0, help="first N files of each corpus (0 = all)")
  ap.add_argument("--peer_python", default="", help="python of a venv with miditok (optional)")
  a = ap.parse_args()
  files = corpus(pathlib.Path(a.data))
  if a.limit:
    files = {k: v[: a.limit] for k, v in files.items()}
  results = []
  for name, fl in files.items():
    encs = ["drums", "performance", "triples"] if name == "groove" else ["performance", "triples"]
    ref = [time_reference(fl) for _ in range(a.reference_passes)]
    ref_total, ref_enc, ref_tokens = med([r[0] for r in ref]), med([r[1] for r in ref]), ref[0][2]
    for e in encs:
      enc = encoding.get(e)
      sustain = name == "piano" and e == "performance"
      time_midijax(fl[:5], enc, sustain)  # warm caches / imports
      runs = [time_midijax(fl, enc, sustain) for _ in range(a.passes)]
      total, enc_s, tokens = med([r[0] for r in runs]), med([r[1] for r in runs]), runs[0][2]
      row = {"corpus": name, "encoding": e, "files": len(fl), "tokens": tokens,
             "parse+encode_files_per_s": round(len(fl) / total, 1),
             "parse+encode_tokens_per_s": round(tokens / total),
             "encode_tokens_per_s": round(tokens / enc_s),
             "reference_parse+encode_files_per_s": round(len(fl) / ref_total, 1),
             "reference_encode_tokens_per_s": round(ref_tokens / ref_enc)}
      row["ratio_files_per_s_vs_reference"] = round(row["parse+encode_files_per_s"] /
                                                    row["reference_parse+encode_files_per_s"], 1)
      row["ratio_encode_tokens_per_s_vs_reference"] = round(
          row["encode_tokens_per_s"] / row["reference_encode_tokens_per_s"], 1)
      results.append(row)
  peers = None
  if a.peer_python:
    script = REPO.parent / "shared" / "peers" / "tokenize_peers.py"
    out = subprocess.run([a.peer_python, str(script), "--parts", "miditok",
                          "--groove", str(pathlib.Path(a.data) / "groove"),
                          "--piano", str(pathlib.Path(a.data) / "piano"),
                          "--passes", str(a.passes)] + (["--limit", str(a.limit)] if a.limit else []),
                         capture_output=True, text=True, check=True)
    peers = json.loads(out.stdout.strip().splitlines()[-1])
    remi = {r["corpus"]: r["files_per_s"]["median"] for r in peers["results"]
            if r["metric"] == "miditok_remi_load+encode"}
    for row in results:
      row["miditok_remi_load+encode_files_per_s"] = remi[row["corpus"]]
      row["ratio_files_per_s_vs_miditok_remi"] = round(
          row["parse+encode_files_per_s"] / remi[row["corpus"]], 1)
  print(json.dumps({"bench": "tokenize", "machine": f"{os.cpu_count()} cores, single process",
                    "passes": a.passes, "results": results}))


if __name__ == "__main__":
  main()
