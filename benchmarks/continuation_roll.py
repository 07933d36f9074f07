#!/usr/bin/env python3
"""Piano-roll figure of a prompt, its real continuation and two generated continuations.

Takes one prompt window of a split (as `midijax evaluate`'s C2ST cuts them: the piece's
conditioning prefix and `--prompt_tokens` event tokens, then `--length` tokens of real
continuation), samples two constrained continuations with the run's config.sample settings
(or the flags), and draws all three after the prompt on the piece's own clock, with its
beat and bar grid (`midijax.reports.plot_continuations`). Prints one JSON line.

    python benchmarks/continuation_roll.py --workdir workdirs/groove_small \\
        --data_dir workdirs/tfds --out docs/groove_continuation.png
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import dataclasses
import json
import pathlib

REPO = bench_env.REPO


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained run (its best checkpoint)")
  ap.add_argument("--data_dir", default="", help="TFDS data dir (default: the run's config)")
  ap.add_argument("--split", default="test", help="split the prompt comes from (default test)")
  ap.add_argument("--prompt_tokens", type=int, default=64, help="event tokens of the prompt")
  ap.add_argument("--length", type=int, default=128, help="tokens of each continuation")
  ap.add_argument("--window", type=int, default=0,
                  help="which of the split's windows (in the seeded draw of the C2ST)")
  ap.add_argument("--seed", type=int, default=0, help="window draw and sampling seed")
  ap.add_argument("--temperature", type=float, default=None)
  ap.add_argument("--top_k", type=int, default=None)
  ap.add_argument("--top_p", type=float, default=None)
  ap.add_argument("--guidance", type=float, default=None, help="prompt guidance")
  ap.add_argument("--out", default=str(REPO / "docs" / "groove_continuation.png"))
  a = ap.parse_args(argv)

  import numpy as np
  from midijax import checkpoint, encoding, evaluation, input_pipeline, reports, runs
  from midijax import two_sample

  model, enc, config, step = runs.load_run(
      a.workdir, best=checkpoint.best_step(a.workdir) is not None)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  settings = evaluation.resolve_sampling(config, a.temperature, a.top_k, a.top_p, a.guidance)
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, a.split)
  windows = evaluation.prompt_windows(
      store, enc, prompt_tokens=a.prompt_tokens, length=a.length, max_windows=a.window + 1,
      seed=a.seed, meters=evaluation.piece_meters(spec.version_dir, a.split))
  if len(windows) <= a.window:
    raise SystemExit(f"split {a.split!r} has only {len(windows)} windows of "
                     f"{a.prompt_tokens} + {a.length} tokens")
  i = a.window
  context, qpm, meter = windows.contexts[i], float(windows.qpm[i]), windows.meters[i]
  generated = evaluation.sample_continuations(
      model, enc, [windows.prompts[i]] * 2, length=a.length, seed=a.seed, **settings)

  # One clock for the prompt and the continuations: the piece's, from the bar line at or
  # before the prompt's first event.
  advance = two_sample.seconds_per_token(enc, qpm)
  events = enc.strip_specials(context).astype(np.int64)
  t_prompt = float(advance[events[:len(events) - a.prompt_tokens]].sum())
  t_context = float(advance[events].sum())
  piece = enc.decode_notes(context, qpm=qpm, is_drum=is_drum)
  piece = dataclasses.replace(piece, time_signatures=np.array([[0.0, *meter]], np.float64))
  origin = two_sample.bar_line_at_or_before(piece, t_prompt)
  prompt = two_sample.shift_clock(piece.select(piece.start >= t_prompt - 1e-9), origin)
  delta = two_sample.bar_line_at_or_before(piece, t_context) - origin
  clips = {}
  for label, ids in [("real continuation", windows.real[i])] + [
      (f"generated {k + 1}", g) for k, g in enumerate(generated)]:
    clip, _ = two_sample.continuation_clip(enc, context, ids, qpm=qpm, is_drum=is_drum,
                                           token_seconds=advance, time_signature=meter)
    clips[label] = dataclasses.replace(clip, start=clip.start + delta, end=clip.end + delta)
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  s = settings
  title = (f"{a.prompt_tokens}-token prompt from the {a.split} split and {a.length}-token "
           f"continuations (temperature {s['temperature']:g}, top-p {s['top_p']:g}, "
           f"top-k {s['top_k']}"
           + (f", guidance {s['guidance']:g}" if s["guidance"] else "") + ", constrained)")
  reports.plot_continuations(prompt, clips, out, prompt_end=t_context - origin, qpm=qpm,
                             meter=meter, title=title)
  print(json.dumps({"figure": str(out), "workdir": str(a.workdir), "step": step,
                    "split": a.split, "piece": int(windows.pieces[i]),
                    "offset_tokens": int(windows.offsets[i]), "qpm": qpm, "meter": list(meter),
                    "prompt_tokens": a.prompt_tokens, "length": a.length, **settings,
                    "notes": {k: len(v) for k, v in clips.items()}}))


if __name__ == "__main__":
  bench_env.run(main)
