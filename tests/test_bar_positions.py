"""Bar-position embeddings (config.model.bar_positions): the time since the last BAR token,
and time-rope heads (config.model.time_rope_heads): rotary positions counted in the
music's time; both computed from the encoding's bar clock the same way in training,
prefill, decoding and the sampler."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midijax import encoding, runs, sampling
from midijax.errors import ConfigError
from midijax.models.transformer import Transformer, TransformerConfig

ENC = encoding.get("drums", time_unit="beats", bar_tokens=True)
SHIFT = lambda k: ENC.vocab[f"TIME_SHIFT_{k}"]  # noqa: E731
BAR = ENC.vocab["BAR"]
KICK, SNARE = ENC.vocab["DRUM_kick"], ENC.vocab["DRUM_snare"]
VEL = ENC.vocab["VELOCITY_20"]


def make_model(bar_positions=64, **changes):
  cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=2,
                          qkv_dim=32, mlp_dim=64, max_len=64, dropout_rate=0.0,
                          attention_dropout_rate=0.0, deterministic=True,
                          bar_positions=bar_positions, bar_clock=tuple(ENC.bar_clock()),
                          **changes)
  return Transformer(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))


def test_bar_clock_of_the_encodings():
  clock = ENC.bar_clock()
  assert clock.shape == (ENC.vocab_size,) and clock[BAR] == -1
  assert clock[SHIFT(1)] == 1 and clock[SHIFT(48)] == 48
  assert clock[KICK] == clock[VEL] == clock[ENC.bos_id] == 0
  # No bar lines, no clock.
  assert encoding.get("drums").bar_clock() is None
  assert encoding.get("performance").bar_clock() is None


def test_bar_times_count_from_the_last_bar_and_restart_with_each_segment():
  model = make_model()
  row = [ENC.bos_id, SHIFT(5), KICK, VEL, BAR, KICK, VEL, SHIFT(48), SNARE, VEL, SHIFT(10),
         BAR, SHIFT(2)]
  times = np.asarray(model.bar_times(jnp.asarray([row])))[0]
  # Unknown (-1) until the first BAR of the window; a BAR is at 0; shifts add their steps.
  np.testing.assert_array_equal(times, [-1, -1, -1, -1, 0, 0, 0, 48, 48, 48, 58, 0, 2])
  # Packed rows: a new segment does not inherit the previous piece's bar.
  packed = jnp.asarray([row[:6] + row[:6]])
  segments = jnp.asarray([[1] * 6 + [2] * 6])
  np.testing.assert_array_equal(np.asarray(model.bar_times(packed, segments))[0],
                                [-1, -1, -1, -1, 0, 0] * 2)
  # Token by token (the sampler's way) gives the same times.
  t = jnp.full((1,), -1, jnp.int32)
  for i, token in enumerate(row):
    t = model.advance_bar_time(t, jnp.asarray([token]))
    assert int(t[0]) == times[i]


def _assert_decoding_matches_the_full_forward(model, seed, prompt):
  """Prefill of `prompt` random tokens, then decode steps carrying the bar time and the
  music time the model uses, give the full forward's logits. Returns (tokens, cache)."""
  cfg = model.config
  rng = np.random.default_rng(seed)
  kinds = [SHIFT(12), SHIFT(24), SHIFT(6), KICK, SNARE, VEL, BAR]
  tokens = jnp.asarray(rng.choice(kinds, (2, 24)), jnp.int32)
  full = model(tokens)
  logits, cache = model.prefill(tokens[:, :prompt], 32)
  np.testing.assert_allclose(logits[:, -1], full[:, prompt - 1], atol=1e-5)
  bar_time = model.bar_times(tokens[:, :prompt])[:, -1] if cfg.bar_positions else None
  music = model.music_times(tokens[:, :prompt])[:, -1] if cfg.time_rope_heads else None
  for i in range(prompt, tokens.shape[1]):
    if cfg.bar_positions:
      bar_time = model.advance_bar_time(bar_time, tokens[:, i])
    if cfg.time_rope_heads:
      music = model.advance_music_time(music, tokens[:, i])
    step, cache = model.decode_step(tokens[:, i], cache, i, bar_time=bar_time,
                                    music_time=music)
    np.testing.assert_allclose(step, full[:, i], atol=1e-5, rtol=1e-5)
  return tokens, cache


def test_bar_position_changes_the_prediction_and_decoding_matches_the_full_forward():
  model = make_model()
  tokens, cache = _assert_decoding_matches_the_full_forward(model, seed=0, prompt=6)
  with pytest.raises(ValueError, match="bar_time"):
    model.decode_step(tokens[:, 0], cache, 0)
  # The same tokens one bar position later predict differently: the embedding is used.
  a = model(jnp.asarray([[BAR, SHIFT(12), KICK]]))[0, -1]
  b = model(jnp.asarray([[BAR, SHIFT(24), KICK]]))[0, -1]
  base = make_model(bar_positions=0)
  assert float(jnp.abs(a - b).max()) > 1e-3
  # Without it the parameters drawn before it are the same.
  assert np.array_equal(np.asarray(base.embedding[...]), np.asarray(model.embedding[...]))


@pytest.mark.parametrize("time_rope_heads", [0, 1])
def test_sampler_carries_bar_times_like_the_full_forward(time_rope_heads):
  """Greedy sampling through the window slide equals greedy decoding by full forwards of
  the same window (the sampler's bar time and music time after a slide are the window's
  own)."""
  model = make_model(time_rope_heads=time_rope_heads)
  prompt = np.asarray([[ENC.bos_id, BAR, SHIFT(12), KICK, VEL, SHIFT(12), SNARE, VEL]],
                      np.int32)
  out = sampling.sample_tokens(model, prompt, encoding=ENC, max_new_tokens=20,
                               temperature=0.0, constrained=False, cache_len=16,
                               window_keep=8, prefix_len=1, min_new_tokens=20)["tokens"][0]
  seq = list(prompt[0])
  for _ in range(20):
    window = seq if len(seq) < 16 else None
    if window is None:  # the slid window: prefix + the last window_keep tokens
      keep = 8 + (len(seq) - 16) % 7
      window = seq[:1] + seq[len(seq) - keep:]
    logits = model(jnp.asarray([window]))[0, -1].at[encoding.EOS_ID].set(-jnp.inf)
    seq.append(int(jnp.argmax(logits)))
  np.testing.assert_array_equal(out[:len(seq)], seq)


def test_a_model_asking_for_bar_positions_needs_bar_tokens():
  cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=1,
                          qkv_dim=32, mlp_dim=64, max_len=32, bar_positions=16)
  with pytest.raises(ConfigError, match="config.model.bar_positions=16 needs an encoding "
                                        "with BAR tokens"):
    Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="config.model.bar_positions=-1"):
    TransformerConfig(vocab_size=10, bar_positions=-1)
  import ml_collections
  config = ml_collections.ConfigDict({"model": {"bar_positions": 8, "emb_dim": 32}})
  assert runs.model_config_from(config, ENC.vocab_size, encoding=ENC).bar_clock == tuple(
      ENC.bar_clock())
  drums_10ms = encoding.get("drums")
  assert runs.model_config_from(config, drums_10ms.vocab_size,
                                encoding=drums_10ms).bar_clock == ()


def test_training_a_bar_position_model_on_an_encoding_without_bars_names_the_field():
  from configs import groove_small
  from midijax import sharding, train
  config = groove_small.get_config()
  config.model.update(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=64, bar_positions=8)
  mesh = sharding.create_mesh(config.mesh)
  drums_10ms = encoding.get("drums")
  with pytest.raises(ConfigError, match=r"^config.model.bar_positions=8 needs an encoding"):
    train.create_train_state(config, drums_10ms.vocab_size, mesh,
                             sharding.get_logical_axis_rules(config.mesh), abstract=True,
                             encoding=drums_10ms)
  # With bar lines it builds, and the table is one row per step plus "unknown".
  setup, state = train.create_train_state(config, ENC.vocab_size, mesh,
                                          sharding.get_logical_axis_rules(config.mesh),
                                          abstract=True, encoding=ENC)
  assert state.params["bar_embedding"].shape == (9, 32)


def test_music_times_count_from_the_row_and_restart_with_each_segment():
  model = make_model(time_rope_heads=1)
  row = [ENC.bos_id, SHIFT(5), KICK, VEL, BAR, KICK, VEL, SHIFT(48), SNARE, VEL, SHIFT(10),
         BAR, SHIFT(2)]
  times = np.asarray(model.music_times(jnp.asarray([row])))[0]
  np.testing.assert_array_equal(times, [0, 5, 5, 5, 5, 5, 5, 53, 53, 53, 63, 63, 65])
  packed = jnp.asarray([row[:8] + row[:8]])
  segments = jnp.asarray([[1] * 8 + [2] * 8])
  np.testing.assert_array_equal(np.asarray(model.music_times(packed, segments))[0],
                                [0, 5, 5, 5, 5, 5, 5, 53] * 2)
  t = jnp.zeros((1,), jnp.int32)
  for i, token in enumerate(row):
    t = model.advance_music_time(t, jnp.asarray([token]))
    assert int(t[0]) == times[i]
  # The first time_rope_heads heads take the music's time, the others the token index.
  rope = np.asarray(model._rope_positions(jnp.arange(13)[None, :], jnp.asarray([times])))
  np.testing.assert_array_equal(rope[0, :, 0], times)
  np.testing.assert_array_equal(rope[0, :, 1], np.arange(13))


@pytest.mark.parametrize("bar_positions", [0, 64])
def test_time_rope_decoding_matches_the_full_forward(bar_positions):
  model = make_model(bar_positions=bar_positions, time_rope_heads=1)
  tokens, cache = _assert_decoding_matches_the_full_forward(model, seed=1, prompt=5)
  bar_time = jnp.zeros((2,), jnp.int32) if bar_positions else None
  with pytest.raises(ValueError, match="music_time"):
    model.decode_step(tokens[:, 0], cache, 0, bar_time=bar_time)
  # With every head on the music's time, one layer sees the tokens before the last as a
  # set of (token, time) pairs: two hits at the same time in either order predict the
  # same; on token positions they do not.
  def one_layer(heads):
    cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=1,
                            qkv_dim=32, mlp_dim=64, max_len=64, deterministic=True,
                            bar_clock=tuple(ENC.bar_clock()), time_rope_heads=heads)
    return Transformer(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
  rows = jnp.asarray([[SHIFT(12), KICK, SNARE, SHIFT(6), KICK],
                      [SHIFT(12), SNARE, KICK, SHIFT(6), KICK]])
  timed, tokened = one_layer(2)(rows)[:, -1], one_layer(0)(rows)[:, -1]
  np.testing.assert_allclose(timed[0], timed[1], atol=1e-5)
  assert float(jnp.abs(tokened[0] - tokened[1]).max()) > 1e-3


def test_time_rope_heads_are_checked():
  with pytest.raises(ConfigError, match=r"config.model.time_rope_heads=3 must be an integer "
                                        r"in \[0, config.model.num_heads=2\]"):
    make_model(time_rope_heads=3)
  with pytest.raises(ConfigError, match="time_rope_heads=1 needs config.model.position='rope'"):
    make_model(time_rope_heads=1, position="sinusoidal")
  cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=1,
                          qkv_dim=32, mlp_dim=64, max_len=32, time_rope_heads=1)
  with pytest.raises(ConfigError, match="config.model.time_rope_heads=1 needs an encoding "
                                        "with BAR tokens"):
    Transformer(cfg, rngs=nnx.Rngs(0))
  import ml_collections
  config = ml_collections.ConfigDict({"model": {"time_rope_heads": 1, "emb_dim": 32}})
  assert runs.model_config_from(config, ENC.vocab_size, encoding=ENC).bar_clock == tuple(
      ENC.bar_clock())
