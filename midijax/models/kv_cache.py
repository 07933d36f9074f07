"""The key/value cache of decoding: its layout and its int8 format, defined once.

`Transformer.init_cache` / `prefill` make one `LayerCache` per layer and `decode_step`
updates them; the sampler only grows them (`LayerCache.grow`) and carries them through its
loop. Every attention backend reads this layout:

* values [B, H, L, Dh] and keys [B, H, L, Dh] (heads before positions, so attention over
  the cache is a plain batched matmul and a step writes one slot in place), or keys
  [B, H, Dh, L] (`keys_transposed`): the layout in which XLA:CPU's batched matrix-vector
  product streams fastest for head_dim >= KEYS_TRANSPOSED_FROM_HEAD_DIM (measured at
  batch 32: [.., L, Dh] is 1.2x faster for Dh=32, [.., Dh, L] 1.5x faster for Dh=64). The
  CPU decode kernel and int8 caches keep [B, H, L, Dh].
* kind "float": the model's compute dtype. kind "int8": each cached key and value vector as
  int8 codes with one float32 scale (`quantize_kv`), a quarter of float32's bytes, which is
  what a batch-32 step spends its time reading; attention's logits move by about 1% of
  their spread (tests/test_sampling.py bounds it).

L is the cache's length in tokens; slots at or after the next position hold nothing (or an
earlier window's entries) and attention masks them.
"""
from __future__ import annotations

from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from midijax import sharding

KV_CACHE_KINDS = ("float", "int8")
KEYS_TRANSPOSED_FROM_HEAD_DIM = 64
# Logical axes of the cache arrays (for `midijax.sharding`).
AXES = {"k": ("batch", "heads", "length", "kv"), "kT": ("batch", "heads", "kv", "length"),
        "v": ("batch", "heads", "length", "kv"), "k_scale": ("batch", "heads", "length"),
        "v_scale": ("batch", "heads", "length")}


def quantize_kv(x: jax.Array):
  """float [..., D] -> (int8 [..., D], float32 [...] scale): x ~ q * scale per vector.

  Symmetric absmax: scale = max|x| / 127, q = round(x / scale) (half to even), 0 for a
  zero vector. The CPU int8 decode kernel quantizes new tokens with the same formula.
  """
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
  q = jnp.clip(jnp.round(x * inv[..., None]), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_kv(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """The inverse of `quantize_kv` (up to rounding): codes * scale in `dtype`."""
  return (codes.astype(jnp.float32) * scale[..., None]).astype(dtype)


@struct.dataclass
class LayerCache:
  """One layer's cached keys and values (see the module docstring for the layout).

  Attributes:
    k: [B, H, L, Dh], or [B, H, Dh, L] when `keys_transposed`; int8 codes for kind int8.
    v: [B, H, L, Dh].
    k_scale, v_scale: float32 [B, H, L] for kind "int8", else None.
    keys_transposed: static; keys stored [B, H, Dh, L].
  """
  k: jax.Array
  v: jax.Array
  k_scale: Optional[jax.Array] = None
  v_scale: Optional[jax.Array] = None
  keys_transposed: bool = struct.field(pytree_node=False, default=False)

  @property
  def kind(self) -> str:
    """"int8" or "float"."""
    return "int8" if self.k_scale is not None else "float"

  @property
  def length(self) -> int:
    """Slots (tokens) the cache holds."""
    return self.v.shape[2]

  def arrays(self) -> dict:
    """{name: array} of the arrays present (k, v and, for int8, k_scale, v_scale)."""
    names = ("k", "v", "k_scale", "v_scale") if self.kind == "int8" else ("k", "v")
    return {n: getattr(self, n) for n in names}

  def axes(self, name: str) -> tuple:
    """Logical axis names of array `name`."""
    return AXES["kT" if name == "k" and self.keys_transposed else name]

  def length_axis(self, name: str) -> int:
    """The axis of array `name` that indexes positions."""
    return 3 if name == "k" and self.keys_transposed else 2

  def constrained(self) -> "LayerCache":
    """This cache with its arrays' shardings constrained by their logical axes."""
    return self.replace(**{n: sharding.with_logical_constraint(a, self.axes(n))
                           for n, a in self.arrays().items()})

  def grow(self, length: int) -> "LayerCache":
    """The cache padded with empty slots to `length` tokens (attention masks them)."""
    def pad(name, x):
      widths = [(0, 0)] * x.ndim
      widths[self.length_axis(name)] = (0, length - x.shape[self.length_axis(name)])
      return jnp.pad(x, widths)
    return self.replace(**{n: pad(n, a) for n, a in self.arrays().items()}).constrained()

  def encode(self, k: jax.Array, v: jax.Array) -> dict:
    """One token's key and value (float [B, H, Dh]) as this cache stores them: {"k", "v"}
    in the cache's dtype, or int8 codes plus "k_scale", "v_scale" [B, H]."""
    if self.kind == "int8":
      (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
      return {"k": k, "v": v, "k_scale": k_scale, "v_scale": v_scale}
    return {"k": k, "v": v}

  def with_slot(self, pos: jax.Array, new: dict,
                after: Optional[jax.Array] = None) -> "LayerCache":
    """The cache with one token's entries (`encode`'s dict) written at position `pos`.

    `after` ([B, H] zeros computed from the attention output that read the cache) makes
    the writes depend on that read, so XLA orders them after it and updates the cache in
    place instead of copying it twice per step (measured: 4x slower per step at batch 32
    without this; an optimization_barrier does not help: XLA copies through it).
    """
    def write(name, cache, x):
      if after is not None:
        x = x + after.reshape(after.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
      axis = self.length_axis(name)
      start = [0] * cache.ndim
      start[axis] = pos
      return jax.lax.dynamic_update_slice(cache, jnp.expand_dims(x, axis).astype(cache.dtype),
                                          start)

    return self.replace(**{n: write(n, getattr(self, n), x) for n, x in new.items()}
                        ).constrained()


def new_cache(k: jax.Array, v: jax.Array, length: int, kind: str = "float",
              keys_transposed: bool = False) -> LayerCache:
  """A LayerCache of `length` slots holding the keys and values of positions 0..W-1.

  Args:
    k, v: [B, W, H, Dh] keys and values of a prompt (the layout projections produce).
    length: slots L >= W.
    kind: "float" (kept in k's dtype) or "int8" (`quantize_kv`).
    keys_transposed: store keys [B, H, Dh, L] (float caches only).

  Returns:
    The LayerCache; slots >= W are zeros.
  """
  if kind not in KV_CACHE_KINDS:
    raise ValueError(f"cache kind must be one of {KV_CACHE_KINDS}, got {kind!r}")
  keys_transposed = keys_transposed and kind == "float"
  k = k.transpose((0, 2, 3, 1) if keys_transposed else (0, 2, 1, 3))
  v = v.transpose((0, 2, 1, 3))
  if kind == "int8":
    (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
    cache = LayerCache(k=k, v=v, k_scale=k_scale, v_scale=v_scale)
  else:
    cache = LayerCache(k=k, v=v, keys_transposed=keys_transposed)
  return cache.grow(length)
