"""Attention backends (midijax/models/attention.py) on CPU: each against a plain dense
reference, forward and gradient, including splash attention in Pallas interpret mode, the
memory-efficient chunked relative attention, and the choice of backend per platform.
Also the rematerialized and scanned model against the plain one, and checkpoint conversion
between scanned and unscanned layers."""
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import IN_CI
from midijax.errors import ConfigError
from midijax.kernels import causal_attention as cpu_attention
from midijax.models import attention, transformer

VOCAB = 200


def _inputs(b=2, t=128, h=2, d=16, seed=0, max_len=None):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
  table = jnp.asarray(rng.standard_normal((h, max_len or t, d)) * 0.5, jnp.float32)
  # Row 0: two packed pieces; row 1: one.
  segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], [t // 3, t - t // 3], axis=1)[:b])
  return q, k, v, table, segments


def dense_reference(q, k, v, segment_ids=None, table=None):
  """softmax(q k^T / sqrt(Dh) + q_i . E[i - j] / sqrt(Dh)) v under the causal (and segment)
  mask, with the relative logits gathered directly (no skewing)."""
  t, dh = q.shape[1], q.shape[3]
  logits = jnp.einsum("bthd,bshd->bhts", q, k)
  if table is not None:
    distance = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    rows = table[:, table.shape[1] - 1 - jnp.clip(distance, 0, t - 1)]  # [H, T, T, Dh]
    logits = logits + jnp.einsum("bthd,htsd->bhts", q, rows)
  allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  logits = jnp.where(allowed, logits / math.sqrt(dh), -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


def _value_and_grads(fn, q, k, v, table):
  w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
  loss = lambda q, k, v, table: jnp.sum(w * fn(q, k, v, table))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, table)


def _assert_close(got, want, tol):
  (gv, gg), (wv, wg) = got, want
  np.testing.assert_allclose(gv, wv, rtol=tol, atol=tol)
  for g, r in zip(gg, wg):
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


BACKENDS = [
    # (impl, relative, packing)
    ("chunked", True, True), ("chunked", False, False),
    ("cpu_blocked", True, True), ("cpu_blocked", False, False),
    ("xla", False, True), ("splash", False, True), ("splash", False, False),
    ("cpu_kernel", False, False),
]


@pytest.mark.parametrize("impl, relative, packing", BACKENDS,
                         ids=[f"{i}{'-relative' if r else ''}{'-packed' if p else ''}"
                              for i, r, p in BACKENDS])
def test_backend_matches_dense_attention_forward_and_gradient(impl, relative, packing):
  if impl == "cpu_kernel" and not IN_CI and not cpu_attention.available():
    pytest.skip("CPU attention kernel not built (needs g++)")
  q, k, v, table, segments = _inputs(t=128 if impl == "splash" else 64)  # splash: 128 | T
  segments = segments if packing else None

  def ours(q, k, v, table):
    return attention.attend(q, k, v, impl=impl, segment_ids=segments,
                            relative_table=table if relative else None, block=16,
                            interpret=True)

  def reference(q, k, v, table):
    return dense_reference(q, k, v, segments, table if relative else None)

  _assert_close(_value_and_grads(ours, q, k, v, table),
                _value_and_grads(reference, q, k, v, table), 2e-4)
  if impl in ("splash", "cpu_kernel"):  # the kernel really ran
    text = jax.jit(ours).lower(q, k, v, table).as_text()
    assert ("splash" in text) if impl == "splash" else (cpu_attention.FORWARD_TARGET in text)


def test_skew_of_a_query_chunk_equals_gathered_relative_logits():
  """Chunk rows lo..hi-1 over keys 0..hi-1: entry [r, j] = rel logit for distance lo+r-j."""
  rng = np.random.default_rng(1)
  c, w = 4, 12  # queries 8..11 of 12 keys
  rel = jnp.asarray(rng.standard_normal((2, c, w)), jnp.float32)  # col m: distance w-1-m
  got = np.asarray(attention.skew(rel))
  for r in range(c):
    for j in range(w - c + r + 1):
      np.testing.assert_array_equal(got[:, r, j], rel[:, r, w - 1 - (w - c + r - j)])
  square = jnp.asarray(rng.standard_normal((3, 6, 6)), jnp.float32)
  padded = jnp.pad(square, ((0, 0), (0, 0), (1, 0))).reshape(3, 7, 6)[:, 1:]  # the paper's
  np.testing.assert_array_equal(attention.skew(square), padded)


def _all_shapes(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _all_shapes(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _all_shapes(sub, out)
  return out


def test_chunked_relative_attention_never_builds_a_full_square():
  """At T=2048 no intermediate of the forward or backward pass is [.., T, T]: the
  relative logits and probabilities exist one query chunk at a time."""
  b, t, h, d, chunk = 1, 2048, 2, 16, 256
  shape = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((h, t, d), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, table, seg):
    out = attention.attend(q, k, v, impl="chunked", segment_ids=seg, relative_table=table,
                           dropout_rate=0.1, dropout_rng=jax.random.key(0), block=chunk)
    return jnp.sum(out.astype(jnp.float32))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(shape, shape, shape, table, seg)
  shapes = _all_shapes(jaxpr.jaxpr, [])
  assert (b, h, chunk, chunk) in shapes  # a block's logits
  assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (t, t)]
  largest = max(math.prod(s) for s in shapes)
  assert largest <= max(b * h * chunk * 2 * chunk, b * t * h * d, h * (t + chunk) * d)


def test_chunked_dropout_gradient_recomputes_the_same_mask():
  """The chunked backward pass recomputes each block's dropout bits: its gradient equals
  autodiff of dense attention dropping with the same bits, and E[output] is unchanged."""
  q, k, v, table, segments = _inputs(t=32, seed=2)
  key = jax.random.key(3)
  chunk, rate = 8, 0.25
  n = q.shape[1] // chunk

  def chunked(q, k, v, table):
    return attention.chunked_attention(q, k, v, segment_ids=segments, relative_table=table,
                                       dropout_rate=rate, dropout_rng=key, chunk=chunk)

  def dense_with_the_same_bits(q, k, v, table):
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    b, t, h, _ = q.shape
    bits = jnp.concatenate([jnp.concatenate(
        [attention._block_bits((b, h, chunk, chunk), seeds, i, j, n) for j in range(n)],
        axis=-1) for i in range(n)], axis=-2)  # [B, H, T, T]
    logits = jnp.einsum("bthd,bshd->bhts", q, k)
    distance = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    rows = table[:, table.shape[1] - 1 - jnp.clip(distance, 0, t - 1)]
    logits = (logits + jnp.einsum("bthd,htsd->bhts", q, rows)) / math.sqrt(q.shape[-1])
    allowed = (jnp.tril(jnp.ones((t, t), bool))[None, None]
               & (segments[:, None, :, None] == segments[:, None, None, :]))
    probs = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
    probs = attention.layers.drop(probs, bits, attention.layers.keep_threshold(rate))
    return jnp.einsum("bhts,bshd->bthd", probs, v)

  _assert_close(_value_and_grads(chunked, q, k, v, table),
                _value_and_grads(dense_with_the_same_bits, q, k, v, table), 1e-4)
  no_dropout = attention.chunked_attention(q, k, v, chunk=chunk)
  dropped = attention.chunked_attention(q, k, v, dropout_rate=rate, dropout_rng=key,
                                        chunk=chunk)
  assert not np.allclose(dropped, no_dropout)
  # E[dropped] ~ no dropout: the kept probabilities are scaled by 1 / 0.75.
  assert abs(float(jnp.mean(dropped) - jnp.mean(no_dropout))) < 0.05


def _config(**changes):
  base = dict(vocab_size=VOCAB, emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, num_layers=2,
              max_len=256, dropout_rate=0.0, attention_dropout_rate=0.0, position="rope",
              deterministic=True)
  base.update(changes)
  return transformer.TransformerConfig(**base)


def test_resolve_attention_impl_per_platform():
  resolve = transformer.resolve_attention_impl
  rope = _config()
  relative = _config(position="relative")
  dropout = _config(attention_dropout_rate=0.1)
  bf16 = _config(dtype="bfloat16")
  assert resolve(rope, "tpu", 8, seq_len=2048) == "splash"
  assert resolve(rope, "tpu", 8, seq_len=200) == "chunked"
  assert resolve(relative, "tpu", 8) == "chunked"
  assert resolve(dropout, "tpu", 8) == "chunked"  # never the CPU-tuned path
  assert resolve(bf16, "gpu", 8) == "cudnn"
  assert resolve(bf16, "cuda", 8, packing=True) == "xla"
  assert resolve(rope, "gpu", 8) == "xla"
  assert resolve(relative.replace(dtype="bfloat16"), "gpu", 8) == "chunked"
  assert resolve(relative, "cpu", 1) == "cpu_blocked"
  assert resolve(rope, "cpu", 8) == "cpu_blocked"
  if cpu_attention.available():
    assert resolve(rope, "cpu", 1) == "cpu_kernel"
    assert resolve(dropout, "cpu", 1) == "cpu_kernel"  # dropout calls run cpu_blocked
  for cfg, backend, message in [
      (_config(attention_impl="splash"), "cpu", "model.pallas_interpret=True"),
      (_config(attention_impl="splash"), "gpu", "TPU kernel"),
      (_config(attention_impl="splash", attention_dropout_rate=0.1), "tpu",
       "model.attention_dropout_rate=0.1"),
      (_config(attention_impl="cudnn", position="relative", dtype="bfloat16"), "gpu",
       "relative-position bias"),
      (_config(attention_impl="cudnn"), "gpu", "bfloat16 or float16"),
      (_config(attention_impl="cudnn", dtype="bfloat16"), "tpu", "NVIDIA GPU"),
      (_config(attention_impl="xla", attention_dropout_rate=0.1), "gpu", "no attention dropout"),
      (_config(attention_impl="cpu_blocked"), "tpu", "tuned for XLA:CPU"),
      (_config(attention_impl="cpu_kernel"), "cpu", "one CPU device"),
      (_config(attention_impl="cpu_kernel", position="relative"), "cpu", "relative"),
  ]:
    with pytest.raises(ConfigError, match="model.attention_impl='") as e:
      resolve(cfg, backend, 4 if "one CPU" in message else 1, seq_len=128)
    assert message in str(e.value)
  with pytest.raises(ConfigError, match="multiple of 128"):
    resolve(_config(attention_impl="splash", pallas_interpret=True), "cpu", 1, seq_len=100)
  assert resolve(_config(attention_impl="splash", pallas_interpret=True), "cpu", 1) == "splash"


def _model(**changes):
  return transformer.Transformer(_config(**changes),
                                 rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))


def _logits_and_grads(model, tokens, segments=None, dropout_key=None):
  """Logits and parameter gradients (per layer, also for a scanned model) in one jit."""
  @nnx.jit
  def run(model):
    def loss(model):
      logits = model(tokens, segment_ids=segments, dropout_rng=dropout_key,
                     deterministic=dropout_key is None)
      return jnp.mean(jax.nn.log_softmax(logits[..., :VOCAB])[..., 0]), logits
    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads
  logits, grads = run(model)
  return np.asarray(logits[..., :VOCAB]), jax.tree.leaves(transformer.unstack_layers(grads))


def test_model_backends_agree_with_packing():
  """The same model on splash (interpret), chunked and xla as on cpu_blocked: same logits
  and gradients, with packed rows."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 128)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], [50, 78], axis=1))
  want_logits, want_grads = _logits_and_grads(
      _model(attention_impl="cpu_blocked", num_layers=1), tokens, segments)
  for impl in ("splash", "chunked", "xla"):
    logits, grads = _logits_and_grads(
        _model(attention_impl=impl, pallas_interpret=True, num_layers=1), tokens, segments)
    np.testing.assert_allclose(logits, want_logits, atol=2e-4, rtol=2e-4, err_msg=impl)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-3, err_msg=impl)


def test_splash_model_prefills_any_prompt_and_samples_on_any_platform():
  """Splash tiles multiples of 128 tokens: a 5-token prompt's prefill runs XLA's attention.
  A model trained with splash and loaded on a CPU (no interpret mode) runs the CPU
  backend instead of failing."""
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (2, 128)), jnp.int32)
  splash = _model(attention_impl="splash", pallas_interpret=True, num_layers=1)
  full = np.asarray(jax.jit(lambda t: splash(t))(tokens))
  prompt_logits, _ = jax.jit(lambda t: splash.prefill(t, 16))(tokens[:, :5])
  np.testing.assert_allclose(prompt_logits, full[:, :5], atol=2e-4, rtol=2e-4)
  on_cpu = _model(attention_impl="splash", num_layers=1)  # same seed: same parameters
  np.testing.assert_allclose(jax.jit(lambda t: on_cpu(t))(tokens), full, atol=2e-4, rtol=2e-4)


def test_remat_and_scanned_layers_compute_the_same_model():
  """remat_policy and scan_layers change memory and compile time, not the math: the same
  seed gives the same parameters, logits and gradients (dropout and relative attention
  included)."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 32)), jnp.int32)
  key = jax.random.key(4)
  common = dict(position="relative", max_len=32, dropout_rate=0.1,
                attention_dropout_rate=0.1, attention_impl="chunked", attention_block=8)
  want_logits, want_grads = _logits_and_grads(_model(**common), tokens, dropout_key=key)
  for changes in (dict(remat_policy="full"), dict(scan_layers=True, remat_policy="save_dots")):
    logits, grads = _logits_and_grads(_model(**common, **changes), tokens, dropout_key=key)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5, err_msg=str(changes))
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=str(changes))
  for name in transformer.REMAT_POLICIES:  # every policy is a valid jax.checkpoint policy
    assert name == "none" or callable(transformer.remat_policy(name))


def test_weight_decay_skips_the_same_parameters_when_scanned():
  from midijax import train

  def by_name(mask):  # parameter path without the layer index -> decayed?
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(mask):
      keys = [str(getattr(k, "key", k)) for k in path]
      out["/".join(k for k in keys if not k.isdigit())] = value
    return out

  plain = train.weight_decay_mask(nnx.state(_model(position="relative"), nnx.Param))
  scanned = train.weight_decay_mask(
      nnx.state(_model(position="relative", scan_layers=True), nnx.Param))
  assert by_name(plain) == by_name(scanned)
  assert 0 < sum(by_name(plain).values()) < len(by_name(plain))


def test_scanned_model_decodes_like_its_forward_pass():
  model = _model(position="relative", max_len=32, scan_layers=True, attention_impl="chunked",
                 attention_block=8)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 20)), jnp.int32)
  full = np.asarray(model(tokens))[..., :VOCAB]
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens[:, :6], 20)
    steps = [logits[:, -1]]
    for pos in range(6, 19):
      step, cache = model.decode_step(tokens[:, pos], cache, pos)
      steps.append(step)
    return logits, jnp.stack(steps, axis=1)

  prompt_logits, steps = decode(state)
  np.testing.assert_allclose(prompt_logits[..., :VOCAB], full[:, :6], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(steps[..., :VOCAB], full[:, 5:19], atol=1e-4, rtol=1e-4)


def test_checkpoints_convert_between_scanned_and_unscanned(tmp_path):
  """Parameters saved by an unscanned model restore into a scanned one and back
  (`stack_layers` / `unstack_layers`), through Orbax, with the same logits."""
  plain, scanned = _model(), _model(scan_layers=True)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 16)), jnp.int32)
  want = np.asarray(plain(tokens))
  assert transformer.params_scanned(nnx.state(plain)) is False
  assert transformer.params_scanned(nnx.state(scanned)) is True
  # nnx.State in memory, both ways (the unscanned model's values into the scanned model).
  stacked = transformer.stack_layers(nnx.state(plain, nnx.Param))
  nnx.update(scanned, stacked)
  np.testing.assert_allclose(scanned(tokens), want, atol=1e-5)
  back = transformer.unstack_layers(nnx.state(scanned, nnx.Param))
  other = _model(num_layers=2)
  nnx.update(other, jax.tree.map(lambda x: x + 0, back))
  np.testing.assert_allclose(other(tokens), want, atol=1e-5)
  # Through Orbax: an unscanned checkpoint read as plain dicts ("0", "1" layer keys).
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path)
  assert transformer.params_scanned(restored) is False
  fresh = _model(scan_layers=True)
  target = nnx.state(fresh, nnx.Param)
  nnx.replace_by_pure_dict(target, transformer.stack_layers(restored))
  nnx.update(fresh, target)
  np.testing.assert_allclose(fresh(tokens), want, atol=1e-5)


def test_scanned_rematerialized_run_trains_samples_and_names_its_layout(groove_tfds, tmp_path):
  """A groove_tiny run with scanned, rematerialized blocks trains on real Groove data, logs
  its attention backend in run_info.json, samples through the decode API, and a resume
  with the other scan setting says which one the checkpoint was saved with."""
  import json
  import configs.groove_tiny as groove_tiny
  from midijax import runs, sampling, train
  config = groove_tiny.get_config()
  config.data.data_dir = str(groove_tfds)
  config.data.update(batch_size=4, seq_len=32)
  config.model.update(max_len=32, num_layers=2, scan_layers=True, remat_policy="save_dots")
  config.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2,
                      warmup_steps=1, async_checkpointing=False)
  train.train_and_evaluate(config, str(tmp_path))
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert info["attention_impl"] == ("cpu_kernel" if cpu_attention.available() else "cpu_blocked")
  model, enc, _, _ = runs.load_run(tmp_path)
  assert model.config.scan_layers and transformer.params_scanned(nnx.state(model))
  result = sampling.generate(model, enc, num_samples=2, max_new_tokens=8, seed=0)
  assert all(len(t) > result.prompt_length for t in result.tokens)
  config.model.scan_layers = False
  config.train.num_steps = 4
  with pytest.raises(ConfigError, match="saved with config.model.scan_layers=True"):
    train.train_and_evaluate(config, str(tmp_path))
