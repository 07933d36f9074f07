"""Fuzz suite: hostile MIDI and token files never crash, hang or blow up a command.

The files come from tests/hostile_files.py (seeded, made from real files). Each command
runs in a subprocess under a memory cap (RLIMIT_AS, 2 GiB: the commands here import
neither TensorFlow nor JAX, which reserve far more address space than they use) and a
time limit; tests/fuzz_driver.py runs many cases in one such process through
`midijax.cli.main`, so the suite stays short. Every outcome must be a clean one-line error
(exit 2) or a valid output. `build-data` (which imports TensorFlow) runs as a real
`midijax` process instead, and its peak resident memory is measured.
"""
import collections
import json
import os
import pathlib
import resource
import subprocess
import sys

import pytest

import hostile_files

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = pathlib.Path(__file__).resolve().parent / "fuzz_driver.py"
MEMORY_CAP = 2 << 30  # bytes of address space per driver process
SEED = 17
ENCODINGS = ("performance", "drums", "triples")
# Files the note_seq reader (pure Python, ~10 us per byte) also reads.
NOTE_SEQ_MAX_CASE_BYTES = 20_000


def _limit_memory():
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _env():
  env = dict(os.environ, PYTHONPATH=str(REPO), MIDIJAX_ALLOCATOR="system")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def run_batches(batches, work: pathlib.Path, timeout: float = 600):
  """Runs each batch of cases in its own capped driver process, all at once; returns
  {case id: result} and the driver summaries. Fails naming a case that killed its process."""
  procs = []
  for b, cases in enumerate(batches):
    spec, results = work / f"cases_{b}.json", work / f"results_{b}.jsonl"
    spec.write_text(json.dumps(cases))
    results.write_text("")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(spec), str(results)], cwd=work,
                            env=_env(), preexec_fn=_limit_memory, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    procs.append((proc, results))
  out, summaries = {}, []
  for proc, results in procs:
    try:
      log = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
      proc.kill()
      log = proc.communicate()[0].decode(errors="replace")
    started, done = None, None
    for line in results.read_text().splitlines():
      row = json.loads(line)
      if row.get("start"):
        started = row["id"]
      elif row.get("done"):
        done = row
      else:
        out[row["id"]] = row
        started = None
    assert done is not None, (f"driver died (exit {proc.returncode}) during case {started}: "
                              f"{log[-2000:]}")
    summaries.append(done)
  return out, summaries


def assert_clean(results, cases):
  bad = [(c["id"], " ".join(map(str, c["argv"][:1] + c["argv"][3:])), results[c["id"]]["outcome"],
          (results[c["id"]]["detail"] or results[c["id"]]["stderr"])[-600:])
         for c in cases if results[c["id"]]["outcome"] not in ("ok", "error")]
  assert not bad, f"{len(bad)} of {len(cases)} cases failed; first: " + "\n".join(
      map(str, bad[:5]))


def split(cases, n=2):
  return [cases[i::n] for i in range(n)]


@pytest.fixture(scope="module")
def real_bytes(groove_files, piano_files):
  small_piano = sorted(piano_files, key=lambda p: p.stat().st_size)[:2]
  return [p.read_bytes() for p in groove_files[:4] + small_piano]


@pytest.fixture(scope="module")
def midi_dir(tmp_path_factory, real_bytes):
  folder = tmp_path_factory.mktemp("hostile_midi")
  cases = hostile_files.midi_cases(real_bytes, SEED)
  for name, data in cases:
    (folder / f"{name}.mid").write_bytes(data)
  return folder, [name for name, _ in cases]


def test_midi2tokens_survives_hostile_midi(midi_dir, tmp_path):
  """Every hostile MIDI file through midi2tokens in every encoding (and with --ids,
  --sustain, the note_seq reader): a valid token file or one clean error line."""
  folder, names = midi_dir
  assert len(names) >= 500
  cases = []
  for i, name in enumerate(names):
    src = folder / f"{name}.mid"
    for enc in ENCODINGS:
      flags = {"performance": [["--ids"], ["--sustain"], []][i % 3],
               "triples": [[], [], ["--sustain"]][i % 3], "drums": []}[enc]
      if "sustain" in name and "--sustain" not in flags:
        flags = flags + ["--sustain"]
      cases.append({"id": f"{name}:{enc}", "encoding": enc, "check": "tokens",
                    "argv": ["midi2tokens", str(src), str(tmp_path / f"{name}.{enc}.txt"),
                             "--encoding", enc, *flags]})
  note_seq = [{"id": f"{name}:note_seq", "encoding": "performance", "check": "tokens",
               "argv": ["midi2tokens", str(folder / f"{name}.mid"),
                        str(tmp_path / f"{name}.ns.txt"), "--reader", "note_seq"]}
              for i, name in enumerate(names) if (folder / f"{name}.mid").stat().st_size
              <= NOTE_SEQ_MAX_CASE_BYTES and i % 8 == 0 or "division" in name
              or "tempo_zero" in name or "delta_huge_x" in name or "notes_million" in name]
  results, summaries = run_batches(split(cases) + [note_seq], tmp_path)
  assert_clean(results, cases + note_seq)
  # midi2tokens with the default reader imports neither TensorFlow, JAX nor note-seq.
  assert summaries[0]["modules"] == [] and summaries[1]["modules"] == []
  outcomes = collections.Counter(r["outcome"] for r in results.values())
  assert outcomes["ok"] > 300 and outcomes["error"] > 900, outcomes
  reason = lambda case: results[case]["stderr"]
  assert "time division of 0" in reason(next(c for c in results if "division_0000" in c))
  assert "SMPTE" in reason(next(c for c in results if "division_e728" in c))
  for enc in ENCODINGS:
    assert "tempo of 0" in reason(f"{_named(names, 'tempo_zero_start')}:{enc}")
    assert "max_seconds" in reason(f"{_named(names, 'delta_huge_two_98_bytes')}:{enc}")
    assert "instrument tracks" in reason(f"{_named(names, 'tracks_65535')}:{enc}")
    assert "more notes than the limit" in reason(f"{_named(names, 'notes_2_1_million')}:{enc}")
  assert "max_tokens" in reason(f"{_named(names, 'notes_million')}:performance")
  print(f"\nmidi2tokens fuzz: {len(names)} files, {len(cases) + len(note_seq)} runs, "
        f"{dict(outcomes)}, slowest {max(r['seconds'] for r in results.values()):.1f} s, "
        f"peak RSS {max(r['max_rss_mb'] for r in results.values())} MB")


def _named(names, suffix):
  return next(n for n in names if n.endswith("_" + suffix))


def test_tokens2midi_survives_hostile_token_files(tmp_path):
  """Hostile token files (strict and --lenient) and random valid token streams through
  tokens2midi: one clean error line, or a MIDI file that midi_io reads back and that
  midi2tokens turns into tokens again."""
  hostile = hostile_files.token_cases(SEED)
  random = hostile_files.random_token_cases(SEED, per_encoding=12)
  cases = []
  for name, data, enc in hostile + random:
    src = tmp_path / f"{name}.txt"
    src.write_bytes(data)
    header_enc = data[:200].split(b"encoding=")[1].split()[0].decode(errors="replace") \
        if b"encoding=" in data[:200] else "performance"
    roundtrip = enc or (header_enc if header_enc in ENCODINGS else "performance")
    modes = [[]] if name.startswith("random") or len(data) > 1 << 20 else [[], ["--lenient"]]
    for mode in modes:
      cases.append({"id": f"{name}{''.join(mode)}", "encoding": roundtrip, "check": "midi",
                    "argv": ["tokens2midi", str(src), str(tmp_path / f"{name}{''.join(mode)}.mid"),
                             *(["--encoding", enc] if enc else []), *mode]})
  results, _ = run_batches(split(cases), tmp_path)
  assert_clean(results, cases)
  outcomes = collections.Counter(r["outcome"] for r in results.values())
  random_ok = sum(results[c["id"]]["outcome"] == "ok" for c in cases if "random" in c["id"])
  assert random_ok >= 40, outcomes
  err = lambda case: results[next(c["id"] for c in cases if c["id"].endswith(case))]["stderr"]
  assert "binary data" in err("binary_random")
  assert "line 1: header field qpm" in err("header_qpm_inf")
  assert "line 3:" in err("triples_duration_huge")
  assert "past tick 268435455" in err("triples_far_apart")
  assert "max_tokens" in err("lines_10m_ids")
  assert "max_notes" in err("lines_1m_drum_hits")
  assert "longer than 256 bytes" in err("line_10mb_no_newline")
  print(f"\ntokens2midi fuzz: {len(hostile)} hostile + {len(random)} random files, "
        f"{len(cases)} runs, {dict(outcomes)}, slowest "
        f"{max(r['seconds'] for r in results.values()):.1f} s, peak RSS "
        f"{max(r['max_rss_mb'] for r in results.values())} MB")


# A sample of the hostile files for the build: every kind but the byte flips, plus some.
BUILD_KINDS = ("division", "tempo", "delta", "notes", "tracks_65535", "tracks_programs",
               "chunk", "meta", "timesig", "nonmidi", "rs_", "real_deltas", "real_tempo")


def _measured(cmd, timeout):
  """Runs `cmd` as a grandchild; returns (CompletedProcess, peak RSS MB of its process tree)."""
  wrapper = ("import resource, subprocess, sys\n"
             "rc = subprocess.run(sys.argv[1:]).returncode\n"
             "print('MAXRSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,"
             " file=sys.stderr)\n"
             "sys.exit(rc)\n")
  proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                        env=_env(), timeout=timeout)
  rss = int(proc.stderr.rsplit("MAXRSS_MB", 1)[1].split()[0])
  return proc, rss


def test_build_data_midi_folder_skips_hostile_files(midi_dir, piano_files, tmp_path):
  """`midijax build-data midi_folder` over real piano files plus hostile ones finishes,
  keeps every real file, lists each hostile file it skipped with its reason in
  build_report.json, and its processes' memory stays bounded."""
  folder, names = midi_dir
  src = tmp_path / "src"
  src.mkdir()
  good = sorted(piano_files, key=lambda p: p.stat().st_size)[:6]
  for p in good:
    (src / p.name).write_bytes(p.read_bytes())
  chosen = [n for n in names if any(k in n for k in BUILD_KINDS)] + \
      [n for n in names if "flip" in n][:10]
  for n in chosen:
    (src / f"{n}.mid").write_bytes((folder / f"{n}.mid").read_bytes())
  out = tmp_path / "tfds"
  proc, rss = _measured([sys.executable, "-m", "midijax.cli", "build-data", "midi_folder",
                         "--manual_dir", str(src), "--data_dir", str(out), "--num_shards", "1",
                         "--num_workers", "2"], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  report = json.loads(next(out.rglob("build_report.json")).read_text())
  skipped = {pathlib.Path(s["file"]).stem: s["reason"] for s in report["skipped_files"]}
  assert not any(p.stem in skipped for p in good), skipped
  assert report["files"] == len(good) + len(chosen) and report["ok"] >= len(good)
  for n in chosen:
    if any(k in n for k in ("division_0000", "tempo_zero_start", "delta_huge_two_98",
                            "tracks_65535", "notes_2_1_million", "delta_huge_x2")):
      assert n in skipped, n
  assert "max_seconds" in skipped[_named(names, "delta_huge_two_98_bytes")]
  assert "instrument tracks" in skipped[_named(names, "tracks_65535")]
  assert "max_tokens" in skipped[_named(names, "notes_million")]
  # No hostile file that slipped through makes more tokens than a real piece could.
  assert report["tokens"] < 5_000_000
  # TensorFlow's import alone is most of it (0.8 GB measured, 2 workers).
  assert rss < 2 * 1024, f"peak RSS {rss} MB"
  print(f"\nbuild-data: {report['files']} files ({len(chosen)} hostile), {report['ok']} ok, "
        f"{report['skipped']} skipped, {report['tokens']} tokens, peak RSS {rss} MB")


def test_midijax_command_end_to_end(midi_dir, tmp_path):
  """A few hostile inputs through the real `midijax` process (allocator re-exec and all)
  under the memory cap: exit 2 and exactly one line on stderr."""
  folder, names = midi_dir
  tokens = tmp_path / "ten_million.txt"
  tokens.write_bytes(b"62\n" * 10_000_000)
  binary = tmp_path / "binary.txt"
  binary.write_bytes(bytes(range(256)) * 100)
  runs = [["midi2tokens", str(folder / f"{_named(names, n)}.mid"), str(tmp_path / "o.txt"),
           "--encoding", enc] for n, enc in [("division_0000", "triples"),
                                             ("tempo_zero_start", "triples"),
                                             ("delta_huge_two_98_bytes", "performance"),
                                             ("notes_million", "performance"),
                                             ("tracks_65535", "drums")]]
  runs += [["tokens2midi", str(tokens), str(tmp_path / "o.mid")],
           ["tokens2midi", str(binary), str(tmp_path / "o.mid"), "--lenient"]]
  for argv in runs:
    env = {k: v for k, v in _env().items() if k != "MIDIJAX_ALLOCATOR"}
    proc = subprocess.run([sys.executable, "-m", "midijax.cli", *argv], capture_output=True,
                          text=True, env=env, preexec_fn=_limit_memory, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr[-2000:])
    assert lines[0].startswith(f"midijax {argv[0]}: error: "), lines
