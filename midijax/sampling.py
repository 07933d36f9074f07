"""Sampling from a trained model: one jitted key/value-cache loop, grammar-masked.

Reads top-down: token choice (`choose_tokens`: temperature, top-k, top-p), the prompt
prefill and cache phases, the jitted loop (`sample_tokens`), then the functions the CLI and
evaluation call: `generate` (from BOS + conditioning, or any prompt) and
`continue_midi` (continue the first seconds or bars of a MIDI file, with the conditioning
prefix the model was trained with: `infer_conditions` picks what the file cannot state).

How the loop works (`_sample`):

* The prompt (int [B, P], equal lengths, e.g. BOS + conditioning, or a MIDI prompt) is
  prefilled into the cache in one `model.prefill(prompt, ...)` pass.
* A `lax.while_loop` then emits one token per row per step: masked by the encoding's
  grammar, chosen with Gumbel noise from per-row PRNG keys (`fold_in(key(seed), row)`,
  drawn NOISE_CHUNK steps at a time), fed back through `model.decode_step`. Rows
  stop at EOS (the rest is PAD), at `max_new_tokens`, or when the next token would take
  the music past `max_seconds` (the sample is cut there, without EOS). The loop exits
  when every row has stopped.
* The model owns the cache (midijax.models.kv_cache: heads before positions, so attention
  reads it with plain batched matmuls, no per-step transpose and an in-place update) and
  its attention (the backend of `config.model.attention_impl`, the C++ decode kernel on
  one CPU device). The sampler only chooses tokens, runs the loop and grows the cache: the
  loop runs in a few phases of growing cache length, so a token attends over
  (about) the positions in use rather than the whole context. No step recomputes earlier
  tokens: a step costs the weights' matmuls plus reading the cache so far, which only
  shows at large batch x length, where the cache outweighs the weights.
* `kv_cache="int8"` stores each cached key and value vector as int8 with one float32
  scale (`midijax.models.kv_cache.quantize_kv`): a quarter of the bytes, which is what a batch-32 step spends its
  time reading; attention's logits move by about 1% of their spread (tests/test_sampling.py
  bounds it). The default keeps the model's dtype, exact to the full forward pass.
* Past the context (`cache_len`, default the model's max_len) the window slides: the
  BOS + conditioning prefix and the last `window_keep` tokens are prefilled again in one
  pass and sampling goes on (positions restart; the grammar state and the elapsed time
  carry over), so a model trained on 1024-token windows can play for minutes. A prompt
  that does not fit the context starts that way: the model sees the prefix and the
  prompt's last `window_keep` tokens, the grammar all of it.

* With `guidance` > 0 (prompt guidance) a second, prompt-free stream with a cache of its
  own runs beside the first: it starts from the BOS + conditioning prefix alone and reads
  every sampled token. Each token is chosen from the first stream's log-probabilities
  moved away from the second's. When the first stream's window slides, the prompt leaves
  it: from there on there is no prompt to lean towards, and the second stream stops.

Everything that changes the program's shapes (batch, prompt length, max_new_tokens,
cache_len, window_keep, top_k, top_p on/off, guidance on/off, encoding) is static: one
compile per combination. Temperature, top_p, guidance, seed, max_seconds and constrained
are traced values.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from midijax import constraints as grammar_lib
from midijax import losses
from midijax import sharding
from midijax.encoding import (CONDITIONING, EOS_ID, PAD_ID, Encoding, conditions_of_notes,
                              encode_prompt, is_drum_music)
from midijax.errors import MidijaxError
from midijax.models import transformer
from midijax.models.kv_cache import LayerCache

# Why a row stopped (the `stop_reasons` of a SampleResult).
STOP_REASONS = ("max_tokens", "eos", "max_seconds")
# Attention over the cache runs in up to this many phases of growing length; with the
# default (None) one phase per CACHE_BYTES_PER_PHASE of cache, so small caches (which sit
# in the CPU's cache anyway) compile one loop, large ones up to MAX_CACHE_PHASES.
MAX_CACHE_PHASES = 8
CACHE_BYTES_PER_PHASE = 16 << 20


# ----------------------------------------------------------------------------- token choice
def choose_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, *,
                  top_k: int = 0, top_p: Optional[jax.Array] = None) -> jax.Array:
  """Samples one token per row.

  Sampling is the Gumbel-max trick, argmax(logits + temperature * gumbel), which equals
  sampling softmax(logits / temperature) for temperature > 0 and is the greedy argmax at
  temperature 0, with no division and no branch.

  Args:
    logits: float32 [B, V]; masked ids should be very negative (e.g. MASKED_LOGIT).
    keys: [B] PRNG keys, one per row (rows draw independently).
    temperature: float scalar >= 0; 0 = greedy.
    top_k: static; keep only the k largest logits (0 = all).
    top_p: float scalar in (0, 1], nucleus: keep the fewest most likely tokens whose
      probability (at this temperature) sums to at least top_p; None = off.

  Returns:
    int32 [B] token ids.
  """
  width = noise_width(logits.shape[-1], top_k)
  noise = jax.vmap(lambda key: jax.random.gumbel(key, (width,), jnp.float32))(keys)
  return choose_with_noise(logits, noise, temperature, top_k=top_k, top_p=top_p)


def noise_width(vocab: int, top_k: int) -> int:
  """Gumbel draws per row and step: top_k, or the whole (padded) vocabulary."""
  return top_k if 0 < top_k < vocab else vocab


def choose_with_noise(logits: jax.Array, noise: jax.Array, temperature: jax.Array, *,
                      top_k: int = 0, top_p: Optional[jax.Array] = None) -> jax.Array:
  """`choose_tokens` with the standard Gumbel noise given: float32 [B, noise_width]."""
  vocab = logits.shape[-1]
  index = None
  if 0 < top_k < vocab:
    logits, index = jax.lax.top_k(logits, top_k)  # sorted, largest first
  elif top_p is not None:
    logits, index = jax.lax.top_k(logits, vocab)  # a full sort for the nucleus
  if top_p is not None:
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), axis=-1)
    # Keep a token if the tokens before it (more likely) do not yet reach top_p; the
    # first one is always kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    logits = jnp.where(before < top_p, logits, -jnp.inf)
  choice = jnp.argmax(logits + temperature * noise, axis=-1)
  if index is not None:
    choice = jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]
  return choice.astype(jnp.int32)


# The sampler draws its Gumbel noise this many steps at a time: JAX's threefry runs as a
# small loop on CPU, and one draw per step cost ~10% of a batch-32 decode step.
NOISE_CHUNK = 32


def noise_chunk(keys: jax.Array, chunk: jax.Array, width: int) -> jax.Array:
  """Gumbel noise for steps chunk*NOISE_CHUNK ... of every row: float32 [B, C, width].

  Row r's noise comes from fold_in(keys[r], chunk) alone, so it does not depend on the
  batch size or on how the batch is sharded.
  """
  return jax.vmap(lambda key: jax.random.gumbel(
      jax.random.fold_in(key, chunk), (NOISE_CHUNK, width), jnp.float32))(keys)


def row_keys(seed: jax.Array, batch_size: int) -> jax.Array:
  """[B] keys: fold_in(key(seed), row), so row r is the same sample at any batch size."""
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(batch_size, dtype=jnp.int32))


# ----------------------------------------------------------------------------- decoding
# Key/value cache storage (--kv_cache): the model's dtype, or int8 with a float32 scale per
# vector. The model owns the cache's layout and format (midijax.models.kv_cache).
KV_CACHE_KINDS = ("model", "int8")


def cache_kind(kv_cache: str) -> str:
  """The model's cache kind ("float" or "int8") for a KV_CACHE_KINDS name."""
  return "int8" if kv_cache == "int8" else "float"


def prefill(model: transformer.Transformer, tokens: jax.Array, length: int,
            kv_cache: str = "model"):
  """Runs `tokens` through the model in one pass (`Transformer.prefill`).

  Args:
    model: the Transformer.
    tokens: int [B, W] (a prompt or a re-prefilled window), positions 0..W-1.
    length: cache length L >= W to return (the first phase's length).
    kv_cache: one of KV_CACHE_KINDS.

  Returns:
    (float32 [B, V] logits for the token after `tokens`, the cache: one LayerCache per
    layer, L slots).
  """
  logits, cache = model.prefill(tokens, length, cache_kind(kv_cache))
  return logits[:, -1], cache


def grow(cache: List[LayerCache], length: int) -> List[LayerCache]:
  """Each layer's cache padded to `length` slots (empty; attention masks them)."""
  return [layer.grow(length) for layer in cache]


# Phases are at least this many tokens apart: below that, reading a few empty cache slots
# costs less than another compiled loop.
MIN_PHASE_TOKENS = 128


def cache_phases(start: int, length: int, num_phases: int) -> List[int]:
  """Cache lengths of the loop's phases for positions start..length-1.

  The cache grows in steps of ceil(length / num_phases) (a multiple of 8, at least
  MIN_PHASE_TOKENS) so attention reads at most that many empty slots per token; each
  phase's length is a static shape.

  Returns:
    Increasing lengths, each > start, the last == length.
  """
  per_phase = -(-length // max(num_phases, 1))
  step = max(MIN_PHASE_TOKENS, -(-per_phase // 8) * 8)
  ends = [e for e in range(step, length, step) if e > start] + [length]
  return ends


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """The static settings of one compiled sampler (see `sample_tokens`)."""
  max_new_tokens: int
  cache_len: int
  window_keep: int
  prefix_len: int
  top_k: int
  use_top_p: bool
  grammar: grammar_lib.Grammar
  cache_phases: int
  kv_cache: str = "model"
  guided: bool = False


def _sample(graphdef, spec: SamplerSpec, params, prompt, seed, temperature, top_p, max_seconds,
            min_new_tokens, token_limit, constrained, guidance):
  """The jitted sampler. Returns (tokens [B, P+N], stop reason [B], seconds [B], steps)."""
  model = nnx.merge(graphdef, params)
  g = spec.grammar
  batch, prompt_len = prompt.shape
  keys = row_keys(seed, batch)
  seconds_table = jnp.asarray(g.seconds)
  top_p = top_p if spec.use_top_p else None
  noise_cols = noise_width(g.vocab_size, spec.top_k)

  def sample_one(c, noise):
    """Chooses, checks and records the next token of every row (noise: this chunk's)."""
    logits = c["logits"]
    if spec.guided:
      # Prompt guidance: the log-probabilities with the prompt, moved further from those of
      # the prompt-free stream (see `sample_tokens`).
      with_prompt = jax.nn.log_softmax(logits, axis=-1)
      free = jax.nn.log_softmax(c["free"]["logits"], axis=-1)
      logits = jnp.where(c["guiding"], with_prompt + guidance * (with_prompt - free), logits)
    # The mask is computed either way: one program serves both settings.
    logits = jnp.where(g.allowed(c["grammar"]) | ~constrained, logits, transformer.MASKED_LOGIT)
    # No EOS before min_new_tokens (benchmarks time an exact number of tokens).
    logits = logits.at[:, EOS_ID].set(
        jnp.where(c["i"] < min_new_tokens, transformer.MASKED_LOGIT, logits[:, EOS_ID]))
    step_noise = jax.lax.dynamic_index_in_dim(noise, c["i"] % NOISE_CHUNK, axis=1,
                                              keepdims=False)
    token = choose_with_noise(logits, step_noise, temperature, top_k=spec.top_k, top_p=top_p)
    elapsed = c["elapsed"] + seconds_table[token]
    running = ~c["done"]
    over = (elapsed > max_seconds) & running  # max_seconds = inf: no limit
    token = jnp.where(running & ~over, token, PAD_ID)
    is_eos = (token == EOS_ID) & running
    reason = jnp.where(over, 2, jnp.where(is_eos, 1, c["reason"]))
    return {
        **c,
        "token": token,
        "out": jax.lax.dynamic_update_slice(c["out"], token[:, None], (0, prompt_len + c["i"])),
        "grammar": g.update(c["grammar"], token),
        "elapsed": jnp.where(token != PAD_ID, elapsed, c["elapsed"]),
        "done": c["done"] | over | is_eos,
        "reason": reason,
        "i": c["i"] + 1,
    }

  def going(c):
    return (c["i"] < token_limit) & ~jnp.all(c["done"])

  def run_phases(c, cache, start):
    """Samples until the cache (grown phase by phase from `start`) is full or all stop."""
    for length in cache_phases(start, spec.cache_len, spec.cache_phases):
      cache = grow(cache, length)

      def in_phase(carry, length=length):
        return going(carry[0]) & (carry[0]["pos"] < length)

      def chunk(carry, in_phase=in_phase):
        """Steps up to the end of the current noise chunk (or of the phase)."""
        c = carry[0]
        index = c["i"] // NOISE_CHUNK
        noise = noise_chunk(keys, index, noise_cols)

        def step(carry):
          c, cache = carry
          c = sample_one(c, noise)
          bar = model.advance_bar_time(c["bar"], c["token"]) if uses_bars else c["bar"]
          music = (model.advance_music_time(c["music"], c["token"]) if uses_time
                   else c["music"])
          # Echo models: what the window's earlier bars played at this place, carried
          # on one token at a time.
          echo = (model.advance_echo(c["echo"], c["token"], prompt_len + c["i"] - 1)
                  if uses_echo else c["echo"])
          logits, cache = model.decode_step(c["token"], cache, c["pos"],
                                            bar_time=bar if uses_bars else None,
                                            music_time=music if uses_time else None,
                                            echo=model.echo_of(echo) if uses_echo else None)
          if spec.guided:
            c = {**c, "free": jax.lax.cond(
                c["guiding"],
                lambda free: advance_free(free, c["token"], c["out"], prompt_len + c["i"] - 1),
                lambda free: free, c["free"])}
          return {**c, "logits": logits, "pos": c["pos"] + 1, "bar": bar,
                  "music": music, "echo": echo}, cache

        return jax.lax.while_loop(
            lambda carry: in_phase(carry) & (carry[0]["i"] // NOISE_CHUNK == index), step, carry)

      c, cache = jax.lax.while_loop(in_phase, chunk, (c, cache))
    return c

  window_len = spec.prefix_len + spec.window_keep
  if prompt_len < spec.cache_len:
    first, first_len = prompt, prompt_len
  else:
    # A prompt longer than the context starts as if the window had already slid: the
    # prefix and the prompt's last window_keep tokens; the grammar state comes from all of it.
    first = jnp.concatenate([prompt[:, :spec.prefix_len],
                             prompt[:, prompt_len - spec.window_keep:]], axis=1)
    first_len = window_len
  # Where the window's tokens after the prefix start in `out` (the echo of earlier bars
  # reads the window, as training does).
  start = 0 if prompt_len < spec.cache_len else prompt_len - spec.window_keep
  # Models with bar-position embeddings: the time since the last BAR (-1: none yet in the
  # window), as training computes it over a window, carried on token by token.
  uses_bars = bool(model.config.bar_positions)
  bar_time = lambda window: (model.bar_times(window)[:, -1] if uses_bars
                             else jnp.zeros((batch,), jnp.int32))
  # Models with time-rope heads: the music's time from the window's start, likewise.
  uses_time = bool(model.config.time_rope_heads)
  uses_echo = bool(model.config.bar_echo)
  echo_state = lambda out, index, start: (model.echo_state(out, index, start) if uses_echo
                                          else jnp.zeros((), jnp.int32))
  music_time = lambda window: (model.music_times(window)[:, -1] if uses_time
                               else jnp.zeros((batch,), jnp.int32))

  def advance_free(free, token, out, index):
    """The prompt-free stream one token on (`token`, written at out[:, index]). It holds
    fewer tokens than the prompted stream, and stops when that one slides, so its cache
    never fills."""
    bar = model.advance_bar_time(free["bar"], token) if uses_bars else free["bar"]
    music = model.advance_music_time(free["music"], token) if uses_time else free["music"]
    echo = model.advance_echo(free["echo"], token, index) if uses_echo else free["echo"]
    logits, cache = model.decode_step(token, free["cache"], free["pos"],
                                      bar_time=bar if uses_bars else None,
                                      music_time=music if uses_time else None,
                                      echo=model.echo_of(echo) if uses_echo else None)
    return {"logits": logits, "cache": cache, "pos": free["pos"] + 1, "bar": bar,
            "music": music, "echo": echo}

  logits, cache = prefill(model, first, first_len, spec.kv_cache)
  out = jnp.concatenate([prompt, jnp.zeros((batch, spec.max_new_tokens), jnp.int32)], axis=1)
  carry = {
      "i": jnp.zeros((), jnp.int32), "pos": jnp.asarray(first_len, jnp.int32),
      "logits": logits, "out": out, "token": jnp.zeros((batch,), jnp.int32),
      "grammar": g.init_state(batch, prompt), "elapsed": jnp.zeros((batch,), jnp.float32),
      "done": jnp.zeros((batch,), bool), "reason": jnp.zeros((batch,), jnp.int32),
      "bar": bar_time(first), "music": music_time(first),
      "echo": echo_state(out, prompt_len - 1, start),
  }
  if spec.guided:
    # The prompt-free stream starts from the prefix alone: the prompt's tokens are left out
    # of its window (and of its echo), the sampled ones are in.
    prefix = prompt[:, :spec.prefix_len]
    free_logits, free_cache = prefill(model, prefix, spec.cache_len, spec.kv_cache)
    carry["free"] = {"logits": free_logits, "cache": free_cache,
                     "pos": jnp.asarray(spec.prefix_len, jnp.int32), "bar": bar_time(prefix),
                     "music": music_time(prefix),
                     "echo": echo_state(out, prompt_len - 1, prompt_len)}
    carry["guiding"] = jnp.asarray(True)
  carry = run_phases(carry, cache, first_len)

  if first_len + spec.max_new_tokens > spec.cache_len:

    def slide(c):
      start = prompt_len + c["i"] - spec.window_keep
      window = jnp.concatenate(
          [c["out"][:, :spec.prefix_len],
           jax.lax.dynamic_slice_in_dim(c["out"], start, spec.window_keep, axis=1)], axis=1)
      logits, cache = prefill(model, window, window_len, spec.kv_cache)
      if spec.guided:
        # The prompt has left the window: nothing to lean towards, the second stream stops.
        c = {**c, "guiding": jnp.asarray(False)}
      return run_phases({**c, "logits": logits, "pos": jnp.asarray(window_len, jnp.int32),
                         "bar": bar_time(window), "music": music_time(window),
                         "echo": echo_state(c["out"], prompt_len + c["i"] - 1, start)},
                         cache,
                         window_len)

    carry = jax.lax.while_loop(going, slide, carry)
  return carry["out"], carry["reason"], carry["elapsed"], carry["i"]


_sample_jit = jax.jit(_sample, static_argnums=(0, 1))
# Compiled samplers by (graphdef, spec, argument shapes/shardings, mesh); a few are kept.
_COMPILED: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_MAX_COMPILED = 8


def _compiled_sampler(graphdef, spec, args, mesh, rules):
  """(compiled executable, compile seconds; 0 when it was already compiled)."""
  shapes = tuple((a.shape, str(a.dtype), getattr(a, "sharding", None))
                 for a in jax.tree.leaves(args))
  key = (graphdef, spec, shapes, mesh, tuple(rules) if rules else None)
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key], 0.0
  start = time.perf_counter()
  if mesh is not None:
    with sharding.use_mesh(mesh, rules):
      compiled = _sample_jit.lower(graphdef, spec, *args).compile()
  else:
    compiled = _sample_jit.lower(graphdef, spec, *args).compile()
  _COMPILED[key] = compiled
  while len(_COMPILED) > _MAX_COMPILED:
    _COMPILED.popitem(last=False)
  return compiled, time.perf_counter() - start


def sample_tokens(model: transformer.Transformer, prompt, *, encoding: Encoding,
                  max_new_tokens: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, constrained: bool = True,
                  max_seconds: Optional[float] = None, qpm: float = 120.0,
                  cache_len: Optional[int] = None, window_keep: Optional[int] = None,
                  prefix_len: Optional[int] = None, cache_phases: Optional[int] = None,
                  min_new_tokens: int = 0, token_limit: Optional[int] = None,
                  kv_cache: str = "model", guidance: float = 0.0, mesh=None,
                  rules=None) -> Dict[str, Any]:
  """Samples continuations of a batch of equal-length prompts (the low-level entry point).

  Args:
    model: the Transformer (its parameters placed on `mesh` when one is given).
    prompt: int [B, P] ids, every row the same length (BOS + conditioning + events).
    encoding: the vocabulary's encoding (grammar, EOS/PAD, time per token).
    max_new_tokens: tokens to sample after the prompt, at most.
    seed: PRNG seed; row r draws from fold_in(key(seed), r), so the same seed gives the
      same samples and a row does not depend on the batch size.
    temperature: >= 0; 0 = greedy (argmax).
    top_k: keep the k most likely tokens (0 = all).
    top_p: nucleus probability in (0, 1]; 1 = off.
    constrained: mask each step with the encoding's grammar (False: raw model).
    max_seconds: stop a row before the token that would take its new music past this
      many seconds (time-shift / position tokens counted); None = no limit.
    qpm: tempo for beat-based encodings' time (`triples`), quarter notes per minute.
    cache_len: context in tokens (prompt + generated) before the window slides; default
      the model's max_len. A longer prompt is fed as the slid window would be.
    window_keep: tokens of recent context kept (after the BOS + conditioning prefix) when
      the window slides; default half the context.
    prefix_len: length of the BOS + conditioning prefix re-kept at every slide; default
      the leading run of ids >= encoding.bos_id in row 0.
    cache_phases: number of growing cache lengths the loop runs through (1 = attend over
      the whole context from the first token); default: from the cache's size in bytes.
    min_new_tokens: EOS is masked until this many new tokens (for exact-length timing).
    token_limit: stop after this many new tokens (<= max_new_tokens) without compiling
      another sampler; default max_new_tokens.
    kv_cache: "model" (keys and values in the model's dtype) or "int8" (`quantize_kv`:
      a quarter of the float32 bytes; not with relative attention).
    guidance: >= 0; prompt guidance (classifier-free guidance on the prompt, as Sanchez
      et al. 2023 apply it to language models). Each token is chosen from
      log p(x | prompt) + guidance * (log p(x | prompt) - log p(x | prefix)): a second,
      prompt-free stream reads the BOS + conditioning prefix and the sampled tokens but
      not the prompt's, and the choice leans further towards what the prompt makes more
      likely than the model's prior (its drummer's kit and pattern). Once the window has
      slid past the prompt, the choice is the unguided one (and the second stream
      stops). 0 = off; > 0 runs the model twice a token until then. Without a prompt
      after the prefix it changes nothing.
    mesh, rules: a device mesh (`sharding.create_mesh`) and logical axis rules: the batch
      is split over its data axes and the sampler traced under `sharding.use_mesh`.

  Returns:
    dict: "tokens" int32 [B, P + max_new_tokens] (prompt, new tokens, PAD after a stop),
    "stop_reasons" list of STOP_REASONS, "seconds" float [B] of new music,
    "steps" loop iterations, "compile_s", "sample_s".

  Raises:
    ValueError: on inconsistent settings (window_keep not leaving room in the context, ...).
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be int [batch, length>0], got shape {prompt.shape}")
  cfg = model.config
  if kv_cache not in KV_CACHE_KINDS:
    raise MidijaxError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
  if kv_cache == "int8" and cfg.position == "relative":
    raise MidijaxError("kv_cache='int8' does not support relative attention (this model's "
                       "position='relative'); use kv_cache='model'")
  if encoding.vocab_size > cfg.vocab_size:
    raise MidijaxError(f"the model's vocabulary has {cfg.vocab_size} ids but encoding "
                       f"{encoding.name!r} needs {encoding.vocab_size}: incompatible encoding")
  batch, plen = prompt.shape
  cache_len = int(cache_len or cfg.max_len)
  if cfg.position == "relative" and cache_len > cfg.max_len:
    raise ValueError(f"cache_len={cache_len} exceeds max_len={cfg.max_len}, the longest "
                     "relative distance the model knows")
  if prefix_len is None:
    lead = np.flatnonzero(prompt[0] < encoding.bos_id)
    prefix_len = int(lead[0]) if len(lead) else plen
  window_keep = int(window_keep if window_keep is not None else cache_len // 2)
  if not 0 < window_keep or prefix_len + window_keep >= cache_len:
    raise ValueError(f"window_keep={window_keep} must be positive and leave room after the "
                     f"{prefix_len}-token prefix in the {cache_len}-token context")
  # Cache no longer than the sequence can get (short samples use less memory).
  if plen < cache_len:
    cache_len = min(cache_len, plen + max_new_tokens)
  if cache_phases is None and model.decode_attention_impl(mesh) == "cpu_kernel":
    cache_phases = 1  # the kernel reads only the filled slots: no shorter phases needed
  if cache_phases is None:
    cache_bytes = (batch * cache_len * cfg.num_layers * 2 * cfg.qkv_dim *
                   (1 if kv_cache == "int8" else jnp.dtype(cfg.dtype).itemsize))
    cache_phases = int(np.clip(-(-cache_bytes // CACHE_BYTES_PER_PHASE), 1, MAX_CACHE_PHASES))
  if not 0 <= guidance < float("inf"):
    raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
  # Without music after the prefix the prompt-free stream would be the same stream.
  guided = bool(guidance > 0) and prefix_len < plen
  spec = SamplerSpec(
      max_new_tokens=int(max_new_tokens), cache_len=cache_len, window_keep=window_keep,
      prefix_len=prefix_len, top_k=int(top_k) if 0 < top_k < cfg.padded_vocab_size else 0,
      use_top_p=top_p is not None and top_p < 1.0,
      grammar=grammar_lib.get(encoding, cfg.padded_vocab_size, qpm),
      cache_phases=int(cache_phases), kv_cache=kv_cache, guided=guided)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if spec.use_top_p and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")

  graphdef, params = nnx.split(model)
  # Rows are padded up to a multiple of the batch shards; the extra rows are dropped.
  rows = batch
  if mesh is not None:
    axes = sharding.batch_sharding(mesh, rules).spec[0] or ()
    shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    rows = -(-batch // shards) * shards
    if rows > batch:
      prompt = np.concatenate([prompt, np.repeat(prompt[-1:], rows - batch, 0)])
    prompt = jax.device_put(prompt, sharding.batch_sharding(mesh, rules))
  args = (params, jnp.asarray(prompt), jnp.asarray(seed, jnp.int32),
          jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p or 1.0, jnp.float32),
          jnp.asarray(np.inf if max_seconds is None else max_seconds, jnp.float32),
          jnp.asarray(min_new_tokens, jnp.int32),
          jnp.asarray(max_new_tokens if token_limit is None else token_limit, jnp.int32),
          jnp.asarray(constrained, bool), jnp.asarray(guidance, jnp.float32))
  compiled, compile_s = _compiled_sampler(graphdef, spec, args, mesh, rules)
  start = time.perf_counter()
  tokens, reason, seconds, steps = jax.block_until_ready(compiled(*args))
  sample_s = time.perf_counter() - start
  tokens, reason, seconds = (np.asarray(jax.device_get(x))[:batch]
                             for x in (tokens, reason, seconds))
  return {"tokens": tokens, "stop_reasons": [STOP_REASONS[int(r)] for r in reason],
          "seconds": seconds.astype(np.float64), "steps": int(steps),
          "compile_s": compile_s, "sample_s": sample_s}


# ----------------------------------------------------------------------------- high level
@dataclasses.dataclass
class SampleResult:
  """Samples from `generate` / `continue_midi`.

  Attributes:
    tokens: per sample, the prompt followed by the new tokens (EOS kept, PAD dropped).
    prompt_length: tokens of prompt at the start of every sample.
    stop_reasons: per sample, "eos", "max_tokens" or "max_seconds".
    seconds: per sample, seconds of new music (time shifts / positions sampled).
    timing: compile_s, sample_s (seconds), new_tokens (all samples), tokens_per_s (new
      tokens per second of sampling), steps (loop iterations).
  """
  tokens: List[np.ndarray]
  prompt_length: int
  stop_reasons: List[str]
  seconds: List[float]
  timing: Dict[str, float]

  @property
  def continuations(self) -> List[np.ndarray]:
    """The new tokens of each sample."""
    return [t[self.prompt_length:] for t in self.tokens]


def trim_sample(row: np.ndarray, prompt_length: int) -> np.ndarray:
  """A row of `sample_tokens(...)["tokens"]` up to its EOS (kept), without the PAD after a
  stop; the first `prompt_length` ids (the prompt) are kept as they are."""
  new = row[prompt_length:]
  eos = np.flatnonzero(new == EOS_ID)
  if len(eos):
    new = new[:eos[0] + 1]
  else:
    real = np.flatnonzero(new != PAD_ID)
    new = new[:real[-1] + 1] if len(real) else new[:0]
  return np.concatenate([row[:prompt_length], new]).astype(np.int32)


_trim = trim_sample  # the name midijax.evaluation / export first used


def ordered_conditions(conditions: Optional[Mapping[str, str]]) -> Dict[str, str]:
  """Conditions in the vocabulary's kind order (style, tempo, type, meter, family, dataset),
  the order the data builders write them after BOS."""
  conditions = dict(conditions or {})
  unknown = [k for k in conditions if k not in CONDITIONING]
  if unknown:
    raise MidijaxError(f"unknown conditioning kind(s) {unknown}; valid: {', '.join(CONDITIONING)}")
  return {k: str(conditions[k]) for k in CONDITIONING if conditions.get(k) is not None}


def generate(model: transformer.Transformer, enc: Encoding, *, num_samples: int = 1,
             max_new_tokens: int = 512, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, conditions: Optional[Mapping[str, str]] = None,
             prompt_ids: Optional[Sequence[int]] = None, max_seconds: Optional[float] = None,
             constrained: bool = True, window_keep: Optional[int] = None,
             cache_len: Optional[int] = None, qpm: float = 120.0, kv_cache: str = "model",
             guidance: float = 0.0, mesh=None, rules=None) -> SampleResult:
  """Samples `num_samples` pieces from BOS + conditioning (+ optional event prompt).

  Args:
    model, enc: the trained model and its encoding (`runs.load_run`).
    num_samples: samples, drawn as one batch.
    max_new_tokens: tokens per sample after the prompt, at most.
    temperature, top_k, top_p, seed: see `sample_tokens`.
    conditions: e.g. {"style": "funk", "tempo": 100, "type": "beat"}; a tempo may be beats
      per minute (binned) or a bin name; unknown values raise TokenError listing the valid.
    prompt_ids: event ids to start from (after the prefix), e.g. an encoded MIDI excerpt.
    max_seconds: seconds of new music per sample, at most.
    constrained: apply the encoding's grammar.
    window_keep, cache_len: sliding-window settings (`sample_tokens`).
    qpm: tempo for `triples` time (max_seconds).
    kv_cache: "model" or "int8" (`sample_tokens`).
    guidance: prompt guidance (`sample_tokens`; only a prompt after the prefix is guided).
    mesh, rules: sample sharded over a mesh (`sample_tokens`).

  Returns:
    SampleResult.
  """
  if num_samples < 1 or max_new_tokens < 1:
    raise MidijaxError("num_samples and max_new_tokens must be at least 1")
  prompt = enc.with_specials(np.asarray(prompt_ids if prompt_ids is not None else [], np.int32),
                             ordered_conditions(conditions), bos=True, eos=False)
  prefix_len = len(prompt) - (len(prompt_ids) if prompt_ids is not None else 0)
  out = sample_tokens(model, np.tile(prompt, (num_samples, 1)), encoding=enc,
                      max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                      top_k=top_k, top_p=top_p, constrained=constrained,
                      max_seconds=max_seconds, qpm=qpm, cache_len=cache_len,
                      window_keep=window_keep, prefix_len=prefix_len, kv_cache=kv_cache,
                      guidance=guidance, mesh=mesh, rules=rules)
  tokens = [trim_sample(row, len(prompt)) for row in out["tokens"]]
  new_tokens = sum(len(t) - len(prompt) for t in tokens)
  timing = {"compile_s": out["compile_s"], "sample_s": out["sample_s"],
            "new_tokens": new_tokens, "steps": out["steps"],
            "tokens_per_s": new_tokens / max(out["sample_s"], 1e-9)}
  return SampleResult(tokens=tokens, prompt_length=len(prompt), stop_reasons=out["stop_reasons"],
                      seconds=[float(s) for s in out["seconds"]], timing=timing)


@dataclasses.dataclass
class Continuation:
  """What `continue_midi` returns.

  Attributes:
    prompt: the prompt's notes as encoded (cut at `prompt_seconds`).
    full: per sample, prompt + continuation notes.
    continuation: per sample, the continuation's notes alone (time 0 = the cut point).
    result: the token samples (prompt ids included).
    prompt_seconds: where the prompt was cut (seconds).
    qpm: the prompt file's first tempo (quarter notes per minute).
    is_drum: whether notes are written on the drum channel.
  """
  prompt: Any
  full: List[Any]
  continuation: List[Any]
  result: SampleResult
  prompt_seconds: float
  qpm: float
  is_drum: bool
  conditions: Dict[str, str] = dataclasses.field(default_factory=dict)
  inferred: Dict[str, Any] = dataclasses.field(default_factory=dict)


def bar_seconds(notes) -> float:
  """Seconds per bar from the first tempo and time signature of `notes`."""
  num, den = notes.time_signatures[0, 1:3] if len(notes.time_signatures) else (4, 4)
  return 60.0 / notes.qpm * float(num) * 4.0 / float(den)


# Conditioning kinds a MIDI prompt cannot state (GMD's style and beat/fill, a mixture's
# source dataset): `infer_conditions` picks them with the model. Tempo, meter and family
# come from the prompt's notes (`encoding.conditions_of_notes`).
INFERRED_KINDS = ("style", "type", "dataset")
# `prompt_log_likelihoods` scores rows in batches of SCORE_BATCH, padded to a multiple of
# SCORE_BUCKET tokens; `infer_conditions` scores at most MAX_CANDIDATES prefixes (GMD:
# 18 styles x 2 types = 36).
SCORE_BATCH = 16
SCORE_BUCKET = 64
MAX_CANDIDATES = 1024


def prompt_log_likelihoods(model: transformer.Transformer, rows: np.ndarray,
                           prefix_len: int) -> np.ndarray:
  """log p(row[prefix_len:] | row[:prefix_len]) under `model`, float64 [R].

  Args:
    model: the trained model (deterministic).
    rows: int [R, T] token ids of equal length, e.g. BOS + conditioning + a prompt.
    prefix_len: tokens given, not scored (>= 1).
  """
  rows = np.asarray(rows, np.int32)
  length = rows.shape[1]
  if not 1 <= prefix_len < length:
    raise ValueError(f"prefix_len must be in [1, {length}), got {prefix_len}")
  # Rows are padded (PAD, after the real tokens: the model is causal) to a multiple of
  # SCORE_BUCKET tokens and SCORE_BATCH rows, so that prompts of similar length share one
  # compiled program.
  width = max(length, min(-(-length // SCORE_BUCKET) * SCORE_BUCKET, model.config.max_len + 1))
  out = []
  for i in range(0, len(rows), SCORE_BATCH):
    chunk = np.full((SCORE_BATCH, width), PAD_ID, np.int32)
    part = rows[i:i + SCORE_BATCH]
    chunk[:len(part), :length] = part
    scores = _score_rows(model, jnp.asarray(chunk), jnp.int32(prefix_len), jnp.int32(length))
    out.append(np.asarray(scores, np.float64)[:len(part)])
  return np.concatenate(out) if out else np.zeros(0, np.float64)


@nnx.jit
def _score_rows(model, x, prefix_len, length):
  """Summed log-probabilities of x[:, prefix_len:length] given what precedes, float32 [B]:
  minus the NLL training and evaluation compute (`losses.weighted_cross_entropy`), per row."""
  logits = model(x[:, :-1], deterministic=True)
  target = jnp.arange(1, x.shape[1])
  weights = ((target >= prefix_len) & (target < length)).astype(jnp.float32)
  row_nll = jax.vmap(lambda lg, t: losses.weighted_cross_entropy(lg, t, weights)[0])
  return -row_nll(logits, x[:, 1:])


def infer_conditions(model: transformer.Transformer, enc: Encoding, prompt_ids: Sequence[int],
                     conditions: Mapping[str, str], kinds: Sequence[str]):
  """Fills the conditioning kinds the model was trained with but a prompt cannot state.

  For each kind of `kinds` (the run's, `runs.conditioning_kinds`) that is in
  INFERRED_KINDS and not in `conditions`, every combination of values is tried as the
  prefix of `prompt_ids`, and the one under which the model finds the prompt most likely is
  kept: with a uniform prior over the values, the most probable given the prompt. The model
  then continues a prompt with the prefix it was trained with, not one missing tokens it
  always saw.

  Returns:
    (conditions with the inferred kinds added, record): the record is {} when nothing was
    inferred, else {"kinds", "values" (the chosen), "log_likelihood" (nats, the prompt's
    event tokens), "candidates" (how many prefixes were scored), "runner_up" (the next best
    values and how many nats less likely the prompt is under them)}.
  """
  conditions = dict(conditions)
  missing = [k for k in CONDITIONING if k in kinds and k in INFERRED_KINDS and k not in conditions]
  if not missing:
    return ordered_conditions(conditions), {}
  candidates = list(itertools.product(*(CONDITIONING[k] for k in missing)))
  if len(candidates) > MAX_CANDIDATES:
    raise MidijaxError(f"inferring {', '.join(missing)} would score {len(candidates)} prefixes "
                       f"(at most {MAX_CANDIDATES}); give some of them as flags")
  prompt_ids = np.asarray(prompt_ids, np.int32)
  rows = np.stack([enc.with_specials(prompt_ids, ordered_conditions({**conditions,
                                                                     **dict(zip(missing, c))}),
                                     bos=True, eos=False) for c in candidates])
  prefix_len = rows.shape[1] - len(prompt_ids)
  scores = prompt_log_likelihoods(model, rows, prefix_len)
  order = np.argsort(-scores, kind="stable")
  best = dict(zip(missing, candidates[order[0]]))
  record = {"kinds": missing, "values": best, "log_likelihood": float(scores[order[0]]),
            "candidates": len(candidates)}
  if len(order) > 1:
    record["runner_up"] = {"values": dict(zip(missing, candidates[order[1]])),
                           "nats_less_likely": float(scores[order[0]] - scores[order[1]])}
  return ordered_conditions({**conditions, **best}), record


def continue_midi(model: transformer.Transformer, enc: Encoding, prompt_path, *,
                  prompt_seconds: Optional[float] = None, prompt_bars: Optional[float] = None,
                  seconds: Optional[float] = 8.0, max_new_tokens: Optional[int] = None,
                  num_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0,
                  conditions: Optional[Mapping[str, str]] = None, constrained: bool = True,
                  window_keep: Optional[int] = None, cache_len: Optional[int] = None,
                  is_drum: Optional[bool] = None, kv_cache: str = "model",
                  guidance: float = 0.0, mesh=None, rules=None,
                  condition_kinds: Optional[Sequence[str]] = None) -> Continuation:
  """Continues the start of a MIDI file.

  Args:
    model, enc: the trained model and its encoding.
    prompt_path: a .mid file (drums from a Groove file, a piano opening, ...).
    prompt_seconds: cut the prompt after this many seconds; or
    prompt_bars: after this many bars at the file's first tempo and time signature;
      neither: the whole file.
    seconds: seconds of music to add (None: only max_new_tokens limits).
    max_new_tokens: token cap; default enough room for `seconds` at a dense 200 tokens
      per second, or 2048.
    num_samples, temperature, top_k, top_p, seed, conditions, constrained, window_keep,
    cache_len, kv_cache, guidance, mesh, rules: as in `generate`.
    is_drum: write drum-channel notes; default: the prompt is all drums (drums encoding
      always writes drums).
    condition_kinds: the conditioning kinds the model was trained with
      (`runs.conditioning_kinds`); None: not known.

  The prompt gets the prefix the model was trained with: each kind of `condition_kinds`
  that `conditions` does not give comes from the prompt file where it can (tempo, meter,
  instrument family: `encoding.conditions_of_notes`), the others (style, beat/fill,
  dataset) from the model (`infer_conditions`). With `condition_kinds` unknown, only
  drums with BAR tokens (`groove/drums_beats`) get their tempo bin and meter from the file:
  the grammar keeps bars whole only once it knows the meter.

  Returns:
    Continuation.

  Raises:
    MidiReadError: a missing or unreadable prompt file.
    MidijaxError: no usable notes.
  """
  from midijax import midi_io
  if prompt_seconds is not None and prompt_bars is not None:
    raise MidijaxError("give prompt_seconds or prompt_bars, not both")
  notes = midi_io.read_notes(prompt_path)
  if not is_drum_music(enc, notes=notes):
    notes = midi_io.apply_sustain(notes)  # as the piano builders encode pitched music
  if enc.name == "drums":
    notes = notes.select(notes.is_drum)
    if len(notes) == 0:
      raise MidijaxError(f"{prompt_path}: no drum notes for the drums model to continue")
  is_drum = is_drum_music(enc, notes=notes) if is_drum is None else is_drum
  if prompt_bars is not None:
    if prompt_bars <= 0:
      raise MidijaxError(f"prompt_bars must be positive, got {prompt_bars}")
    cut = prompt_bars * bar_seconds(notes)
  elif prompt_seconds is not None:
    if prompt_seconds <= 0:
      raise MidijaxError(f"prompt_seconds must be positive, got {prompt_seconds}")
    cut = float(prompt_seconds)
  else:
    cut = notes.total_time
  ids = encode_prompt(enc, notes, cut)
  if not np.any((ids >= enc.body_offset) & (ids < enc.bos_id)):
    raise MidijaxError(f"{prompt_path}: no notes in the first {cut:.2f} s to continue")
  conditions = dict(conditions or {})
  kinds = list(condition_kinds) if condition_kinds is not None else (
      ["tempo", "meter"] if getattr(enc, "bar_tokens", False) else [])
  for kind, value in conditions_of_notes(notes, kinds).items():
    conditions.setdefault(kind, value)
  to_infer = [k for k in kinds if k in INFERRED_KINDS and k not in conditions]
  # A prompt longer than the context is scored, as it is sampled from, by its latest tokens.
  context = int(cache_len or model.config.max_len)
  room = max(context - 1 - len(ordered_conditions(conditions)) - len(to_infer), 1)
  conditions, inferred = infer_conditions(model, enc, ids[-room:], conditions, kinds)
  if max_new_tokens is None:
    max_new_tokens = int(min(max(seconds or 0, 1) * 200, 1 << 16)) if seconds else 2048
  result = generate(model, enc, num_samples=num_samples, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    conditions=conditions, prompt_ids=ids, max_seconds=seconds,
                    constrained=constrained, window_keep=window_keep, cache_len=cache_len,
                    qpm=notes.qpm, kv_cache=kv_cache, guidance=guidance, mesh=mesh,
                    rules=rules)
  decode = functools.partial(enc.decode_notes, is_drum=is_drum, qpm=notes.qpm)
  return Continuation(prompt=decode(ids), full=[decode(t) for t in result.tokens],
                      continuation=[decode(t) for t in result.continuations], result=result,
                      prompt_seconds=cut, qpm=notes.qpm, is_drum=is_drum,
                      conditions=conditions, inferred=inferred)
