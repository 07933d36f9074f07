"""Piano model on the MAESTRO + GiantMIDI sample: trains on a 2-core CPU in minutes.

`performance` encoding (Magenta's 310 events), sustain applied, transposition +-3 and
time stretch +-5% on the fly; relative attention (Music Transformer) at a small size.

    midijax build-data piano --manual_dir ../shared/data/piano
    midijax train --config=configs/piano_small.py --workdir=workdirs/piano_small

Expect: a falling training and validation loss (loss.png in the workdir); no reference
quality figure has been measured for this config.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "piano"
  config.data.builder_config = "performance"
  config.data.seq_len = 256
  config.data.batch_size = 16
  config.data.transpose_semitones = 3
  config.data.time_stretch = 0.05
  config.model.update(emb_dim=128, qkv_dim=128, num_heads=4, num_layers=4, mlp_dim=512,
                      max_len=512, dropout_rate=0.1, position="relative")
  config.train.update(num_steps=3000, warmup_steps=200, learning_rate=1e-3,
                      log_every=100, eval_every=500, checkpoint_every=500)
  return config
