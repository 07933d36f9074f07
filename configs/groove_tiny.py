"""A tiny groove model for CI and smoke tests: trains in seconds on a 2-core CPU.

    midijax build-data groove --manual_dir ../shared/data/groove
    midijax train --config=configs/groove_tiny.py --workdir=/tmp/groove_tiny

Expect: 20 steps in seconds (about 70,000 training tokens/s on the 2-core CPU machine,
`benchmarks/train_throughput.py`), a checkpoint at steps 10 and 20 and a finite validation
loss; its samples are not music. The tests train it on a small copy of the Groove data.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "groove"
  config.data.builder_config = "drums"
  config.data.seq_len = 64
  config.data.batch_size = 8
  config.data.eval_batch_size = 16
  config.data.max_eval_batches = 4
  config.model.update(emb_dim=32, qkv_dim=32, num_heads=2, num_layers=1, mlp_dim=64,
                      max_len=64, dropout_rate=0.0)
  config.train.update(num_steps=20, warmup_steps=5, log_every=5, eval_every=10,
                      checkpoint_every=10, learning_rate=3e-3)
  return config
