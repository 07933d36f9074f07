#!/usr/bin/env python3
"""Dataset build at scale: the local process pool against Apache Beam's DirectRunner.

Makes a synthetic corpus from the MIDI files of ../shared/data (groove, maestro,
giantmidi), round-robin: copy k of a file is the file itself for k = 0, else transposed
(pitched notes, by +1, -1, +2, ... semitones) and time-stretched (every tempo event
scaled by 1 + 0.01 k), so no two files are equal. It then builds the `midi_folder`
dataset (config performance_keep_drums: pitched and drum notes, every file gives an
example) from the first N files, for each N, three ways, each in a fresh process:

  local             data_pipelines.build with its multiprocessing pool (--workers processes)
  beam_in_memory    the DirectRunner in the build process (direct_running_mode=in_memory)
  beam_multi        the DirectRunner with --workers worker processes (multi_processing)

and prints one JSON document: per (mode, N) the wall time, files/s, the build report's
counts (equal across modes for the same N), and peak memory: of the build process and
of the largest worker process (each one's peak resident set, VmHWM), and of all of them
at once (the largest sum of proportional set sizes, PSS, so pages that forked workers
share count once), sampled every 0.2 s over the process tree with psutil (Linux). Memory
per process should stay flat from 1,000 to 10,000 files.

    python benchmarks/build_beam.py                       # N = 1000, 10000 (the README table)
    python benchmarks/build_beam.py --num_files 200 --modes local,beam_multi   # a quick check

The corpus (about 75 MB at 10,000 files) and the datasets go to --workdir (default: a
temporary folder, deleted at the end; give one to keep the corpus between runs).
"""
from __future__ import annotations

import os as _os
import sys as _sys

# benchmarks/tokenize.py is named like the standard library's `tokenize`: keep this folder
# off sys.path so `inspect` (numpy, TF) imports the real one.
_here = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("local", "beam_in_memory", "beam_multi")
CONFIG = "performance_keep_drums"
DRUM_CHANNEL = 9


# --------------------------------------------------------------------------- corpus
def source_files(data: pathlib.Path) -> List[pathlib.Path]:
  """Every .mid/.midi file of the shared corpus, sorted (groove, then piano)."""
  files = [p for p in data.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file()]
  return sorted(files, key=lambda p: p.relative_to(data).as_posix())


def variant(src: pathlib.Path, k: int, dest: pathlib.Path) -> None:
  """Writes copy `k` of `src` to `dest`: k = 0 as is, else transposed and time-stretched.

  Works on the MIDI events with mido (no re-rendering): note numbers of every channel but
  the drum channel shift by the k-th value of +1, -1, +2, -2, ... (clipped to 0..127), and
  every tempo (microseconds per quarter note) is multiplied by 1 + 0.01 k; a file without a
  tempo event gets one at its start.
  """
  import mido  # pylint: disable=g-import-not-at-top
  if k == 0:
    shutil.copyfile(src, dest)
    return
  shift = (k + 1) // 2 * (1 if k % 2 else -1)
  stretch = 1.0 + 0.01 * k
  mid = mido.MidiFile(src)
  has_tempo = False
  for track in mid.tracks:
    for i, msg in enumerate(track):
      if msg.type in ("note_on", "note_off") and msg.channel != DRUM_CHANNEL:
        track[i] = msg.copy(note=min(127, max(0, msg.note + shift)))
      elif msg.type == "set_tempo":
        has_tempo = True
        track[i] = msg.copy(tempo=max(1, min(0xFFFFFF, round(msg.tempo * stretch))))
  if not has_tempo:
    mid.tracks[0].insert(0, mido.MetaMessage("set_tempo", tempo=round(500000 * stretch), time=0))
  mid.save(dest)


def make_corpus(data: pathlib.Path, folder: pathlib.Path, num_files: int) -> pathlib.Path:
  """The first `num_files` synthetic files in `folder` (kept and extended between calls)."""
  sources = source_files(data)
  if not sources:
    print(f"build_beam.py: no MIDI files under {data}", file=sys.stderr)
    sys.exit(2)  # a user error, as the midijax command reports one
  for i in range(num_files):
    src = sources[i % len(sources)]
    k = i // len(sources)
    dest = folder / f"part_{i // 1000:03d}" / f"{i:06d}_{src.stem}_v{k}.mid"
    if not dest.exists():
      dest.parent.mkdir(parents=True, exist_ok=True)
      variant(src, k, dest)
  return folder


def linked_subset(corpus: pathlib.Path, folder: pathlib.Path, num_files: int) -> pathlib.Path:
  """`folder` with hard links to the first `num_files` files of `corpus`."""
  if folder.exists():
    shutil.rmtree(folder)
  files = sorted(corpus.rglob("*.mid"))[:num_files]
  for f in files:
    target = folder / f.relative_to(corpus)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(f, target)
  return folder


# --------------------------------------------------------------------------- one build
def child_build(mode: str, corpus: str, data_dir: str, workers: int) -> None:
  """Runs in the measured process: one build; prints the build report as JSON."""
  import data_pipelines  # pylint: disable=g-import-not-at-top
  from data_pipelines import common  # pylint: disable=g-import-not-at-top
  beam_options = {
      "local": None,
      "beam_in_memory": "runner=DirectRunner,direct_running_mode=in_memory",
      "beam_multi": (f"runner=DirectRunner,direct_num_workers={workers},"
                     "direct_running_mode=multi_processing"),
  }[mode]
  builder = data_pipelines.build("midi_folder", CONFIG, manual_dir=corpus, data_dir=data_dir,
                                 num_workers=workers, beam_options=beam_options)
  print("REPORT " + json.dumps(common.read_json(builder.data_dir, common.REPORT_FILE)),
        flush=True)


class TreeMemory:
  """Samples the resident memory of a process and its descendants in a thread (psutil)."""

  def __init__(self, pid: int, interval: float = 0.2):
    import psutil  # pylint: disable=g-import-not-at-top
    self._psutil = psutil
    self.root = psutil.Process(pid)
    self.interval = interval
    self.peak: Dict[int, int] = {}  # pid -> peak resident bytes seen (VmHWM where known)
    self.peak_total = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _sample(self) -> None:
    try:
      procs = [self.root] + self.root.children(recursive=True)
    except self._psutil.Error:
      return
    total = 0
    for p in procs:
      try:
        info = p.memory_full_info()  # smaps_rollup: pss counts a forked page once in all
        hwm = _vm_hwm(p.pid) or info.rss
      except self._psutil.Error:
        continue
      total += getattr(info, "pss", info.rss)
      self.peak[p.pid] = max(self.peak.get(p.pid, 0), hwm)
    self.peak_total = max(self.peak_total, total)

  def _run(self) -> None:
    while not self._stop.is_set():
      self._sample()
      self._stop.wait(self.interval)

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def _vm_hwm(pid: int) -> int:
  """A process's peak resident set (bytes) from /proc/<pid>/status; 0 where unavailable."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def measure(mode: str, corpus: pathlib.Path, data_dir: pathlib.Path, workers: int,
            timeout: float) -> Dict:
  """Runs one build in a fresh process; returns its timing, counts and peak memory."""
  cmd = [sys.executable, __file__, "--_child", mode, "--_corpus", str(corpus),
         "--_data_dir", str(data_dir), "--workers", str(workers)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  memory = TreeMemory(proc.pid)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  seconds = time.perf_counter() - start
  memory.stop()
  report = next((json.loads(line[len("REPORT "):]) for line in out.splitlines()
                 if line.startswith("REPORT ")), None)
  mib = 1 << 20
  row = {"mode": mode, "num_files": None, "seconds": round(seconds, 2),
         "returncode": proc.returncode,
         "peak_rss_mib_build_process": round(memory.peak.get(proc.pid, 0) / mib, 1),
         "peak_rss_mib_largest_worker": round(
             max([v for k, v in memory.peak.items() if k != proc.pid], default=0) / mib, 1),
         "peak_pss_mib_all_processes": round(memory.peak_total / mib, 1),
         "processes_seen": len(memory.peak)}
  if report is None:
    row["error"] = err.strip().splitlines()[-5:]
    return row
  row.update({"num_files": report["files"],
              "files_per_second": round(report["files"] / seconds, 1),
              **{k: report[k] for k in ("ok", "skipped", "examples", "tokens")}})
  return row


def machine() -> Dict:
  import psutil  # pylint: disable=g-import-not-at-top
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
  except OSError:
    pass
  return {"cpu": model, "cores": len(os.sched_getaffinity(0)),
          "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
          "python": platform.python_version()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                 help="source MIDI corpus (default ../shared/data)")
  p.add_argument("--num_files", default="1000,10000", help="corpus sizes, comma-separated")
  p.add_argument("--modes", default=",".join(MODES), help=f"subset of {', '.join(MODES)}")
  p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                 help="pool processes / DirectRunner workers (default: every core)")
  p.add_argument("--workdir", default=None, help="keep the corpus and datasets here")
  p.add_argument("--timeout", type=float, default=7200, help="seconds per build")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_corpus", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_data_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    child_build(args._child, args._corpus, args._data_dir, args.workers)
    return 0
  sizes = sorted(int(n) for n in args.num_files.split(","))
  modes = [m for m in args.modes.split(",") if m]
  unknown = set(modes) - set(MODES)
  if unknown:
    p.error(f"unknown mode(s) {sorted(unknown)}; valid: {', '.join(MODES)}")
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="build_beam_"))
  rows = []
  try:
    corpus = make_corpus(pathlib.Path(args.data), work / "corpus", sizes[-1])
    for n in sizes:
      subset = linked_subset(corpus, work / f"corpus_{n}", n)
      for mode in modes:
        data_dir = work / f"tfds_{mode}_{n}"
        shutil.rmtree(data_dir, ignore_errors=True)
        row = measure(mode, subset, data_dir, args.workers, args.timeout)
        row["num_files"] = n
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(data_dir, ignore_errors=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)
  counts = {}
  for r in rows:  # The three modes must agree on what they built.
    counts.setdefault(r["num_files"], set()).add(
        tuple(r.get(k) for k in ("ok", "skipped", "examples", "tokens")))
  print(json.dumps({"benchmark": "build_beam", "machine": machine(), "workers": args.workers,
                    "config": f"midi_folder/{CONFIG}", "rows": rows,
                    "counts_agree": all(len(c) == 1 for c in counts.values())}, indent=1))
  return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
