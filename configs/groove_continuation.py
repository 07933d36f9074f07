"""Drum continuation on one style of the Groove MIDI Dataset: fine-tuned (all parameters
or LoRA adapters) vs from scratch.

The task: given 2 bars of a real funk groove (BOS + style / tempo / beat-fill tokens +
the prompt, never scored), predict the next 2 bars; the loss covers exactly those target
tokens (`groove/drums_continuation_funk`, see data_pipelines/groove/groove.py). The
model is groove_small's (4 layers of width 128); rows of 384 tokens hold every funk
prompt and almost every whole target.

    midijax build-data groove --manual_dir ../shared/data/groove --data_dir workdirs/tfds
    midijax build-data groove --config drums_continuation --set styles=funk \\
        --name drums_continuation_funk --manual_dir ../shared/data/groove \\
        --data_dir workdirs/tfds
    # pretrain on all styles (full performances), then fine-tune from its best checkpoint
    midijax train --config=configs/groove_small.py --workdir=workdirs/groove_small \\
        --config.data.data_dir=workdirs/tfds
    midijax train --config=configs/groove_continuation.py:finetune \\
        --workdir=workdirs/funk_finetune --config.data.data_dir=workdirs/tfds \\
        --config.train.init_from=workdirs/groove_small:best
    # LoRA: rank-8 adapters on every attention and MLP projection, only they train
    midijax train --config=configs/groove_continuation.py:lora \\
        --workdir=workdirs/funk_lora --config.data.data_dir=workdirs/tfds \\
        --config.train.init_from=workdirs/groove_small:best
    # merge the adapters into a plain model that generate / continue load like any run
    midijax export --workdir workdirs/funk_lora --best --out workdirs/funk_lora_merged
    # the same model and data and the same step budget, from a random initialisation
    midijax train --config=configs/groove_continuation.py:scratch \\
        --workdir=workdirs/funk_scratch --config.data.data_dir=workdirs/tfds
    # continuation NLL on the funk test pairs, the same 384-token windows for every model
    midijax evaluate --task continuation --workdir workdirs/funk_finetune --best \\
        --data groove/drums_continuation_funk --seq_len 384
    midijax compare-runs workdirs/funk_finetune workdirs/funk_lora workdirs/funk_scratch

`python benchmarks/finetune_continuation.py` runs all of it and writes the table
(results.json, results.md); `--scale tiny` runs it in minutes with groove_tiny-size
models. Argument (after the colon): finetune | scratch | lora, then optionally ",tiny"
(groove_tiny's model, a few steps).

Fine-tuning starts from parameters already good at drums, so it uses a lower peak
learning rate (3e-4) than from scratch (1e-3, groove_small's); all train 600 steps.
LoRA (`lora`: config.model.lora_rank=8, lora_alpha=16, so the adapters' output is scaled
by 2; config.train.trainable=".*lora_[ab]") trains only the adapters, which start at zero
(B = 0) and are few, so it takes a higher peak learning rate, 2e-3 (LoRA's usual range
is about 3-10x the full fine-tuning rate). groove_small's 4 layers of width 128 get 24
adapter pairs (q, k, v, out, wi, wo): 73,728 trainable parameters of 926,848 (8%);
groove_tiny's 1 layer: 6 pairs, 3,584 of 28,256.
"""
from configs import default
from configs import groove_small
from configs import groove_tiny

# What the argument after the colon may name.
VARIANTS = ("finetune", "scratch", "lora")


def get_config(arg: str = "finetune"):
  variant, _, scale = str(arg).partition(",")
  if variant not in VARIANTS or scale not in ("", "tiny"):
    raise ValueError(f"configs/groove_continuation.py:{arg}: expected "
                     f"{' | '.join(VARIANTS)}[,tiny]")
  tiny = scale == "tiny"
  config = (groove_tiny if tiny else groove_small).get_config()
  config.data.name = "groove"
  config.data.builder_config = "drums_continuation_funk"
  # Every funk prompt (at most 266 tokens with its prefix) fits, and nearly all targets.
  config.data.seq_len = 384
  config.model.max_len = 384
  config.data.batch_size = 8 if tiny else 16
  config.data.eval_batch_size = 16 if tiny else 32
  config.data.max_eval_batches = 4 if tiny else -1
  # Pairs are not augmented (a stretched target would no longer follow its prompt).
  config.data.transpose_semitones = 0
  config.data.time_stretch = 0.0
  config.data.velocity_scale = 0.0
  config.train.update(num_steps=20 if tiny else 600, warmup_steps=5 if tiny else 50,
                      log_every=5 if tiny else 50, eval_every=10 if tiny else 100,
                      checkpoint_every=10 if tiny else 100)
  if variant == "scratch":
    config.train.learning_rate = default.get_config().train.learning_rate
    config.train.init_from = ""
  else:
    config.train.learning_rate = 3e-4
    config.train.init_from = "workdirs/groove_tiny:best" if tiny else "workdirs/groove_small:best"
  if variant == "lora":
    config.model.lora_rank = 8
    config.model.lora_alpha = 16.0
    config.train.trainable = ".*lora_[ab]"
    config.train.learning_rate = 2e-3
  return config
