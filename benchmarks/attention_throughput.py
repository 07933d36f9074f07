#!/usr/bin/env python3
"""Speed of midijax's causal attention alone, forward and forward + backward.

Times, side by side with their runs interleaved, the two implementations the CPU training
step can use: XLA's blocked attention ("xla": `attention.causal_block_attention`, the
cpu_blocked backend, used with dropout, a bias, a packing mask or several devices) and the
C++ kernel ("kernel": `midijax.kernels.causal_attention`, the cpu_kernel backend, used
otherwise on one CPU device), and with --chunked the accelerators' flash attention written
in JAX ("chunked": `attention.chunked_attention`, blocks of the same size), on random q, k, v
of shape [batch, seq, heads, head_dim], for each query block size. Prints one JSON line:
milliseconds per call (median of --runs after compiling), the GFLOP/s of the matmul work
(2 products of 2*Dh flops per logit of the blocks computed; forward + backward counts 3x
that, as for the other matmuls; the kernel's recomputation is not counted) and the
kernel's speed-up. Compare with the model's big matmuls (`benchmarks/train_throughput.py`).

    python benchmarks/attention_throughput.py [--batch 8 --seq 1024 --heads 8 --head_dim 64]
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import json
import os
import statistics
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--blocks", default="64,128,256", help="query block sizes")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--chunked", action="store_true",
                  help="also time the chunked backend (the TPU/GPU path for relative attention)")
  a = ap.parse_args()
  try:
    blocks = [int(b) for b in a.blocks.split(",") if b]
  except ValueError:
    ap.error(f"--blocks must be comma-separated integers, got {a.blocks!r}")
  bad = [b for b in blocks if b <= 0 or a.seq % b or a.seq < 2 * b]
  if bad or not blocks:
    ap.error(f"--blocks {bad or a.blocks!r}: each block must divide --seq {a.seq} at least "
             "twice")
  from midijax import allocator
  allocator.reexec_with_tcmalloc()  # as the midijax command runs

  import jax
  import jax.numpy as jnp
  import numpy as np
  from midijax.kernels import causal_attention as cpu_attention
  from midijax.models import attention

  shape = (a.batch, a.seq, a.heads, a.head_dim)
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))

  def timed(fns):
    """Median seconds per call of each fn, their runs interleaved (the machine drifts)."""
    for fn in fns.values():
      jax.block_until_ready(fn(q, k, v))
    times = {name: [] for name in fns}
    for _ in range(a.runs):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

  implementations = {"xla": lambda q, k, v, b: attention.causal_block_attention(
      q, k, v, None, None, b)}
  if cpu_attention.available():  # as attention.attend calls it: [B, T, H, Dh] in and out
    implementations["kernel"] = cpu_attention.causal_attention
  if a.chunked:
    implementations["chunked"] = lambda q, k, v, b: attention.chunked_attention(q, k, v, chunk=b)
  rows = {}
  for block in blocks:
    n = a.seq // block
    logits = a.batch * a.heads * block * block * n * (n + 1) // 2  # computed, incl. masked
    flops = 2 * 2 * a.head_dim * logits
    forward = {name: jax.jit(lambda q, k, v, f=f, b=block: f(q, k, v, b))
               for name, f in implementations.items()}
    both = {name: jax.jit(jax.grad(lambda q, k, v, f=f, b=block: jnp.sum(w * f(q, k, v, b)),
                                   argnums=(0, 1, 2)))
            for name, f in implementations.items()}
    t_f, t_b = timed(forward), timed(both)
    row = {}
    for name in implementations:
      row[name] = {"forward_ms": round(t_f[name] * 1e3, 1),
                   "forward_gflop_per_s": round(flops / t_f[name] / 1e9, 1),
                   "forward_backward_ms": round(t_b[name] * 1e3, 1),
                   "forward_backward_gflop_per_s": round(3 * flops / t_b[name] / 1e9, 1)}
    if "kernel" in implementations:
      row["kernel_speedup_forward"] = round(t_f["xla"] / t_f["kernel"], 2)
      row["kernel_speedup_forward_backward"] = round(t_b["xla"] / t_b["kernel"], 2)
    rows[str(block)] = row
  print(json.dumps({"bench": "attention_throughput", "shape": list(shape), "blocks": rows,
                    "kernel": cpu_attention.available(), "allocator": allocator.current(),
                    "jax": jax.__version__,
                    "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  bench_env.run(main)
