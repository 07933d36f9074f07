"""Base config: every field of a midijax run, with its meaning and unit.

Other configs import this one and change a few fields. Any field can be overridden on the
command line, e.g. `--config.train.num_steps=200`. This file alone trains a small groove
model (4 layers of width 128, `drums` encoding):

    midijax build-data groove --manual_dir ../shared/data/groove
    midijax train --config=configs/default.py --workdir=/tmp/run

Expect: about 2,000 training tokens/s on the 2-core CPU machine
(`python benchmarks/train_throughput.py --config configs/default.py`), so the 2,000 steps
of batch 32 x 256 take about 2 hours there; groove_small.py is the measured small run.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Seed for parameter init, dropout and data order (integer).
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # TFDS builder name: groove | piano | midi_folder (built with `midijax build-data`).
  data.name = "groove"
  # Builder config, e.g. drums | performance | triples | drums_2bar (see README).
  data.builder_config = "drums"
  # TFDS data dir; empty means TFDS's default (honours TFDS_DATA_DIR).
  data.data_dir = ""
  # Optional mixture: list of "name/config:weight" strings; empty = just `name`.
  data.mixture = ()
  # Training split and evaluation split names.
  data.train_split = "train"
  data.eval_split = "validation"
  # Tokens per training row (model input length); crops are seq_len + 1 long.
  data.seq_len = 256
  # Global batch size (rows per step across all processes/devices).
  data.batch_size = 32
  # Pack several short pieces into one row with segment ids (True) or pad each (False).
  data.packing = False
  # With packing: pieces drawn per row (at most).
  data.max_segments_per_row = 8
  # How each training row's piece is drawn: "epoch" visits every piece once per epoch
  # (one random crop each, whatever its length); "tokens" draws a piece with probability
  # proportional to its length, so each piece's tokens are trained on in proportion (a
  # corpus of many short pieces and a few long ones: see configs/groove_beats.py), though
  # a long piece's last token is in only 1 of its (length - row) uniform crops; "windows"
  # the same, with a piece shorter than a row weighing one row; "chunks" draws as
  # "tokens" and places the row around a token drawn uniformly, so a long piece's end
  # (its EOS) is a target at least half as often as its middle.
  data.piece_sampling = "epoch"
  # Pitched data augmentation (training only): max transposition (semitones) and time
  # stretch (fraction, 0.05 = +-5%); drums are never transposed.
  data.transpose_semitones = 0
  data.time_stretch = 0.0
  # Velocity augmentation (training only, `performance` and `drums`): velocities scaled by
  # a factor in [1 - velocity_scale, 1 + velocity_scale] per piece (0 = off). The curve:
  # "linear" multiplies the velocity bins (clipped at the top bin); "power" maps bin b of B
  # to B * (b / B) ** (1 / factor), so the top and bottom bins stay where they are.
  data.velocity_scale = 0.0
  data.velocity_curve = "linear"
  # Input noise (training only, `drums` and `performance`): each drum or velocity token the
  # model reads is, with this probability, replaced by a random one of its kind; the
  # targets stay the real tokens, so the model learns to carry on after a slip like those
  # of its own samples (0 = off). Time shifts and BAR are never replaced.
  data.input_noise = 0.0
  # Evaluation batch size (rows) and a cap on eval batches (-1 = the whole split).
  data.eval_batch_size = 32
  data.max_eval_batches = -1
  # Evaluation windows: 0 = consecutive, non-overlapping seq_len windows; C > 0 = each
  # window after a piece's first feeds the C tokens before its targets as unscored
  # context (strided evaluation: targets predicted from >= C tokens of their piece).
  data.eval_context = 0

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # Vocabulary size; 0 = taken from the dataset's vocab.json.
  model.vocab_size = 0
  # Width of the residual stream (d_model), attention width, heads, layers, MLP width.
  model.emb_dim = 128
  model.qkv_dim = 128
  model.num_heads = 4
  model.num_layers = 4
  model.mlp_dim = 512
  # Longest sequence the model sees (tokens); must be >= data.seq_len.
  model.max_len = 256
  # Dropout on residual branches / embeddings, and on attention probabilities.
  model.dropout_rate = 0.1
  model.attention_dropout_rate = 0.0
  # Positions: sinusoidal | rope | relative (Music Transformer, skewing).
  model.position = "rope"
  # rmsnorm | layernorm; gelu | relu | swiglu.
  model.norm = "rmsnorm"
  model.mlp_activation = "gelu"
  # Query block (tokens) of the blocked attention backends: cpu_blocked uses blocks of at most
  # this many tokens (and at most seq_len / 4), chunked chunks of exactly this many; both skip
  # the masked upper triangle. 0 = one dense T x T block.
  model.attention_block = 128
  # Share the input embedding with the output projection.
  model.tied_embeddings = False
  # Compute dtype: float32 on CPU; bfloat16 on TPU/GPU. Parameters are always float32.
  model.dtype = "float32"
  # Attention backend (midijax/models/attention.py; the one chosen is logged at start-up and
  # written to run_info.json):
  #   auto         TPU: splash, or chunked for relative attention / attention dropout;
  #                GPU: cudnn (bfloat16), else xla, else chunked; CPU: cpu_kernel where the
  #                C++ kernel runs (one device, float32, not relative), else cpu_blocked
  #   xla          jax.nn.dot_product_attention (dense T x T; no dropout, no relative)
  #   chunked      XLA, query chunks of attention_block tokens recomputed in the backward
  #                pass: no T x T tensor; relative attention (skewing per chunk), dropout
  #   cudnn        cuDNN flash attention (GPU, bfloat16/float16; no dropout, no relative)
  #   splash       Pallas splash attention (TPU; seq_len a multiple of 128; no dropout, no
  #                relative; on CPU only with pallas_interpret)
  #   cpu_blocked  XLA:CPU-tuned blocked attention (CPU only)
  #   cpu_kernel   the C++ kernels of midijax/kernels (one CPU device, float32)
  model.attention_impl = "auto"
  # Recompute activations in the backward pass, per block: none | full (keep only block
  # inputs) | save_dots (keep the weight matmuls' outputs) | save_qkv (keep q, k, v).
  model.remat_policy = "none"
  # Stack the blocks' parameters and run them with one lax.scan (compile time independent of
  # depth). Checkpoints convert with midijax.models.stack_layers / unstack_layers.
  model.scan_layers = False
  # Run Pallas kernels (splash) in interpret mode: for tests on CPU, slow.
  model.pallas_interpret = False
  # LoRA adapters (Hu et al. 2021) on the attention (query, key, value, out) and MLP (wi,
  # wi_gate, wo) projections: x W + (lora_alpha / lora_rank) (x A) B, A random, B zero (so
  # a fresh adapter changes nothing). Rank 0 = none; at most min(emb_dim, qkv_dim, mlp_dim).
  # Parameters <kernel>_lora_a / <kernel>_lora_b: train only them with
  # train.trainable = ".*lora_[ab]"; `midijax export` merges them into a plain model.
  model.lora_rank = 0
  # Adapter output scale alpha / rank: 16 is scale 2 at rank 8 (fixed alpha: trying
  # another rank needs little learning-rate retuning).
  model.lora_alpha = 16.0
  # Learned embedding of the time since the last bar line (encoding steps, 0..N-1; longer
  # times share the last row), added to each token's embedding, so the model knows where
  # in the bar it is without adding up time shifts. 0 = off; needs BAR tokens (groove's
  # drums_beats encoding).
  model.bar_positions = 0
  # Rotary heads on the music's time: this many heads (of num_heads) rotate queries and
  # keys by the steps of music from the window's start instead of the token index, so
  # "the same place a bar ago" is a fixed offset however many tokens lie between. 0 = off;
  # needs position="rope" and BAR tokens (drums_beats).
  model.time_rope_heads = 0
  # Echo of earlier bars: each token's input also carries what was hit at the same place in
  # the previous `bar_echo_bars` bars, in `bar_echo` 16th-note cells from its time in the
  # bar on (drum classes, loudness, offset from the cell), through a learned projection.
  # 0 = off; needs drums_beats (BAR tokens, velocities before hits).
  model.bar_echo = 0
  model.bar_echo_bars = 2

  # ---------------------------------------------------------------- training
  config.train = train = ml_collections.ConfigDict()
  # Optimizer steps.
  train.num_steps = 2000
  # Peak learning rate, linear warmup steps, and decay: cosine | rsqrt | constant.
  train.learning_rate = 1e-3
  train.warmup_steps = 100
  train.schedule = "cosine"
  # AdamW.
  train.b1 = 0.9
  train.b2 = 0.98
  train.weight_decay = 0.01
  # "adamw", or "muon" (optax.contrib.muon: orthogonalized momentum for the blocks'
  # matrices at muon_learning_rate, Adam at learning_rate for embeddings, the output head
  # and norm scales; both on the same schedule).
  train.optimizer = "adamw"
  train.muon_learning_rate = 0.02
  # AdamW: also decay norm scales, biases and embeddings (False: only weight matrices).
  # Muon decays its matrices by weight_decay and nothing else.
  train.decay_all = False
  # Clip gradients to this global norm (0 = off).
  train.grad_clip_norm = 1.0
  # Accumulate gradients over this many micro-batches per update (optax.MultiSteps).
  train.grad_accum_steps = 1
  # Exponential moving average of the parameters (Polyak averaging), for validation,
  # the best checkpoint and every use of the trained run: decay per step (0 = off; e.g.
  # 0.999 averages over about the last 1,000 steps). Early steps use a smaller decay,
  # min(ema_decay, (1 + step) / (10 + step)), so the average does not start at init.
  train.ema_decay = 0.0
  # Label smoothing of the targets (0 = off).
  train.label_smoothing = 0.0
  # Stop (with a final evaluation and checkpoint) after this many seconds of this run; 0 = no
  # limit. The step schedule still follows num_steps.
  train.max_seconds = 0.0
  # Steps between log lines, evaluations and checkpoints.
  train.log_every = 50
  train.eval_every = 500
  train.checkpoint_every = 500
  # Checkpoints kept: the newest N plus the best N by validation loss.
  train.keep_latest = 3
  train.keep_best = 1
  # Save checkpoints asynchronously (Orbax).
  train.async_checkpointing = True
  # Peak FLOP/s per device for MFU; 0 = look up the accelerator, or measure (CPU).
  train.peak_flops_per_device = 0.0
  # Stop with an error on a NaN/inf loss (the last good checkpoint stays).
  train.stop_on_nan = True
  # Start from another run's parameters: "WORKDIR" (its latest checkpoint), "WORKDIR:best"
  # or "WORKDIR:STEP"; "" = random initialisation. Parameters only: the optimizer starts
  # afresh at step 0. The architecture (config.model layers, widths, heads, positions,
  # norm, activation) must match; vocabulary rows are copied by token name, new tokens
  # initialised. Ignored once this run has checkpoints (it resumes from them).
  train.init_from = ""
  # Parameters to train: a Python regular expression matched against the whole of each
  # parameter's path (re.fullmatch), e.g. "output", "output|final_norm/scale",
  # "blocks/[23]/.*" or "blocks/.*/mlp/.*"; the others get no update (bit-identical) and
  # no optimizer state. Paths are attribute names joined by "/" (embedding,
  # blocks/0/attention/query, blocks/0/mlp/wi, final_norm/scale, output); a pattern
  # matching nothing is an error that lists them. "" = all parameters.
  train.trainable = ""

  # ---------------------------------------------------------------- devices
  config.mesh = mesh = ml_collections.ConfigDict()
  # Parallelism per mesh axis (data, fsdp, tensor) inside a host/slice (ici) and across
  # hosts/slices (dcn); -1 = all remaining devices.
  mesh.ici_parallelism = (-1, 1, 1)
  mesh.dcn_parallelism = (1, 1, 1)
  # Logical axis -> mesh axes overrides; empty = midijax.sharding.DEFAULT_LOGICAL_AXIS_RULES.
  mesh.logical_axis_rules = ()

  # ---------------------------------------------------------------- sampling defaults
  config.sample = sample = ml_collections.ConfigDict()
  sample.temperature = 1.0
  sample.top_k = 0
  sample.top_p = 1.0
  sample.max_new_tokens = 512
  # Key/value cache: "model" (the model's dtype) or "int8" (a scale per vector; see
  # midijax/sampling.py). Used by generate / continue unless --kv_cache says otherwise.
  sample.kv_cache = "model"
  # Prompt guidance (midijax/sampling.py, `sample_tokens`): 0 = off; > 0 leans each token
  # of a continuation further towards what its prompt makes likely, at twice the cost.
  sample.guidance = 0.0
  return config
