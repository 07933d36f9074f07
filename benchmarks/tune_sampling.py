#!/usr/bin/env python3
"""Tunes a run's sampling settings on a held-out split with the C2ST of `midijax evaluate`.

For every (temperature, top-p, guidance) of the grid, continues the same prompts of `--split`
(default validation: tune there, report on test) with constrained samples and runs the
classifier two-sample test at each continuation length; the best setting is the one whose
worst length (the stronger classifier's accuracy) is lowest, i.e. closest to 50%. Prints
one JSON line per setting, then one for the best; put the best in the config's
`sample` fields.

    python benchmarks/tune_sampling.py --workdir workdirs/groove_small \\
        --data_dir workdirs/tfds --temperatures 0.9,1.0 --top_ps 0.9,0.95,1.0 \\
        --guidances 0,0.5

With `--seeds 0,1,2` each setting's accuracy is the mean over three sampling seeds (the
same prompts, other samples and folds): at 512 tokens one seed's estimate moves by
several points.
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import itertools
import json
import time


def floats(text):
  return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained run (its best checkpoint)")
  ap.add_argument("--data_dir", default="", help="TFDS data dir (default: the run's config)")
  ap.add_argument("--split", default="validation", help="split to tune on")
  ap.add_argument("--temperatures", default="1.0", help="comma-separated temperatures")
  ap.add_argument("--top_ps", default="1.0", help="comma-separated top-p values")
  ap.add_argument("--guidances", default="0",
                  help="comma-separated prompt-guidance values (0 = off; see "
                       "midijax.sampling.sample_tokens)")
  ap.add_argument("--top_k", type=int, default=0, help="top-k for every setting (0 = off)")
  ap.add_argument("--lengths", default="128,512", help="continuation lengths (tokens)")
  ap.add_argument("--prompts", type=int, default=100000,
                  help="prompts per length at most (default: all the split holds)")
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--window_keep", type=int, default=None,
                  help="tokens the sampler keeps when its window slides (default half the "
                       "context)")
  ap.add_argument("--folds", type=int, default=5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--seeds", default="",
                  help="comma-separated sampling seeds (e.g. 0,1,2): each setting is sampled "
                       "and tested once per seed, and its accuracy is their mean (at 512 "
                       "tokens one seed's estimate moves by several points); default --seed")
  ap.add_argument("--importance", type=int, default=0,
                  help="permutation-importance repeats (0: skip the feature ranking)")
  a = ap.parse_args(argv)

  from midijax import checkpoint, encoding, evaluation, generation, input_pipeline, runs

  model, enc, config, step = runs.load_run(
      a.workdir, best=checkpoint.best_step(a.workdir) is not None)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  kind = evaluation.feature_kind(enc, is_drum)
  context = generation.trained_context(config)
  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, a.split)
  meters = evaluation.piece_meters(spec.version_dir, a.split)
  windows = {}
  for n in [int(x) for x in a.lengths.split(",")]:
    evaluation.check_c2st_windows(store, enc, split=a.split, prompt_tokens=a.prompt_tokens,
                                  length=n, num_prompts=a.prompts, n_folds=a.folds)
    windows[n] = evaluation.prompt_windows(store, enc, prompt_tokens=a.prompt_tokens, length=n,
                                           max_windows=a.prompts, seed=a.seed, meters=meters)
  seeds = [int(x) for x in a.seeds.split(",") if x.strip()] or [a.seed]
  rows = []
  for t, p, g in itertools.product(floats(a.temperatures), floats(a.top_ps),
                                   floats(a.guidances)):
    settings = evaluation.resolve_sampling(config, t, a.top_k, p, g)
    t0 = time.perf_counter()
    result = {}
    for n, w in windows.items():
      per_seed = [evaluation.continuation_c2st(
          model, enc, w, settings=settings, is_drum=is_drum, kind=kind, seed=seed,
          n_folds=a.folds, cache_len=context, window_keep=a.window_keep,
          importance_repeats=a.importance, log=lambda *_: None) for seed in seeds]
      r = per_seed[0]
      best = r["classifiers"][r["strongest"]]
      result[str(n)] = {
          "accuracy": round(r["accuracy"], 4), "strongest": r["strongest"],
          "ci": [round(best["ci_low"], 4), round(best["ci_high"], 4)], "n": best["n"],
          "classifiers": {k: round(v["accuracy"], 4) for k, v in r["classifiers"].items()},
          "validity": r["constrained_validity"]["rate"],
          "top_features": [f["name"] for f in best["top_features"][:3]]}
      if len(seeds) > 1:
        # Each seed's stronger classifier, then their mean: the setting's accuracy. The
        # fields above stay the first seed's (its interval is one seed's).
        accs = [x["accuracy"] for x in per_seed]
        result[str(n)].update({
            "accuracy": round(sum(accs) / len(accs), 4),
            "seeds": {str(sd): round(acc, 4) for sd, acc in zip(seeds, accs)},
            "validity": min(x["constrained_validity"]["rate"] for x in per_seed)})
    row = {"temperature": t, "top_p": p, "top_k": a.top_k, "guidance": g, "seeds": seeds,
           "c2st": result,
           "worst": max(v["accuracy"] for v in result.values()),
           "seconds": round(time.perf_counter() - t0, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  best = min(rows, key=lambda r: r["worst"])
  print(json.dumps({"best": best, "workdir": a.workdir, "step": step, "split": a.split,
                    "prompt_tokens": a.prompt_tokens, "context_tokens": context,
                    "window_keep": a.window_keep or context // 2,
                    "windows": {str(n): len(w) for n, w in windows.items()}}))


if __name__ == "__main__":
  bench_env.run(main)
