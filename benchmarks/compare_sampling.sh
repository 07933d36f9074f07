#!/usr/bin/env bash
# Sampling speed side by side: Hugging Face GPT-2 `generate` (../shared/peers/hf_generate.py,
# its best cache per batch size) and midijax (benchmarks/sample_throughput.py, float32 and
# int8 key/value cache), course size and 6x512, batch 1 and 32. Each HF run is followed at
# once by the midijax runs of the same cell, and the whole loop repeats ROUNDS times, so
# the ratios come from neighbouring runs on a noisy machine. Prints one JSON line per run.
#
#   bash benchmarks/compare_sampling.sh PEER_PYTHON [ROUNDS]
#
# PEER_PYTHON: a Python with torch 2.13 and ../shared/peers/requirements.txt installed.
set -euo pipefail
cd "$(dirname "$0")/.."
HF="${1:?usage: compare_sampling.sh PEER_PYTHON [ROUNDS]}"
ROUNDS="${2:-2}"
PEERS="${PEERS:-../shared/peers}"
MJ=".venv/bin/python"
LARGE=(--layers 6 --width 512 --heads 8 --mlp 2048)
for ((round = 1; round <= ROUNDS; round++)); do
  "$HF" "$PEERS/hf_generate.py" --config small --batch-sizes 1 --cache dynamic --runs 3
  "$MJ" benchmarks/sample_throughput.py --batch 1 --runs 3 --kv_cache model
  "$MJ" benchmarks/sample_throughput.py --batch 1 --runs 3 --kv_cache int8
  "$HF" "$PEERS/hf_generate.py" --config small --batch-sizes 32 --cache static --runs 3
  "$MJ" benchmarks/sample_throughput.py --batch 32 --runs 3 --kv_cache model
  "$MJ" benchmarks/sample_throughput.py --batch 32 --runs 3 --kv_cache int8
  "$HF" "$PEERS/hf_generate.py" --config large --batch-sizes 1 --cache dynamic --runs 3
  "$HF" "$PEERS/hf_generate.py" --config large --batch-sizes 1 --cache static --runs 3
  "$MJ" benchmarks/sample_throughput.py --batch 1 --runs 3 "${LARGE[@]}" --kv_cache model
  "$MJ" benchmarks/sample_throughput.py --batch 1 --runs 3 "${LARGE[@]}" --kv_cache int8
  "$HF" "$PEERS/hf_generate.py" --config large --batch-sizes 32 --cache static --runs 2
  "$MJ" benchmarks/sample_throughput.py --batch 32 --runs 2 "${LARGE[@]}" --kv_cache model
  "$MJ" benchmarks/sample_throughput.py --batch 32 --runs 2 "${LARGE[@]}" --kv_cache int8
done
