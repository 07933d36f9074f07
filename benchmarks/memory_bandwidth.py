#!/usr/bin/env python3
"""How fast this machine streams float32 arrays through XLA:CPU, as one JSON line.

The sampler's batch-32 steps read the key/value cache and the batch-1 steps read the
weights once per token, so their speed is bounded by how fast memory can be read. This
script times a jitted `jnp.sum` over float32 arrays of the given sizes (median of --runs
after a warm-up) and prints the read bandwidth in GB/s (10^9 bytes/s) per size, e.g.

  4 MB (one 512 x 2048 weight, in the CPU's caches) ... 450 MB (the 6x512 model's
  batch-32 cache at position ~576, beyond them)

    python benchmarks/memory_bandwidth.py [--sizes_mb 4,76,450] [--runs 5]
"""
import argparse
import json
import os
import statistics
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes_mb", default="4,25,76,450",
                  help="array sizes in MB (10^6 bytes), comma-separated")
  ap.add_argument("--runs", type=int, default=5)
  a = ap.parse_args()
  try:
    sizes = [float(x) for x in a.sizes_mb.split(",") if x]
  except ValueError:
    ap.error(f"--sizes_mb must be comma-separated numbers, got {a.sizes_mb!r}")
  if not sizes or min(sizes) <= 0:
    ap.error(f"--sizes_mb needs positive sizes, got {a.sizes_mb!r}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  # Two rows, summed along the row: both cores stream half the array each.
  total = jax.jit(lambda x: jnp.sum(x, axis=1))
  result = {}
  for mb in sizes:
    n = int(mb * 1e6 / 4) // 2 * 2
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n, np.float32).reshape(2, -1))
    total(x).block_until_ready()
    times = []
    for _ in range(a.runs):
      start = time.perf_counter()
      total(x).block_until_ready()
      times.append(time.perf_counter() - start)
    result[f"{mb:g}"] = round(n * 4 / statistics.median(times) / 1e9, 1)
    del x
  print(json.dumps({"bench": "memory_bandwidth", "read_gb_per_s_by_mb": result,
                    "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
                    "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  main()
