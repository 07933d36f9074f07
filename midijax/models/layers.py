"""Layers without parameters shared by the model and its attention backends.

`dense`: a matmul with a written-out gradient (the projections' and MLP's matmuls).
`dropout` / `hash_bits`: inverted dropout whose keep bits come from a counter-based hash,
so the attention backends can recompute a dropout mask in the backward pass instead of
storing it.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

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
  threshold = keep_threshold(rate)
  if threshold is None:
    return x
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  return drop(x, hash_bits(x.shape, seeds).reshape(x.shape), threshold)


def keep_threshold(rate: float) -> Optional[int]:
  """uint32 threshold below which hash bits keep an element; None = keep everything."""
  threshold = round((1.0 - rate) * 2**32)
  if rate <= 0.0 or threshold >= 2**32:
    return None
  return max(threshold, 1)


def drop(x: jax.Array, bits: jax.Array, threshold: int) -> jax.Array:
  """Zeroes x where bits >= threshold and scales the rest by 2^32 / threshold."""
  return jnp.where(bits < jnp.uint32(threshold),
                   x * jnp.asarray(2**32 / threshold, x.dtype), jnp.zeros_like(x))



def block_seeds(seeds: jax.Array, i) -> jax.Array:
  """Hash seeds (uint32 [2]) for block `i` (a Python int, or a traced integer inside a
  loop) of a blocked computation: every block of an attention draws its own dropout bits
  from the same call's `seeds`."""
  if isinstance(i, int):
    offset = jnp.uint32(i * _WEYL % 2**32)
  else:
    offset = jnp.asarray(i).astype(jnp.uint32) * jnp.uint32(_WEYL)  # wraps mod 2^32
  return jnp.stack([_fmix32(seeds[0] + offset), seeds[1]])
