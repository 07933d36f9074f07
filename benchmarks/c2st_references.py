#!/usr/bin/env python3
"""Reference points for the continuation C2ST: real drummers in place of the model.

`midijax evaluate`'s C2ST asks whether a classifier tells a model's continuations of a
split's prompts from the drummers' own. This script puts other *real* continuations in the
model's place, with the same windows, decoding, features, folds and classifiers
(`evaluation.continuation_c2st` without the sampling), to say what a score means:

* `same_prefix`: for each prompt, the continuation of a random window of the reference
  split (default train: what a model trained on it could at best imitate) whose piece has
  the same conditioning prefix (style, tempo bin, beat / fill, meter), else the same style.
* `nearest_prompt`: the continuation of the reference-split window whose *prompt* is
  nearest to this prompt (standardised clip features of the prompts, among the same prefix
  when it has any): a drummer of the reference split who played the most similar bar.

A model that continued every prompt the way the reference split's drummers play would
score about `same_prefix` to `nearest_prompt`; getting below them means reading
more of the prompt than its style and its nearest neighbour do.

    python benchmarks/c2st_references.py --workdir workdirs/groove_beats \\
        --data_dir workdirs/tfds --seeds 0,1,2

Prints one JSON line per reference and length, then a summary line.
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import json
import time

import numpy as np


def _prefix_key(window_prompt, prompt_tokens):
  return tuple(int(t) for t in window_prompt[:len(window_prompt) - prompt_tokens])


def _style_key(window_prompt, prompt_tokens):
  # The prefix's first token after BOS is the style (data_pipelines/groove CONDITIONING).
  prefix = window_prompt[:len(window_prompt) - prompt_tokens]
  return int(prefix[1]) if len(prefix) > 1 else -1


def _pools(keys_of_refs, key):
  return [i for i, k in enumerate(keys_of_refs) if k == key]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True,
                  help="a trained run: its encoding, data and C2ST settings")
  ap.add_argument("--data_dir", default="", help="TFDS data dir (default: the run's config)")
  ap.add_argument("--split", default="validation", help="split whose prompts are tested")
  ap.add_argument("--reference_split", default="train",
                  help="split the stand-in continuations come from")
  ap.add_argument("--lengths", default="128,512", help="continuation lengths (tokens)")
  ap.add_argument("--prompts", type=int, default=100000,
                  help="prompts per length at most (default: all the split holds)")
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--reference_windows", type=int, default=4000,
                  help="reference-split windows to choose from, at most")
  ap.add_argument("--folds", type=int, default=5)
  ap.add_argument("--seeds", default="0,1,2",
                  help="comma-separated seeds: the random choices, folds and trees")
  a = ap.parse_args(argv)

  from midijax import encoding, evaluation, input_pipeline, runs, two_sample
  from midijax.errors import MidijaxError

  _, enc, config, _ = runs.load_run(a.workdir, best=True)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  kind = evaluation.feature_kind(enc, is_drum)
  spec = input_pipeline.dataset_specs(config)[0]
  stores = {s: input_pipeline.load_split(spec.version_dir, s)
            for s in {a.split, a.reference_split}}
  meters = {s: evaluation.piece_meters(spec.version_dir, s) for s in stores}
  seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
  if not seeds:
    raise MidijaxError("--seeds: give at least one seed")
  pt = a.prompt_tokens

  def clips_of(windows, conts):
    return evaluation.continuation_clips(enc, windows, conts, is_drum)

  def features(clips, durations):
    return two_sample.clip_feature_matrix(clips, kind=kind, durations=durations)

  def prompt_features(windows):
    # Each prompt decoded on its own piece's clock, after the piece's events before it.
    ctx = [c[:len(c) - pt] for c in windows.contexts]
    shifted = evaluation.PromptWindows(
        [None] * len(ctx), ctx, [], windows.pieces, windows.offsets, windows.qpm,
        windows.meters, pt, pt)
    clips, durations = clips_of(shifted, [p[len(p) - pt:] for p in windows.prompts])
    return features(clips, durations).values

  summary = {}
  t_start = time.perf_counter()
  for n in [int(x) for x in a.lengths.split(",") if x.strip()]:
    evaluation.check_c2st_windows(stores[a.split], enc, split=a.split, prompt_tokens=pt,
                                  length=n, num_prompts=a.prompts, n_folds=a.folds)
    test = evaluation.prompt_windows(stores[a.split], enc, prompt_tokens=pt, length=n,
                                     max_windows=a.prompts, seed=0, meters=meters[a.split])
    refs = evaluation.prompt_windows(stores[a.reference_split], enc, prompt_tokens=pt,
                                     length=n, max_windows=a.reference_windows, seed=0,
                                     meters=meters[a.reference_split])
    real_clips, real_s = clips_of(test, test.real)
    real = features(real_clips, real_s)
    # Nearest prompts, on features standardised over both splits' prompts.
    pf_test, pf_ref = prompt_features(test), prompt_features(refs)
    both = np.concatenate([pf_test, pf_ref])
    mu, sd = both.mean(0), both.std(0)
    sd[sd == 0] = 1.0
    z_test, z_ref = (pf_test - mu) / sd, (pf_ref - mu) / sd
    ref_prefix = [_prefix_key(p, pt) for p in refs.prompts]
    ref_style = [_style_key(p, pt) for p in refs.prompts]

    def candidates(i, prefix_keys, style_keys):
      """Reference windows with this prompt's prefix, else its style, else all."""
      for keys, key in ((prefix_keys, _prefix_key(test.prompts[i], pt)),
                        (style_keys, _style_key(test.prompts[i], pt))):
        pool = _pools(keys, key)
        if pool:
          return pool
      return list(range(len(prefix_keys)))

    for name in ("same_prefix", "nearest_prompt"):
      per_seed = []
      for seed in seeds:
        rng = np.random.default_rng(seed)
        picks = []
        for i in range(len(test)):
          pool = candidates(i, ref_prefix, ref_style)
          if name == "same_prefix":
            j = int(rng.choice(pool))
          else:
            d = ((z_ref[pool] - z_test[i]) ** 2).sum(1)
            j = pool[int(np.argmin(d))]
          picks.append(j)
        conts = [refs.real[j] for j in picks]
        # Each stand-in is decoded after its own piece's events (so its beat grid is its
        # drummer's), at the tested piece's tempo (tokens count beats, not seconds).
        stand_in = evaluation.PromptWindows(
            [None] * len(picks), [refs.contexts[j] for j in picks], conts, test.pieces,
            test.offsets, test.qpm, [refs.meters[j] for j in picks], pt, n)
        gen_clips, gen_s = clips_of(stand_in, conts)
        gen = features(gen_clips, gen_s)
        r = two_sample.c2st(real.values, gen.values, real_groups=test.pieces,
                            generated_groups=test.pieces, feature_names=real.names,
                            n_folds=a.folds, seed=seed, importance_repeats=0)
        per_seed.append(r)
      accs = [r["accuracy"] for r in per_seed]
      row = {"reference": name, "length": n, "windows": len(test),
             "reference_windows": len(refs),
             "accuracy": round(float(np.mean(accs)), 4),
             "seeds": {str(s): round(x, 4) for s, x in zip(seeds, accs)},
             "classifiers": {k: round(float(np.mean(
                 [r["classifiers"][k]["accuracy"] for r in per_seed])), 4)
                 for k in per_seed[0]["classifiers"]}}
      summary.setdefault(name, {})[str(n)] = row["accuracy"]
      print(json.dumps(row), flush=True)
  print(json.dumps({"summary": summary, "workdir": a.workdir, "split": a.split,
                    "reference_split": a.reference_split, "prompt_tokens": pt,
                    "seconds": round(time.perf_counter() - t_start, 1)}))


if __name__ == "__main__":
  bench_env.run(main)
