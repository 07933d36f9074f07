"""Causal self-attention on XLA:CPU through a C++ XLA FFI kernel (causal_attention_cpu.cc).

XLA:CPU runs the blocked causal attention as separate batched matmul and softmax passes,
each streaming the [heads, queries, keys] logits through memory, and its small batched
matmuls reach about half of the machine's float32 matmul peak: attention took 39% of the
6-layer width-512 training step (batch 8 x 1024). The kernel does one (batch, head) at a
time, query block by query block, so the logits stay in cache between OpenBLAS sgemm calls
and the softmax; it skips the masked upper triangle and, like flash attention, recomputes
the probabilities in the backward pass from the saved log-sum-exp. Forward + backward it
runs 1.6x faster than the XLA version (`benchmarks/attention_throughput.py`).

`decode_attention` is the sampler's step: one new token per row writes its key and value
into the cache in place and attends over exactly the filled slots, on both cores (XLA ran
those batched matrix-vector products on one). `decode_attention_int8` does the same over an
int8 cache with a float32 scale per cached vector (a quarter of the bytes per step).

The kernel is compiled on first use with the system C++ compiler against the headers
jaxlib ships (`jax.ffi.include_dir()`) and scipy-openblas32's sgemm, for this machine's
CPU (-march=native), into a cache directory keyed by the source, compiler flags, JAX
version and CPU. Where that is not possible (no compiler, no scipy-openblas32) `available()`
says so once in the log and the model keeps its XLA attention. `MIDIJAX_CPU_KERNELS=0`
(or false/off/no) turns the kernels off; `MIDIJAX_KERNEL_CACHE` moves the cache.

Scope: float32 (the decode step also over an int8 cache), causal, no attention bias, mask
or dropout, one CPU device (under a mesh of several devices the custom call would not be
partitioned); `midijax.models.attention` checks this.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("causal_attention_cpu.cc")
ENV_SWITCH = "MIDIJAX_CPU_KERNELS"
ENV_CACHE = "MIDIJAX_KERNEL_CACHE"
FORWARD_TARGET = "midijax_causal_attention_fwd"
BACKWARD_TARGET = "midijax_causal_attention_bwd"
DECODE_TARGET = "midijax_decode_attention"
DECODE_INT8_TARGET = "midijax_decode_attention_int8"
# -ffast-math lets GCC vectorize expf through glibc's libmvec; the kernel only ever
# exponentiates finite, max-subtracted logits.
CXX_FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC")

_log = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
  """The kernel could not be compiled or loaded (the message says why)."""


def _cpu_id() -> str:
  """CPU model and feature flags (a -march=native build is only valid on the same kind)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
  return "\n".join(sorted(set(lines)))


def _openblas():
  """(include dir, lib dir) of scipy-openblas32."""
  try:
    import scipy_openblas32
  except ImportError:
    raise KernelBuildError("scipy-openblas32 is not installed (pip install -r requirements.txt)")
  return scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir()


def build_command(output: str) -> List[str]:
  """The compiler command line that builds the kernel library into `output`."""
  include, lib = _openblas()
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not compiler:
    raise KernelBuildError("no C++ compiler found (install g++, e.g. apt-get install g++)")
  return [compiler, *CXX_FLAGS, str(SOURCE), f"-I{jax.ffi.include_dir()}", f"-I{include}",
          f"-L{lib}", "-lscipy_openblas", f"-Wl,-rpath,{lib}", "-o", output]


def cache_dir() -> pathlib.Path:
  root = os.environ.get(ENV_CACHE)
  if root:
    return pathlib.Path(root)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "midijax" / "kernels"


def library_path() -> pathlib.Path:
  """Builds the kernel library if this source/flags/JAX/CPU has none yet; returns its path."""
  key = hashlib.sha256()
  command = build_command("OUT")
  for part in (SOURCE.read_bytes(), " ".join(command).encode(), jax.__version__.encode(),
               _cpu_id().encode()):
    key.update(part)
  path = cache_dir() / f"causal_attention_cpu-{key.hexdigest()[:16]}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: processes building at once never see half a file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  try:
    done = subprocess.run(build_command(tmp), capture_output=True, text=True)
    if done.returncode != 0:
      raise KernelBuildError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
  """Builds, loads and registers the kernel once; None if it works, else the reason."""
  switch = os.environ.get(ENV_SWITCH, "1")
  if switch.strip().lower() in ("0", "false", "off", "no"):
    return f"{ENV_SWITCH}={switch}"
  try:
    library = ctypes.cdll.LoadLibrary(str(library_path()))
    jax.ffi.register_ffi_target(FORWARD_TARGET,
                                jax.ffi.pycapsule(library.MidijaxCausalAttentionForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD_TARGET,
                                jax.ffi.pycapsule(library.MidijaxCausalAttentionBackward),
                                platform="cpu")
    jax.ffi.register_ffi_target(DECODE_TARGET, jax.ffi.pycapsule(library.MidijaxDecodeAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(DECODE_INT8_TARGET,
                                jax.ffi.pycapsule(library.MidijaxDecodeAttentionInt8),
                                platform="cpu")
  except (KernelBuildError, OSError, AttributeError) as e:
    reason = str(e)
    _log.warning("midijax: the CPU attention kernel is not available, using XLA's attention "
                 "(%s)", reason)
    return reason
  return None


def available() -> bool:
  """True if the kernel is built and registered (builds it on the first call)."""
  return _load() is None


def _require() -> None:
  """Builds and registers the kernels, or raises KernelBuildError saying why not."""
  reason = _load()
  if reason is not None:
    raise KernelBuildError(f"the CPU attention kernels are not available: {reason}")


def supports(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> bool:
  """Whether [B, T, H, D] q, k, v and `block` are in the kernel's scope."""
  t = q.shape[1]
  return (q.ndim == 4 and q.shape == k.shape == v.shape and block > 0 and t % block == 0
          and all(x.dtype == jnp.float32 for x in (q, k, v)))


def _forward_call(q, k, v, block):
  _require()
  b, t, h, d = q.shape
  return jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      vmap_method="sequential")(q, k, v, block=np.int64(block), scale=np.float32(1 / math.sqrt(d)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
  """softmax(q k^T / sqrt(D) + causal mask) v per head, for float32 [B, T, H, D] q, k, v
  (the layout the model's projections produce; the kernel reads each head's rows with a
  stride, so no transposes surround it). Returns [B, T, H, D].

  For inputs that pass `supports(...)`; `block` (the query block) divides T. Builds the
  kernel on first use; raises KernelBuildError if it cannot be built.
  """
  return _forward_call(q, k, v, block)[0]


def _causal_attention_fwd(q, k, v, block):
  out, lse = _forward_call(q, k, v, block)
  return out, (q, k, v, out, lse)


def _causal_attention_bwd(block, residuals, d_out):
  q, k, v, out, lse = residuals
  like = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(BACKWARD_TARGET, (like, like, like), vmap_method="sequential")(
      q, k, v, out, lse, d_out.astype(jnp.float32), block=np.int64(block),
      scale=np.float32(1 / math.sqrt(q.shape[-1])))


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


# ----------------------------------------------------------------------------- decoding
def decode_supports(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array) -> bool:
  """Whether float32 [B, H, D] queries and [B, H, L, D] caches are in the decode kernel's scope."""
  return (q.ndim == 3 and k_cache.ndim == 4 and k_cache.shape == v_cache.shape
          and k_cache.shape[:2] + k_cache.shape[3:] == q.shape
          and all(x.dtype == jnp.float32 for x in (q, k_cache, v_cache)))


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, pos: jax.Array):
  """Attention of one new token per row over cache slots 0..pos, writing slot `pos`.

  Args:
    q, k, v: float32 [B, H, D], the new token's query, key and value.
    k_cache, v_cache: float32 [B, H, L, D]; slots < pos are filled.
    pos: int32 scalar < L.

  Returns:
    (float32 [B, H, D] output, k_cache and v_cache with slot `pos` written). The caches are
    updated in place (the custom call's outputs alias them), and only slots 0..pos are read,
    whatever L.
  """
  _require()
  scale = np.float32(1 / math.sqrt(q.shape[-1]))
  return jax.ffi.ffi_call(
      DECODE_TARGET,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct(k_cache.shape, jnp.float32),
       jax.ShapeDtypeStruct(v_cache.shape, jnp.float32)),
      input_output_aliases={3: 1, 4: 2}, vmap_method="sequential")(
          q, k.astype(jnp.float32), v.astype(jnp.float32), k_cache, v_cache,
          jnp.asarray(pos, jnp.int32), scale=scale)


def decode_supports_int8(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         k_scale: jax.Array, v_scale: jax.Array) -> bool:
  """Whether float32 [B, H, D] queries, int8 [B, H, L, D] caches and float32 [B, H, L]
  scales are in the int8 decode kernel's scope."""
  return (q.ndim == 3 and k_cache.ndim == 4 and k_cache.shape == v_cache.shape
          and k_cache.shape[:2] + k_cache.shape[3:] == q.shape
          and k_scale.shape == v_scale.shape == k_cache.shape[:3]
          and q.dtype == jnp.float32 and k_cache.dtype == v_cache.dtype == jnp.int8
          and k_scale.dtype == v_scale.dtype == jnp.float32)


def decode_attention_int8(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                          v_cache: jax.Array, k_scale: jax.Array, v_scale: jax.Array,
                          pos: jax.Array):
  """`decode_attention` over an int8 cache (see `midijax.models.kv_cache.quantize_kv` for the format).

  Args:
    q, k, v: float32 [B, H, D], the new token's query, key and value (k and v are
      quantized into slot `pos` first, so the token attends to itself as stored).
    k_cache, v_cache: int8 [B, H, L, D]; k_scale, v_scale: float32 [B, H, L], a cached
      vector being k_cache[b, h, s] * k_scale[b, h, s]. Slots < pos are filled.
    pos: int32 scalar < L.

  Returns:
    (float32 [B, H, D] output, k_cache, v_cache, k_scale, v_scale with slot `pos`
    written), updated in place; only slots 0..pos are read.
  """
  _require()
  scale = np.float32(1 / math.sqrt(q.shape[-1]))
  like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
  return jax.ffi.ffi_call(
      DECODE_INT8_TARGET,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), like(k_cache), like(v_cache),
       like(k_scale), like(v_scale)),
      input_output_aliases={3: 1, 4: 2, 5: 3, 6: 4}, vmap_method="sequential")(
          q, k.astype(jnp.float32), v.astype(jnp.float32), k_cache, v_cache, k_scale, v_scale,
          jnp.asarray(pos, jnp.int32), scale=scale)
