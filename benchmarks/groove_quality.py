#!/usr/bin/env python3
"""Does the Transformer beat a count-based n-gram model? Validation NLL of both, same tokens.

1. Trains `--config` (default configs/groove_small.py) with `midijax train` for at most
   `--max_minutes` of wall clock (skip with --skip_train to score an existing workdir).
2. Scores the best checkpoint on the validation split: mean NLL per token (nats) over the
   deterministic eval windows (every token predicted once; padding excluded).
3. Fits interpolated Witten-Bell n-gram models (orders 2..5) on the training split's token
   sequences and scores them on exactly the same windows (targets, weights, and histories
   limited to the same window).

Prints one JSON line. Example (the README figure):

    python benchmarks/groove_quality.py --data_dir workdirs/tfds --workdir workdirs/groove_small
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(REPO / "configs" / "groove_small.py"))
  ap.add_argument("--workdir", default=str(REPO / "workdirs" / "groove_small"))
  ap.add_argument("--data_dir", default="", help="TFDS data dir holding the built dataset")
  ap.add_argument("--max_minutes", type=float, default=20.0, help="training wall-clock budget")
  ap.add_argument("--skip_train", action="store_true", help="score the workdir as it is")
  ap.add_argument("--orders", default="2,3,4,5", help="n-gram orders to fit")
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

  import numpy as np
  from midijax import input_pipeline, losses, runs
  from midijax.ngram import NgramModel

  model, enc, config, step = runs.load_run(a.workdir, best=True)
  if a.data_dir:
    config.data.data_dir = a.data_dir
  data = input_pipeline.DataSource(config)
  batches = list(data.eval_batches())
  tf_metrics = losses.score_batches(model, batches)

  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, config.data.train_split)
  sequences = [store.piece(i) for i in range(len(store))]
  ngram = {}
  for order in [int(o) for o in a.orders.split(",")]:
    t = time.perf_counter()
    lm = NgramModel(order, enc.vocab_size).fit(sequences)
    total = count = 0.0
    for b in batches:
      s, c = lm.nll(b["inputs"], b["targets"], b["weights"])
      total += s
      count += c
    ngram[order] = {"nll_per_token": round(total / count, 4),
                    "perplexity": round(float(np.exp(total / count)), 3),
                    "seconds": round(time.perf_counter() - t, 1)}
  best_order = min(ngram, key=lambda o: ngram[o]["nll_per_token"])
  metrics = [json.loads(l) for l in (pathlib.Path(a.workdir) / "metrics.jsonl").read_text().splitlines()]
  steps_trained = max(m["step"] for m in metrics)
  print(json.dumps({
      "bench": "groove_quality", "config": os.path.relpath(a.config, REPO),
      "machine": f"{os.cpu_count()} CPU cores", "train_wall_s": round(t_train, 1),
      "steps_trained": steps_trained, "best_step": step,
      "split": config.data.eval_split, "eval_tokens": int(tf_metrics["tokens"]),
      "transformer": {"nll_per_token": round(tf_metrics["loss"], 4),
                      "perplexity": round(tf_metrics["perplexity"], 3),
                      "accuracy": round(tf_metrics["accuracy"], 4)},
      "ngram": ngram, "best_ngram_order": best_order,
      "transformer_beats_ngram": tf_metrics["loss"] < ngram[best_order]["nll_per_token"],
  }))


if __name__ == "__main__":
  main()
