"""Decoder-only Transformer for symbolic music, in Flax NNX.

Reads top-down: `TransformerConfig`, small layers (norm, MLP, dropout, position
encodings), `Attention`, `Block`, `Transformer` (training forward pass and the
key/value-cache `decode` used for sampling), then parameter and FLOP counts.

Shapes: B batch, T query length, S key length, D emb_dim, H num_heads,
Dh head_dim = qkv_dim // num_heads, F mlp_dim, V padded vocab, L layers.

Three position encodings:
  * "sinusoidal": fixed sin/cos table added to the token embeddings.
  * "rope": rotary embeddings applied to queries and keys.
  * "relative": Music Transformer relative attention (Huang et al. 2018): each head
    has its own learned embedding per relative distance 0..max_len-1, shape
    [H, max_len, Dh] (tensor2tensor's `heads_share_relative_embedding=False`),
    giving logits q_i . E[i - j] added to q_i . k_j. The full forward pass uses
    the memory-efficient "skewing" trick (O(T*L) memory instead of O(T^2*Dh)).

Every parameter carries logical axis names (NNX `out_sharding` metadata) that
`midijax.sharding` maps to mesh axes; parameters are created unplaced
(`eager_sharding=False`) so the model builds without a mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from midijax import sharding
from midijax.errors import ConfigError
from midijax.kernels import causal_attention as cpu_attention
from midijax.sharding import with_logical_constraint

# Padded vocab entries get this logit: never sampled, and finite so that
# temperature scaling or `0 * logit` in a loss cannot produce inf / NaN.
MASKED_LOGIT = -1e9
# Vocab is padded to a multiple of this for lane-aligned matmuls and so the vocab
# dim splits evenly over tensor-parallel devices.
VOCAB_MULTIPLE = 128

POSITIONS = ("sinusoidal", "rope", "relative")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "relu", "swiglu")
DTYPES = (jnp.dtype("float32"), jnp.dtype("bfloat16"), jnp.dtype("float16"))

# Decode cache: one {"k", "v"} dict per layer, arrays [B, S, H, Dh] with these
# logical axes (for sharding the cache with midijax.sharding).
Cache = list[dict[str, jax.Array]]
CACHE_AXES = ("batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the decoder-only Transformer.

  Attributes:
    vocab_size: number of real token ids; the model pads to `padded_vocab_size`.
    emb_dim: residual stream width D.
    num_heads: attention heads H.
    num_layers: Transformer blocks L.
    qkv_dim: total query/key/value width; per-head dim is qkv_dim // num_heads.
    mlp_dim: hidden width F of the feed-forward block.
    max_len: longest sequence (tokens) the model is used on; also the largest
      relative distance + 1 for "relative" attention.
    dropout_rate: dropout on embeddings and on each residual branch output.
    attention_dropout_rate: dropout on attention probabilities.
    position: "sinusoidal", "rope" or "relative".
    norm: "rmsnorm" or "layernorm" (pre-norm blocks plus a final norm).
    mlp_activation: "gelu" or "relu" (2 matrices; relu is PyTorch's
      nn.TransformerEncoderLayer default, the course project's) or "swiglu" (3
      matrices, gated).
    tied_embeddings: if True the output projection is the embedding table.
    dtype: compute dtype (float32 on CPU, bfloat16 on TPU/GPU); a name or dtype.
    param_dtype: parameter storage dtype.
    deterministic: default for dropout; True disables it (eval / sampling).
    rope_max_wavelength: longest RoPE wavelength (tokens).
    norm_epsilon: added to the variance in norms.
    attention_block: largest query block (tokens) of the written-out causal
      attention (CPU, or any backend with attention dropout); sequences of 64 tokens
      or more use at most T/4. Query block i attends only to keys 0..(i+1)*block-1,
      skipping the masked upper triangle (T=1024, block 128: 56% of the T x T
      work). 0 = one dense T x T block.
  """
  vocab_size: int
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  qkv_dim: int = 512
  mlp_dim: int = 2048
  max_len: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  position: str = "rope"
  norm: str = "rmsnorm"
  mlp_activation: str = "swiglu"
  tied_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = False
  rope_max_wavelength: float = 10_000.0
  norm_epsilon: float = 1e-6
  attention_block: int = 128

  def __post_init__(self):
    # The one place model fields are checked. A TransformerConfig is built from a run's
    # config.model (midijax.runs.model_config_from), so errors name that field.
    def bad(field: str, why: str):
      raise ConfigError(f"config.model.{field}={getattr(self, field)!r} {why}")

    for field, allowed in (("position", POSITIONS), ("norm", NORMS),
                           ("mlp_activation", ACTIVATIONS)):
      if getattr(self, field) not in allowed:
        bad(field, f"; expected one of {allowed}")
    for field in ("dtype", "param_dtype"):
      try:
        dtype = jnp.dtype(getattr(self, field))
      except TypeError:
        dtype = None
      if dtype not in DTYPES:
        bad(field, "; expected float32 | bfloat16 | float16")
      # Accept dtype names from ConfigDicts ("bfloat16").
      object.__setattr__(self, field, dtype)
    for field in ("emb_dim", "num_heads", "num_layers", "qkv_dim", "mlp_dim", "max_len"):
      if getattr(self, field) <= 0:
        bad(field, "must be positive")
    if self.qkv_dim % self.num_heads:
      bad("num_heads", f"must divide config.model.qkv_dim={self.qkv_dim}")
    if self.position == "sinusoidal" and self.emb_dim % 2:
      bad("emb_dim", "must be even for sinusoidal positions")
    if self.position == "rope" and self.head_dim % 2:
      bad("qkv_dim", f"/ num_heads = {self.head_dim} must be even for rope positions")
    for field in ("dropout_rate", "attention_dropout_rate"):
      if not 0 <= getattr(self, field) < 1:
        bad(field, "must be in [0, 1)")
    if self.attention_block < 0:
      bad("attention_block", "must be >= 0 (0 = dense attention)")

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def head_dim(self) -> int:
    return self.qkv_dim // self.num_heads

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- small layers


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[Optional[str]],
           dtype) -> nnx.Param:
  """A parameter initialized by `init`, annotated with logical axis `names`."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(names), eager_sharding=False)


def _fan_in_init(in_axis, out_axis):
  """Truncated-normal init with variance 1 / fan_in over the given kernel axes."""
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


# Projections x [..., K] @ w [K, N] go through `dense`, whose gradient is written out so
# that the weight gradient is one matmul over the flattened rows, x2 [rows, K]^T @
# dy2 [rows, N], with a single contracting axis. Autodiff of the einsum contracts two
# axes (batch, length), and XLA:CPU lowered that by first copying the activation
# transposed (70-145 ms per [8192, 2048] MLP activation on the 2-core CPU).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in `out_dtype` (default: the inputs' dtype).

  A plain matmul (accumulating in float32 with out_dtype=float32 for bfloat16 inputs);
  see above for its gradient.
  """
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=out_dtype)


def _dense_fwd(x, w, out_dtype):
  return dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, residuals, dy):
  del out_dtype
  x, w = residuals
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.kind = config.norm
    self.epsilon = config.norm_epsilon
    self.dtype = config.dtype
    dim, pdt = config.emb_dim, config.param_dtype
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), pdt)
    if self.kind == "layernorm":
      self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the compute dtype."""
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    x = x * self.scale[...].astype(jnp.float32)
    if self.kind == "layernorm":
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


class Mlp(nnx.Module):
  """Feed-forward block: GELU or ReLU (D->F->D), or SwiGLU (silu(x Wg) * (x Wu) -> D)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.activation = config.mlp_activation
    self.dtype = config.dtype
    d, f, pdt = config.emb_dim, config.mlp_dim, config.param_dtype
    init = _fan_in_init(0, 1)
    self.wi = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    if self.activation == "swiglu":
      self.wi_gate = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.wo = _param(rngs, init, (f, d), ("mlp", "embed"), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    h = dense(x, self.wi[...].astype(self.dtype))
    if self.activation == "swiglu":
      h = jax.nn.silu(dense(x, self.wi_gate[...].astype(self.dtype))) * h
    elif self.activation == "relu":
      h = jax.nn.relu(h)
    else:
      h = jax.nn.gelu(h)
    h = with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(h, self.wo[...].astype(self.dtype))


# Dropout's keep/drop bits come from a counter-based hash, not from jax.random: each
# element's (row, column) index is mixed with two 32-bit words drawn once per call from
# the key by two rounds of MurmurHash3's 32-bit finalizer (integer multiplies, xors and
# shifts that XLA fuses into the ops that apply the mask, so no mask is materialized or
# stored for the backward pass). Dropout needs decorrelated bits, not cryptographic ones;
# threefry (jax.random.bits) spends ~20 rounds per 64 bits. Measured on the 2-core CPU
# machine, seed_course training step with dropout 0.1 (batch 32 x 256 tokens): dropout
# cost 17% of the step with threefry bits (8 bits per element, the cheapest jax.random
# option measured: bernoulli was 4-10x dearer, rbg keys slower on CPU) and about 5% with
# the hash. Any key implementation works (only two words are drawn from it). The keep
# probability is exact to 2^-32; kept values are scaled by its inverse, so E[output] = x.
_HASH_MUL_1 = 0x85EBCA6B
_HASH_MUL_2 = 0xC2B2AE35
_WEYL = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection of uint32 with full avalanche)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_HASH_MUL_1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_HASH_MUL_2)
  return h ^ (h >> 16)


def hash_bits(shape: Sequence[int], seeds: jax.Array) -> jax.Array:
  """uint32 pseudo-random bits for every element of `shape`.

  Args:
    shape: the array shape.
    seeds: uint32 [2], e.g. `jax.random.bits(key, (2,), jnp.uint32)`.

  Returns:
    uint32 array of `shape`; element (row, col) (row = flat index of the leading dims,
    col = index in the last) is fmix32(fmix32(row * W + s0) ^ (col * W' + s1)).
  """
  shape = tuple(shape) or (1,)
  rank = len(shape)
  row = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(rank - 2, -1, -1):
    row = row + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  col = jax.lax.broadcasted_iota(jnp.uint32, shape, rank - 1)
  h = _fmix32(row * jnp.uint32(_WEYL) + seeds[0])
  return _fmix32(h ^ (col * jnp.uint32(_HASH_MUL_1) + seeds[1]))


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Inverted dropout.

  Args:
    x: any-shaped activation.
    rate: drop probability in [0, 1) (exact to 2^-32).
    rng: PRNG key (any key implementation).

  Returns:
    `x` with elements zeroed and the rest scaled so E[output] = x.
  """
  keep_threshold = _keep_threshold(rate)
  if keep_threshold is None:
    return x
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  return _drop(x, hash_bits(x.shape, seeds).reshape(x.shape), keep_threshold)


def _keep_threshold(rate: float) -> Optional[int]:
  """uint32 threshold below which hash bits keep an element; None = keep everything."""
  keep_threshold = round((1.0 - rate) * 2**32)
  if rate <= 0.0 or keep_threshold >= 2**32:
    return None
  return max(keep_threshold, 1)


def _drop(x: jax.Array, bits: jax.Array, keep_threshold: int) -> jax.Array:
  """Zeroes x where bits >= keep_threshold and scales the rest by 2^32 / keep_threshold."""
  return jnp.where(bits < jnp.uint32(keep_threshold),
                   x * jnp.asarray(2**32 / keep_threshold, x.dtype), jnp.zeros_like(x))


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed sin/cos position encodings (Vaswani et al. 2017).

  Args:
    positions: int [B, T] token positions.
    dim: encoding width (even).

  Returns:
    float32 [B, T, dim]: sin in the first half, cos in the second, wavelengths
    geometric from 2*pi to 10000*2*pi.
  """
  half = dim // 2
  inv_freq = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate half" layout.

  Args:
    x: [B, T, H, Dh] queries or keys.
    positions: int [B, T] (or [1, T]) absolute positions.
    max_wavelength: longest wavelength (tokens).

  Returns:
    [B, T, H, Dh] in the dtype of `x`; rotation computed in float32.
  """
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, :, None, None] / timescale  # [B, T, 1, Dh/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def _skew(rel_logits: jax.Array) -> jax.Array:
  """Music Transformer "skewing": relative-distance logits -> query/key logits.

  Args:
    rel_logits: [B, H, T, T]; entry [i, m] is q_i . E_r for distance T-1-m.

  Returns:
    [B, H, T, T]; entry [i, j] = q_i . E_r for distance i - j when j <= i (the
    entries above the diagonal are junk, removed by the causal mask).
  """
  b, h, t, _ = rel_logits.shape
  padded = jnp.pad(rel_logits, ((0, 0), (0, 0), (0, 0), (1, 0)))
  return padded.reshape(b, h, t + 1, t)[:, :, 1:, :]


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
    probs = dropout(probs, dropout_rate, dropout_rng)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def _rows(x: Optional[jax.Array], lo: int, hi: int, keys: int) -> Optional[jax.Array]:
  """Query rows lo:hi and keys :keys of a [.., T, S]-broadcastable bias or mask."""
  if x is None:
    return None
  rows = x[..., lo:hi, :] if x.shape[-2] > 1 else x
  return rows[..., :keys] if rows.shape[-1] > 1 else rows


def _block_seeds(seeds: jax.Array, i: int) -> jax.Array:
  """Dropout hash seeds of query block i (uint32 [2])."""
  return jnp.stack([_fmix32(seeds[0] + jnp.uint32(i * _WEYL % 2**32)), seeds[1]])


def _causal_blocks(q, k, v, bias, mask, block: int, keep_threshold: Optional[int], seeds):
  """Blocked causal attention forward: (output [B, H, T, Dh], probabilities per block).

  q, k, v are [B, H, T, Dh] (heads first, so every block's products are plain batched
  matmuls over slices, with no per-block transposes). Block i holds queries
  i*block..(i+1)*block-1 and keys 0..(i+1)*block-1; its probabilities (before dropout) are [B, H, block, (i+1)*block] float32. With a
  `keep_threshold`, dropout on the probabilities uses hash bits of `_block_seeds`, which
  the backward pass recomputes instead of storing.
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
    kept = p if keep_threshold is None else _drop(
        p, hash_bits(p.shape, _block_seeds(seeds, i)), keep_threshold)
    outputs.append(jnp.einsum("bhts,bhsd->bhtd", kept.astype(v.dtype), v[:, :, :hi]))
    probs.append(p)
  return jnp.concatenate(outputs, axis=2), probs


def causal_block_attention(q, k, v, bias, mask, block: int, dropout_rate: float = 0.0,
                           dropout_rng: Optional[jax.Array] = None):
  """Causal attention in query blocks that skip the masked upper triangle.

  Equals the dense written-out attention; its gradient is written by hand so that the
  softmax backward uses rowsum(dO * O) (a [B, H, T] product, as flash attention does)
  instead of reducing dP * P over every T x T logit. That identity holds with dropout
  on the probabilities too, whose mask the backward pass recomputes from its hash seeds.

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
  keep_threshold = _keep_threshold(dropout_rate) if dropout_rng is not None else None
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
    bits = None if keep_threshold is None else hash_bits(p.shape, _block_seeds(seeds, i))
    kept = p if bits is None else _drop(p, bits, keep_threshold)
    dv = dv.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", kept, d_o))
    dp = jnp.einsum("bhtd,bhsd->bhts", d_o, v[:, :, :hi], preferred_element_type=jnp.float32)
    if bits is not None:
      dp = _drop(dp, bits, keep_threshold)
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


def attend(q, k, v, *, bias=None, mask=None, is_causal=False,
           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
           block: int = 0) -> jax.Array:
  """Scaled dot-product attention, with optional dropout on the probabilities.

  Without attention dropout on GPU/TPU this is `jax.nn.dot_product_attention`
  (its `implementation="cudnn"` fused kernel is the upgrade path on GPU). On one CPU
  device, causal float32 attention without bias, mask or dropout runs through the C++
  kernel in `midijax.kernels.causal_attention` (same block size). Otherwise (attention
  dropout, which dot_product_attention lacks, or XLA:CPU, where it is faster) the same
  math is written out here. Written out and causal, it runs in
  query blocks of `block` tokens, block i attending only to keys up to its last
  query: the masked upper triangle (almost half the T x T logits, softmax and
  their gradients) is never computed.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, H, Dh].
    bias: float, broadcastable to [B, H, T, S], added to the scaled logits.
    mask: bool, broadcastable to [B, H, T, S]; True = may attend.
    is_causal: also apply a causal mask (query t sees keys <= t).
    dropout_rate: drop probability of attention probabilities.
    dropout_rng: key; dropout is applied only if given and rate > 0.
    block: query block (tokens) of the written-out causal path; 0 = dense.

  Returns:
    [B, T, H, Dh].
  """
  use_dropout = dropout_rng is not None and dropout_rate > 0.0
  # XLA:CPU runs the written-out form faster than dot_product_attention (causal, T=1024,
  # forward + backward: 1.09 s vs 1.62 s on the 2-core CPU), so CPUs take it too.
  if not use_dropout and jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
  t, s = q.shape[1], k.shape[1]
  # At least 4 blocks, so short sequences skip most of the triangle too (seed_course,
  # T=256: blocks of 64 made its training step 7% faster than blocks of 128).
  block = min(block, t // 4) if t >= 64 else block
  # On one CPU device, the C++ kernel (midijax/kernels): 1.6x XLA's blocked attention.
  if (is_causal and bias is None and mask is None and not use_dropout and block and t == s
      and sharding.on_single_cpu_device() and cpu_attention.supports(q, k, v, block)
      and cpu_attention.available()):
    return cpu_attention.causal_attention(q, k, v, block)
  if not (is_causal and block and t == s and t % block == 0 and t >= 2 * block):
    allowed = mask
    if is_causal:
      causal = jnp.tril(jnp.ones((t, s), bool))
      allowed = causal if allowed is None else allowed & causal
    return _attend_written_out(q, k, v, bias, allowed, dropout_rate,
                               dropout_rng if use_dropout else None)
  return causal_block_attention(q, k, v, bias, mask, block, dropout_rate,
                                dropout_rng if use_dropout else None)


class Attention(nnx.Module):
  """Causal multi-head self-attention with sinusoidal / rope / relative positions."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, h, dh, pdt = config.emb_dim, config.num_heads, config.head_dim, config.param_dtype
    qkv_init = _fan_in_init(0, (1, 2))
    self.query = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.key = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.value = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.out = _param(rngs, _fan_in_init((0, 1), 2), (h, dh, d), ("heads", "kv", "embed"), pdt)
    if config.position == "relative":
      # Row m holds relative distance max_len - 1 - m (distance 0 is the last row),
      # the order the skewing trick reads them in.
      self.relative_embedding = _param(
          rngs, nnx.initializers.normal(dh ** -0.5), (h, config.max_len, dh),
          ("heads", "relpos", "kv"), pdt)

  def _project_qkv(self, x: jax.Array, positions: jax.Array):
    """[B, T, D] -> q, k, v each [B, T, H, Dh] (rope applied to q and k)."""
    dtype = self.config.dtype
    # Three matmuls: one fused [D, 3*H*Dh] projection measured slower per training step on
    # XLA:CPU (8% with einsums, 3% through `dense`: the split outputs cost transposes).
    def project(w):  # [D, H, Dh] -> [B, T, H, Dh]
      d, h, dh = w.shape
      return dense(x, w.reshape(d, h * dh).astype(dtype)).reshape(x.shape[:-1] + (h, dh))
    q, k, v = project(self.query[...]), project(self.key[...]), project(self.value[...])
    if self.config.position == "rope":
      q = apply_rope(q, positions, self.config.rope_max_wavelength)
      k = apply_rope(k, positions, self.config.rope_max_wavelength)
    names = ("batch", "length", "heads", "kv")
    return (with_logical_constraint(q, names), with_logical_constraint(k, names),
            with_logical_constraint(v, names))

  def _relative_logits(self, q: jax.Array, num_distances: int) -> jax.Array:
    """q . E_r for the last `num_distances` rows of E_r: [B, H, T, num_distances] f32."""
    table = self.relative_embedding[:, self.config.max_len - num_distances:, :]
    return jnp.einsum("bthk,hmk->bhtm", q, table.astype(self.config.dtype),
                      preferred_element_type=jnp.float32)

  def _output(self, encoded: jax.Array) -> jax.Array:
    """[B, T, H, Dh] -> [B, T, D]."""
    h, dh, d = self.out.shape
    w = self.out[...].reshape(h * dh, d).astype(self.config.dtype)
    return dense(encoded.reshape(encoded.shape[:-2] + (h * dh,)), w)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: Optional[jax.Array],
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Full-sequence causal attention (training / scoring).

    Args:
      x: [B, T, D] normalized input.
      positions: int [B, T] (or [1, T]) positions, for rope.
      mask: bool [B, 1, T, T] packing (segment) mask, or None for plain causal.
      dropout_rng: key for attention dropout, None for none.

    Returns:
      [B, T, D].
    """
    q, k, v = self._project_qkv(x, positions)
    bias = None
    if self.config.position == "relative":
      t = x.shape[1]
      if t > self.config.max_len:
        raise ValueError(f"Relative attention supports up to max_len={self.config.max_len} "
                         f"tokens, got {t}.")
      bias = _skew(self._relative_logits(q, t)) / math.sqrt(self.config.head_dim)
    # `mask` (packing) already holds the causal mask; is_causal lets attend skip blocks.
    encoded = attend(q, k, v, bias=bias, mask=mask, is_causal=True,
                     dropout_rate=self.config.attention_dropout_rate, dropout_rng=dropout_rng,
                     block=self.config.attention_block)
    return self._output(encoded)

  def decode(self, x: jax.Array, cache: dict[str, jax.Array], start_index: jax.Array):
    """Attention for T new tokens at cache positions start_index..start_index+T-1.

    Args:
      x: [B, T, D] normalized input of the new tokens.
      cache: {"k", "v"}: [B, S, H, Dh] keys/values of positions < start_index.
      start_index: int32 scalar, cache position of the first new token.

    Returns:
      ([B, T, D] output, updated cache).
    """
    t, s = x.shape[1], cache["k"].shape[1]
    query_pos = start_index + jnp.arange(t, dtype=jnp.int32)  # [T]
    q, k, v = self._project_qkv(x, query_pos[None, :])
    cache = {
        name: with_logical_constraint(
            jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype),
                                         (0, start_index, 0, 0)), CACHE_AXES)
        for name, new in (("k", k), ("v", v))
    }
    distance = query_pos[:, None] - jnp.arange(s, dtype=jnp.int32)[None, :]  # [T, S]
    mask = (distance >= 0)[None, None]  # unwritten cache slots lie in the future
    bias = None
    if self.config.position == "relative":
      # Relative logits for the absolute (query, key) pairs: q_t . E_r[distance].
      max_len = self.config.max_len
      rel = self._relative_logits(q, max_len)  # [B, H, T, max_len]
      index = jnp.clip(max_len - 1 - distance, 0, max_len - 1)
      bias = jnp.take_along_axis(rel, jnp.broadcast_to(index, rel.shape[:2] + index.shape),
                                 axis=-1) / math.sqrt(self.config.head_dim)
    encoded = attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                     bias=bias, mask=mask)
    return self._output(encoded), cache


# ----------------------------------------------------------------------------- block


class Block(nnx.Module):
  """Pre-norm Transformer block: x + Attn(Norm(x)), then x + Mlp(Norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.dropout_rate = config.dropout_rate
    self.attention_norm = Norm(config, rngs=rngs)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = Norm(config, rngs=rngs)
    self.mlp = Mlp(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: Optional[jax.Array],
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; dropout only if `dropout_rng` is given."""
    attn_rng = attn_out_rng = mlp_out_rng = None
    if dropout_rng is not None:
      attn_rng, attn_out_rng, mlp_out_rng = jax.random.split(dropout_rng, 3)
    h = self.attention(self.attention_norm(x), positions, mask, attn_rng)
    if dropout_rng is not None:
      h = dropout(h, self.dropout_rate, attn_out_rng)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if dropout_rng is not None:
      h = dropout(h, self.dropout_rate, mlp_out_rng)
    return with_logical_constraint(x + h, ("batch", "length", "embed"))

  def decode(self, x: jax.Array, cache: dict[str, jax.Array], start_index: jax.Array):
    """Like __call__ without dropout, attending to and updating the cache."""
    h, cache = self.attention.decode(self.attention_norm(x), cache, start_index)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


# ----------------------------------------------------------------------------- model


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes.

  Args:
    segment_ids: int [B, T]; equal ids in a run belong to one packed piece.

  Returns:
    int32 [B, T] index of each token within its run.
  """
  index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  is_start = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
  return index - start


class Transformer(nnx.Module):
  """Decoder-only Transformer language model over (padded) token ids.

  Training: `logits = model(tokens, segment_ids=..., positions=..., dropout_rng=key)`.
  Sampling: `cache = model.init_cache(B, S)` then
  `logits, cache = model.decode(tokens, cache, start_index)`, once with the whole
  prompt and then one token per step; both are pure and jit / while_loop safe.
  Dropout is off when `deterministic` (the attribute, set from the config and
  flipped by `model.eval()` / `model.train()`, or the call argument).
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.deterministic = config.deterministic
    self.embedding = _param(rngs, nnx.initializers.normal(1.0),
                            (config.padded_vocab_size, config.emb_dim), ("vocab", "embed"),
                            config.param_dtype)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = Norm(config, rngs=rngs)
    if not config.tied_embeddings:
      self.output = _param(rngs, _fan_in_init(0, 1),
                           (config.emb_dim, config.padded_vocab_size), ("embed", "vocab"),
                           config.param_dtype)

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """int [B, T] -> [B, T, D] token (+ sinusoidal position) embeddings."""
    # Gather from a replicated copy of the table so each batch shard looks up its
    # own rows: a gather from a (vocab, embed)-sharded table makes XLA replicate
    # the activations instead. Music vocabularies make the table small.
    table = with_logical_constraint(self.embedding[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
    if self.config.position == "sinusoidal":
      x = x + sinusoidal_embedding(positions, self.config.emb_dim).astype(self.config.dtype)
    return with_logical_constraint(x, ("batch", "length", "embed"))

  def _logits(self, x: jax.Array) -> jax.Array:
    """[B, T, D] final hidden -> float32 [B, T, V] with padded ids masked."""
    cfg = self.config
    x = self.final_norm(x)
    if cfg.tied_embeddings:
      # Embedding rows have unit variance; 1/sqrt(D) keeps the logits O(1).
      logits = dense(x, self.embedding[...].T.astype(cfg.dtype),
                     jnp.float32) / math.sqrt(cfg.emb_dim)
    else:
      logits = dense(x, self.output[...].astype(cfg.dtype), jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size:
      is_real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(is_real, logits, MASKED_LOGIT)
    return with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, deterministic: Optional[bool] = None,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits for every position (teacher forcing).

    Args:
      tokens: int [B, T] input ids (< vocab_size).
      positions: int [B, T] position of each token in its piece; defaults to
        0..T-1, or to restarting at each segment boundary if `segment_ids` is given.
        Used by "sinusoidal" and "rope"; "relative" needs none.
      segment_ids: int [B, T] packing ids; tokens attend only within their segment.
      deterministic: overrides `self.deterministic` (True = no dropout).
      dropout_rng: PRNG key, required when dropout is active.

    Returns:
      float32 [B, T, padded_vocab_size] logits; ids >= vocab_size are MASKED_LOGIT.
    """
    cfg = self.config
    deterministic = self.deterministic if deterministic is None else deterministic
    use_dropout = not deterministic and (cfg.dropout_rate > 0 or cfg.attention_dropout_rate > 0)
    if use_dropout and dropout_rng is None:
      raise ValueError("dropout is active (deterministic=False, rate > 0) but no dropout_rng "
                       "was given; pass dropout_rng=key or deterministic=True.")
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :])
    mask = None
    if segment_ids is not None:
      t = tokens.shape[1]
      same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
      mask = (same_segment & jnp.tril(jnp.ones((t, t), bool)))[:, None]  # [B, 1, T, T]

    rngs = [None] * (cfg.num_layers + 1)
    if use_dropout:
      rngs = list(jax.random.split(dropout_rng, cfg.num_layers + 1))
    x = self._embed(tokens, positions)
    if use_dropout:
      x = dropout(x, cfg.dropout_rate, rngs[-1])
    for block, rng in zip(self.blocks, rngs):
      x = block(x, positions, mask, rng)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> Cache:
    """Empty key/value cache.

    Args:
      batch_size: number of sequences sampled together.
      max_len: cache length in tokens (prompt + generated); defaults to
        config.max_len, and may not exceed it for "relative" attention.

    Returns:
      One {"k", "v"} dict per layer, each [batch_size, max_len, H, Dh] zeros in
      the compute dtype.
    """
    cfg = self.config
    max_len = cfg.max_len if max_len is None else max_len
    if cfg.position == "relative" and max_len > cfg.max_len:
      raise ValueError(f"cache max_len={max_len} exceeds config.max_len={cfg.max_len}, "
                       f"the longest relative distance the model knows.")
    shape = (batch_size, max_len, cfg.num_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
            for _ in range(cfg.num_layers)]

  def decode(self, tokens: jax.Array, cache: Cache, start_index: jax.Array
             ) -> tuple[jax.Array, Cache]:
    """Logits for T new tokens given a cache holding everything before them.

    Args:
      tokens: int [B, T] ids at positions start_index..start_index+T-1 (T = the
        whole prompt for prefill, 1 per sampling step).
      cache: from `init_cache` or a previous `decode`; positions < start_index filled.
      start_index: int32 scalar; start_index + T must not exceed the cache length.

    Returns:
      (float32 [B, T, padded_vocab_size] logits as in __call__, updated cache).
    """
    start_index = jnp.asarray(start_index, jnp.int32)
    positions = (start_index + jnp.arange(tokens.shape[1], dtype=jnp.int32))[None, :]
    x = self._embed(tokens, positions)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, layer_cache, start_index)
      new_cache.append(layer_cache)
    return self._logits(x), new_cache


# ----------------------------------------------------------------------------- counting


def count_params(model_or_state: Any) -> int:
  """Number of parameter scalars in an `nnx.Module` (its nnx.Param) or a state tree."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(model_or_state))


def matmul_params(config: TransformerConfig) -> int:
  """Weights used in per-token matmuls: N of the 6N rule.

  L * (4 * D * H * Dh  [q, k, v, out]  +  (2 or 3 for SwiGLU) * D * F)  +  D * vocab_size
  [output projection, counted even when tied: the matmul runs either way; the
  real vocab, not the padding]. The embedding lookup (a gather), norms and
  relative-position tables are excluded.
  """
  c = config
  mlp_matrices = 3 if c.mlp_activation == "swiglu" else 2
  per_layer = 4 * c.emb_dim * c.num_heads * c.head_dim + mlp_matrices * c.emb_dim * c.mlp_dim
  return c.num_layers * per_layer + c.emb_dim * c.vocab_size


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B style.

    6 * N  +  12 * L * H * Dh * T   (+ 6 * L * H * Dh * T for "relative")

  N = `matmul_params(config)`; 2 FLOPs per multiply-add, x3 for forward + backward.
  The attention term counts q.k and probs.v over the full T x T square (as PaLM,
  no causal halving); relative attention adds q.E_r, a third T x T x Dh matmul
  per head.

  Args:
    config: the model.
    seq_len: training sequence length T (tokens).

  Returns:
    FLOPs per token, for MFU = tokens/s * flops_per_token / peak FLOP/s.
  """
  c = config
  attention_matmuls = 3 if c.position == "relative" else 2
  attention = 6 * attention_matmuls * c.num_layers * c.num_heads * c.head_dim * seq_len
  return float(6 * matmul_params(c) + attention)
