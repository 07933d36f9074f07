"""Drum model on the Groove MIDI Dataset, trained in about 15 minutes on a 2-core CPU.

`drums` encoding (GrooVAE's 9 classes, 10 ms microtiming, 32 velocity bins) with a
style / tempo / beat-fill prefix; rotary positions; 4 layers of width 128. GMD has about
a million training tokens, so the recipe fights overfitting: time stretch within 5% and
velocity scaling within 10% of each piece (keeping microtiming relative to the beat),
dropout 0.2, and a cosine schedule over 4,000 steps.

    midijax build-data groove --manual_dir ../shared/data/groove
    midijax train --config=configs/groove_small.py --workdir=workdirs/groove_small
    midijax evaluate --workdir=workdirs/groove_small --best --split validation

Expect (README "Quality"; 2-core CPU machine, 2026-12-03): a best validation NLL of about
2.25 nats/token (perplexity 9.5) after 4,000 steps, against 2.84 for the best n-gram model
(Kneser-Ney 4-gram) on the same windows. `config.sample` holds the sampling settings
tuned on the validation split with the C2ST (`benchmarks/tune_sampling.py`).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "groove"
  config.data.builder_config = "drums"
  config.data.seq_len = 256
  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  # Augmentation (training only): each piece stretched in time by a factor in [0.95, 1.05]
  # and its velocities scaled by one in [0.9, 1.1].
  config.data.time_stretch = 0.05
  config.data.velocity_scale = 0.1
  config.model.update(emb_dim=128, qkv_dim=128, num_heads=4, num_layers=4, mlp_dim=512,
                      max_len=512, dropout_rate=0.2, attention_dropout_rate=0.0,
                      position="rope", norm="rmsnorm", mlp_activation="gelu")
  config.train.update(num_steps=4000, warmup_steps=200, learning_rate=1e-3,
                      log_every=100, eval_every=500, checkpoint_every=500)
  # Sampling (generate, continue, evaluate, export-listening), tuned on validation.
  config.sample.temperature = 0.8
  config.sample.top_p = 0.95
  return config
