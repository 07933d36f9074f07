"""Input pipeline throughput: tokens/s that `make_train_iterator` delivers on this machine.

Builds the dataset first if it is missing (from --manual_dir), then times `--steps`
training batches after `--warmup` and prints one JSON line:

    .venv/bin/python benchmarks/input_pipeline.py --name groove --builder_config drums \\
        --seq_len 256 --batch_size 32

`tokens_per_s` counts every row position (batch_size * seq_len per batch, what the
train step consumes); `target_tokens_per_s` counts weighted targets only (padding,
prefixes and packing boundaries excluded).
"""
from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path, where a sibling file may shadow a
# standard module (benchmarks/tokenize.py hides `tokenize`); use the repo root instead.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [REPO] + [p for p in sys.path
                        if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import platform  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", default="groove", help="groove | piano | midi_folder")
  p.add_argument("--builder_config", default="", help="builder config ('' = default)")
  p.add_argument("--mixture", default="", help="comma-separated name/config:weight entries")
  p.add_argument("--data_dir", default="",
                 help="TFDS data dir ('' = $TFDS_DATA_DIR, else a temporary dir)")
  p.add_argument("--manual_dir", default="",
                 help="source folder to build from when the dataset is missing "
                      "('' = ../shared/data/<name>)")
  p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
  p.add_argument("--batch_size", type=int, default=32, help="rows per batch (global)")
  p.add_argument("--packing", action="store_true", help="pack pieces with segment ids")
  p.add_argument("--max_segments_per_row", type=int, default=8)
  p.add_argument("--transpose_semitones", type=int, default=0)
  p.add_argument("--time_stretch", type=float, default=0.0)
  p.add_argument("--steps", type=int, default=300, help="timed batches")
  p.add_argument("--warmup", type=int, default=20, help="untimed batches first")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  from midijax import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
      tempfile.gettempdir(), "midijax_bench_tfds")
  mixture = tuple(m for m in args.mixture.split(",") if m)
  entries = [m.partition(":")[0].partition("/") for m in mixture] or [
      (args.name, "/", args.builder_config)]
  build_seconds = 0.0
  for name, _, builder_config in entries:
    try:
      input_pipeline.find_dataset_dir(name, builder_config, data_dir)
    except Exception:  # pylint: disable=broad-except
      import data_pipelines  # pylint: disable=g-import-not-at-top
      manual = args.manual_dir or str(pathlib.Path(REPO).parent / "shared" / "data" / name)
      t = time.perf_counter()
      data_pipelines.build(name, builder_config or None, manual_dir=manual, data_dir=data_dir)
      build_seconds += time.perf_counter() - t
  config = ml_collections.ConfigDict({
      "seed": args.seed,
      "data": {
          "name": args.name, "builder_config": args.builder_config, "data_dir": data_dir,
          "mixture": mixture, "train_split": "train", "seq_len": args.seq_len,
          "batch_size": args.batch_size, "packing": args.packing,
          "max_segments_per_row": args.max_segments_per_row,
          "transpose_semitones": args.transpose_semitones, "time_stretch": args.time_stretch,
      }})
  t = time.perf_counter()
  it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  setup = time.perf_counter() - t
  weights = 0.0
  t = time.perf_counter()
  for _ in range(args.steps):
    weights += float(next(it)["weights"].sum())
  seconds = time.perf_counter() - t
  rows, seq_len = it.per_process_batch_shape
  result = {
      "benchmark": "input_pipeline",
      "dataset": ",".join(mixture) or f"{args.name}/{args.builder_config or 'default'}",
      "seq_len": seq_len, "batch_size": rows, "packing": args.packing,
      "transpose_semitones": args.transpose_semitones, "time_stretch": args.time_stretch,
      "steps": args.steps, "seconds": round(seconds, 3),
      "batches_per_s": round(args.steps / seconds, 1),
      "tokens_per_s": round(args.steps * rows * seq_len / seconds),
      "target_tokens_per_s": round(weights / seconds),
      "target_fraction": round(weights / (args.steps * rows * seq_len), 3),
      "setup_and_warmup_s": round(setup, 2), "build_s": round(build_seconds, 2),
      "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "machine": platform.platform(),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
