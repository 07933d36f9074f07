#!/usr/bin/env python3
"""Sampling speed: new tokens/s of midijax's jitted KV-cache sampler, and time per token.

Builds the config's model with random weights and runs `sampling.sample_tokens` (the
loop `midijax generate` runs: grammar mask, top-k 50, temperature 0.8) on a batch of
random prompts, EOS suppressed so every row makes exactly --new_tokens tokens, and prints
one JSON line:

  tokens_per_s       batch * new_tokens / wall time of one whole sampling call, median of
                     --runs runs after compiling and one untimed run
  s_per_token_at     {position: seconds per step near that position}: from a prompt ending
                     64 tokens before it, a run of up to 128 new tokens minus a run of one
                     (the same compiled program, `token_limit`; fastest of --runs each),
                     over the steps between; both runs are short, so their noise stays
                     small against the difference. Flat = no recomputation (at large
                     batch x length the growing cache read shows)
  load_average       the machine's 1-minute load when done (other jobs slow it down)
  compile_s          compiling the sampler (once per batch / length / settings)
  guided_time_ratio  with --guidance G > 0 (prompt guidance, a second prompt-free stream):
                     the guided call's time over the unguided one's, runs alternated in
                     one process (median of each); tokens_per_s is the guided sampler's

The context is set to prompt + new_tokens so the window never slides (as Hugging Face's
GPT-2 with n_positions 2048); compare with ../shared/peers/hf_generate.py, same sizes:

    python benchmarks/sample_throughput.py --config configs/seed_course.py --batch 1
    python benchmarks/sample_throughput.py --config configs/seed_course.py --batch 32
    python benchmarks/sample_throughput.py --config configs/seed_course.py --batch 32 \
        --layers 6 --width 512 --heads 8 --mlp 2048
    python benchmarks/sample_throughput.py --config configs/seed_course.py --batch 32 \
        --kv_cache int8   # int8 key/value cache (a quarter of the bytes per step)
    python benchmarks/sample_throughput.py --config configs/music_transformer.py --batch 1 \
        --dtype float32   # Music Transformer relative attention, float32 on CPU
    python benchmarks/sample_throughput.py --config configs/groove_beats.py --batch 64 \
        --encoding drums --prompt 64 --new_tokens 512 --guidance 0.5   # prompt guidance
"""
import bench_env  # noqa: F401  first: see benchmarks/bench_env.py

import argparse
import importlib.util
import json
import os
import pathlib
import statistics

REPO = bench_env.REPO


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(REPO / "configs" / "seed_course.py"),
                  help="config file (configs/NAME.py) giving the model's shape")
  ap.add_argument("--batch", type=int, default=1, help="sequences sampled together")
  ap.add_argument("--new_tokens", type=int, default=1024, help="tokens sampled per row")
  ap.add_argument("--prompt", type=int, default=16, help="prompt length (random event tokens)")
  ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
  ap.add_argument("--encoding", default="performance",
                  help="vocabulary / grammar (performance: 310 events as the HF peer's vocab)")
  ap.add_argument("--top_k", type=int, default=50)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--temperature", type=float, default=0.8)
  ap.add_argument("--unconstrained", action="store_true", help="no grammar mask")
  ap.add_argument("--guidance", type=float, default=0.0,
                  help="prompt guidance (0 = off); > 0 also times the unguided sampler")
  ap.add_argument("--kv_cache", choices=("model", "int8"), default="model",
                  help="key/value cache storage (int8: a scale per vector, see sampling.py)")
  ap.add_argument("--cache_phases", type=int, default=None,
                  help="growing cache lengths (default: from the cache size, see sampling.py)")
  ap.add_argument("--positions", default="128,1024",
                  help="positions for s_per_token_at (comma-separated)")
  ap.add_argument("--layers", type=int)
  ap.add_argument("--width", type=int, help="emb_dim = qkv_dim")
  ap.add_argument("--heads", type=int)
  ap.add_argument("--mlp", type=int)
  ap.add_argument("--max_len", type=int, help="model max_len (default: the config's)")
  ap.add_argument("--position", choices=["sinusoidal", "rope", "relative"])
  ap.add_argument("--dtype", default=None,
                  help="compute dtype override, e.g. float32 for a bfloat16 (TPU/GPU) config on CPU")
  a = ap.parse_args()
  from midijax import allocator
  allocator.reexec_with_tcmalloc()  # as the midijax command runs

  import jax
  import numpy as np
  from flax import nnx
  from midijax import encoding, sampling
  from midijax.models import transformer

  m = load_config(a.config).model
  enc = encoding.get(a.encoding)
  context = a.prompt + a.new_tokens
  max_len = a.max_len or m.max_len
  position = a.position or m.position
  if position != "relative":
    # Absolute positions run past max_len; the benchmark needs no sliding window.
    max_len = max(max_len, context)
  cfg = transformer.TransformerConfig(
      vocab_size=enc.vocab_size, emb_dim=a.width or m.emb_dim, qkv_dim=a.width or m.qkv_dim,
      num_heads=a.heads or m.num_heads, num_layers=a.layers or m.num_layers,
      mlp_dim=a.mlp or m.mlp_dim, max_len=max_len, position=position, norm=m.norm,
      mlp_activation=m.mlp_activation, tied_embeddings=m.tied_embeddings,
      dtype=a.dtype or m.dtype,
      dropout_rate=0.0, attention_dropout_rate=0.0, deterministic=True)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompt = rng.integers(enc.body_offset, enc.bos_id, (a.batch, a.prompt)).astype(np.int32)
  prompt[:, 0] = enc.bos_id
  kw = dict(encoding=enc, max_new_tokens=a.new_tokens, temperature=a.temperature,
            top_k=a.top_k, top_p=a.top_p, constrained=not a.unconstrained,
            cache_len=min(context, max_len), min_new_tokens=a.new_tokens, prefix_len=1,
            window_keep=min(context, max_len) // 2, kv_cache=a.kv_cache,
            guidance=a.guidance)
  if a.cache_phases:
    kw["cache_phases"] = a.cache_phases

  def run(limit, seed=0, **changes):
    out = sampling.sample_tokens(model, prompt, seed=seed, token_limit=limit,
                                 **{**kw, **changes})
    return out

  first = run(a.new_tokens)
  compile_s = first["compile_s"]
  run(a.new_tokens, seed=1)
  guided = a.guidance > 0
  if guided:
    run(a.new_tokens, seed=1, guidance=0.0)  # compile the unguided sampler too
  times, plain = [], []
  for r in range(a.runs):
    out = run(a.new_tokens, seed=2 + r)
    assert out["steps"] == a.new_tokens, out["steps"]
    times.append(out["sample_s"])
    if guided:
      plain.append(run(a.new_tokens, seed=2 + r, guidance=0.0)["sample_s"])
  tps = [a.batch * a.new_tokens / t for t in times]
  extra = {}
  if guided:
    extra = {"guidance": a.guidance,
             "plain_tokens_per_s": round(a.batch * a.new_tokens / statistics.median(plain), 1),
             "guided_time_ratio": round(statistics.median(times) / statistics.median(plain), 3)}

  at = {}
  for p in [int(x) for x in a.positions.split(",") if x]:
    start = max(p - 64, 2)  # prompt length: the steps run at positions start, start + 1, ...
    steps = min(128, context - start)
    if steps < 2:
      continue
    near = rng.integers(enc.body_offset, enc.bos_id, (a.batch, start)).astype(np.int32)
    near[:, 0] = enc.bos_id
    kw_near = {**kw, "max_new_tokens": steps, "min_new_tokens": steps}

    def fastest(limit):
      return min(sampling.sample_tokens(model, near, seed=9 + r, token_limit=limit,
                                        **kw_near)["sample_s"] for r in range(a.runs))

    fastest(1)  # compile
    at[str(p)] = round(max(fastest(steps) - fastest(1), 0.0) / (steps - 1), 7)

  print(json.dumps({
      "bench": "sample_throughput", "config": pathlib.Path(a.config).stem,
      "layers": cfg.num_layers, "width": cfg.emb_dim, "heads": cfg.num_heads,
      "mlp": cfg.mlp_dim, "position": cfg.position, "dtype": cfg.dtype.name,
      "encoding": enc.name,
      "vocab_size": enc.vocab_size, "batch": a.batch, "prompt": a.prompt,
      "new_tokens": a.new_tokens, "top_k": a.top_k, "top_p": a.top_p,
      "temperature": a.temperature, "constrained": not a.unconstrained,
      "kv_cache": a.kv_cache,
      "tokens_per_s": round(statistics.median(tps), 1),
      "tokens_per_s_min": round(min(tps), 1), "tokens_per_s_max": round(max(tps), 1),
      "s_per_token_at": at, "compile_s": round(compile_s, 2), **extra,
      "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
      "allocator": allocator.current(),
      "load_average": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  bench_env.run(main)
