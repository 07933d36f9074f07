"""Attention backends, chosen by `config.model.attention_impl`, for training, prefill and
decoding alike.

Full-sequence causal self-attention (training, scoring, the sampler's prefill) goes through
`attend`; one new token over the key/value cache (the sampler's step) through
`decode_attention`. Backends (`ATTENTION_IMPLS`):

  auto         resolved per backend by `resolve_attention_impl`: on TPU `splash`, or
               `chunked` for relative attention (an additive bias) or attention dropout;
               on GPU `cudnn` (bfloat16 / float16, no bias, no dropout), else `xla`
               (no bias, no dropout), else `chunked`; on CPU today's choice: `cpu_kernel`
               where the C++ kernel can run (one CPU device, float32, no relative
               attention), else `cpu_blocked`.
  xla          `jax.nn.dot_product_attention(implementation="xla")`: dense [B, H, T, T]
               logits; no attention dropout, no relative attention.
  chunked      XLA, any backend: queries in chunks of `attention_block` tokens, each
               attending only to the keys up to its last query, each chunk recomputed in
               the backward pass (`jax.checkpoint`), so no [B, H, T, T] tensor exists;
               relative logits per chunk with the skewing trick; hash dropout on the
               probabilities; packing by segment ids. The accelerator path for Music
               Transformer's relative attention and for attention dropout.
  cudnn        `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash
               attention on NVIDIA GPUs; bfloat16 / float16, no bias, no dropout.
  splash       Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
               on TPU: causal block-sparse flash attention, packing by segment ids; no
               bias, no dropout; sequence a multiple of 128. On CPU only with
               `config.model.pallas_interpret` (Pallas interpret mode, for tests). Under a
               mesh it runs per shard (`jax.shard_map`, batch and heads split).
  cpu_blocked  XLA:CPU-tuned: the causal attention written out in query blocks that skip
               the masked triangle, with a written-out backward (`causal_block_attention`);
               relative bias, packing masks and hash dropout. CPU only.
  cpu_kernel   the C++ XLA FFI kernels of midijax/kernels on one CPU device (float32,
               causal, no bias): training / prefill attention and the decode step (also
               over an int8 cache); calls outside their scope (attention dropout, packed
               rows, lengths the block does not divide) run `cpu_blocked`.

Decoding reads the cache through `decode_attention`: the C++ decode kernel when the
backend is `cpu_kernel` (or `auto` on one CPU device) and the model is float32 without
relative attention, else XLA's batched matrix-vector products.

Shapes: B batch, T query length, S key length, H heads, Dh head dim, L cache length.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from midijax import sharding
from midijax.errors import ConfigError
from midijax.kernels import causal_attention as cpu_attention
from midijax.models import kv_cache
from midijax.models import layers

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash", "cpu_blocked", "cpu_kernel")
# Splash attention's tiles (tokens): the largest of these that divides the sequence.
SPLASH_BLOCKS = (512, 256, 128)
_CUDNN_DTYPES = ("bfloat16", "float16")


# ----------------------------------------------------------------------------- choosing
def _platform(backend: str) -> str:
  backend = backend.lower()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def resolve_attention_impl(cfg, backend: str, num_devices: int = 1, *,
                           seq_len: Optional[int] = None, packing: bool = False) -> str:
  """The attention backend a model config runs with on `backend`, checked before compiling.

  Args:
    cfg: a `TransformerConfig` (attention_impl, position, attention_dropout_rate, dtype,
      head_dim, pallas_interpret are read).
    backend: the platform compiled for: "cpu", "gpu" (or "cuda", "rocm") or "tpu" (for
      ahead-of-time compiles the target's, not this process's).
    num_devices: devices the program runs on (the CPU kernels need exactly one).
    seq_len: training sequence length (tokens), when known: splash needs a multiple of 128.
    packing: rows hold several pieces (segment ids); the cuDNN path takes no segments here.

  Returns:
    One of ATTENTION_IMPLS other than "auto".

  Raises:
    ConfigError: naming `model.attention_impl` (or the field in the way) when the chosen
      backend cannot run this config on `backend`.
  """
  impl, platform = cfg.attention_impl, _platform(backend)
  relative = cfg.position == "relative"
  dropout = cfg.attention_dropout_rate > 0
  dtype = jnp.dtype(cfg.dtype).name
  field = f"model.attention_impl={impl!r}"
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"{field}; expected one of {', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    if platform == "tpu":
      if relative or dropout or (seq_len is not None and seq_len % 128):
        return "chunked"
      return "splash"
    if platform == "gpu":
      if relative or dropout:
        return "chunked"
      if (dtype in _CUDNN_DTYPES and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
          and not packing):
        return "cudnn"
      return "xla"
    if (num_devices == 1 and not relative and dtype == "float32"
        and cpu_attention.available()):
      return "cpu_kernel"
    return "cpu_blocked"
  if impl in ("xla", "cudnn", "splash") and dropout:
    raise ConfigError(
        f"{field} has no attention dropout, but model.attention_dropout_rate="
        f"{cfg.attention_dropout_rate}: set it to 0 or use model.attention_impl='chunked'")
  if impl in ("xla", "cudnn", "splash", "cpu_kernel") and relative:
    raise ConfigError(
        f"{field} takes no relative-position bias (model.position='relative'); use "
        "model.attention_impl='chunked' (or 'auto')")
  if impl == "cudnn":
    if platform != "gpu":
      raise ConfigError(f"{field} needs an NVIDIA GPU; this target is {backend}")
    if dtype not in _CUDNN_DTYPES:
      raise ConfigError(f"{field} needs model.dtype bfloat16 or float16, got {dtype}")
    if cfg.head_dim > 128 or cfg.head_dim % 8:
      raise ConfigError(f"{field} needs a head dim (qkv_dim / num_heads) that is a multiple "
                        f"of 8 up to 128, got {cfg.head_dim}")
  if impl == "splash":
    if platform == "gpu" or (platform == "cpu" and not cfg.pallas_interpret):
      raise ConfigError(f"{field} is a TPU kernel; on {backend} it runs only with "
                        "model.pallas_interpret=True (slow; for tests)")
    if seq_len is not None and seq_len % 128:
      raise ConfigError(f"{field} needs data.seq_len to be a multiple of 128, got {seq_len}")
  if impl in ("cpu_blocked", "cpu_kernel") and platform != "cpu":
    raise ConfigError(f"{field} is tuned for XLA:CPU; on {backend} use 'auto', 'chunked' or "
                      "'xla'")
  if impl == "cpu_kernel":
    if num_devices != 1:
      raise ConfigError(f"{field} runs on one CPU device; this target has {num_devices}")
    if dtype != "float32":
      raise ConfigError(f"{field} needs model.dtype float32, got {dtype}")
    if not cpu_attention.available():
      raise ConfigError(f"{field}: the C++ kernel could not be built here (see the log; it "
                        "needs g++ and scipy-openblas32); use 'cpu_blocked'")
  return impl


# Backends each platform can run (splash on CPU only in interpret mode).
_RUNNABLE = {"cpu": ("xla", "chunked", "cpu_blocked", "cpu_kernel"),
             "gpu": ("xla", "chunked", "cudnn"), "tpu": ("xla", "chunked", "splash")}


def _trace_platform() -> str:
  """The platform being compiled for: the active mesh's devices' (an ahead-of-time TPU
  compile on a CPU host), else JAX's default backend."""
  mesh = sharding.active_mesh()
  if mesh is not None:
    return _platform(mesh.devices.flat[0].platform)
  return _platform(jax.default_backend())


def _call_impl(impl: str, relative: bool, dropout: bool, interpret: bool) -> str:
  """The backend a call runs: `impl`, or for "auto" (and for a backend this platform cannot
  run, e.g. a model trained with splash sampled on a CPU) the platform's own choice, as
  `resolve_attention_impl` makes it for training ("cpu_auto": the kernel where it applies)."""
  platform = _trace_platform()
  if impl == "splash" and interpret:
    return impl
  if impl != "auto" and impl in _RUNNABLE.get(platform, ()):
    return impl
  if platform == "cpu":
    return "cpu_auto"
  if platform == "tpu" and not (relative or dropout):
    return "splash"
  return "chunked" if relative or dropout else "xla"


# ----------------------------------------------------------------------------- relative
def skew(rel_logits: jax.Array) -> jax.Array:
  """Music Transformer "skewing": relative-distance logits -> query/key logits.

  Args:
    rel_logits: [..., C, W] for C queries at positions W-C..W-1 (the last C of W keys);
      column m is q . E_r for relative distance W-1-m.

  Returns:
    [..., C, W]; entry [r, j] = q_r . E_r for distance (W-C+r) - j when j <= W-C+r (the
    entries to the right are junk, removed by the causal mask). C = W is the paper's
    square case.
  """
  c, w = rel_logits.shape[-2:]
  lead = rel_logits.shape[:-2]
  padded = jnp.pad(rel_logits, [(0, 0)] * (rel_logits.ndim - 1) + [(1, 0)])
  if c == w:  # the paper's reshape: [T, T+1] -> [T+1, T], drop the first row
    return padded.reshape(lead + (c + 1, c))[..., 1:, :]
  flat = padded.reshape(lead + (c * (w + 1),))
  return flat[..., c:c + c * w].reshape(lead + (c, w))


def skew_by_shifts(rel_logits: jax.Array) -> jax.Array:
  """`skew` without its reshapes: row r shifted left by C-1-r in log2(C) steps, each a
  static slice, pad and select.

  The reshapes of `skew` move data across the minor dimension at odd strides (W+1), which
  TPU layouts handle badly (compiling chunked relative attention for T=2048 took many
  minutes); these steps are lane-aligned elementwise ops that XLA fuses. Same result as
  `skew` on the entries the causal mask keeps; the junk entries differ (zeros here).
  """
  c, w = rel_logits.shape[-2:]
  shift = (c - 1) - jnp.arange(c)  # [C]
  out = rel_logits
  bit = 1
  while bit < c:
    moved = jnp.pad(out[..., bit:], [(0, 0)] * (out.ndim - 1) + [(0, bit)])
    out = jnp.where(((shift & bit) != 0)[:, None], moved, out)
    bit *= 2
  return out


def relative_logits(q: jax.Array, table: jax.Array, num_distances: int) -> jax.Array:
  """q . E_r for the last `num_distances` rows of the table.

  Args:
    q: [B, T, H, Dh] queries (compute dtype).
    table: [H, max_len, Dh] relative embeddings; row m is distance max_len-1-m.
    num_distances: rows used (distances num_distances-1 .. 0).

  Returns:
    float32 [B, H, T, num_distances].
  """
  rows = table[:, table.shape[1] - num_distances:, :]
  return jnp.einsum("bthk,hmk->bhtm", q, rows.astype(q.dtype),
                    preferred_element_type=jnp.float32)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """bool [B, 1, T, T]: causal and within one packed piece."""
  t = segment_ids.shape[1]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_segment & jnp.tril(jnp.ones((t, t), bool)))[:, None]


# ----------------------------------------------------------------------------- cpu_blocked
def _attend_written_out(q, k, v, bias, allowed, dropout_rate, dropout_rng):
  """softmax(q k^T / sqrt(Dh) + bias, where allowed) v, dropout on the probabilities."""
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if dropout_rng is not None and dropout_rate > 0.0:
    probs = layers.dropout(probs, dropout_rate, dropout_rng)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def _rows(x: Optional[jax.Array], lo: int, hi: int, keys: int) -> Optional[jax.Array]:
  """Query rows lo:hi and keys :keys of a [.., T, S]-broadcastable bias or mask."""
  if x is None:
    return None
  rows = x[..., lo:hi, :] if x.shape[-2] > 1 else x
  return rows[..., :keys] if rows.shape[-1] > 1 else rows


def _causal_blocks(q, k, v, bias, mask, block: int, keep_threshold: Optional[int], seeds):
  """Blocked causal attention forward: (output [B, H, T, Dh], probabilities per block).

  q, k, v are [B, H, T, Dh] (heads first, so every block's products are plain batched
  matmuls over slices, with no per-block transposes). Block i holds queries
  i*block..(i+1)*block-1 and keys 0..(i+1)*block-1; its probabilities (before dropout)
  are [B, H, block, (i+1)*block] float32. With a `keep_threshold`, dropout on the
  probabilities uses hash bits of `layers.block_seeds`, which the backward pass
  recomputes instead of storing.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  outputs, probs = [], []
  for i in range(q.shape[2] // block):
    lo, hi = i * block, (i + 1) * block
    logits = jnp.einsum("bhtd,bhsd->bhts", q[:, :, lo:hi], k[:, :, :hi],
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
      logits = logits + _rows(bias, lo, hi, hi)
    # Query lo + r sees keys 0..lo + r; only the last key block is partly masked.
    allowed = jnp.tril(jnp.ones((block, hi), bool), k=lo)
    if mask is not None:
      allowed = allowed & _rows(mask, lo, hi, hi)
    p = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(jnp.float32).min), axis=-1)
    kept = p if keep_threshold is None else layers.drop(
        p, layers.hash_bits(p.shape, layers.block_seeds(seeds, i)), keep_threshold)
    outputs.append(jnp.einsum("bhts,bhsd->bhtd", kept.astype(v.dtype), v[:, :, :hi]))
    probs.append(p)
  return jnp.concatenate(outputs, axis=2), probs


def causal_block_attention(q, k, v, bias, mask, block: int, dropout_rate: float = 0.0,
                           dropout_rng: Optional[jax.Array] = None):
  """Causal attention in query blocks that skip the masked upper triangle (`cpu_blocked`).

  Equals the dense written-out attention; its gradient is written by hand so that the
  softmax backward uses rowsum(dO * O) (a [B, H, T] product, as flash attention does)
  instead of reducing dP * P over every T x T logit. That identity holds with dropout
  on the probabilities too, whose mask the backward pass recomputes from its hash seeds.
  It keeps every block's probabilities for the backward pass: fast on XLA:CPU, but
  [B, H, T, T/2] floats per layer (accelerators use `chunked`).

  Args:
    q, k, v: [B, T, H, Dh] (T a multiple of `block`).
    bias: None or float broadcastable to [B, H, T, T], added to the scaled logits.
    mask: None or bool broadcastable to [B, H, T, T] (True = may attend), on top of
      the causal mask.
    block: query block length (tokens).
    dropout_rate: dropout on the attention probabilities (needs `dropout_rng`).
    dropout_rng: PRNG key for that dropout.

  Returns:
    [B, T, H, Dh] in v's dtype.
  """
  keep_threshold = layers.keep_threshold(dropout_rate) if dropout_rng is not None else None
  seeds = (jnp.zeros((2,), jnp.uint32) if keep_threshold is None
           else jax.random.bits(dropout_rng, (2,), jnp.uint32))
  bias_shape, bias_dtype = (None, None) if bias is None else (tuple(bias.shape), bias.dtype)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, H, Dh] <-> [B, H, T, Dh]
  out = _causal_block_attention(heads_first(q), heads_first(k), heads_first(v), bias, mask,
                                seeds, block, keep_threshold, bias_shape, bias_dtype)
  return heads_first(out)


# Static arguments: the block, the dropout threshold and the bias's shape and dtype
# (residuals must be arrays).
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _causal_block_attention(q, k, v, bias, mask, seeds, block, keep_threshold, bias_shape,
                            bias_dtype):
  del bias_shape, bias_dtype
  return _causal_blocks(q, k, v, bias, mask, block, keep_threshold, seeds)[0]


def _causal_block_attention_fwd(q, k, v, bias, mask, seeds, block, keep_threshold,
                                bias_shape, bias_dtype):
  del bias_shape, bias_dtype
  out, probs = _causal_blocks(q, k, v, bias, mask, block, keep_threshold, seeds)
  return out, (q, k, v, out, probs, seeds)


def _causal_block_attention_bwd(block, keep_threshold, bias_shape, bias_dtype, residuals,
                                d_out):
  q, k, v, out, probs, seeds = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  t = q.shape[2]
  d_out = d_out.astype(jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  dq_blocks, d_logit_rows = [], []
  for i, p in enumerate(probs):
    lo, hi = i * block, (i + 1) * block
    d_o = d_out[:, :, lo:hi]
    bits = (None if keep_threshold is None
            else layers.hash_bits(p.shape, layers.block_seeds(seeds, i)))
    kept = p if bits is None else layers.drop(p, bits, keep_threshold)
    dv = dv.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", kept, d_o))
    dp = jnp.einsum("bhtd,bhsd->bhts", d_o, v[:, :, :hi], preferred_element_type=jnp.float32)
    if bits is not None:
      dp = layers.drop(dp, bits, keep_threshold)
    # sum_s P[t, s] dP[t, s] = dO[t] . O[t] (with dropout too: O is the dropped
    # probabilities times V): the softmax backward without a T x T reduce.
    delta = jnp.einsum("bhtd,bhtd->bht", d_o, out[:, :, lo:hi].astype(jnp.float32))
    d_logits = p * (dp - delta[..., None])  # masked entries: p = 0
    dq_blocks.append(jnp.einsum("bhts,bhsd->bhtd", d_logits, k[:, :, :hi],
                                preferred_element_type=jnp.float32) * scale)
    dk = dk.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", d_logits, q[:, :, lo:hi],
                                         preferred_element_type=jnp.float32) * scale)
    if bias_shape is not None:
      d_logit_rows.append(jnp.pad(d_logits, ((0, 0), (0, 0), (0, 0), (0, t - hi))))
  d_bias = None
  if bias_shape is not None:
    d_bias = jnp.concatenate(d_logit_rows, axis=2)  # [B, H, T, T]
    d_bias = jnp.sum(d_bias, axis=tuple(range(4 - len(bias_shape))))  # to the bias's rank
    broadcast = tuple(a for a, n in enumerate(bias_shape) if n == 1 and d_bias.shape[a] != 1)
    d_bias = jnp.sum(d_bias, axis=broadcast, keepdims=True).astype(bias_dtype)
  return (jnp.concatenate(dq_blocks, axis=2).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), d_bias, None, None)


_causal_block_attention.defvjp(_causal_block_attention_fwd, _causal_block_attention_bwd)


def _cpu_attention(q, k, v, *, bias, mask, dropout_rate, dropout_rng, block,
                   allow_kernel: bool) -> jax.Array:
  """`cpu_blocked` / `cpu_kernel`: causal attention as midijax has run it on XLA:CPU.

  The C++ kernel for float32 calls without bias, mask or dropout on one CPU device
  (1.6x XLA's blocked attention); else query blocks that skip the masked triangle
  (`causal_block_attention`); sequences too short for two blocks, dense.
  """
  use_dropout = dropout_rng is not None and dropout_rate > 0.0
  t = q.shape[1]
  # At least 4 blocks, so short sequences skip most of the triangle too (seed_course,
  # T=256: blocks of 64 made its training step 7% faster than blocks of 128).
  block = min(block, t // 4) if t >= 64 else block
  if (allow_kernel and bias is None and mask is None and not use_dropout and block
      and sharding.on_single_cpu_device() and cpu_attention.supports(q, k, v, block)
      and cpu_attention.available()):
    return cpu_attention.causal_attention(q, k, v, block)
  if not (block and t % block == 0 and t >= 2 * block):
    causal = jnp.tril(jnp.ones((t, t), bool))
    allowed = causal if mask is None else mask & causal
    return _attend_written_out(q, k, v, bias, allowed, dropout_rate,
                               dropout_rng if use_dropout else None)
  return causal_block_attention(q, k, v, bias, mask, block, dropout_rate,
                                dropout_rng if use_dropout else None)


# ----------------------------------------------------------------------------- chunked
def chunked_attention(q, k, v, *, segment_ids=None, relative_table=None,
                      dropout_rate: float = 0.0, dropout_rng=None, chunk: int = 512):
  """Causal flash attention written in JAX for any XLA backend (`chunked`).

  Queries and keys are split into blocks of `chunk` tokens. Query block i visits key
  blocks 0..i in a loop with an online softmax (blocks above the diagonal are never
  computed), keeping only its output and log-sum-exp; the backward pass loops again and
  recomputes each block's probabilities from them (the flash attention recipe). Memory is
  a few [B, H, chunk, chunk] float32 blocks at a time, never [B, H, T, T], and the loop
  bodies are compiled once, whatever the sequence length. With a relative table, block
  (i, j)'s relative logits are q_i . E_r for the 2 * chunk distances the block spans,
  skewed into place (`skew_by_shifts`). Dropout on the probabilities draws hash bits per
  block pair, recomputed identically in the backward pass.

  Args:
    q, k, v: [B, T, H, Dh].
    segment_ids: int [B, T] packing ids (attend within a piece), or None.
    relative_table: [H, max_len >= T, Dh] Music Transformer embeddings, or None.
    dropout_rate: drop probability of the attention probabilities.
    dropout_rng: key for that dropout (None: no dropout).
    chunk: block length (tokens); a T it does not divide is one block.

  Returns:
    [B, T, H, Dh] in v's dtype.
  """
  t = q.shape[1]
  chunk = chunk if chunk and t % chunk == 0 else t
  threshold = layers.keep_threshold(dropout_rate) if dropout_rng is not None else None
  seeds = (jnp.zeros((2,), jnp.uint32) if threshold is None
           else jax.random.bits(dropout_rng, (2,), jnp.uint32))
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  table_shape = None if relative_table is None else tuple(relative_table.shape)
  table_dtype = None if relative_table is None else relative_table.dtype
  out = _flash(heads_first(q), heads_first(k), heads_first(v), segment_ids, relative_table,
               seeds, chunk, threshold, table_shape, table_dtype)
  return heads_first(out)


def _pad_table(table, chunk: int):
  """[H, max_len + chunk, Dh] float32: `chunk` zero rows for the negative (future)
  distances a diagonal block's window reaches."""
  return jnp.pad(table.astype(jnp.float32), ((0, 0), (0, chunk), (0, 0)))


def _block_logits(q_i, k_j, table, segment_ids, i, j, chunk: int):
  """Scaled logits of query block i over key block j ([B, H, c, c] float32, masked
  entries at float32's minimum) and the relative window's table rows (or None)."""
  scale = 1.0 / math.sqrt(q_i.shape[-1])
  s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
  rows = None
  if table is not None:
    # Column m of the window is distance (i - j) * c + c - 1 - m; row max_len-1-d holds
    # distance d (the table is padded with `chunk` rows for negative distances).
    max_len = table.shape[1] - chunk
    start = max_len - (i - j) * chunk - chunk
    rows = jax.lax.dynamic_slice_in_dim(table, start, 2 * chunk, axis=1)  # [H, 2c, Dh]
    rel = jnp.einsum("bhqd,hmd->bhqm", q_i, rows.astype(q_i.dtype),
                     preferred_element_type=jnp.float32)
    s = s + skew_by_shifts(rel)[..., :chunk]
  s = s * scale
  query = i * chunk + jnp.arange(chunk)
  key = j * chunk + jnp.arange(chunk)
  allowed = (query[:, None] >= key[None, :])[None, None]
  if segment_ids is not None:
    seg_q = jax.lax.dynamic_slice_in_dim(segment_ids, i * chunk, chunk, axis=1)
    seg_k = jax.lax.dynamic_slice_in_dim(segment_ids, j * chunk, chunk, axis=1)
    allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :])[:, None]
  return jnp.where(allowed, s, jnp.finfo(jnp.float32).min), rows


def _block_bits(shape, seeds, i, j, num_blocks: int):
  return layers.hash_bits(shape, layers.block_seeds(seeds, i * num_blocks + j))


def _flash_forward(qh, kh, vh, segment_ids, table, seeds, chunk, threshold):
  """(output [B, H, T, Dh] in v's dtype, log-sum-exp [B, H, T] float32)."""
  b, h, t, dh = qh.shape
  n = t // chunk
  table = None if table is None else _pad_table(table, chunk)

  def query_block(i, carry):
    out, lse = carry
    q_i = jax.lax.dynamic_slice_in_dim(qh, i * chunk, chunk, axis=2)

    def key_block(j, acc):
      m, l, o = acc
      k_j = jax.lax.dynamic_slice_in_dim(kh, j * chunk, chunk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(vh, j * chunk, chunk, axis=2)
      s, _ = _block_logits(q_i, k_j, table, segment_ids, i, j, chunk)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      # A block wholly masked for a row gives it junk (exp(0)) until a real logit raises
      # its maximum; every row's diagonal block has one, and the correction zeroes it.
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      if threshold is not None:
        p = layers.drop(p, _block_bits(p.shape, seeds, i, j, n), threshold)
      o = o * correction[..., None] + jnp.einsum(
          "bhqk,bhkd->bhqd", p.astype(vh.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, l, o

    init = (jnp.full((b, h, chunk), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, chunk), jnp.float32), jnp.zeros((b, h, chunk, dh), jnp.float32))
    m, l, o = jax.lax.fori_loop(0, i + 1, key_block, init)
    out = jax.lax.dynamic_update_slice_in_dim(out, (o / l[..., None]).astype(out.dtype),
                                              i * chunk, axis=2)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * chunk, axis=2)
    return out, lse

  init = (jnp.zeros(qh.shape, vh.dtype), jnp.zeros((b, h, t), jnp.float32))
  return jax.lax.fori_loop(0, n, query_block, init)


# Static arguments: the chunk, the dropout threshold and the table's shape and dtype.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(qh, kh, vh, segment_ids, table, seeds, chunk, threshold, table_shape, table_dtype):
  del table_shape, table_dtype
  return _flash_forward(qh, kh, vh, segment_ids, table, seeds, chunk, threshold)[0]


def _flash_fwd(qh, kh, vh, segment_ids, table, seeds, chunk, threshold, table_shape,
               table_dtype):
  del table_shape, table_dtype
  out, lse = _flash_forward(qh, kh, vh, segment_ids, table, seeds, chunk, threshold)
  return out, (qh, kh, vh, segment_ids, table, seeds, out, lse)


def _flash_bwd(chunk, threshold, table_shape, table_dtype, residuals, d_out):
  qh, kh, vh, segment_ids, table, seeds, out, lse = residuals
  b, h, t, dh = qh.shape
  n = t // chunk
  scale = 1.0 / math.sqrt(dh)
  padded = None if table is None else _pad_table(table, chunk)
  d_out = d_out.astype(jnp.float32)
  # sum_k P dP = dO . O per query (with dropout too: O holds the dropped probabilities):
  # the softmax backward without reducing over keys.
  delta = jnp.einsum("bhqd,bhqd->bhq", d_out, out.astype(jnp.float32))
  # The skew's transpose, for the relative logits' gradient.
  unskew = None if table is None else jax.linear_transpose(
      lambda r: skew_by_shifts(r)[..., :chunk],
      jax.ShapeDtypeStruct((b, h, chunk, 2 * chunk), jnp.float32))

  def query_block(i, carry):
    dq, dk, dv, d_table = carry
    q_i = jax.lax.dynamic_slice_in_dim(qh, i * chunk, chunk, axis=2)
    do_i = jax.lax.dynamic_slice_in_dim(d_out, i * chunk, chunk, axis=2)
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * chunk, chunk, axis=2)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * chunk, chunk, axis=2)

    def key_block(j, acc):
      dq_i, dk, dv, d_table = acc
      k_j = jax.lax.dynamic_slice_in_dim(kh, j * chunk, chunk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(vh, j * chunk, chunk, axis=2)
      s, rows = _block_logits(q_i, k_j, padded, segment_ids, i, j, chunk)
      p = jnp.exp(s - lse_i[..., None])  # masked entries: 0
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j.astype(jnp.float32))
      kept = p
      if threshold is not None:
        bits = _block_bits(p.shape, seeds, i, j, n)
        kept = layers.drop(p, bits, threshold)
        dp = layers.drop(dp, bits, threshold)
      dv_j = jnp.einsum("bhqk,bhqd->bhkd", kept, do_i)
      ds = p * (dp - delta_i[..., None]) * scale  # d(q.k + rel) of this block
      dq_i = dq_i + jnp.einsum("bhqk,bhkd->bhqd", ds, k_j.astype(jnp.float32))
      dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds, q_i.astype(jnp.float32))
      add = lambda full, part: jax.lax.dynamic_update_slice_in_dim(
          full, jax.lax.dynamic_slice_in_dim(full, j * chunk, chunk, axis=2) + part,
          j * chunk, axis=2)
      dk, dv = add(dk, dk_j), add(dv, dv_j)
      if padded is not None:
        d_rel = unskew(ds)[0]  # [B, H, c, 2c]
        dq_i = dq_i + jnp.einsum("bhqm,hmd->bhqd", d_rel, rows.astype(jnp.float32))
        d_rows = jnp.einsum("bhqm,bhqd->hmd", d_rel, q_i.astype(jnp.float32))
        start = padded.shape[1] - chunk - (i - j) * chunk - chunk
        d_table = jax.lax.dynamic_update_slice_in_dim(
            d_table, jax.lax.dynamic_slice_in_dim(d_table, start, 2 * chunk, axis=1) + d_rows,
            start, axis=1)
      return dq_i, dk, dv, d_table

    dq_i, dk, dv, d_table = jax.lax.fori_loop(
        0, i + 1, key_block, (jnp.zeros((b, h, chunk, dh), jnp.float32), dk, dv, d_table))
    dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * chunk, axis=2)
    return dq, dk, dv, d_table

  zeros = jnp.zeros(qh.shape, jnp.float32)
  d_table = (jnp.zeros((1,), jnp.float32) if padded is None
             else jnp.zeros(padded.shape, jnp.float32))
  dq, dk, dv, d_table = jax.lax.fori_loop(0, n, query_block, (zeros, zeros, zeros, d_table))
  d_table = None if table is None else d_table[:, :table_shape[1]].astype(table_dtype)
  return (dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, d_table, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- splash
def splash_block(seq_len: int) -> int:
  """Splash attention's tile for a sequence: the largest of SPLASH_BLOCKS dividing it."""
  for block in SPLASH_BLOCKS:
    if seq_len % block == 0:
      return block
  raise ValueError(f"splash attention needs a sequence length divisible by 128, got {seq_len}")


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = splash_block(seq_len)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret), splash.SegmentIds


def splash_attention(q, k, v, *, segment_ids=None, interpret: bool = False) -> jax.Array:
  """Causal Pallas splash attention (`splash`).

  Args:
    q, k, v: [B, T, H, Dh], T a multiple of 128.
    segment_ids: int [B, T] packing ids, or None.
    interpret: run the Pallas kernel in interpret mode (CPU tests).

  Returns:
    [B, T, H, Dh] in q's dtype. Under `sharding.use_mesh` the kernel runs per shard
    (`jax.shard_map`), with the batch and heads split as the logical rules split them.
  """
  t, dh = q.shape[1], q.shape[3]
  # The kernel does not scale the logits.
  q = q * jnp.asarray(1.0 / math.sqrt(dh), q.dtype)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)

  def local(qh, kh, vh, *segments):
    kernel, segment_type = _splash_kernel(qh.shape[1], t, interpret)
    if not segments:
      return jax.vmap(kernel)(qh, kh, vh)
    return jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=segment_type(s, s)))(
        qh, kh, vh, segments[0])

  args = (qh, kh, vh) + (() if segment_ids is None else (segment_ids,))
  mesh = sharding.active_mesh()
  if mesh is None or mesh.size == 1:
    out = local(*args)
  else:
    spec = sharding.activation_spec(("batch", "heads", "length", "kv"))
    specs = (spec,) * 3 + (() if segment_ids is None
                           else (sharding.activation_spec(("batch", "length")),))
    out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec,
                        check_vma=False)(*args)
  return heads_first(out)


# ----------------------------------------------------------------------------- attend
def attend(q, k, v, *, impl: str = "auto", segment_ids=None, relative_table=None,
           dropout_rate: float = 0.0, dropout_rng=None, block: int = 128,
           interpret: bool = False) -> jax.Array:
  """Causal self-attention over a whole sequence through backend `impl`.

  Args:
    q, k, v: [B, T, H, Dh] queries, keys, values of positions 0..T-1 (rope applied).
    impl: one of ATTENTION_IMPLS (normally resolved by `resolve_attention_impl`; "auto",
      or a backend the platform compiled for cannot run, resolves for that platform).
    segment_ids: int [B, T] packing ids: tokens attend only within their piece.
    relative_table: [H, max_len, Dh] relative-position embeddings (Music Transformer),
      adding q_i . E[i - j] / sqrt(Dh) to the logits; None for none.
    dropout_rate: drop probability of the attention probabilities.
    dropout_rng: key; dropout is applied only if given and rate > 0.
    block: query block / chunk (tokens) of the cpu_blocked and chunked backends.
    interpret: Pallas interpret mode for `splash` (CPU tests).

  Returns:
    [B, T, H, Dh].
  """
  use_dropout = dropout_rng is not None and dropout_rate > 0.0
  rng = dropout_rng if use_dropout else None
  t = q.shape[1]
  if relative_table is not None and t > relative_table.shape[1]:
    raise ValueError(f"Relative attention supports up to max_len={relative_table.shape[1]} "
                     f"tokens, got {t}.")
  impl = _call_impl(impl, relative_table is not None, use_dropout, interpret)
  if impl == "splash" and relative_table is None and not use_dropout and t % 128 == 0:
    return splash_attention(q, k, v, segment_ids=segment_ids, interpret=interpret)
  if impl in ("chunked", "splash", "xla", "cudnn") and (
      impl == "chunked" or use_dropout or relative_table is not None):
    # Dropout or a relative bias, which the fused kernels do not take, run chunked too.
    return chunked_attention(q, k, v, segment_ids=segment_ids, relative_table=relative_table,
                             dropout_rate=dropout_rate, dropout_rng=rng, chunk=block)
  mask = None if segment_ids is None else segment_mask(segment_ids)
  if impl in ("splash", "xla", "cudnn"):  # splash: a length it cannot tile (a prompt)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation="cudnn" if impl == "cudnn" else "xla")
  # cpu_blocked, cpu_kernel, or auto on CPU (today's choice: the kernel where it applies).
  bias = None
  if relative_table is not None:
    bias = skew(relative_logits(q, relative_table, t)) / math.sqrt(q.shape[-1])
  return _cpu_attention(q, k, v, bias=bias, mask=mask, dropout_rate=dropout_rate,
                        dropout_rng=rng, block=block, allow_kernel=impl != "cpu_blocked")


# ----------------------------------------------------------------------------- decoding
def decode_uses_cpu_kernel(impl: str, position: str, dtype, mesh=None) -> bool:
  """Whether decode steps (traced now, or under `mesh`) attend through the C++ kernel.

  midijax/kernels' decode attention reads exactly the filled cache slots on both cores,
  where XLA's batched matrix-vector products ran on one: for backend auto or cpu_kernel,
  on one CPU device, float32 models without relative attention (whose bias it does not
  take).
  """
  return (impl in ("auto", "cpu_kernel") and position != "relative"
          and jnp.dtype(dtype) == jnp.float32 and sharding.on_single_cpu_device(mesh)
          and cpu_attention.available())


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: kv_cache.LayerCache,
                     pos: jax.Array, *, relative_table: Optional[jax.Array] = None,
                     use_kernel: bool = False):
  """One new token per row attending to cache slots 0..pos-1 and itself, then stored.

  Attention reads the cache as it was (positions < pos) and the new key/value
  separately, and only then writes them into slot `pos`: with the write the last use of
  the old cache, XLA updates it in place instead of copying it every step. An int8 cache
  stores the new key and value quantized and attends to them as stored. With
  `use_kernel` (see `decode_uses_cpu_kernel`) the CPU decode kernels do all of this.

  Args:
    q, k, v: [B, H, Dh] the new token's query, key and value (compute dtype).
    cache: the layer's cache; slots < pos are filled.
    pos: int32 scalar position of the new token (< cache.length).
    relative_table: [H, max_len, Dh] for relative attention (cache.length <= max_len).
    use_kernel: attend through the C++ decode kernels.

  Returns:
    (float32 [B, H, Dh] attention output, the cache with slot `pos` written).
  """
  keys, values = cache.k, cache.v
  quantized = cache.kind == "int8"
  if use_kernel:
    if not quantized and cpu_attention.decode_supports(q, keys, values):
      out, k_new, v_new = cpu_attention.decode_attention(q, k, v, keys, values, pos)
      return out, cache.replace(k=k_new, v=v_new).constrained()
    if quantized and cpu_attention.decode_supports_int8(q, keys, values, cache.k_scale,
                                                        cache.v_scale):
      out, *arrays = cpu_attention.decode_attention_int8(q, k, v, keys, values, cache.k_scale,
                                                         cache.v_scale, pos)
      return out, cache.replace(**dict(zip(("k", "v", "k_scale", "v_scale"), arrays))
                                ).constrained()
  new = cache.encode(k, v)
  if quantized:
    # The new token is attended to as stored (int8), as the kernel does.
    k = kv_cache.dequantize_kv(new["k"], new["k_scale"], q.dtype)
    v = kv_cache.dequantize_kv(new["v"], new["v_scale"], jnp.float32)
  length = cache.length
  scale = 1.0 / math.sqrt(q.shape[-1])
  old = jnp.einsum("bhd,bhds->bhs" if cache.keys_transposed else "bhd,bhsd->bhs", q,
                   keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
  if quantized:
    old = old * cache.k_scale
  new_logit = jnp.einsum("bhd,bhd->bh", q, k, preferred_element_type=jnp.float32) * scale
  if relative_table is not None:
    # q . E[distance], distance = pos - s: the last `length` rows of E (row m is distance
    # length-1-m) read from offset length-1-pos; the zero padding lands on s > pos.
    rel = relative_logits(q[:, None], relative_table, length)[:, :, 0]  # [B, H, length]
    new_logit = new_logit + rel[:, :, -1] * scale
    rel = jnp.pad(rel, ((0, 0), (0, 0), (0, length)))
    old = old + jax.lax.dynamic_slice_in_dim(rel, length - 1 - pos, length, axis=2) * scale
  # Slots >= pos hold nothing yet (or a previous window's keys).
  old = jnp.where(jnp.arange(length) < pos, old, -jnp.inf)
  top = jnp.maximum(jnp.max(old, axis=-1), new_logit)
  p_old = jnp.exp(old - top[..., None])
  p_new = jnp.exp(new_logit - top)
  total = jnp.sum(p_old, axis=-1) + p_new
  if quantized:  # sum_s p_s (code_s * step_s) = sum_s (p_s * step_s) code_s
    p_old, values = p_old * cache.v_scale, values.astype(q.dtype)
  out = jnp.einsum("bhs,bhsd->bhd", p_old.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  out = (out + p_new[..., None] * v.astype(jnp.float32)) / total[..., None]
  # Make the writes depend on `out` (x * 0.0 is not folded for floats), so they follow
  # the reads above (see LayerCache.with_slot).
  after = out[:, :, 0] * 0.0  # [B, H]
  return out, cache.with_slot(pos, new, after)
