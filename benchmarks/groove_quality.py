#!/usr/bin/env python3
"""Does the Transformer beat count-based n-gram models? Validation NLL of all, same windows.

1. Trains `--config` (default configs/groove_small.py) with `midijax train` for at most
   `--max_minutes` of wall clock (skip with --skip_train to score an existing workdir).
2. Scores the best checkpoint on the evaluation split (`--split`, default the config's
   data.eval_split): NLL over the deterministic eval windows (every token predicted once;
   padding excluded). `--eval_context C` overlaps them (`config.data.eval_context`): every
   target after a piece's first window is predicted from at least C tokens before it,
   instead of from as few as none at the start of each non-overlapping window.
3. Fits interpolated Witten-Bell and interpolated modified Kneser-Ney n-gram models
   (`--orders`, default 2..5) on the training split's token sequences and scores them on
   exactly the same windows (targets, weights, and histories limited to the same window).

Every model gets NLL per token, per note (NLL summed over all targets / note-starting
targets) and per second of music (/ seconds the targets advance time, from the
encoding's grammar table): per note and per second compare models of different
encodings. The best n-gram is the lowest NLL per token of either family. `--by_kind`
adds, for the Transformer and the best n-gram, the NLL of each kind of target token
(DRUM, TIME_SHIFT, VELOCITY, BAR, ...): where the nats go and where the Transformer gains,
and the Transformer's NLL by position of the target in its window (how much the history
before a token is worth; with `--seq_len` longer than the training rows, what positions
the model never trained on cost).

Prints one JSON line. Example (the README figure):

    python benchmarks/groove_quality.py --data_dir workdirs/tfds --workdir workdirs/groove_small
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = bench_env.REPO


def per_unit(total: float, units: dict) -> dict:
  """NLL (nats) per token, note and second, and perplexity, from a summed NLL."""
  import numpy as np
  return {"nll_per_token": round(total / units["tokens"], 4),
          "nll_per_note": round(total / max(units["notes"], 1.0), 4),
          "nll_per_second": round(total / max(units["seconds"], 1e-9), 4),
          "perplexity": round(float(np.exp(total / units["tokens"])), 3)}


TOKEN_KINDS = ("TIME_SHIFT", "NOTE_ON", "NOTE_OFF", "VELOCITY", "DRUM", "OFFSET", "POSITION",
               "DURATION", "BAR", "EOS")


def token_kinds(names):
  """The kind of each vocabulary entry: its known prefix (TIME_SHIFT_12 -> TIME_SHIFT),
  else the text before its first underscore."""
  return [next((k for k in TOKEN_KINDS if n == k or n.startswith(k + "_")), n.split("_")[0])
          for n in names]


def by_kind(kinds, batches, token_nll):
  """{kind: {"share" of scored targets, "nll" per target of that kind, "share_of_nll"}} from
  per-target NLL arrays (one [rows, seq_len] per batch)."""
  import numpy as np
  kinds = np.asarray(kinds)
  total, count = {}, {}
  for b, nll in zip(batches, token_nll):
    scored = np.asarray(b["weights"]) > 0
    for k, v in zip(kinds[np.asarray(b["targets"])[scored]], np.asarray(nll)[scored]):
      total[k] = total.get(k, 0.0) + float(v)
      count[k] = count.get(k, 0) + 1
  n, nats = sum(count.values()), sum(total.values())
  return {k: {"share": round(count[k] / n, 4), "nll": round(total[k] / count[k], 4),
              "share_of_nll": round(total[k] / nats, 4)}
          for k in sorted(count, key=lambda k: -total[k])}


def by_position(batches, token_nll, seq_len):
  """{"a-b": NLL per scored target at row positions [a, b)} over the windows."""
  import numpy as np
  edges = [0, 16, 32, 64] + list(range(128, seq_len, 64)) + [seq_len]
  total, count = np.zeros(seq_len), np.zeros(seq_len)
  for b, nll in zip(batches, token_nll):
    w = np.asarray(b["weights"]) > 0
    total += np.where(w, np.asarray(nll), 0.0).sum(0)
    count += w.sum(0)
  return {f"{a}-{z}": round(float(total[a:z].sum() / count[a:z].sum()), 4)
          for a, z in zip(edges[:-1], edges[1:]) if count[a:z].sum()}


def transformer_token_nll(model, batches):
  """Per-target NLL (nats) of the model on each batch, float32 [rows, seq_len] each."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from midijax import losses
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(p, b):
    return losses.token_nll(losses.apply_model(graphdef, p, b, True, None), b["targets"])
  return [jax.device_get(step(params, {k: jnp.asarray(v) for k, v in b.items()}))
          for b in batches]


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(REPO / "configs" / "groove_small.py"))
  ap.add_argument("--workdir", default=str(REPO / "workdirs" / "groove_small"))
  ap.add_argument("--data_dir", default="", help="TFDS data dir holding the built dataset")
  ap.add_argument("--max_minutes", type=float, default=20.0, help="training wall-clock budget")
  ap.add_argument("--skip_train", action="store_true", help="score the workdir as it is")
  ap.add_argument("--split", default="", help="split scored (default: data.eval_split)")
  ap.add_argument("--params", default="", choices=("", "params", "ema_params"),
                  help="checkpoint parameter tree to score: the raw parameters or their "
                       "moving average (config.train.ema_decay runs); default the run's own")
  ap.add_argument("--eval_context", type=int, default=None,
                  help="unscored context tokens before each later window's targets "
                       "(config.data.eval_context; default the run's config, else 0)")
  ap.add_argument("--seq_len", type=int, default=None,
                  help="window length in tokens (default the run's data.seq_len; at most "
                       "the model's max_len)")
  ap.add_argument("--by_kind", action="store_true",
                  help="also the NLL of each kind of target token (Transformer, best n-gram)")
  ap.add_argument("--orders", default="2,3,4,5", help="n-gram orders to fit")
  ap.add_argument("--smoothing", default="witten_bell,kneser_ney",
                  help="n-gram families to fit (witten_bell, kneser_ney)")
  a = ap.parse_args()

  t_train = 0.0
  if not a.skip_train:
    cmd = [sys.executable, "-m", "midijax.cli", "train", f"--config={a.config}",
           f"--workdir={a.workdir}", f"--config.train.max_seconds={a.max_minutes * 60}"]
    if a.data_dir:
      cmd.append(f"--config.data.data_dir={a.data_dir}")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    t_train = time.perf_counter() - t

  from midijax import evaluation, input_pipeline, losses, runs
  from midijax.errors import MidijaxError
  from midijax.ngram import KneserNeyModel, NgramModel

  model, enc, config, step = runs.load_run(a.workdir, best=True, params_tree=a.params or None)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  with config.unlocked():
    config.data.max_eval_batches = -1
    if a.eval_context is not None:
      config.data.eval_context = a.eval_context
    if a.seq_len:
      if a.seq_len > model.config.max_len:
        sys.exit(f"groove_quality.py: --seq_len {a.seq_len} is above the model's max_len "
                 f"{model.config.max_len}")
      config.data.seq_len = a.seq_len
  split = a.split or config.data.eval_split
  data = input_pipeline.DataSource(config)
  try:
    iterator = data.eval_batches(split)
  except MidijaxError as e:  # e.g. an --eval_context that leaves no room for a target
    sys.exit(f"groove_quality.py: {e}")
  batches = list(iterator)
  spec = input_pipeline.dataset_specs(config)[0]
  units = evaluation.window_units(enc, batches,
                                  evaluation.batch_qpm(iterator, spec.version_dir, split))
  tf_metrics = losses.score_batches(model, batches)

  store = input_pipeline.load_split(spec.version_dir, config.data.train_split)
  sequences = [store.piece(i) for i in range(len(store))]
  families = {"witten_bell": NgramModel, "kneser_ney": KneserNeyModel}
  ngram, ngram_token_nll = {}, {}
  for family in a.smoothing.split(","):
    ngram[family] = {}
    for order in [int(o) for o in a.orders.split(",")]:
      t = time.perf_counter()
      lm = families[family](order, enc.vocab_size).fit(sequences)
      per_target = [lm.token_nll(b["inputs"], b["targets"], b["weights"]) for b in batches]
      total = sum(float((x * b["weights"]).sum()) for x, b in zip(per_target, batches))
      ngram[family][order] = {**per_unit(total, units),
                              "seconds": round(time.perf_counter() - t, 1)}
      if a.by_kind:
        ngram_token_nll[family, order] = per_target
  best = {f: min(r, key=lambda o: r[o]["nll_per_token"]) for f, r in ngram.items()}
  best_family = min(best, key=lambda f: ngram[f][best[f]]["nll_per_token"])
  best_ngram = ngram[best_family][best[best_family]]
  kinds = {}
  if a.by_kind:
    names = token_kinds(enc.vocab.names)
    per_target = transformer_token_nll(model, batches)
    kinds = {"transformer": by_kind(names, batches, per_target),
             "transformer_by_position": by_position(batches, per_target,
                                                    int(config.data.seq_len)),
             "best_ngram": by_kind(names, batches,
                                   ngram_token_nll[best_family, best[best_family]])}
  transformer = per_unit(tf_metrics["loss"] * tf_metrics["tokens"], units)
  transformer["accuracy"] = round(tf_metrics["accuracy"], 4)
  metrics = [json.loads(l) for l in
             (pathlib.Path(a.workdir) / "metrics.jsonl").read_text().splitlines()]
  print(json.dumps({
      "bench": "groove_quality", "config": os.path.relpath(a.config, REPO),
      "machine": f"{os.cpu_count()} CPU cores", "train_wall_s": round(t_train, 1),
      "steps_trained": max(m["step"] for m in metrics), "best_step": step, "split": split,
      "params": a.params or "the run's own",
      "eval_context": int(config.data.get("eval_context", 0)),
      "seq_len": int(config.data.seq_len),
      "eval_windows": iterator.num_windows,
      "eval_tokens": int(units["tokens"]), "eval_notes": int(units["notes"]),
      "eval_seconds": round(units["seconds"], 1),
      "transformer": transformer, "ngram": ngram, "best_ngram_order": best,
      "best_ngram": {"smoothing": best_family, "order": best[best_family], **best_ngram},
      "transformer_below_best_ngram": round(
          1 - transformer["nll_per_token"] / best_ngram["nll_per_token"], 4),
      **({"by_kind": kinds} if kinds else {}),
  }))


if __name__ == "__main__":
  bench_env.run(main)
