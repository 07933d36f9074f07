#!/usr/bin/env python3
"""Speed of midijax's blocked causal attention alone, forward and forward + backward.

Times `transformer.causal_block_attention` (the attention the CPU training step runs) on
random q, k, v of shape [batch, seq, heads, head_dim], for each query block size, and
prints one JSON line: milliseconds per call (median of --runs after compiling) and the
GFLOP/s of the matmul work it does (2 products of 2*Dh flops per computed logit forward;
forward + backward counts 3x that, as for the other matmuls). Compare with the model's
big projection and MLP matmuls (`benchmarks/train_throughput.py` reports the whole step).

    python benchmarks/attention_throughput.py [--batch 8 --seq 1024 --heads 8 --head_dim 64]
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--blocks", default="64,128,256", help="query block sizes")
  ap.add_argument("--runs", type=int, default=5)
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
  from midijax.models import transformer

  shape = (a.batch, a.seq, a.heads, a.head_dim)
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))

  def timed(fn):
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(a.runs):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  rows = {}
  for block in blocks:
    n = a.seq // block
    logits = a.batch * a.heads * block * block * n * (n + 1) // 2  # computed, incl. masked
    flops = 2 * 2 * a.head_dim * logits
    forward = jax.jit(lambda q, k, v, b=block: transformer.causal_block_attention(
        q, k, v, None, None, b))
    both = jax.jit(jax.grad(lambda q, k, v, b=block: jnp.sum(
        w * transformer.causal_block_attention(q, k, v, None, None, b)), argnums=(0, 1, 2)))
    t_f, t_b = timed(forward), timed(both)
    rows[str(block)] = {"forward_ms": round(t_f * 1e3, 1),
                        "forward_gflop_per_s": round(flops / t_f / 1e9, 1),
                        "forward_backward_ms": round(t_b * 1e3, 1),
                        "forward_backward_gflop_per_s": round(3 * flops / t_b / 1e9, 1)}
  print(json.dumps({"bench": "attention_throughput", "shape": list(shape), "blocks": rows,
                    "allocator": allocator.current(), "jax": jax.__version__,
                    "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  main()
