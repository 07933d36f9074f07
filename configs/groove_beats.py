"""Drum model on the Groove MIDI Dataset with time counted in beats: the quick start's model.

groove_small's Transformer (4 layers of width 128, rotary positions, dropout 0.2, velocity
scaling within 10%, cosine schedule) on `groove/drums_beats`: the same drum hits and
velocities, but time shifts count 1/48 quarter note at the piece's tempo instead of 10 ms,
and the prefix names the meter. A bar of 4/4 is 192 steps at any tempo, so the model does
not have to infer the tempo from the hits to stay on the drummer's grid, and a groove
played at 90 and at 120 bpm is one token pattern. Time stretching is no augmentation for
it (the tokens do not change with tempo), so there is none.

    midijax build-data groove --config drums_beats --manual_dir ../shared/data/groove
    midijax train --config=configs/groove_beats.py --workdir=workdirs/groove_beats
    midijax evaluate --workdir=workdirs/groove_beats --best --split validation

Decoding needs the tempo: `continue` takes it from the prompt file, `generate` from --bpm
(default 120), `evaluate` and `export-listening` from each piece's metadata.
"""
from configs import groove_small


def get_config():
  config = groove_small.get_config()
  config.data.builder_config = "drums_beats"
  config.data.time_stretch = 0.0
  return config
