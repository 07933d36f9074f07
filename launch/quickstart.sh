#!/usr/bin/env bash
# The main job for a newcomer: set up, build the Groove dataset from ../shared/data, train a
# small drum model, and continue a real groove from its first two bars.
#
#   bash launch/quickstart.sh                 # groove_small for QUICKSTART_STEPS steps
#   QUICKSTART_STEPS=100 bash launch/quickstart.sh   # the same path, sooner (a weaker model)
# (groove_tiny's 64-token context cannot hold the 2-bar prompt that `continue` is given.)
#
# Outputs land in workdirs/ (ignored by git): workdirs/tfds (TFRecords),
# workdirs/quickstart (checkpoints, metrics.jsonl, loss.png, TensorBoard), and
# workdirs/quickstart/continue + /samples (MIDI files).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${MIDIJAX_SHARED_DATA:-../shared/data}"
CONFIG="${QUICKSTART_CONFIG:-configs/groove_small.py}"
STEPS="${QUICKSTART_STEPS:-600}"
WORKDIR="${QUICKSTART_WORKDIR:-workdirs/quickstart}"
TFDS_DIR="workdirs/tfds"
PROMPT="$DATA/groove/drummer1/eval_session/1_funk-groove1_138_beat_4-4.mid"

if [[ ! -d "$DATA/groove" ]]; then
  echo "quickstart: $DATA/groove not found; set MIDIJAX_SHARED_DATA to the corpus root" >&2
  exit 2
fi

bash launch/setup.sh
MJ=.venv/bin/midijax

if [[ ! -d "$TFDS_DIR/groove" ]]; then
  "$MJ" build-data groove --manual_dir "$DATA/groove" --data_dir "$TFDS_DIR"
fi
"$MJ" train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$TFDS_DIR" --config.train.num_steps="$STEPS"
"$MJ" continue --workdir "$WORKDIR" --prompt "$PROMPT" --prompt_bars 2 --seconds 8 \
  --num_samples 4 --temperature 0.9 --top_k 40 --seed 0 --out "$WORKDIR/continue"
"$MJ" generate --workdir "$WORKDIR" --num_samples 4 --max_tokens 512 --temperature 0.9 \
  --style funk --bpm 110 --type beat --seed 0 --out "$WORKDIR/samples"
echo "quickstart: done. Listen to $WORKDIR/continue/*.mid; loss curve: $WORKDIR/loss.png"
