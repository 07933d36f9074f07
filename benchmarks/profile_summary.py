#!/usr/bin/env python3
"""Where a profiled step's time goes: XLA:CPU ops grouped by kind, as one JSON line.

Reads the newest `*.xplane.pb` under a `jax.profiler` trace directory (written by
`benchmarks/train_throughput.py --profile_dir DIR`) and the compiled HLO text saved
beside it (`DIR/step.hlo.txt`), and sums the time of every executed XLA op (thunk) on
the CPU worker threads, grouped by

  group     "attention" (rank-4 outputs whose last dim is >= 128: the scores and
            probabilities [B, H, block, S] and key/value operands laid out [B, H, Dh, S]),
            "matmul" (the other dot fusions), or "elementwise/other";
  op        the JAX primitive the op came from (dot_general, reduce_sum, select_n, ...).

Times are thread-busy milliseconds summed over both worker threads (two ops can run at
once, so the total can exceed the step's wall time). The xplane protobuf is parsed with
TensorFlow's copy of the schema (tensorflow is in requirements.txt).

    python benchmarks/train_throughput.py --config configs/seed_course.py --layers 6 \\
        --width 512 --heads 8 --mlp 2048 --seq 1024 --batch 8 --dropout 0 --profile_dir /tmp/p
    python benchmarks/profile_summary.py /tmp/p [--top 15]
"""
import argparse
import collections
import json
import os
import pathlib
import re
import sys

# Python puts this script's folder first on sys.path, where benchmarks/tokenize.py hides
# the standard `tokenize` (which TensorFlow's import needs); keep that folder off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def load_ops(hlo_text: str):
  """HLO instruction name -> (output shape text, JAX op name)."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      ops[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return ops


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("trace_dir")
  ap.add_argument("--top", type=int, default=12, help="single ops to list")
  a = ap.parse_args()
  root = pathlib.Path(a.trace_dir)
  planes = sorted(root.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not planes:
    print(f"profile_summary: no *.xplane.pb under {root} (write one with "
          "benchmarks/train_throughput.py --profile_dir)", file=sys.stderr)
    sys.exit(2)  # a user error, as the midijax command reports one
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel

  hlo_path = root / "step.hlo.txt"
  ops = load_ops(hlo_path.read_text()) if hlo_path.exists() else {}
  space = xplane_pb2.XSpace()
  space.ParseFromString(planes[-1].read_bytes())
  per_op = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # the CPU client's worker threads
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if not name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          per_op[name] += event.duration_ps / 1e9
  groups, kinds = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    shape, op_name = ops.get(name, ("", ""))
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
    if len(dims) == 4 and dims[-1] >= 128:
      group = "attention"
    elif "ynn_fusion" in name or name.startswith("dot"):
      group = "matmul"
    else:
      group = "elementwise/other"
    groups[group] += ms
    kinds[re.sub(r"\d+", "N", op_name.split("/")[-1]) or name.split(".")[0]] += ms
  total = sum(per_op.values())
  print(json.dumps({
      "bench": "profile_summary", "trace": str(planes[-1]), "thread_busy_ms": round(total, 1),
      "groups_ms": {k: round(v, 1) for k, v in groups.most_common()},
      "ops_ms": {k: round(v, 1) for k, v in kinds.most_common(12)},
      "top": [{"op": n, "ms": round(v, 1), "shape": ops.get(n, ("", ""))[0],
               "from": ops.get(n, ("", ""))[1][-60:]} for n, v in per_op.most_common(a.top)],
  }))


if __name__ == "__main__":
  main()
