#!/usr/bin/env python3
"""Where a run's 512-token C2ST accuracy comes from: drift along the continuation, or
precision of the features over a longer clip; and how far real music of two splits can
be told apart at all.

Three C2STs on the prompts `midijax evaluate` and `benchmarks/tune_sampling.py` use (every
prompt of `--split` the length allows, 64-token prompts, the run's `config.sample`):

  chunks        the run's continuations of `--length` tokens, each cut into consecutive
                pieces of `--chunk` tokens (decoded on the clock of all that came before);
                the C2ST of each chunk position against the real continuation's same chunk.
                Accuracy that climbs from the first chunk to the last is drift; chunks
                that each sit well below the whole continuation's accuracy mean the
                longer clip measures the same small differences more precisely.
  whole         the same continuations, whole (the number `tune_sampling.py` reports).
  splits        real continuations of `--split` against as many real continuations drawn
                from `--other_split` (`--repeats` draws): how far the two splits' music
                differs for this classifier (50% = not at all). No model involved.
  shifts        the features whose means differ most between the generated and the real
                whole continuations, in pooled standard deviations (generated - real),
                with both means: which way each tell points (`--shifts` of them); and the
                same between every real continuation of `--other_split` and the real
                ones of `--split` (where the model's training data itself differs).

Prints one JSON line per C2ST, then a summary line.

    python benchmarks/c2st_anatomy.py --workdir workdirs/groove_beats --data_dir workdirs/tfds
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import json
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained run (its best checkpoint)")
  ap.add_argument("--data_dir", default="", help="TFDS data dir (default: the run's config)")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--other_split", default="train", help="the split compared in 'splits'")
  ap.add_argument("--length", type=int, default=512, help="continuation tokens")
  ap.add_argument("--chunk", type=int, default=128, help="tokens per chunk")
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=None, help="default config.sample")
  ap.add_argument("--top_p", type=float, default=None, help="default config.sample")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=3, help="draws of the other split")
  ap.add_argument("--folds", type=int, default=5)
  ap.add_argument("--shifts", type=int, default=10, help="features listed in 'shifts'")
  a = ap.parse_args(argv)
  if a.chunk <= 0 or a.length % a.chunk:
    ap.error(f"--chunk {a.chunk} must be positive and divide --length {a.length}")

  import dataclasses
  import numpy as np
  from midijax import checkpoint, encoding, evaluation, generation, input_pipeline, runs
  from midijax import two_sample

  model, enc, config, step = runs.load_run(
      a.workdir, best=checkpoint.best_step(a.workdir) is not None)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  kind = evaluation.feature_kind(enc, is_drum)
  spec = input_pipeline.dataset_specs(config)[0]

  def windows_of(split):
    store = input_pipeline.load_split(spec.version_dir, split)
    meters = evaluation.piece_meters(spec.version_dir, split)
    evaluation.check_c2st_windows(store, enc, split=split, prompt_tokens=a.prompt_tokens,
                                  length=a.length, num_prompts=100000, n_folds=a.folds)
    return evaluation.prompt_windows(store, enc, prompt_tokens=a.prompt_tokens,
                                     length=a.length, max_windows=100000, seed=a.seed,
                                     meters=meters)

  def features(w, continuations, begin, end):
    """Feature matrix of tokens [begin, end) of each continuation."""
    clips, seconds = evaluation.continuation_clips(enc, w, continuations, is_drum,
                                                   start=begin, stop=end)
    return two_sample.clip_feature_matrix(clips, kind=kind, durations=seconds)

  def report(name, real, other, real_groups, other_groups, seed, **extra):
    r = two_sample.c2st(real.values, other.values, real_groups=real_groups,
                        generated_groups=other_groups, feature_names=real.names,
                        n_folds=a.folds, seed=seed, importance_repeats=0)
    best = r["classifiers"][r["strongest"]]
    row = {"c2st": name, **extra, "accuracy": round(r["accuracy"], 4),
           "strongest": r["strongest"],
           "ci": [round(best["ci_low"], 4), round(best["ci_high"], 4)], "n": best["n"],
           "classifiers": {k: round(v["accuracy"], 4) for k, v in r["classifiers"].items()}}
    print(json.dumps(row), flush=True)
    return row

  t0 = time.perf_counter()
  w = windows_of(a.split)
  settings = evaluation.resolve_sampling(config, a.temperature, None, a.top_p)
  generated = evaluation.sample_continuations(
      model, enc, w.prompts, length=a.length, temperature=settings["temperature"],
      top_k=settings["top_k"], top_p=settings["top_p"], seed=a.seed,
      cache_len=generation.trained_context(config))
  chunks = []
  for begin in range(0, a.length, a.chunk):
    end = begin + a.chunk
    chunks.append(report("chunk", features(w, w.real, begin, end),
                         features(w, generated, begin, end), w.pieces, w.pieces, a.seed,
                         tokens=[begin, end]))
  real_whole, generated_whole = features(w, w.real, 0, a.length), features(w, generated, 0,
                                                                          a.length)
  whole = report("whole", real_whole, generated_whole, w.pieces, w.pieces, a.seed,
                 tokens=[0, a.length])

  def shifts_of(other, against):
    """The features whose means differ most, `other` - real, in pooled standard deviations."""
    real_mean, other_mean = real_whole.values.mean(0), other.values.mean(0)
    pooled = np.sqrt((real_whole.values.var(0) + other.values.var(0)) / 2)
    shift = np.where(pooled > 0, (other_mean - real_mean) / np.where(pooled > 0, pooled, 1), 0.)
    rows = [{"feature": real_whole.names[i], "shift_sd": round(float(shift[i]), 3),
             "real_mean": round(float(real_mean[i]), 4),
             "other_mean": round(float(other_mean[i]), 4)}
            for i in np.argsort(-np.abs(shift))[:a.shifts]]
    print(json.dumps({"c2st": "shifts", "against": against, "tokens": [0, a.length],
                      "shifts": rows}), flush=True)
    return rows

  shifts = shifts_of(generated_whole, "generated")
  other = windows_of(a.other_split)
  # Every real continuation of the other split, decoded once: its mean differences (what
  # a model trained on that split would reproduce where the splits' music differs), and
  # the rows each draw below takes.
  other_whole = features(other, other.real, 0, a.length)
  shifts_of(other_whole, a.other_split)
  rng = np.random.default_rng(a.seed)
  splits = []
  for r in range(a.repeats):
    pick = rng.choice(len(other), size=min(len(w), len(other)), replace=False)
    drawn = dataclasses.replace(other_whole, values=other_whole.values[pick])
    # Piece numbers of the two splits are separate sequences: keep their groups apart.
    splits.append(report("splits", real_whole, drawn, w.pieces,
                         other.pieces[pick] + int(w.pieces.max()) + 1, a.seed + r,
                         splits=[a.split, a.other_split], repeat=r))
  print(json.dumps({
      "workdir": a.workdir, "step": step, "split": a.split, "length": a.length,
      "chunk": a.chunk, "prompts": len(w), "sampling": settings,
      "chunk_accuracy": [c["accuracy"] for c in chunks], "whole_accuracy": whole["accuracy"],
      "largest_shifts": [x["feature"] for x in shifts[:3]],
      "splits_accuracy_mean": round(float(np.mean([s["accuracy"] for s in splits])), 4),
      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
  main()
