"""Prompt guidance (`sampling.sample_tokens(guidance=...)`, config.sample.guidance): each
token chosen from log p(x | prompt) + g * (log p(x | prompt) - log p(x | prefix)), the
second term from a prompt-free stream that reads the prefix and the sampled tokens."""
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midijax import encoding, evaluation, generation, sampling
from midijax.errors import MidijaxError
from midijax.models.transformer import Transformer, TransformerConfig

ENC = encoding.get("drums", time_unit="beats", bar_tokens=True)
SHIFT = lambda k: ENC.vocab[f"TIME_SHIFT_{k}"]  # noqa: E731
BAR, KICK, SNARE = ENC.vocab["BAR"], ENC.vocab["DRUM_kick"], ENC.vocab["DRUM_snare"]
LOUD = ENC.vocab["VELOCITY_24"]
KEEP = 8
PROMPT = [ENC.bos_id, BAR, LOUD, KICK, SHIFT(12), SNARE, SHIFT(36), BAR, KICK]


def make_model():
  """Every input the sampler carries per stream: bar positions, time-rope heads, the echo."""
  tables = ENC.echo_tables()
  cfg = TransformerConfig(vocab_size=ENC.vocab_size, emb_dim=32, num_heads=2, num_layers=2,
                          qkv_dim=32, mlp_dim=64, max_len=64, dropout_rate=0.0,
                          attention_dropout_rate=0.0, deterministic=True,
                          bar_clock=tuple(ENC.bar_clock()), bar_positions=32, time_rope_heads=1,
                          bar_echo=3, bar_echo_bars=2, echo_classes=tuple(tables["classes"]),
                          echo_velocities=tuple(tables["velocities"]), echo_cell=tables["cell"])
  return Transformer(cfg, rngs=nnx.Rngs(jax.random.key(1, impl="unsafe_rbg")))


def window(seq, cache_len):
  """What a stream's cache holds after `seq`: all of it, or (once it has slid) the prefix
  and the kept tokens."""
  if len(seq) < cache_len:
    return seq
  keep = KEEP + (len(seq) - cache_len) % (cache_len - 1 - KEEP)
  return seq[:1] + seq[len(seq) - keep:]


@pytest.mark.parametrize("cache_len", [16, 40])
def test_guided_greedy_sampling_equals_the_two_streams_by_full_forwards(cache_len):
  """Greedy guided sampling = argmax of the mixed log-probabilities of two full forwards:
  the prompted window, and the prompt-free one (prefix + sampled tokens) until the
  prompted window slides, the same window after."""
  model = make_model()
  guidance, n = 1.5, 30
  prompt = np.asarray([PROMPT], np.int32)
  out = sampling.sample_tokens(model, prompt, encoding=ENC, max_new_tokens=n,
                               temperature=0.0, constrained=False, cache_len=cache_len,
                               window_keep=KEEP, prefix_len=1, min_new_tokens=n,
                               guidance=guidance)["tokens"][0]
  forward = jax.jit(lambda tokens: model(tokens))

  def last(tokens):
    """Log-probabilities after `tokens`: one compiled forward, padded after the end (the
    model is causal, so the padding changes nothing before it)."""
    row = np.full((1, model.config.max_len), encoding.PAD_ID, np.int32)
    row[0, :len(tokens)] = tokens
    return jax.nn.log_softmax(forward(jnp.asarray(row))[0, len(tokens) - 1])

  seq, free = list(PROMPT), PROMPT[:1]
  for _ in range(n):
    with_prompt = last(window(seq, cache_len))
    if len(seq) >= cache_len:  # slid: the prompt is out of the window, guidance adds nothing
      alone = with_prompt
    else:
      alone = last(free)
    mixed = (with_prompt + guidance * (with_prompt - alone)).at[encoding.EOS_ID].set(-jnp.inf)
    token = int(jnp.argmax(mixed))
    seq.append(token)
    free = free + [token]
  np.testing.assert_array_equal(out, seq)
  plain = sampling.sample_tokens(model, prompt, encoding=ENC, max_new_tokens=n,
                                 temperature=0.0, constrained=False, cache_len=cache_len,
                                 window_keep=KEEP, prefix_len=1, min_new_tokens=n)["tokens"][0]
  assert (plain != out).any()  # the guidance changed the choice


def test_guidance_needs_a_prompt_and_is_checked():
  model = make_model()
  kw = dict(encoding=ENC, max_new_tokens=12, temperature=1.0, seed=3, prefix_len=1)
  alone = np.asarray([[ENC.bos_id]], np.int32)
  # Nothing after the prefix: one stream, the same samples as without guidance.
  np.testing.assert_array_equal(sampling.sample_tokens(model, alone, guidance=2.0, **kw)["tokens"],
                                sampling.sample_tokens(model, alone, **kw)["tokens"])
  # Constrained guided samples keep the grammar.
  from midijax import constraints
  rows = sampling.sample_tokens(model, np.asarray([PROMPT] * 4, np.int32), guidance=1.0,
                                **{**kw, "max_new_tokens": 40})["tokens"]
  assert not np.any(constraints.grammar_violations(list(rows), ENC))
  with pytest.raises(ValueError, match="guidance"):
    sampling.sample_tokens(model, alone, guidance=-0.5, **kw)
  config = ml_collections.ConfigDict({"model": {"max_len": 64}, "data": {"seq_len": 64},
                                      "sample": {"guidance": 0.5}})
  assert generation.sampling_settings(config, ENC)["guidance"] == 0.5
  assert generation.sampling_settings(config, ENC, guidance=0.0)["guidance"] == 0.0
  assert evaluation.resolve_sampling(config)["guidance"] == 0.5
  assert evaluation.resolve_sampling(ml_collections.ConfigDict({"sample": {}}))["guidance"] == 0
  with pytest.raises(MidijaxError, match="guidance"):
    generation.sampling_settings(config, ENC, guidance=-1.0)
  with pytest.raises(MidijaxError, match="guidance"):
    evaluation.resolve_sampling(config, guidance=float("nan"))
  # An infinite weight would turn the log-probabilities into NaN: refused too.
  with pytest.raises(MidijaxError, match="guidance"):
    generation.sampling_settings(config, ENC, guidance=float("inf"))
  with pytest.raises(ValueError, match="guidance"):
    sampling.sample_tokens(model, alone, guidance=float("inf"), **kw)
