#!/usr/bin/env python3
"""Training throughput of a config's model: tokens/s, FLOP/s and MFU, on random tokens.

Runs midijax's real jitted train step (`train.jit_train_step`: the function `midijax train`
runs, with the same optimizer, sharding and loss) on random token batches of the config's
shape and prints one JSON line:

  tokens_per_s       median over the timed steps (after warm-up) of batch*seq / step time
  flops_per_token    transformer.flops_per_token: 6*N + 12*L*H*Dh*T (+6*L*H*Dh*T for relative
                     attention), N = matmul weights incl. the output projection (PaLM app. B)
  flops_per_s        tokens_per_s * flops_per_token
  peak_flops_per_s   this machine's float32 (or the config's dtype) matmul peak, measured here
                     with jnp.dot of 2048x2048 (best of several runs), times the device count
  mfu                flops_per_s / peak_flops_per_s

    python benchmarks/train_throughput.py --config configs/seed_course.py [--steps 20] [--dropout 0.1]
    python benchmarks/train_throughput.py --config configs/seed_course.py --layers 6 --width 512 \
        --heads 8 --mlp 2048 --seq 1024 --batch 8 --dropout 0
    python benchmarks/train_throughput.py --config configs/groove_small.py --seq 512 --batch 8 \
        --optimizers adamw,muon          # side by side, one step of each in turn
    python benchmarks/train_throughput.py --config configs/groove_beats.py \
        --variant model.bar_echo=0 --variant model.bar_echo=4   # any config fields, likewise
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import json
import os
import pathlib
import statistics
import time

REPO = bench_env.REPO


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="config file (configs/NAME.py)")
  ap.add_argument("--steps", type=int, default=20, help="timed steps")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  ap.add_argument("--max_seconds", type=float, default=120.0, help="stop timing after this")
  ap.add_argument("--dropout", type=float, default=None, help="override dropout rate")
  ap.add_argument("--prng", default=None, choices=["threefry2x32", "rbg", "unsafe_rbg"],
                  help="jax_default_prng_impl for dropout's random numbers")
  ap.add_argument("--layers", type=int)
  ap.add_argument("--width", type=int, help="emb_dim = qkv_dim")
  ap.add_argument("--heads", type=int)
  ap.add_argument("--mlp", type=int)
  ap.add_argument("--seq", type=int)
  ap.add_argument("--batch", type=int)
  ap.add_argument("--dtype", default=None, help="compute dtype override (float32, bfloat16)")
  ap.add_argument("--vocab", type=int, default=310,
                  help="vocabulary size of the random tokens (bar-clock models: their "
                       "encoding's)")
  ap.add_argument("--optimizers", default="",
                  help="comma-separated train.optimizer values (adamw,muon) timed side by "
                       "side, step by step in turn; the JSON adds each one's median step "
                       "time and the ratio to the first (default: the config's)")
  ap.add_argument("--variant", action="append", nargs="+", default=[], metavar="FIELD=VALUE",
                  help="a variant of the config (config fields as --config.FIELD=VALUE "
                       "takes them, without the prefix); repeat the flag for each one, "
                       "timed side by side like --optimizers; the JSON adds each one's "
                       "median step time and the ratio to the first")
  ap.add_argument("--profile_dir", default="",
                  help="after timing, trace one step with jax.profiler into this directory and "
                       "save the compiled HLO beside it (summarise: benchmarks/profile_summary.py)")
  a = ap.parse_args()
  from midijax import allocator
  allocator.reexec_with_tcmalloc()  # as the midijax command runs

  import jax
  if a.prng:
    jax.config.update("jax_default_prng_impl", a.prng)
  import numpy as np
  from midijax import sharding, train
  from midijax.cli import load_config
  from midijax.models import transformer

  if a.variant and a.optimizers:
    raise SystemExit("give --optimizers or --variant, not both")

  def variant_config(overrides):
    """The config with `overrides` (FIELD=VALUE) and this script's shape flags applied."""
    config = load_config(a.config, [f"--config.{o}" for o in overrides])
    m = config.model
    if a.layers: m.num_layers = a.layers
    if a.width: m.emb_dim = m.qkv_dim = a.width
    if a.heads: m.num_heads = a.heads
    if a.mlp: m.mlp_dim = a.mlp
    if a.seq: config.data.seq_len = a.seq
    if a.seq and m.max_len < a.seq: m.max_len = a.seq
    if a.batch: config.data.batch_size = a.batch
    if a.dtype: m.dtype = a.dtype
    if a.dropout is not None:
      m.dropout_rate = a.dropout
      m.attention_dropout_rate = min(m.attention_dropout_rate, a.dropout)
    train.validate_config(config)
    return config

  # Each variant: (label, config). --optimizers is the variant list of train.optimizer.
  if a.variant:
    variants = [(" ".join(v), variant_config(v)) for v in a.variant]
  else:
    optimizers = [o for o in a.optimizers.split(",") if o] or [
        load_config(a.config).train.optimizer]
    variants = [(o, variant_config([f"train.optimizer={o}"])) for o in optimizers]
  config = variants[0][1]
  m = config.model
  B, T = config.data.batch_size, config.data.seq_len
  if any((c.data.batch_size, c.data.seq_len) != (B, T) for _, c in variants):
    raise SystemExit("the variants must share data.batch_size and data.seq_len (one batch "
                     "serves them all)")
  # Models with a bar clock (bar positions, heads on the music's time, the echo of earlier
  # bars) take it from the encoding the config's builder config writes; the random tokens
  # then use its vocabulary.
  enc = None
  if any(c.model.get(f, 0) for _, c in variants
         for f in ("bar_positions", "time_rope_heads", "bar_echo")):
    import data_pipelines
    enc = data_pipelines.config_encoding(config.data.name, config.data.builder_config or None)
    a.vocab = enc.vocab_size
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.get_logical_axis_rules(config.mesh)
  others = {}  # the variants after the first: (state, step_fn), timed in turn with it
  for label, other in variants[1:]:
    other_setup, other_state = train.create_train_state(other, a.vocab, mesh, rules,
                                                        encoding=enc)
    with sharding.use_mesh(mesh, rules):
      others[label] = [other_state, train.jit_train_step(other, other_setup)]
  setup, state = train.create_train_state(config, a.vocab, mesh, rules, encoding=enc)
  batch_sh = setup.batch_sharding
  with sharding.use_mesh(mesh, rules):
    step_fn = train.jit_train_step(config, setup)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
      x = rng.integers(2, a.vocab, (B, T + 1)).astype(np.int32)
      batches.append(jax.device_put({"inputs": x[:, :-1], "targets": x[:, 1:],
                                     "weights": np.ones((B, T), np.float32)}, batch_sh))
    key = jax.random.key(0)
    t = time.perf_counter()
    state, metrics = step_fn(state, batches[0], key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    for i in range(a.warmup):
      state, metrics = step_fn(state, batches[i % 4], key)
      for entry in others.values():
        entry[0], m_other = entry[1](entry[0], batches[i % 4], key)
        jax.block_until_ready(m_other)
    jax.block_until_ready(metrics)
    times = []
    other_times = {o: [] for o in others}
    start = time.perf_counter()
    for i in range(a.steps):
      t = time.perf_counter()
      state, metrics = step_fn(state, batches[i % 4], key)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
      for o, entry in others.items():
        t = time.perf_counter()
        entry[0], m_other = entry[1](entry[0], batches[i % 4], key)
        jax.block_until_ready(m_other)
        other_times[o].append(time.perf_counter() - t)
      if time.perf_counter() - start > a.max_seconds and len(times) >= 3:
        break
    if a.profile_dir:
      profile_dir = pathlib.Path(a.profile_dir)
      profile_dir.mkdir(parents=True, exist_ok=True)
      (profile_dir / "step.hlo.txt").write_text(
          step_fn.lower(state, batches[0], key).compile().as_text())
      jax.profiler.start_trace(str(profile_dir))
      state, metrics = step_fn(state, batches[0], key)
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
  step_s = statistics.median(times)
  tokens_per_s = B * T / step_s
  fpt = transformer.flops_per_token(setup.model_config, T)
  peak = train.measure_matmul_flops(2048, repeats=8, dtype=m.dtype) * jax.device_count()
  out = {
      "bench": "train_throughput", "config": os.path.relpath(a.config, REPO),
      "model": {"layers": m.num_layers, "width": m.emb_dim, "heads": m.num_heads,
                "mlp": m.mlp_dim, "position": m.position, "dtype": m.dtype},
      "seq_len": T, "batch": B, "dropout": m.dropout_rate,
      "prng": jax.config.jax_default_prng_impl, "devices": jax.device_count(),
      "allocator": allocator.current(),
      "device_kind": jax.devices()[0].device_kind, "steps_timed": len(times),
      "compile_s": round(compile_s, 2), "step_s_median": round(step_s, 5),
      "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
      "tokens_per_s": round(tokens_per_s, 1), "flops_per_token": fpt,
      "flops_formula": "6*N + 12*L*H*Dh*T (+6*L*H*Dh*T relative); N = matmul weights",
      "flops_per_s": round(tokens_per_s * fpt), "peak_flops_per_s": round(peak),
      "peak_source": "measured jnp.dot 2048x2048", "mfu": round(tokens_per_s * fpt / peak, 4),
      "final_loss": float(jax.device_get(metrics["loss_sum"]) / jax.device_get(metrics["weight_sum"])),
  }
  if others:
    key = "variants" if a.variant else "optimizers"
    out[key] = {variants[0][0]: round(step_s, 5)}
    out[key].update({o: round(statistics.median(t), 5) for o, t in other_times.items()})
    out["step_time_ratio_to_" + variants[0][0]] = {
        o: round(statistics.median(t) / step_s, 3) for o, t in other_times.items()}
  out["optimizer"] = config.train.optimizer
  print(json.dumps(out))


if __name__ == "__main__":
  bench_env.run(main)
