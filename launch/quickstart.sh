#!/usr/bin/env bash
# The main job for a newcomer: set up, build the Groove dataset from ../shared/data, train a
# small drum model, and continue a real groove from its first two bars.
#
#   bash launch/quickstart.sh                 # groove_beats for QUICKSTART_STEPS steps
#   QUICKSTART_STEPS=100 bash launch/quickstart.sh   # the same path, sooner (a weaker model)
# (groove_tiny's 64-token context cannot hold the 2-bar prompt that `continue` is given.)
#
# Outputs land in workdirs/ (ignored by git): workdirs/tfds (TFRecords),
# workdirs/quickstart (checkpoints, metrics.jsonl, loss.png, TensorBoard), and
# workdirs/quickstart/continue + /samples (MIDI files).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${MIDIJAX_SHARED_DATA:-../shared/data}"
CONFIG="${QUICKSTART_CONFIG:-configs/groove_beats.py}"
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

# The Groove builder config the training config reads (drums_beats for groove_beats).
DATA_CONFIG="$(.venv/bin/python - "$CONFIG" <<'PY'
import importlib.util, sys
sys.path.insert(0, ".")
spec = importlib.util.spec_from_file_location("quickstart_config", sys.argv[1].split(":")[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.get_config().data.builder_config)
PY
)"
if [[ ! -d "$TFDS_DIR/groove/$DATA_CONFIG" ]]; then
  "$MJ" build-data groove --config "$DATA_CONFIG" --manual_dir "$DATA/groove" \
    --data_dir "$TFDS_DIR"
fi
"$MJ" train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$TFDS_DIR" --config.train.num_steps="$STEPS"
"$MJ" continue --workdir "$WORKDIR" --prompt "$PROMPT" --prompt_bars 2 --seconds 8 \
  --style funk --bpm 138 --type beat --meter 4-4 --num_samples 4 --seed 0 \
  --out "$WORKDIR/continue"
"$MJ" generate --workdir "$WORKDIR" --num_samples 4 --max_tokens 512 \
  --style funk --bpm 110 --type beat --meter 4-4 --seed 0 --out "$WORKDIR/samples"
echo "quickstart: done. Listen to $WORKDIR/continue/*.mid; loss curve: $WORKDIR/loss.png"
