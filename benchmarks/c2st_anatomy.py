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
  presence      (drums) per drum class, the share of continuations with any hit of it, the
                share with a few (1-3) hits, and the mean hits, for the real and the
                generated continuations and the other split's real ones: a class the run
                plays in more continuations than either split, a few hits each, is
                sprinkled in from other drummers' kits rather than played as a part.
  repetition    (drums) how alike consecutive bars of the real and the generated
                continuations are, pair by pair from the first whole bar (1 - the mean
                |difference| of their velocity grids, as drum_velocity_groove_consistency
                compares bars), and how many 16th x class cells per pair hold a hit in one
                bar only, per drum class: whether the bars drift apart along the
                continuation or differ from the first pair on, and on which drums.
  next_bar      (drum encodings with BAR tokens) the run's next bar after real bars k
                (--next_bar_at): how alike it is to bar k, against the drummer's bar
                k + 1. Close to the drummer here but far apart in 'repetition' means the
                bars part when the model continues its own music: exposure bias.

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
  ap.add_argument("--guidance", type=float, default=None,
                  help="prompt guidance (default config.sample, else 0)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=3, help="draws of the other split")
  ap.add_argument("--folds", type=int, default=5)
  ap.add_argument("--shifts", type=int, default=10, help="features listed in 'shifts'")
  ap.add_argument("--bar_pairs", type=int, default=8,
                  help="consecutive bar pairs listed in 'repetition' (drums)")
  ap.add_argument("--next_bar_at", default="1,5",
                  help="bars k of 'next_bar': the run continues the real bars up to k")
  ap.add_argument("--next_bar_context", type=int, default=256,
                  help="event tokens of real music before each next bar")
  ap.add_argument("--next_bar_tokens", type=int, default=160,
                  help="tokens sampled for each next bar (cut at its closing BAR)")
  a = ap.parse_args(argv)
  if a.chunk <= 0 or a.length % a.chunk:
    ap.error(f"--chunk {a.chunk} must be positive and divide --length {a.length}")
  try:
    a.next_bar_at = [int(x) for x in a.next_bar_at.split(",") if x.strip()]
  except ValueError:
    ap.error(f"--next_bar_at must be comma-separated bar numbers, got {a.next_bar_at!r}")
  if any(k < 0 for k in a.next_bar_at) or a.next_bar_context < 1 or a.next_bar_tokens < 1:
    ap.error("--next_bar_at needs bars >= 0, --next_bar_context and --next_bar_tokens "
             "at least 1 token")

  import dataclasses
  import numpy as np
  from midijax import checkpoint, encoding, evaluation, generation, input_pipeline, runs
  from midijax import music_stats, two_sample

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

  def features(w, continuations, begin, end, decoded=None):
    """Feature matrix of tokens [begin, end) of each continuation (`decoded`: their
    `continuation_clips`, when already decoded)."""
    clips, seconds = decoded or evaluation.continuation_clips(
        enc, w, continuations, is_drum, start=begin, stop=end)
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

  def repetition_of(real_clips, generated_clips):
    """How alike consecutive bars are (`music_stats.drum_bar_grid`, as the velocity
    consistency compares them), from the first whole bar of each continuation on: by bar
    pair, and the cells per class played in one bar of a pair only."""
    names = music_stats.drum_class_names()
    out = {}
    for who, clips in (("real", real_clips), ("generated", generated_clips)):
      grids = [music_stats.drum_bar_grid(c) for c in clips]
      # Bar 0 of a continuation starts where its prompt ends, mid-bar or not: pairs from 1.
      pairs = [[g[b], g[b + 1]] for g in grids for b in range(1, len(g) - 1)]
      by_pair = [round(float(np.mean([1 - np.abs(g[b] - g[b + 1]).mean()
                                      for g in grids if len(g) > b + 1])), 4)
                 for b in range(1, a.bar_pairs + 1) if any(len(g) > b + 1 for g in grids)]
      # Per pair and class (bars of other meters have other 16th counts).
      changed = (np.mean([((x > 0) ^ (y > 0)).sum(0) for x, y in pairs], axis=0)
                 if pairs else np.zeros(len(names)))
      out[who] = {"bars_alike_by_pair": by_pair, "bar_pairs": len(pairs),
                  "changed_cells": {n: round(float(c), 2) for n, c in zip(names, changed)}}
    print(json.dumps({"c2st": "repetition", "tokens": [0, a.length], **out}), flush=True)

  def next_bar_of(w, settings):
    """The run's next bar after real bars: how alike it is to the bar before it, against
    how alike the drummer's next bar is (bar pairs k, k+1 of the real continuations, k in
    --next_bar_at). Little difference here and a large one in 'repetition' means the
    bars drift apart when the model continues its own bars (exposure bias), not when it
    continues the drummer's."""
    bar_id = enc.vocab.ids.get("BAR")
    if bar_id is None:
      return
    prompt_len = a.next_bar_context
    out = []
    for k in a.next_bar_at:
      rows, prompts, heads = [], [], []
      for i, real in enumerate(w.real):
        bars = np.flatnonzero(real == bar_id)
        if len(bars) < k + 2:
          continue
        head = real[:bars[k] + 1]  # through the BAR that starts grid bar k + 1
        prefix = w.prompts[i][:len(w.prompts[i]) - w.prompt_tokens]
        events = np.concatenate([w.contexts[i][len(prefix):], head])[-prompt_len:]
        rows.append(i)
        heads.append(head)
        prompts.append(np.concatenate([prefix, events]).astype(np.int32))
      if len(rows) < 2:
        continue
      sub = dataclasses.replace(
          w, prompts=[w.prompts[i] for i in rows], contexts=[w.contexts[i] for i in rows],
          real=[w.real[i] for i in rows], pieces=w.pieces[rows], offsets=w.offsets[rows],
          qpm=w.qpm[rows], meters=[w.meters[i] for i in rows])
      sampled = evaluation.sample_continuations(
          model, enc, prompts, length=a.next_bar_tokens, temperature=settings["temperature"],
          top_k=settings["top_k"], top_p=settings["top_p"], seed=a.seed,
          cache_len=generation.trained_context(config), guidance=settings["guidance"])
      nexts = []
      for head, g in zip(heads, sampled):
        stop = np.flatnonzero(g == bar_id)
        nexts.append(np.concatenate([head, g[:stop[0]] if len(stop) else g]).astype(np.int32))

      def alike(conts):
        values = []
        for c in evaluation.continuation_clips(enc, sub, conts, is_drum)[0]:
          g = music_stats.drum_bar_grid(c)
          if len(g) < k + 2:  # silent bars at the end: zeros
            g = np.concatenate([g, np.zeros((k + 2 - len(g),) + g.shape[1:])])
          values.append(1 - np.abs(g[k] - g[k + 1]).mean())
        return round(float(np.mean(values)), 4)

      out.append({"bar": k, "windows": len(rows), "real": alike(sub.real),
                  "generated": alike(nexts)})
    print(json.dumps({"c2st": "next_bar", "context_tokens": prompt_len, "pairs": out}),
          flush=True)

  t0 = time.perf_counter()
  w = windows_of(a.split)
  settings = evaluation.resolve_sampling(config, a.temperature, None, a.top_p, a.guidance)
  generated = evaluation.sample_continuations(
      model, enc, w.prompts, length=a.length, temperature=settings["temperature"],
      top_k=settings["top_k"], top_p=settings["top_p"], seed=a.seed,
      cache_len=generation.trained_context(config), guidance=settings["guidance"])
  chunks = []
  for begin in range(0, a.length, a.chunk):
    end = begin + a.chunk
    chunks.append(report("chunk", features(w, w.real, begin, end),
                         features(w, generated, begin, end), w.pieces, w.pieces, a.seed,
                         tokens=[begin, end]))
  # The whole continuations, decoded once for their features and their bars.
  real_decoded = evaluation.continuation_clips(enc, w, w.real, is_drum)
  generated_decoded = evaluation.continuation_clips(enc, w, generated, is_drum)
  real_whole = features(w, w.real, 0, a.length, real_decoded)
  generated_whole = features(w, generated, 0, a.length, generated_decoded)
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
  if kind == "drums":
    repetition_of(real_decoded[0], generated_decoded[0])
    next_bar_of(w, settings)
  other = windows_of(a.other_split)
  # Every real continuation of the other split, decoded once: its mean differences (what
  # a model trained on that split would reproduce where the splits' music differs), and
  # the rows each draw below takes.
  other_whole = features(other, other.real, 0, a.length)
  shifts_of(other_whole, a.other_split)

  def presence_of(matrices):
    """Per drum class: [share of clips with a hit, share with 1-3 hits, mean hits]."""
    out = {}
    for name in music_stats.drum_class_names():
      column = f"drum_class_hits[{name}]"
      if column not in real_whole.names:
        continue
      j = real_whole.names.index(column)
      out[name] = {who: [round(float((m.values[:, j] > 0).mean()), 3),
                         round(float(((m.values[:, j] > 0) & (m.values[:, j] <= 3)).mean()), 3),
                         round(float(m.values[:, j].mean()), 2)]
                   for who, m in matrices.items()}
    print(json.dumps({"c2st": "presence", "tokens": [0, a.length],
                      "fields": ["any", "1-3", "mean"], "classes": out}), flush=True)

  if kind == "drums":
    presence_of({"real": real_whole, "generated": generated_whole,
                 a.other_split: other_whole})
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
  bench_env.run(main)
