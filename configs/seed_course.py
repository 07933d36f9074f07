"""The course project's model: 4 layers, 4 heads, width 128, sequence 256, batch 32, lr 1e-4.

Sinusoidal absolute positions, LayerNorm, a ReLU MLP of 512 (PyTorch's
nn.TransformerEncoderLayer default, which the course model used), dropout 0.1, as the
PyTorch course project trained it, on the piano data in the course's
POSITION/NOTE_ON/DURATION triples.

    midijax build-data piano --config triples --manual_dir ../shared/data/piano
    midijax train --config=configs/seed_course.py --workdir=workdirs/seed_course

Expect: about 21,600 training tokens/s on one CPU device of the 2-core machine, 2.7x the
PyTorch course model side by side (`python benchmarks/compare_train.py`, 2026-12-02).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "piano"
  config.data.builder_config = "triples"
  config.data.seq_len = 256
  config.data.batch_size = 32
  config.model.update(emb_dim=128, qkv_dim=128, num_heads=4, num_layers=4, mlp_dim=512,
                      max_len=256, dropout_rate=0.1, attention_dropout_rate=0.1,
                      position="sinusoidal", norm="layernorm", mlp_activation="relu")
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.schedule = "constant"
  config.train.num_steps = 5000
  return config
