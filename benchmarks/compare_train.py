#!/usr/bin/env python3
"""Training throughput side by side: midijax vs the plain-PyTorch course model, one run.

For each model (the course model: configs/seed_course.py; and 6 layers, width 512, 8 heads,
MLP 2048, sequence 1024, batch 8) and each dropout (0.1, 0), runs
benchmarks/train_throughput.py and ../shared/peers/torch_seed_train.py back to back and
prints one JSON line per pair with both tokens/s, the ratio and midijax's MFU. The PyTorch
peer needs its own venv (see ../shared/peers/README.md): --peer_python.

    python benchmarks/compare_train.py --peer_python /tmp/peervenv/bin/python
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers"

MODELS = {
    "seed_course": {"ours": [], "peer": []},
    "6x512": {"ours": ["--layers", "6", "--width", "512", "--heads", "8", "--mlp", "2048",
                       "--seq", "1024", "--batch", "8"],
              "peer": ["--d-model", "512", "--heads", "8", "--layers", "6", "--ff", "2048",
                       "--seq", "1024", "--batch", "8"]},
}


def last_json(cmd):
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if out.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--peer_python", default="", help="python with torch (skip the peer if empty)")
  ap.add_argument("--models", default="seed_course,6x512")
  ap.add_argument("--dropouts", default="0.1,0")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (midijax)")
  ap.add_argument("--peer_max_seconds", type=float, default=100.0)
  a = ap.parse_args()
  for name in a.models.split(","):
    for d in a.dropouts.split(","):
      ours = last_json([sys.executable, "benchmarks/train_throughput.py", "--config",
                        "configs/seed_course.py", "--dropout", d, "--steps", str(a.steps)]
                       + MODELS[name]["ours"])
      row = {"bench": "compare_train", "model": name, "dropout": float(d),
             "midijax_tokens_per_s": ours["tokens_per_s"], "midijax_mfu": ours["mfu"],
             "flops_per_token": ours["flops_per_token"],
             "peak_flops_per_s": ours["peak_flops_per_s"], "machine": f"{os.cpu_count()} cores"}
      if a.peer_python:
        peer = last_json([a.peer_python, str(PEERS / "torch_seed_train.py"), "--dropout", d,
                          "--max-seconds", str(a.peer_max_seconds)] + MODELS[name]["peer"])
        tps = peer["tokens_per_s_median"]
        row["pytorch_tokens_per_s"] = tps
        row["ratio_midijax_vs_pytorch"] = round(ours["tokens_per_s"] / tps, 2)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
