"""The echo of earlier bars (config.model.bar_echo): what was hit at the same place in the
previous bars, computed from the tokens the same way in training, prefill, decoding and
the sampler."""
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midijax import encoding, runs, sampling
from midijax.errors import ConfigError
from midijax.models.transformer import Transformer, TransformerConfig

ENC = encoding.get("drums", time_unit="beats", bar_tokens=True)
TABLES = ENC.echo_tables()
SHIFT = lambda k: ENC.vocab[f"TIME_SHIFT_{k}"]  # noqa: E731
BAR = ENC.vocab["BAR"]
KICK, SNARE, HAT = ENC.vocab["DRUM_kick"], ENC.vocab["DRUM_snare"], ENC.vocab["DRUM_closed_hihat"]
LOUD, SOFT = ENC.vocab["VELOCITY_24"], ENC.vocab["VELOCITY_8"]
CLASS = {KICK: 0, SNARE: 1, HAT: 2}


def make_model(bar_echo=2, bar_echo_bars=1, **changes):
  cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=2,
                          qkv_dim=32, mlp_dim=64, max_len=64, dropout_rate=0.0,
                          attention_dropout_rate=0.0, deterministic=True,
                          bar_clock=tuple(ENC.bar_clock()), bar_echo=bar_echo,
                          bar_echo_bars=bar_echo_bars, echo_classes=tuple(TABLES["classes"]),
                          echo_velocities=tuple(TABLES["velocities"]), echo_cell=TABLES["cell"],
                          **changes)
  return Transformer(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))


def test_echo_tables_of_the_encodings():
  assert TABLES["cell"] == 12  # a 16th at 48 steps a quarter
  assert [TABLES["classes"][i] for i in (KICK, SNARE, HAT)] == [
      ENC.drum_index(np.asarray([36]))[0], 1, 2]
  assert TABLES["classes"][LOUD] == TABLES["classes"][BAR] == TABLES["classes"][SHIFT(3)] == -1
  assert TABLES["velocities"][LOUD] == pytest.approx(24 / 32)
  assert TABLES["velocities"][KICK] == -1
  # Only drum encodings with bar lines and velocities before their hits echo.
  assert encoding.get("drums", time_unit="beats", bar_tokens=True,
                      velocity_after=True).echo_tables() is None
  assert encoding.get("drums").echo_tables() is None
  assert encoding.get("performance").echo_tables() is None


def _features(model, row, segments=None):
  f = model.bar_echo_features(jnp.asarray([row]),
                              None if segments is None else jnp.asarray([segments]))
  cfg = model.config
  return np.asarray(f)[0].reshape(len(row), cfg.bar_echo_bars, cfg.bar_echo,
                                  cfg.echo_num_classes, 3)


def test_echo_shows_the_previous_bar_by_cell_with_loudness_and_offset():
  model = make_model(bar_echo=2, bar_echo_bars=2)
  row = [ENC.bos_id, BAR, LOUD, KICK, SHIFT(14), SOFT, SNARE, SHIFT(34),     # bar 1: 0, 14
         BAR, SHIFT(2), LOUD, HAT, SHIFT(10),                                # bar 2: 2
         BAR, SHIFT(12)]                                                     # bar 3
  f = _features(model, row)
  hit = lambda i: {(lag, cell, c) for lag, cell, c in zip(*np.nonzero(f[i, ..., 0]))}
  # Bar 1 has no earlier bar in the window; nothing before the first BAR is placed.
  for i in range(8):
    assert not f[i].any(), i
  # At bar 2's line (time 0): the kick at 0 is in cell 0, the snare at 14 in cell 1 (aimed
  # at 12, two steps late), with the loudness in force at each.
  assert hit(8) == {(0, 0, 0), (0, 1, 1)}
  np.testing.assert_allclose(f[8, 0, 0, 0], [1, 24 / 32, 0], atol=1e-6)
  np.testing.assert_allclose(f[8, 0, 1, 1], [1, 8 / 32, 2 / 12], atol=1e-6)
  # Two steps on, the cells move with the token's time: the kick is two steps behind.
  np.testing.assert_allclose(f[9, 0, 0, 0], [1, 24 / 32, -2 / 12], atol=1e-6)
  np.testing.assert_allclose(f[9, 0, 1, 1], [1, 8 / 32, 0], atol=1e-6)
  # At 12 the snare (14) is in cell 0 and nothing of bar 1 lies in the next cell.
  assert hit(12) == {(0, 0, 1)}
  # Bar 3 sees bar 2 one bar back and bar 1 two bars back.
  assert hit(13) == {(0, 0, 2), (1, 0, 0), (1, 1, 1)}
  np.testing.assert_allclose(f[13, 0, 0, 2], [1, 24 / 32, 2 / 12], atol=1e-6)
  # A packed row's second piece does not echo the first one.
  packed = row[:8] + row[1:8]
  g = _features(model, packed, [1] * 8 + [2] * 7)
  assert not g[8:].any() and not g[:8].any()
  # The sampler's one-token form, over a buffer with anything after the token, agrees;
  # so does its state carried on token by token from the first.
  buffer = jnp.asarray([row + [KICK] * 5])
  state = model.echo_state(buffer, 0)
  for i in range(len(row)):
    np.testing.assert_allclose(np.asarray(model.bar_echo_at(buffer, i))[0],
                               f[i].reshape(-1), atol=1e-6)
    if i:
      state = model.advance_echo(state, buffer[:, i], i)
    np.testing.assert_allclose(np.asarray(model.echo_of(state))[0], f[i].reshape(-1),
                               atol=1e-6)


def test_echo_changes_the_prediction_and_decoding_matches_the_full_forward():
  model = make_model(bar_positions=32, time_rope_heads=1)
  rng = np.random.default_rng(0)
  kinds = [SHIFT(12), SHIFT(24), SHIFT(6), KICK, SNARE, LOUD, SOFT, BAR]
  tokens = jnp.asarray(rng.choice(kinds, (2, 28)), jnp.int32)
  full = model(tokens)
  prompt = 7
  logits, cache = model.prefill(tokens[:, :prompt], 32)
  np.testing.assert_allclose(logits[:, -1], full[:, prompt - 1], atol=1e-5)
  bar_time = model.bar_times(tokens[:, :prompt])[:, -1]
  music = model.music_times(tokens[:, :prompt])[:, -1]
  for i in range(prompt, tokens.shape[1]):
    bar_time = model.advance_bar_time(bar_time, tokens[:, i])
    music = model.advance_music_time(music, tokens[:, i])
    step, cache = model.decode_step(tokens[:, i], cache, i, bar_time=bar_time,
                                    music_time=music, echo=model.bar_echo_at(tokens, i))
    np.testing.assert_allclose(step, full[:, i], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="echo"):
    model.decode_step(tokens[:, 0], cache, 0, bar_time=bar_time, music_time=music)
  # The same last bar after another earlier bar predicts differently: the echo is used.
  a = model(jnp.asarray([[BAR, LOUD, KICK, SHIFT(48), BAR, SHIFT(12)]]))[0, -1]
  b = model(jnp.asarray([[BAR, LOUD, SNARE, SHIFT(48), BAR, SHIFT(12)]]))[0, -1]
  c = model(jnp.asarray([[BAR, LOUD, KICK, SHIFT(24), BAR, SHIFT(12)]]))[0, -1]
  assert float(jnp.abs(a - c).max()) > 1e-3  # the kick is 12 steps away: in another cell
  assert float(jnp.abs(a - b).max()) > 1e-3
  # The parameters drawn before the echo's projection are those of the model without it.
  base = make_model(bar_echo=0, bar_positions=32, time_rope_heads=1)
  assert np.array_equal(np.asarray(base.embedding[...]), np.asarray(model.embedding[...]))
  assert np.array_equal(np.asarray(base.bar_embedding[...]),
                        np.asarray(model.bar_embedding[...]))


@pytest.mark.parametrize("cache_len", [16, 40])
def test_sampler_echoes_like_the_full_forward_through_the_window_slide(cache_len):
  """Greedy sampling equals greedy decoding by full forwards of the same window: the
  sampler's echo reads the window (after a slide, the prefix and the kept tokens), as
  training's does."""
  model = make_model(bar_echo=3, bar_echo_bars=2, bar_positions=32)
  prompt = np.asarray([[ENC.bos_id, BAR, LOUD, KICK, SHIFT(12), SNARE, SHIFT(36), BAR, KICK]],
                      np.int32)
  out = sampling.sample_tokens(model, prompt, encoding=ENC, max_new_tokens=24,
                               temperature=0.0, constrained=False, cache_len=cache_len,
                               window_keep=8, prefix_len=1, min_new_tokens=24)["tokens"][0]
  # One compiled forward, padded after the window's end (causal: nothing before changes).
  forward = jax.jit(lambda tokens: model(tokens))
  seq = list(prompt[0])
  for _ in range(24):
    window = seq if len(seq) < cache_len else None
    if window is None:  # the slid window: prefix + the last window_keep tokens
      keep = 8 + (len(seq) - cache_len) % (cache_len - 9)
      window = seq[:1] + seq[len(seq) - keep:]
    row = np.full((1, model.config.max_len), encoding.PAD_ID, np.int32)
    row[0, :len(window)] = window
    logits = forward(jnp.asarray(row))[0, len(window) - 1].at[encoding.EOS_ID].set(-jnp.inf)
    seq.append(int(jnp.argmax(logits)))
  np.testing.assert_array_equal(out[:len(seq)], seq)


def test_bar_echo_is_checked_and_filled_from_the_encoding():
  with pytest.raises(ConfigError, match=r"config.model.bar_echo=-1 must be an integer >= 0"):
    TransformerConfig(vocab_size=10, bar_echo=-1)
  with pytest.raises(ConfigError, match=r"config.model.bar_echo_bars=0 must be an integer >= 1"):
    TransformerConfig(vocab_size=10, bar_echo_bars=0)
  config = ml_collections.ConfigDict({"model": {"bar_echo": 4, "emb_dim": 32, "num_layers": 1,
                                                "qkv_dim": 32, "mlp_dim": 64, "num_heads": 2}})
  cfg = runs.model_config_from(config, ENC.vocab_size, encoding=ENC)
  assert cfg.echo_classes == tuple(TABLES["classes"]) and cfg.echo_cell == 12
  assert cfg.bar_clock == tuple(ENC.bar_clock())
  assert cfg.echo_features == 2 * 4 * 9 * 3
  Transformer(cfg, rngs=nnx.Rngs(0))
  # An encoding without the tables: the model names the field.
  dv = encoding.get("drums", time_unit="beats", bar_tokens=True, velocity_after=True)
  cfg = runs.model_config_from(config, dv.vocab_size, encoding=dv)
  with pytest.raises(ConfigError, match=r"^config.model.bar_echo=4 needs a drum encoding "
                                        "with BAR tokens"):
    Transformer(cfg, rngs=nnx.Rngs(0))
