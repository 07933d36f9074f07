"""Tests for midijax.models.transformer on tiny configs (CPU, float32)."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midijax.errors import ConfigError
from midijax.models import attention, layers, transformer
from midijax.models.transformer import Transformer, TransformerConfig

VOCAB = 200  # padded to 256
POSITIONS = ("sinusoidal", "rope", "relative")
# Decode and full forward run the same float32 math in a different order
# (cache-length attention, other matmul shapes); observed differences are ~2e-6
# on logits of magnitude ~4.
DECODE_ATOL = DECODE_RTOL = 1e-5
# Same computation on different-but-equal inputs (causality, packing).
ATOL = 1e-5


def tiny_config(**changes) -> TransformerConfig:
  base = dict(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_layers=2, qkv_dim=32,
              mlp_dim=64, max_len=32, dropout_rate=0.1, attention_dropout_rate=0.1,
              deterministic=True)
  base.update(changes)
  return TransformerConfig(**base)


def make_model(**changes) -> Transformer:
  # unsafe_rbg keys compile ~5x faster than threefry on CPU (XLA's RngBitGenerator
  # vs the unrolled threefry hash); initial values do not matter here.
  return Transformer(tiny_config(**changes), rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))


def tokens_for(batch, length, seed=0):
  # numpy, not jax.random: every eager jax.random shape costs a compile.
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


@nnx.jit(static_argnames=("deterministic",))
def forward(model, tokens, positions=None, segment_ids=None, deterministic=True,
            dropout_rng=None):
  return model(tokens, positions=positions, segment_ids=segment_ids,
               deterministic=deterministic, dropout_rng=dropout_rng)


def test_config_pads_vocab_and_validates():
  assert tiny_config(vocab_size=128).padded_vocab_size == 128
  assert tiny_config(vocab_size=129).padded_vocab_size == 256
  assert tiny_config(dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match="config.model.position='alibi'"):
    tiny_config(position="alibi")
  with pytest.raises(ConfigError, match="config.model.qkv_dim=30"):
    tiny_config(qkv_dim=30)
  with pytest.raises(ConfigError, match="config.model.attention_impl='flash'"):
    tiny_config(attention_impl="flash")
  with pytest.raises(ConfigError, match="config.model.remat_policy='some'"):
    tiny_config(remat_policy="some")
  with pytest.raises(ConfigError, match="config.model.attention_dropout_rate=1.0"):
    tiny_config(attention_dropout_rate=1.0)


# One config per position type, shared by the causality, packing and decode tests
# (same config and input shapes -> one compiled forward pass), together covering
# both norms, both activations and tied / untied output.
VARIANTS = {
    "sinusoidal": dict(position="sinusoidal", norm="layernorm", mlp_activation="gelu",
                       tied_embeddings=True),
    "rope": dict(position="rope", norm="rmsnorm", mlp_activation="swiglu",
                 tied_embeddings=False),
    "relative": dict(position="relative", norm="layernorm", mlp_activation="swiglu",
                     tied_embeddings=True),
}
BATCH, LENGTH = 2, 24


def test_output_shape_and_padded_vocab_masked():
  model = make_model(**VARIANTS["rope"])
  logits = forward(model, tokens_for(BATCH, LENGTH))
  assert logits.shape == (BATCH, LENGTH, 256) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits[..., VOCAB:], transformer.MASKED_LOGIT)
  assert np.all(np.isfinite(logits))
  assert int(jnp.max(jnp.argmax(logits, -1))) < VOCAB
  # Padded ids get exactly zero probability, even at a low sampling temperature.
  np.testing.assert_array_equal(jax.nn.softmax(logits / 0.01)[..., VOCAB:], 0.0)


@pytest.mark.parametrize("position", POSITIONS)
def test_causal_mask(position):
  """Changing tokens from position 10 on never changes the logits before it."""
  model = make_model(**VARIANTS[position])
  tokens = tokens_for(BATCH, LENGTH)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % VOCAB)
  before, after = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(before[:, :10], after[:, :10], atol=ATOL, rtol=0)
  assert float(jnp.max(jnp.abs(before[:, 10:] - after[:, 10:]))) > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_segments_are_isolated(position):
  """A packed row gives each piece the logits it gets at the start of a row."""
  model = make_model(**VARIANTS[position])
  a, b = np.asarray(tokens_for(1, 10, seed=1)[0]), np.asarray(tokens_for(1, 14, seed=2)[0])
  pad10, pad14 = np.zeros(10, a.dtype), np.zeros(14, a.dtype)
  # Row 0: a then b packed. Rows 1, 2: a or b alone, followed by padding (id 0).
  tokens = np.stack([np.concatenate([a, b]), np.concatenate([a, pad14]),
                     np.concatenate([b, pad10])])
  segment_ids = np.array([[1] * 10 + [2] * 14, [1] * 10 + [0] * 14, [1] * 14 + [0] * 10])
  # Positions default to restarting per segment.
  np.testing.assert_array_equal(transformer.positions_from_segments(segment_ids)[0],
                                np.concatenate([np.arange(10), np.arange(14)]))
  logits = forward(model, tokens, segment_ids=segment_ids)
  np.testing.assert_allclose(logits[0, :10], logits[1, :10], atol=ATOL, rtol=0)
  np.testing.assert_allclose(logits[0, 10:], logits[2, :14], atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_decode_matches_full_forward(position):
  """Prefill a prompt in one pass, then step one token at a time inside jit + fori_loop."""
  model = make_model(**VARIANTS[position])
  prompt_len, cache_len = 7, 32
  tokens = tokens_for(BATCH, LENGTH)
  full = forward(model, tokens)
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill_then_step(state, tokens):
    model = nnx.merge(graphdef, state)
    prompt_logits, cache = model.prefill(tokens[:, :prompt_len], cache_len)
    step_logits = jnp.zeros((BATCH, LENGTH, model.config.padded_vocab_size), jnp.float32)

    def step(i, carry):
      step_logits, cache = carry
      logits, cache = model.decode_step(tokens[:, i], cache, i)
      return step_logits.at[:, i].set(logits), cache

    step_logits, _ = jax.lax.fori_loop(prompt_len, LENGTH, step, (step_logits, cache))
    return prompt_logits, step_logits[:, prompt_len:]

  prompt_logits, step_logits = prefill_then_step(state, tokens)
  decoded = jnp.concatenate([prompt_logits, step_logits], axis=1)
  np.testing.assert_allclose(decoded[..., :VOCAB], full[..., :VOCAB],
                             atol=DECODE_ATOL, rtol=DECODE_RTOL)
  np.testing.assert_array_equal(decoded[..., VOCAB:], transformer.MASKED_LOGIT)


@pytest.mark.parametrize("variant, key_impl", [
    (dict(norm="layernorm", mlp_activation="gelu", position="relative"), "threefry2x32"),
    (dict(norm="rmsnorm", mlp_activation="swiglu", position="sinusoidal"), "unsafe_rbg"),
], ids=["layernorm-gelu", "rmsnorm-swiglu"])
def test_train_step_with_dropout_and_packing(variant, key_impl):
  """Both norms and activations run forward + backward with dropout and packing."""
  model = make_model(**variant, deterministic=False)
  tokens = tokens_for(BATCH, LENGTH)
  segment_ids = jnp.array([[1] * 9 + [2] * 15, [1] * 24])

  @nnx.jit
  def loss_and_grads(model, rng):
    def loss_fn(model):
      logits = model(tokens, segment_ids=segment_ids, dropout_rng=rng)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = loss_and_grads(model, jax.random.key(0, impl=key_impl))
  assert np.isfinite(loss) and 4.0 < float(loss) < 12.0  # ~log(200) = 5.3 at init
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
  other_loss, _ = loss_and_grads(model, jax.random.key(1, impl=key_impl))
  assert float(other_loss) != float(loss)  # dropout depends on the key


def test_dropout_needs_rng_and_respects_deterministic():
  model = make_model(**VARIANTS["rope"], deterministic=False)
  tokens = tokens_for(BATCH, LENGTH)
  with pytest.raises(ValueError, match="dropout_rng"):
    model(tokens)
  clean = forward(model, tokens, deterministic=True)
  model.eval()  # sets model.deterministic = True: no key needed, same logits.
  np.testing.assert_allclose(forward(model, tokens, deterministic=None), clean, atol=ATOL, rtol=0)


def test_dropout_rate_and_expectation():
  x = jnp.ones((64, 32, 48))
  y = layers.dropout(x, 0.25, jax.random.key(0))
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.75) < 0.01
  assert abs(float(jnp.mean(y)) - 1.0) < 0.02
  # Odd last dim (not a multiple of 4 bytes) and a non-default key implementation.
  z = layers.dropout(jnp.ones((5, 7)), 0.5, jax.random.key(1, impl="rbg"))
  assert z.shape == (5, 7) and set(np.unique(z)) <= {0.0, 2.0}
  np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(0)), x)


def test_written_out_attention_matches_dot_product_attention():
  """cpu_blocked's dense written-out form (short sequences, dropout) equals jax.nn's."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 12, 4, 8), np.float32) for _ in range(3))
  bias = rng.standard_normal((2, 4, 12, 12), np.float32)
  mask = (rng.random((2, 1, 12, 12)) < 0.7) | np.eye(12, dtype=bool)
  # A rate this small keeps every element (the keep threshold rounds to 2^32/2^32), but
  # still applies the dropout code.
  @jax.jit
  def both_paths(q, k, v, bias, mask, rng):
    causal = jnp.tril(jnp.ones((12, 12), bool))
    return (attention._attend_written_out(q, k, v, None, causal, 1e-12, rng),
            jax.nn.dot_product_attention(q, k, v, is_causal=True),
            attention._attend_written_out(q, k, v, bias, mask, 1e-12, rng),
            jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask))

  causal_manual, causal_fast, masked_manual, masked_fast = both_paths(
      q, k, v, bias, mask, jax.random.key(5))
  np.testing.assert_allclose(causal_manual, causal_fast, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(masked_manual, masked_fast, atol=1e-5, rtol=1e-5)


def test_parameters_carry_logical_names():
  # Metadata needs no values: an abstract (eval_shape) model suffices.
  model = nnx.eval_shape(lambda: make_model(position="relative", mlp_activation="swiglu"))
  names = {
      jax.tree_util.keystr(path): var.get_metadata()["out_sharding"]
      for path, var in jax.tree.leaves_with_path(
          nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  }
  expected = {
      "['embedding']": ("vocab", "embed"),
      "['output']": ("embed", "vocab"),
      "['final_norm']['scale']": ("embed",),
      "['blocks'][0]['attention']['query']": ("embed", "heads", "kv"),
      "['blocks'][0]['attention']['key']": ("embed", "heads", "kv"),
      "['blocks'][0]['attention']['value']": ("embed", "heads", "kv"),
      "['blocks'][0]['attention']['out']": ("heads", "kv", "embed"),
      "['blocks'][0]['attention']['relative_embedding']": ("heads", "relpos", "kv"),
      "['blocks'][1]['mlp']['wi']": ("embed", "mlp"),
      "['blocks'][1]['mlp']['wi_gate']": ("embed", "mlp"),
      "['blocks'][1]['mlp']['wo']": ("mlp", "embed"),
      "['blocks'][1]['mlp_norm']['scale']": ("embed",),
  }
  for path, logical in expected.items():
    assert names[path] == logical, path
  # Every parameter is annotated, with one name per dimension.
  state = nnx.state(model, nnx.Param)
  for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    assert len(var.get_metadata()["out_sharding"]) == len(var.shape)


def test_count_params_and_flops_per_token():
  d, h, dh, layers, f, t = 64, 4, 16, 2, 128, 32
  config = tiny_config(emb_dim=d, num_heads=h, qkv_dim=h * dh, num_layers=layers, mlp_dim=f,
                       mlp_activation="swiglu", position="rope", tied_embeddings=False)
  # Matmul weights: per layer q, k, v, out (4 * 64 * 64) + SwiGLU (3 * 64 * 128),
  # plus the output projection over the real vocab (64 * 200).
  n = layers * (4 * d * h * dh + 3 * d * f) + d * VOCAB
  assert n == 94_720 == transformer.matmul_params(config)
  assert transformer.flops_per_token(config, t) == 6 * n + 12 * layers * h * dh * t == 617_472
  relative = config.replace(position="relative")
  assert transformer.flops_per_token(relative, t) == 617_472 + 6 * layers * h * dh * t
  # All stored parameters: padded embedding and output, plus 2 norms per layer + final.
  # (An abstract model: counting needs shapes only.)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  stored = 256 * d + layers * (4 * d * h * dh + 3 * d * f + 2 * d) + d + d * 256
  assert transformer.count_params(model) == stored
  gelu_tied = config.replace(mlp_activation="gelu", tied_embeddings=True)
  assert transformer.matmul_params(gelu_tied) == layers * (4 * d * h * dh + 2 * d * f) + d * VOCAB
  model = nnx.eval_shape(lambda: Transformer(gelu_tied, rngs=nnx.Rngs(0)))
  tied_stored = 256 * d + layers * (4 * d * h * dh + 2 * d * f + 2 * d) + d
  assert transformer.count_params(model) == tied_stored


def test_blocked_causal_attention_equals_dense_with_gradients():
  """Query blocks that skip the masked triangle give the dense result and gradients."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((2, 2, 16, 16)), jnp.float32)
  segments = np.repeat([[1, 2], [1, 1]], 8, axis=1)  # row 0: two packed pieces
  mask = jnp.asarray(segments[:, :, None] == segments[:, None, :])[:, None]

  def loss(q, k, v, bias, block, mask=None):
    out = attention._cpu_attention(q, k, v, bias=bias, mask=mask, dropout_rate=0.0,
                                   dropout_rng=None, block=block, allow_kernel=False)
    return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size)

  # No bias / a full [B, H, T, T] bias (relative attention's) / a broadcast one; packing.
  for b, extra in ((None, {}), (bias, {}), (bias[:1, :, :1], {}), (None, {"mask": mask})):
    argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)
    dense = jax.jit(jax.value_and_grad(lambda *a: loss(*a, 0, **extra), argnums=argnums))
    blocked = jax.jit(jax.value_and_grad(lambda *a: loss(*a, 4, **extra), argnums=argnums))
    (want, want_grads), (got, got_grads) = dense(q, k, v, b), blocked(q, k, v, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_relu_model_with_attention_blocks_is_causal_and_matches_dense():
  blocked = make_model(position="sinusoidal", mlp_activation="relu", attention_block=8)
  dense = make_model(position="sinusoidal", mlp_activation="relu", attention_block=0)
  tokens = tokens_for(BATCH, LENGTH, seed=3)
  changed = tokens.at[:, 13:].set((tokens[:, 13:] + 1) % VOCAB)
  got, got_changed = forward(blocked, tokens), forward(blocked, changed)
  np.testing.assert_allclose(got, forward(dense, tokens), atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(got[:, :13], got_changed[:, :13], atol=ATOL)
  assert not np.allclose(got[:, 13:], got_changed[:, 13:], atol=ATOL)


def test_hash_dropout_bits_are_balanced_and_decorrelated():
  seeds = jax.random.bits(jax.random.key(3), (2,), jnp.uint32)
  bits = np.asarray(layers.hash_bits((4, 64, 256), seeds))
  # Each of the 32 bit positions is set about half the time.
  per_bit = ((bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=(0, 1, 2))
  assert np.all(np.abs(per_bit - 0.5) < 0.01)
  # Neighbouring rows and columns are unrelated (uniform u32: correlation ~0).
  u = bits.astype(np.float64) / 2**32
  for a, b in ((u[:, 1:], u[:, :-1]), (u[..., 1:], u[..., :-1]), (u[1:], u[:-1])):
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
  # Another key, another mask; the same key, the same mask.
  x = jnp.ones((256, 256))
  a, b = (layers.dropout(x, 0.5, jax.random.key(s)) for s in (0, 1))
  assert 0.45 < float(jnp.mean((a != 0) == (b != 0))) < 0.55
  np.testing.assert_array_equal(a, layers.dropout(x, 0.5, jax.random.key(0)))


def test_blocked_attention_dropout_backward_matches_autodiff():
  """The hand-written backward, recomputing the dropout mask, equals autodiff's."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(3))
  key = jax.random.key(7)
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  threshold = layers.keep_threshold(0.25)
  weights = jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32)

  def reference(q, k, v):  # autodiff through the same forward computation
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # _causal_blocks' layout
    out = attention._causal_blocks(heads_first(q), heads_first(k), heads_first(v), None,
                                     None, 4, threshold, seeds)[0]
    return jnp.sum(weights * heads_first(out))

  def blocked(q, k, v):
    return jnp.sum(weights * attention.causal_block_attention(q, k, v, None, None, 4, 0.25,
                                                                key))

  (want, want_grads), (got, got_grads) = (
      jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v) for f in (reference, blocked))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  no_dropout = attention.causal_block_attention(q, k, v, None, None, 4)
  assert not np.allclose(attention.causal_block_attention(q, k, v, None, None, 4, 0.25, key),
                         no_dropout)


@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_dense_gradient_matches_autodiff_of_einsum(out_dtype):
  """`dense`'s written-out gradient (one contraction over the flattened rows) equals
  autodiff of the plain einsum, for [B, T, K] inputs as the projections use it."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, 7)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(cot * f(x, w))

  reference = loss(lambda x, w: jnp.einsum("btk,kn->btn", x, w))
  ours = loss(lambda x, w: layers.dense(x, w, out_dtype))
  np.testing.assert_allclose(layers.dense(x, w, out_dtype), x @ w, rtol=1e-6, atol=1e-6)
  got, want = (jax.jit(jax.grad(f, argnums=(0, 1)))(x, w) for f in (ours, reference))
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
