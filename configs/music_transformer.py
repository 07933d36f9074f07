"""Music Transformer (Huang et al. 2018) in its MAESTRO setting, for accelerators.

Relative attention with skewing, 6 layers, 8 heads, width 512, MLP 2048, sequence 2048,
`performance` encoding with transposition +-3 and time stretch +-5%, bfloat16 compute.
Attention (`auto`) runs the chunked flash attention written in JAX on TPU and GPU: the
relative logits are computed per 512-token block pair, so no [B, H, 2048, 2048] tensor
exists, and it keeps the attention dropout. The blocks are scanned (compile time does not
grow with depth) and rematerialized keeping their matmul outputs (save_dots).

    midijax build-data piano --manual_dir /path/to/maestro-v3.0.0   # or the official download
    midijax compile --config=configs/music_transformer.py --topology=tpu:v4-8  # will it fit?
    midijax train --config=configs/music_transformer.py --workdir=gs://BUCKET/mt

Expect: `midijax compile` reports whether it fits the target (tpu_v4_8.py and gpu_8.py are
its sharding variants); no training run of this config has been measured yet.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "piano"
  config.data.builder_config = "performance"
  config.data.seq_len = 2048
  config.data.batch_size = 64
  config.data.transpose_semitones = 3
  config.data.time_stretch = 0.05
  config.model.update(emb_dim=512, qkv_dim=512, num_heads=8, num_layers=6, mlp_dim=2048,
                      max_len=2048, dropout_rate=0.1, attention_dropout_rate=0.1,
                      position="relative", norm="layernorm", mlp_activation="gelu",
                      dtype="bfloat16", attention_block=512, scan_layers=True,
                      remat_policy="save_dots")
  config.train.update(num_steps=250_000, warmup_steps=4000, learning_rate=1e-3, schedule="rsqrt",
                      log_every=100, eval_every=2000, checkpoint_every=2000)
  return config
