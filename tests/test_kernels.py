"""The C++ CPU attention kernel (midijax/kernels) against XLA's attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import IN_CI
from midijax.kernels import causal_attention as cpu_attention
from midijax.models import attention, kv_cache

# The build needs g++ and scipy-openblas32, which CI installs (launch/setup.sh --system):
# under CI=true these tests run (and fail if the kernel does not build).
needs_kernel = pytest.mark.skipif(not IN_CI and not cpu_attention.available(),
                                  reason="CPU attention kernel not built (needs g++)")


def _qkv(shape, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def _kernel(q, k, v, block):
  """The kernel on [B, H, T, D] arrays (it takes the model's [B, T, H, D] layout)."""
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  return swap(cpu_attention.causal_attention(swap(q), swap(k), swap(v), block))


def _dense_reference(q, k, v):
  """Plain softmax attention with a causal mask, [B, H, T, D] in and out."""
  t = q.shape[2]
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, axis=-1), v)


@needs_kernel
@pytest.mark.parametrize("shape, block", [((2, 3, 64, 16), 16), ((1, 2, 32, 8), 32),
                                          ((2, 2, 256, 64), 64)])
def test_kernel_matches_dense_attention_and_its_gradients(shape, block):
  q, k, v = _qkv(shape)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(w * f(q, k, v)),
                                              argnums=(0, 1, 2)))
  (want, want_grads) = loss(_dense_reference)(q, k, v)
  (got, got_grads) = loss(lambda q, k, v: _kernel(q, k, v, block))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  for g, ref in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)
  out = jax.jit(lambda q, k, v: _kernel(q, k, v, block))(q, k, v)
  np.testing.assert_allclose(out, _dense_reference(q, k, v), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_is_causal():
  q, k, v = _qkv((1, 2, 32, 8), seed=3)
  f = jax.jit(lambda q, k, v: _kernel(q, k, v, 8))
  changed = [x.at[:, :, 20:].add(1.0) for x in (q, k, v)]
  a, b = f(q, k, v), f(*changed)
  np.testing.assert_array_equal(a[:, :, :20], b[:, :, :20])
  assert not np.allclose(a[:, :, 20:], b[:, :, 20:])


def _lowered(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


@needs_kernel
def test_attend_uses_the_kernel_only_where_it_applies():
  q, k, v = _qkv((2, 64, 2, 16))  # [B, T, H, Dh], as the model calls attend
  for impl in ("auto", "cpu_kernel"):
    plain = _lowered(lambda q, k, v: attention.attend(q, k, v, impl=impl, block=16), q, k, v)
    assert cpu_attention.FORWARD_TARGET in plain
  segments = jnp.ones((2, 64), jnp.int32)
  table = jnp.zeros((2, 64, 16), jnp.float32)
  for kwargs in ({"segment_ids": segments}, {"relative_table": table}, {"block": 0},
                 {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)},
                 {"impl": "cpu_blocked"}, {"impl": "chunked"}):
    kwargs = {"block": 16, **kwargs}
    text = _lowered(lambda q, k, v: attention.attend(q, k, v, **kwargs), q, k, v)
    assert cpu_attention.FORWARD_TARGET not in text, kwargs
  half = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
  text = _lowered(lambda q, k, v: attention.attend(q, k, v, block=16), *half)
  assert cpu_attention.FORWARD_TARGET not in text


def test_switch_off_and_build_failure_say_why(monkeypatch, tmp_path):
  monkeypatch.setenv(cpu_attention.ENV_SWITCH, "0")
  assert cpu_attention._load.__wrapped__() == f"{cpu_attention.ENV_SWITCH}=0"
  monkeypatch.setenv(cpu_attention.ENV_SWITCH, "off")
  assert cpu_attention._load.__wrapped__() == f"{cpu_attention.ENV_SWITCH}=off"
  monkeypatch.delenv(cpu_attention.ENV_SWITCH)
  monkeypatch.setenv(cpu_attention.ENV_CACHE, str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  with pytest.raises(cpu_attention.KernelBuildError, match="causal_attention_cpu.cc"):
    cpu_attention.library_path()
  assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind


@needs_kernel
@pytest.mark.parametrize("pos", [0, 17, 39])
def test_decode_kernel_attends_to_the_filled_slots_and_writes_the_new_one(pos):
  b, h, length, d = 3, 2, 40, 16
  rng = np.random.default_rng(pos)
  q, k, v = (jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32) for _ in range(3))
  k_cache, v_cache = (jnp.asarray(rng.standard_normal((b, h, length, d)), jnp.float32)
                      for _ in range(2))
  out, k_got, v_got = jax.jit(cpu_attention.decode_attention)(q, k, v, k_cache, v_cache,
                                                              jnp.int32(pos))
  keys, values = k_cache.at[:, :, pos].set(k), v_cache.at[:, :, pos].set(v)
  np.testing.assert_array_equal(k_got, keys)
  np.testing.assert_array_equal(v_got, values)
  logits = jnp.einsum("bhd,bhld->bhl", q, keys[:, :, :pos + 1]) / np.sqrt(d)
  want = jnp.einsum("bhl,bhld->bhd", jax.nn.softmax(logits, axis=-1), values[:, :, :pos + 1])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)  # slots > pos never read
  with pytest.raises(Exception, match="position outside the cache"):
    jax.block_until_ready(jax.jit(cpu_attention.decode_attention)(
        q, k, v, k_cache, v_cache, jnp.int32(length)))


@needs_kernel
@pytest.mark.parametrize("pos, d", [(0, 16), (17, 16), (15, 32), (47, 64), (33, 128)])
def test_int8_decode_kernel_matches_dequantized_attention(pos, d):
  """int8 cache: the new key/value are quantized into slot `pos` (kv_cache.quantize_kv's
  formula), and the output is exact attention over the dequantized slots 0..pos."""
  b, h, length = 2, 3, 48
  rng = np.random.default_rng(pos + d)
  q, k, v = (jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32) for _ in range(3))
  (k_cache, k_scale), (v_cache, v_scale) = (
      kv_cache.quantize_kv(jnp.asarray(rng.standard_normal((b, h, length, d)), jnp.float32))
      for _ in range(2))
  out, *got = jax.jit(cpu_attention.decode_attention_int8)(
      q, k, v, k_cache, v_cache, k_scale, v_scale, jnp.int32(pos))
  (k8, ks), (v8, vs) = kv_cache.quantize_kv(k), kv_cache.quantize_kv(v)
  want_cache = (k_cache.at[:, :, pos].set(k8), v_cache.at[:, :, pos].set(v8),
                k_scale.at[:, :, pos].set(ks), v_scale.at[:, :, pos].set(vs))
  for g, w in zip(got, want_cache):
    # Codes may differ by one where x / scale sits on a rounding tie.
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=1.0 if g.dtype == jnp.int8 else 1e-6, rtol=1e-6)
  keys = (got[0].astype(jnp.float32) * got[2][..., None])[:, :, :pos + 1]
  values = (got[1].astype(jnp.float32) * got[3][..., None])[:, :, :pos + 1]
  logits = jnp.einsum("bhd,bhld->bhl", q, keys) / np.sqrt(d)
  want = jnp.einsum("bhl,bhld->bhd", jax.nn.softmax(logits, axis=-1), values)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # slots > pos never read
  with pytest.raises(Exception, match="position outside the cache"):
    jax.block_until_ready(jax.jit(cpu_attention.decode_attention_int8)(
        q, k, v, k_cache, v_cache, k_scale, v_scale, jnp.int32(length)))
