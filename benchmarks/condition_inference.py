#!/usr/bin/env python3
"""What `midijax continue` gains by inferring the conditioning a MIDI prompt cannot state.

For each Groove file of `--split` (default validation) long enough for
`--prompt_bars` + `--target_bars` bars, cuts the file as `continue` does (the first
`--prompt_bars` bars are the prompt; the next `--target_bars` bars are the real
continuation), then scores the real continuation's tokens (NLL per token) under three
prefixes of the prompt:

* ``labels``: the file's own style and beat/fill from info.csv (what training saw);
* ``missing``: no style or type token (what `continue` did without --style / --type);
* ``inferred``: the style and type `sampling.infer_conditions` picks from the prompt.

Tempo and meter come from the file in all three (`encoding.conditions_of_notes`). Also
reports how often the inferred style and type are the file's labels. Prints one JSON line.

    python benchmarks/condition_inference.py --workdir workdirs/groove_beats \\
        --groove_dir ../shared/data/groove
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import csv
import json
import pathlib
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained Groove run (its best checkpoint)")
  ap.add_argument("--groove_dir", required=True, help="GMD folder with info.csv")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--prompt_bars", type=float, default=2.0)
  ap.add_argument("--target_bars", type=float, default=2.0)
  ap.add_argument("--max_files", type=int, default=0, help="0 = every file of the split")
  a = ap.parse_args(argv)

  import numpy as np
  from midijax import checkpoint, encoding, midi_io, runs, sampling
  from midijax.errors import MidiReadError

  model, enc, config, step = runs.load_run(
      a.workdir, best=checkpoint.best_step(a.workdir) is not None)
  kinds = runs.conditioning_kinds(a.workdir, config) or []
  if not {"style", "type"} <= set(kinds):
    raise SystemExit(f"{a.workdir}: its training data has no style/type conditioning ({kinds})")
  root = pathlib.Path(a.groove_dir)
  info = root / "info.csv"
  if not info.is_file():
    raise SystemExit(f"condition_inference.py: {info}: not found (--groove_dir must be a GMD "
                     "folder with info.csv)")
  with open(info, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = {"split", "midi_filename", "style", "beat_type"} - set(rows[0] if rows else {})
  if missing:
    raise SystemExit(f"condition_inference.py: {info}: no column(s) {sorted(missing)}")
  rows = [r for r in rows if r["split"] == a.split]
  if a.max_files:
    rows = rows[:a.max_files]
  t0 = time.perf_counter()
  nll = {"labels": [], "missing": [], "inferred": []}
  tokens, hits = 0, {"style": 0, "type": 0, "both": 0}
  files = 0
  skipped = []  # (file, reason) of files that cannot be read: counted, not fatal
  for row in rows:
    try:
      notes = midi_io.read_notes(root / row["midi_filename"])
    except MidiReadError as e:
      skipped.append([row["midi_filename"], str(e)])
      continue
    notes = notes.select(notes.is_drum)
    bar = sampling.bar_seconds(notes)
    cut, end = a.prompt_bars * bar, (a.prompt_bars + a.target_bars) * bar
    if len(notes) == 0 or notes.total_time < end:
      continue
    prompt, target = encoding.continuation_pair(enc, notes, cut, end)
    if len(target) == 0:
      continue
    known = encoding.conditions_of_notes(notes, kinds)
    labels = {"style": row["style"].split("/")[0], "type": row["beat_type"]}
    inferred_cond, record = sampling.infer_conditions(model, enc, prompt, known, kinds)
    body = np.concatenate([prompt, target]).astype(np.int32)
    for name, cond in (("labels", {**known, **labels}), ("missing", known),
                       ("inferred", inferred_cond)):
      ids = enc.with_specials(body, sampling.ordered_conditions(cond), bos=True, eos=False)
      score = sampling.prompt_log_likelihoods(model, ids[None], len(ids) - len(target))
      nll[name].append(-float(score[0]))
    tokens += len(target)
    files += 1
    got = record["values"]
    hits["style"] += got["style"] == labels["style"]
    hits["type"] += got["type"] == labels["type"]
    hits["both"] += got["style"] == labels["style"] and got["type"] == labels["type"]
  if not files:
    raise SystemExit(f"no {a.split} file is {a.prompt_bars + a.target_bars:g} bars long")
  out = {
      "workdir": a.workdir, "step": step, "split": a.split, "files": files,
      "target_tokens": tokens, "prompt_bars": a.prompt_bars, "target_bars": a.target_bars,
      "nll_per_token": {k: round(sum(v) / tokens, 4) for k, v in nll.items()},
      "inferred_equals_label": {k: round(v / files, 4) for k, v in hits.items()},
      "skipped": len(skipped), "skipped_first": skipped[:5],
      "seconds": round(time.perf_counter() - t0, 1),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  bench_env.run(main)
