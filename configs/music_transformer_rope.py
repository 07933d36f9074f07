"""music_transformer with rotary positions instead of relative attention, on splash.

Same data, sizes and training as configs/music_transformer.py, but RoPE positions and no
attention dropout, so `attention_impl=auto` runs Pallas splash attention on TPU (cuDNN flash
attention on GPU): causal block-sparse flash attention with no bias to add.

    midijax compile --config=configs/music_transformer_rope.py --topology=tpu:v4-8
    midijax train --config=configs/music_transformer_rope.py --workdir=gs://BUCKET/mt_rope
"""
from configs import music_transformer


def get_config():
  config = music_transformer.get_config()
  config.model.update(position="rope", attention_dropout_rate=0.0)
  return config
