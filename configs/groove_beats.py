"""Drum model on the Groove MIDI Dataset with time counted in beats: the quick start's model.

groove_small's Transformer (4 layers of width 128, rotary positions, velocity scaling
within 10%, a cosine schedule; here dropout 0.1, Muon for 3,500 steps, Adam's peak
learning rate 2e-3, evaluated with the parameters' moving average), plus a learned embedding
of each token's place in the bar (the time since the last BAR), two of its four heads
rotated by the music's time instead of the token index, and the echo of the previous two
bars at each token's place in the bar (`model.bar_echo`), trained on 512-token windows
(batch 8), on `groove/drums_beats`: the same drum hits and velocities, but time shifts
count 1/48 quarter note at the piece's tempo instead of 10 ms, a BAR token marks each bar
line, and the prefix names the meter. A bar of 4/4 is 192 steps at any tempo, so the model
does not have to infer the tempo from the hits to stay on the drummer's grid, a groove
played at 90 and at 120 bpm is one token pattern, and the sampler's grammar keeps every bar
whole. Time stretching is no augmentation for it (the tokens do not change with tempo), so
there is none. Each row's piece is drawn in proportion to its length
(`data.piece_sampling`). Continuations are sampled with prompt guidance (`sample.guidance`).

    midijax build-data groove --config drums_beats --manual_dir ../shared/data/groove
    midijax train --config=configs/groove_beats.py --workdir=workdirs/groove_beats
    midijax evaluate --workdir=workdirs/groove_beats --best --split validation

Expect (README "Quality"; 2-core CPU VMs, 2026-12-05; 15 minutes on an idle VM, up to 25
on slower ones): a validation NLL of 1.83-1.84 nats/token on 256-token windows, 33.7-33.9%
below the best n-gram of these tokens (Kneser-Ney 4-gram, 2.77), and a C2ST accuracy of
55-56% (128 tokens) / 58-60% (512 tokens) for its continuations over every validation
prompt, averaged over three sampling seeds (three training seeds; mean 55.5% / 58.7%).

Decoding needs the tempo: `continue` takes it from the prompt file, `generate` from --bpm
(default 120), `evaluate` and `export-listening` from each piece's metadata.
"""
from configs import groove_small


def get_config():
  config = groove_small.get_config()
  config.data.builder_config = "drums_beats"
  config.data.time_stretch = 0.0
  # Twice groove_small's peak learning rate, and validation / sampling from a moving
  # average of the parameters (README "Quality": 0.007 nats a token, C2ST 80% -> 77% at
  # 128 tokens, one run each).
  config.train.learning_rate = 2e-3
  config.train.ema_decay = 0.999
  # Where each token sits in the bar, as an embedding (bar positions 0..383 steps of 1/48
  # quarter: up to two bars of 4/4; README "Quality": 2.1729 -> 2.0899 nats a token,
  # C2ST 82% -> 67% at 128 tokens and 87% -> 72% at 512, every validation prompt; seed 0).
  config.model.bar_positions = 384
  # 512-token windows, 8 a batch (README "Quality": 2.0899 -> 2.0546 nats a token on the
  # same 256-token validation windows, C2ST 67% -> 63% / 72% -> 70%; seed 0. Two seeds
  # each: 2.0899 / 2.1052 -> 2.0546 / 2.1044). The sampler's context follows `data.seq_len`.
  config.data.seq_len = 512
  config.data.batch_size = 8
  # Two of the four heads count positions in the music's time instead of tokens (README
  # "Quality": 2.0546 -> 2.0142 nats a token on the 256-token windows, 27.3% below the
  # n-gram; 1.9466 against 2.0612 on the 512-token ones; seed 0).
  config.model.time_rope_heads = 2
  # Muon for the blocks' matrices (optax.contrib.muon, 0.02 on the same schedule; Adam at
  # 2e-3 for embeddings, head and norms). A Muon step costs 1.13x an AdamW step on the
  # 2-core CPU (`benchmarks/train_throughput.py --optimizers adamw,muon`), so 3,500 steps
  # take the time 4,000 AdamW steps took (README "Quality": 2.0142 -> 1.9302 nats a token,
  # 27.3% -> 30.3% below the n-gram; C2ST over three sampling seeds 59.5% / 66.0%; seed 0).
  config.train.optimizer = "muon"
  config.train.muon_learning_rate = 0.02
  config.train.num_steps = 3500
  # The echo of the previous two bars at each token's place in the bar (README "Quality":
  # it keeps the bars as alike along a continuation as at its start; with prompt
  # guidance below, C2ST 60.6% / 66.5% -> 57.6% / 63.9%, three training seeds).
  config.model.bar_echo = 4
  # Each row's piece drawn in proportion to its length, a piece shorter than a row
  # weighing one row (`data.piece_sampling`): 71% of GMD's training pieces, most of them
  # one-bar fills, are shorter than a row and hold 5% of the tokens, so one visit per
  # piece per epoch filled 42% of a row's targets with music, mostly fills, and cropped
  # each long groove once an epoch; drawn this way 78% of the targets are music (README
  # "Quality": 1.9282 -> 1.8473 nats a token, C2ST 57.1% / 62.3% -> 56.7% / 59.0%; seed
  # 0; seeds 1 and 2: 1.8408, 56.3% / 62.9% and 1.8272, 57.4% / 60.6%). "tokens" (no
  # floor: 96% music) scored 1.8349 and 55.3% / 56.5% (seed 1: 1.8388, 57.0% / 61.6%)
  # but trains the end of a piece so rarely that free samples from a fill's prefix run on
  # (overlap 0.867 against 0.936 here).
  config.data.piece_sampling = "windows"
  # Dropout 0.1 instead of groove_small's 0.2, now that rows are mostly music (README
  # "Quality": seeds 0 / 1 / 2 1.8473 / 1.8408 / 1.8272 -> 1.8365 / 1.8314 / 1.8353 nats a
  # token; C2ST over every validation prompt and three sampling seeds 56.7% / 59.0%,
  # 56.3% / 62.9%, 57.4% / 60.6% -> 56.1% / 58.3%, 55.1% / 58.3%, 55.4% / 59.4%).
  config.model.dropout_rate = 0.1
  # Sampling tuned on validation for this model (`benchmarks/tune_sampling.py`): prompt
  # guidance 1.0 leans continuations towards their prompt's kit and pattern.
  config.sample.temperature = 0.95
  config.sample.top_p = 1.0
  config.sample.guidance = 1.0
  return config
