"""Tests for midijax.sampling, midijax.constraints and `midijax generate / continue`.

Small random-weight models check the mechanics (cache, token choice, grammar, sliding
window, sharding); a tiny model trained for a few steps on real Groove files checks the
commands end to end. The 8-device check runs in a subprocess that sees 8 CPU devices
(XLA_FLAGS must be set before JAX starts).
"""
import collections
import json
import os
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midijax import cli, encoding, midi_io, sampling
from midijax import constraints as grammar
from conftest import IN_CI
from midijax.kernels import causal_attention as cpu_attention
from midijax.models import kv_cache, transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
# Cached one-token decoding vs the full forward pass: float32, different summation order.
ATOL = 2e-4


def make_model(enc, position="rope", max_len=64, layers=2, seed=0, **changes):
  cfg = transformer.TransformerConfig(
      vocab_size=enc.vocab_size, emb_dim=32, qkv_dim=32, num_heads=2, num_layers=layers,
      mlp_dim=64, max_len=max_len, position=position, dropout_rate=0.0,
      attention_dropout_rate=0.0, deterministic=True, **changes)
  return transformer.Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def drums():
  return encoding.get("drums")


def groove_prompt(enc, path, seconds=2.0):
  """Event ids of the first `seconds` of a Groove file."""
  return encoding.encode_prompt(enc, midi_io.read_notes(path), seconds)


# ----------------------------------------------------------------------------- decoding
def cached_logits(model, tokens, prompt=5, kind="float", phases=(12,)):
  """Logits after positions prompt-1 .. T-2 from `model.prefill` + one-token
  `model.decode_step`s, the cache grown in phases as the sampler grows it."""
  graphdef, state = nnx.split(model)
  batch, length = tokens.shape

  @jax.jit
  def cached(state, tokens):
    model = nnx.merge(graphdef, state)
    first, cache = sampling.prefill(model, tokens[:, :prompt], prompt,
                                    "int8" if kind == "int8" else "model")
    assert cache[0].kind == kind and cache[0].length == prompt
    steps = jnp.zeros((batch, length - 1, first.shape[-1])).at[:, prompt - 1].set(first)

    def step(pos, carry):
      steps, cache = carry
      logits, cache = model.decode_step(tokens[:, pos], cache, pos)
      return steps.at[:, pos].set(logits), cache

    ends = (prompt,) + tuple(phases) + (length - 1,)
    for start, end in zip(ends[:-1], ends[1:]):
      cache = sampling.grow(cache, end + 1)
      steps, cache = jax.lax.fori_loop(start, end, step, (steps, cache))
    return steps[:, prompt - 1:]

  return np.asarray(cached(state, tokens))


@pytest.mark.parametrize("position, keys_transposed, kernel", [
    ("sinusoidal", False, True), ("sinusoidal", False, False), ("rope", False, True),
    ("rope", True, False), ("relative", False, False), ("relative", True, False)])
def test_cached_decode_matches_full_forward(drums, position, keys_transposed, kernel,
                                            monkeypatch):
  """Prefill 5 tokens, then one token per step through growing cache phases.

  kernel: the CPU decode-attention kernel (attention_impl auto on one CPU device) or
  XLA's attention over the cache (attention_impl cpu_blocked).
  """
  # Keys are stored [B, H, Dh, L] from this head_dim on (here 16), on XLA's path.
  monkeypatch.setattr(kv_cache, "KEYS_TRANSPOSED_FROM_HEAD_DIM", 16 if keys_transposed else 64)
  if kernel and not IN_CI and not cpu_attention.available():
    pytest.skip("CPU attention kernel not built (needs g++)")
  model = make_model(drums, position, max_len=32,
                     attention_impl="auto" if kernel else "cpu_blocked")
  assert (model.decode_attention_impl() == "cpu_kernel") == kernel
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, drums.bos_id, (3, 24)), jnp.int32)
  full = model(tokens)
  got = cached_logits(model, tokens)  # logits after positions 4..22
  np.testing.assert_allclose(got[..., :drums.vocab_size], full[:, 4:23, :drums.vocab_size],
                             atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("width", [32, 64])  # head dims 16 (plain loops) and 32 (AVX-512)
def test_int8_cache_decode_close_to_full_forward(drums, width):
  """kv_cache='int8': the kernel and XLA's path agree, and stay close to the exact logits.

  40 tokens cover the kernel's 16-key blocks and its remainder loop.
  """
  def model_with(impl):
    return transformer.Transformer(transformer.TransformerConfig(
        vocab_size=drums.vocab_size, emb_dim=width, qkv_dim=width, num_heads=2, num_layers=2,
        mlp_dim=64, max_len=48, position="rope", dropout_rate=0.0, attention_dropout_rate=0.0,
        deterministic=True, attention_impl=impl), rngs=nnx.Rngs(0))

  tokens = jnp.asarray(np.random.default_rng(0).integers(2, drums.bos_id, (3, 40)), jnp.int32)
  model = model_with("auto")
  full = np.asarray(model(tokens))[:, 4:39, :drums.vocab_size]
  paths = {}
  if IN_CI or cpu_attention.available():
    assert model.decode_attention_impl() == "cpu_kernel"
    paths["kernel"] = cached_logits(model, tokens, kind="int8")[..., :drums.vocab_size]
  xla = model_with("cpu_blocked")
  assert xla.decode_attention_impl() == "xla"
  paths["xla"] = cached_logits(xla, tokens, kind="int8")[..., :drums.vocab_size]
  for got in paths.values():
    # int8 keys/values: logits move by ~1-2% of their spread here, never by 5%.
    assert np.abs(got - full).max() < 0.05 * full.std()
    assert np.abs(got - full).max() > 1e-5  # it did store int8, not the exact cache
    assert (got.argmax(-1) == full.argmax(-1)).mean() > 0.9
  if "kernel" in paths:  # same quantization formula on both paths
    np.testing.assert_allclose(paths["kernel"], paths["xla"], atol=1e-4, rtol=1e-4)


def test_quantize_kv_round_trip():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5, 64)) * 3, jnp.float32)
  x = x.at[0, 0, 0].set(0.0)  # a zero vector: scale 0, codes 0
  q, scale = kv_cache.quantize_kv(x)
  assert q.dtype == jnp.int8 and scale.shape == (2, 3, 5)
  assert np.abs(np.asarray(q)).max() == 127
  err = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[..., None] - np.asarray(x))
  assert (err <= np.asarray(scale)[..., None] / 2 + 1e-6).all()  # half a step at most
  assert float(scale[0, 0, 0]) == 0.0 and not np.asarray(q[0, 0, 0]).any()


def test_sample_tokens_int8_cache(drums):
  """The whole loop with an int8 cache: the same prompt kept, grammar-valid samples, and the
  same seed giving the same samples; bad settings get a clear error."""
  model = make_model(drums, "sinusoidal", max_len=64)
  prompt = np.full((4, 3), drums.bos_id, np.int32)
  prompt[:, 1:] = drums.body_offset
  kw = dict(encoding=drums, max_new_tokens=40, temperature=1.0, top_k=20, seed=3,
            kv_cache="int8", cache_len=32)  # 43 tokens > 32: the window slides too
  a = sampling.sample_tokens(model, prompt, **kw)
  b = sampling.sample_tokens(model, prompt, **kw)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert (a["tokens"][:, :3] == prompt).all()
  rows = [sampling.trim_sample(r, 3) for r in a["tokens"]]
  assert not grammar.grammar_violations(rows, drums, model.config.padded_vocab_size).any()
  with pytest.raises(sampling.MidijaxError, match="kv_cache must be one of model, int8"):
    sampling.sample_tokens(model, prompt, encoding=drums, max_new_tokens=4, kv_cache="fp8")
  relative = make_model(drums, "relative", max_len=32)
  with pytest.raises(sampling.MidijaxError, match="relative attention"):
    sampling.sample_tokens(relative, prompt, encoding=drums, max_new_tokens=4, kv_cache="int8")


# ----------------------------------------------------------------------------- token choice
def draw(logits, n, temperature, top_k=0, top_p=None, seed=0):
  """n samples of choose_tokens from one row of logits."""
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  keys = sampling.row_keys(jnp.int32(seed), n)
  return np.asarray(jax.jit(lambda r, k: sampling.choose_tokens(
      r, k, jnp.float32(temperature), top_k=top_k,
      top_p=None if top_p is None else jnp.float32(top_p)))(rows, keys))


def test_top_k_and_top_p_never_leave_their_sets():
  logits = np.random.default_rng(1).normal(0, 2, 96).astype(np.float32)
  order = np.argsort(-logits)
  n = 4000
  top_k = draw(logits, n, 1.0, top_k=7)
  assert set(top_k) <= set(order[:7]) and len(set(top_k)) == 7
  for temperature, p in ((1.0, 0.7), (0.5, 0.9)):
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs = probs[order] / probs.sum()
    nucleus = order[:int(np.searchsorted(np.cumsum(probs), p)) + 1]
    got = draw(logits, n, temperature, top_p=p)
    assert set(got) <= set(nucleus) and len(set(got)) > 1
    # The kept tokens are drawn in proportion to their renormalized probabilities.
    freq = np.bincount(got, minlength=96)[nucleus] / n
    np.testing.assert_allclose(freq, probs[:len(nucleus)] / probs[:len(nucleus)].sum(),
                               atol=0.03)
  both = draw(logits, n, 1.0, top_k=3, top_p=0.99)
  assert set(both) <= set(order[:3])
  # Temperature 0, or top_k=1, is the argmax whatever the noise.
  assert set(draw(logits, 64, 0.0)) == {order[0]}
  assert set(draw(logits, 64, 1.0, top_k=1)) == {order[0]}
  assert set(draw(logits, 64, 0.0, top_p=0.5)) == {order[0]}


def test_greedy_is_deterministic_and_the_full_forward_argmax(drums):
  model = make_model(drums, "rope", max_len=64)
  prompt = np.tile(drums.with_specials([drums.drum_base, drums.shift_base + 9], eos=False), (3, 1))
  kw = dict(encoding=drums, max_new_tokens=30, constrained=False)
  greedy = sampling.sample_tokens(model, prompt, temperature=0.0, seed=0, **kw)["tokens"]
  again = sampling.sample_tokens(model, prompt, temperature=0.0, seed=5, **kw)["tokens"]
  np.testing.assert_array_equal(greedy, again)
  logits = np.asarray(model(jnp.asarray(greedy)))[..., :drums.vocab_size]
  p = prompt.shape[1]
  np.testing.assert_array_equal(greedy[:, p:], logits[:, p - 1:-1].argmax(-1))


def test_same_seed_reproduces_and_rows_are_independent(drums):
  model = make_model(drums, "sinusoidal")
  prompt = np.tile(drums.with_specials([], eos=False), (4, 1))
  kw = dict(encoding=drums, max_new_tokens=40, temperature=1.0, min_new_tokens=40)
  a = sampling.sample_tokens(model, prompt, seed=7, **kw)["tokens"]
  b = sampling.sample_tokens(model, prompt, seed=7, **kw)["tokens"]
  c = sampling.sample_tokens(model, prompt, seed=8, **kw)["tokens"]
  np.testing.assert_array_equal(a, b)
  assert (a != c).any(axis=1).all()
  assert len({tuple(r) for r in a}) == 4  # one prompt, four different samples
  # Row r draws from fold_in(key(seed), r): the same at any batch size.
  two = sampling.sample_tokens(model, prompt[:2], seed=7, **kw)["tokens"]
  np.testing.assert_array_equal(two, a[:2])


# ----------------------------------------------------------------------------- grammar
def reference_check(enc, ids):
  """An independent, plain-Python reading of each grammar; returns a problem or None."""
  ids = [int(i) for i in ids]
  i = 0
  while i < len(ids) and ids[i] >= enc.bos_id:
    i += 1
  body = ids[i:]
  if encoding.EOS_ID in body and body.index(encoding.EOS_ID) != len(body) - 1:
    return "tokens after EOS"
  ended = bool(body) and body[-1] == encoding.EOS_ID
  events = body[:-1] if ended else body
  if any(not enc.body_offset <= t < enc.bos_id for t in events):
    return "special token mid-sequence"
  if enc.name == "triples":
    kinds = [0 if t < enc.pitch_base else 1 if t < enc.dur_base else 2 for t in events]
    if any(k != j % 3 for j, k in enumerate(kinds)):
      return "triples out of order"
    if ended and len(kinds) % 3:
      return "EOS inside a triple"
  elif enc.name == "performance":
    sounding = collections.Counter()
    after_velocity = False
    for t in events:
      if after_velocity and not enc.note_on_base <= t < enc.note_off_base:
        return "VELOCITY not followed by NOTE_ON"
      if enc.note_on_base <= t < enc.note_off_base:
        sounding[t - enc.note_on_base] += 1
      elif enc.note_off_base <= t < enc.shift_base:
        if sounding[t - enc.note_off_base] == 0:
          return "NOTE_OFF of a silent pitch"
        sounding[t - enc.note_off_base] -= 1
      after_velocity = t >= enc.velocity_base
    if ended and (after_velocity or sum(sounding.values())):
      return "EOS while notes sound"
  return None


@pytest.mark.parametrize("name", ["drums", "performance", "triples"])
def test_constrained_samples_are_valid_midi_and_keep_the_prompt(tmp_path, groove_files, name):
  enc = encoding.get(name)
  model = make_model(enc, "rope", max_len=96, layers=1, seed=3)  # random: breaks any grammar
  events = groove_prompt(enc, groove_files[3], 1.5)[:30]
  if name == "triples":
    events = events[:len(events) // 3 * 3]
  prompt = enc.with_specials(events, {"style": "funk"}, eos=False)
  result = sampling.generate(model, enc, num_samples=64, max_new_tokens=64, temperature=1.5,
                             seed=1, conditions={"style": "funk"}, prompt_ids=events)
  assert result.prompt_length == len(prompt)
  assert all(np.array_equal(t[:len(prompt)], prompt) for t in result.tokens)
  assert not np.any(grammar.grammar_violations(result.tokens, enc))
  assert [reference_check(enc, t) for t in result.tokens] == [None] * 64
  for i, ids in enumerate(result.tokens):
    notes = enc.decode_notes(ids, is_drum=True)
    assert len(notes) > 0
    if i < 4:  # through note-seq and back
      path = midi_io.write_midi(notes, tmp_path / f"{i}.mid")
      assert len(midi_io.read_notes(path)) == len(notes)
  # The same model without the mask breaks the grammar, and the checker sees it.
  free = sampling.generate(model, enc, num_samples=64, max_new_tokens=64, temperature=1.5,
                           seed=1, conditions={"style": "funk"}, prompt_ids=events,
                           constrained=False)
  bad = grammar.grammar_violations(free.tokens, enc)
  assert bad.sum() > 0
  assert sum(reference_check(enc, t) is not None for t in free.tokens) == np.sum(bad > 0)


def test_drum_bars_stay_whole_when_the_meter_is_known(groove_files):
  """drums in beats with BAR tokens: given METER_4-4 (3-4), a random model's constrained
  samples put a BAR every 192 (144) steps and nowhere else; without the mask they do not,
  and the checker counts it. Without a METER token nothing is forced."""
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True)
  model = make_model(enc, "rope", max_len=160, layers=1, seed=3)
  events = groove_prompt(enc, groove_files[3], 2.0)[:24]
  assert events[0] == enc.bar_id
  for meter, bar in (("4-4", 192), ("3-4", 144)):
    cond = {"style": "funk", "meter": meter}
    result = sampling.generate(model, enc, num_samples=32, max_new_tokens=128,
                               temperature=1.5, seed=1, conditions=cond, prompt_ids=events)
    assert not np.any(grammar.grammar_violations(result.tokens, enc))
    bars_seen = 0
    for ids in result.tokens:
      body = enc.strip_specials(ids)
      steps = np.where((body >= enc.shift_base) & (body < enc.velocity_base),
                       body - enc.shift_base + 1, 0)
      at = np.cumsum(steps)[body == enc.bar_id]
      # Bars after the prompt's first one fall exactly a bar apart.
      assert np.all(np.diff(at) == bar), (meter, np.diff(at))
      bars_seen += len(at) - 1
    assert bars_seen >= 8
    free = sampling.generate(model, enc, num_samples=32, max_new_tokens=128, temperature=1.5,
                             seed=1, conditions=cond, prompt_ids=events, constrained=False)
    assert grammar.grammar_violations(free.tokens, enc).sum() > 0
  # No meter in the prefix: no bar length to keep, so the grammar forbids nothing.
  g = grammar.get(enc)
  state = g.init_state(1, jnp.asarray([[enc.bos_id, *events]]))
  assert np.asarray(g.allowed(state))[0, enc.body_offset:enc.bos_id].all()


def test_velocity_after_the_drum_is_kept_by_the_grammar(groove_files):
  """velocity_after: a random model's constrained samples give every DRUM its VELOCITY
  next and write no other VELOCITY, bars stay whole; unconstrained samples break it and
  the checker counts it. A prompt ending on a drum owes its velocity first."""
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True, velocity_after=True)
  model = make_model(enc, "rope", max_len=160, layers=1, seed=3)
  events = groove_prompt(enc, groove_files[3], 2.0)[:24]
  drum_at = np.flatnonzero(events < enc.shift_base)
  is_vel = lambda ids: (ids >= enc.velocity_base) & (ids < enc.offset_base)
  cond = {"style": "funk", "meter": "4-4"}
  for prompt in (events, events[:drum_at[2] + 1]):
    result = sampling.generate(model, enc, num_samples=16, max_new_tokens=96,
                               temperature=1.5, seed=1, conditions=cond, prompt_ids=prompt)
    assert not np.any(grammar.grammar_violations(result.tokens, enc))
    for ids in result.tokens:
      body = enc.strip_specials(ids)
      drums = np.flatnonzero(body < enc.shift_base)
      drums = drums[drums + 1 < len(body)]
      assert np.all(is_vel(body[drums + 1]))
      vel_at = np.flatnonzero(is_vel(body))
      assert np.all(body[vel_at - 1] < enc.shift_base)
      steps = np.where((body >= enc.shift_base) & (body < enc.velocity_base),
                       body - enc.shift_base + 1, 0)
      assert set(np.diff(np.cumsum(steps)[body == enc.bar_id])) <= {192}
  free = sampling.generate(model, enc, num_samples=16, max_new_tokens=96, temperature=1.5,
                           seed=1, conditions=cond, prompt_ids=events, constrained=False)
  assert grammar.grammar_violations(free.tokens, enc).sum() > 0
  g = grammar.get(enc)
  state = g.init_state(1, jnp.asarray([[enc.bos_id, *events[:drum_at[2] + 1]]]))
  allowed = np.asarray(g.allowed(state))[0]
  assert np.array_equal(np.flatnonzero(allowed), np.flatnonzero(is_vel(np.arange(len(allowed)))))
  # A window cut between a hit and its velocity starts with the velocity: no violation.
  assert grammar.grammar_violations(events[drum_at[1] + 1:], enc) == 0
  for text in ("DRUM_kick\nVELOCITY_3\nVELOCITY_4\n", "DRUM_kick\nDRUM_snare\nVELOCITY_2\n",
               "VELOCITY_3\nTIME_SHIFT_4\nVELOCITY_4\n"):
    assert grammar.grammar_violations(enc.from_text(text), enc) == 1, text


def test_continue_names_tempo_and_meter_for_drums_with_bars(groove_files):
  """`continue` with a drums-with-BAR model: the prefix gets the prompt file's tempo bin
  and meter unless given, so the grammar knows the bar (every sample's bars are whole)."""
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True)
  model = make_model(enc, "rope", max_len=256, layers=1, seed=3)
  path = next(f for f in groove_files if f.name.endswith("_4-4.mid"))
  notes = midi_io.read_notes(path)
  cont = sampling.continue_midi(model, enc, path, prompt_bars=1, seconds=4, num_samples=4,
                                temperature=1.5, seed=0, conditions={"style": "funk"})
  prefix = [enc.vocab.names[t] for t in cont.result.tokens[0][1:4]]
  assert prefix == ["STYLE_funk", f"TEMPO_{encoding.tempo_bin(notes.qpm)}", "METER_4-4"]
  for ids in cont.result.tokens:
    body = enc.strip_specials(ids)
    steps = np.where((body >= enc.shift_base) & (body < enc.velocity_base),
                     body - enc.shift_base + 1, 0)
    assert set(np.diff(np.cumsum(steps)[body == enc.bar_id])) <= {192}


def _direct_log_likelihood(model, ids, prefix_len):
  """log p(ids[prefix_len:] | ids[:prefix_len]) from one plain forward pass (float64 sum)."""
  logits = np.asarray(model(jnp.asarray(ids[None, :-1]), deterministic=True), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return float(sum(logp[j - 1, ids[j]] for j in range(prefix_len, len(ids))))


def test_prompt_log_likelihoods_equal_a_plain_forward_pass(groove_files):
  """Rows of any length (padded inside to a bucket) and batch (padded to SCORE_BATCH rows)
  score what one forward pass of the row alone gives."""
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True)
  model = make_model(enc, "rope", max_len=256, layers=1, seed=5)
  events = next(e for e in (groove_prompt(enc, f, 30.0) for f in groove_files) if len(e) > 140)
  for length, prefix_len in ((70, 4), (128, 1), (129, 60)):
    rows = np.stack([enc.with_specials(events[i:i + length - 1], {"style": "funk"}, eos=False)
                     for i in range(3)])
    got = sampling.prompt_log_likelihoods(model, rows, prefix_len)
    want = [_direct_log_likelihood(model, r, prefix_len) for r in rows]
    np.testing.assert_allclose(got, want, rtol=1e-4)
  with pytest.raises(ValueError, match="prefix_len"):
    sampling.prompt_log_likelihoods(model, rows, rows.shape[1])


def test_infer_conditions_picks_the_prefix_that_makes_the_prompt_most_likely(groove_files):
  enc = encoding.get("drums", time_unit="beats", bar_tokens=True)
  model = make_model(enc, "rope", max_len=256, layers=1, seed=7)
  notes = midi_io.read_notes(groove_files[3])
  events = encoding.encode_prompt(enc, notes, 2.0)
  kinds = ["style", "tempo", "type", "meter"]
  known = encoding.conditions_of_notes(notes, kinds)
  assert known == {"tempo": encoding.tempo_bin(notes.qpm), "meter": "4-4"}
  cond, record = sampling.infer_conditions(model, enc, events, known, kinds)
  # Every (style, type) scored by a plain forward pass: the chosen one is the best.
  scores = {}
  for style in encoding.CONDITIONING["style"]:
    for kind in encoding.CONDITIONING["type"]:
      c = sampling.ordered_conditions({**known, "style": style, "type": kind})
      ids = enc.with_specials(events, c, eos=False)
      scores[style, kind] = _direct_log_likelihood(model, ids, len(ids) - len(events))
  ranked = sorted(scores, key=scores.get, reverse=True)
  assert (record["values"]["style"], record["values"]["type"]) == ranked[0]
  assert record["kinds"] == ["style", "type"] and record["candidates"] == 36
  assert record["log_likelihood"] == pytest.approx(scores[ranked[0]], rel=1e-4)
  assert record["runner_up"]["nats_less_likely"] == pytest.approx(
      scores[ranked[0]] - scores[ranked[1]], abs=1e-3)
  assert list(cond) == kinds and cond["style"] == ranked[0][0]  # the prefix order
  # Given kinds are kept; kinds the run was not trained with are not added.
  cond, record = sampling.infer_conditions(model, enc, events, {**known, "style": "jazz"}, kinds)
  assert cond["style"] == "jazz" and record["kinds"] == ["type"] and record["candidates"] == 2
  cond, record = sampling.infer_conditions(model, enc, events, known, ["tempo", "meter"])
  assert cond == known and record == {}
  # The prompt starts from the prefix continue_midi gives it.
  path = groove_files[3]
  cont = sampling.continue_midi(model, enc, path, prompt_bars=1, seconds=2, num_samples=2,
                                seed=0, condition_kinds=kinds)
  names = [enc.vocab.names[i] for i in cont.result.tokens[0][1:5]]
  values = cont.inferred["values"]
  assert names == [f"STYLE_{values['style']}", f"TEMPO_{known['tempo']}",
                   f"TYPE_{values['type']}", "METER_4-4"]
  assert cont.conditions == {**known, **values}


def test_continue_infers_style_and_type_the_run_was_trained_with(tiny_run, groove_files,
                                                                 groove_tfds, tmp_path, capsys):
  """tiny_run trained on groove/drums (style, tempo, type prefixes): `continue` without
  --style / --type fills both from the model and says so; given, they are used as given.
  Runs without the record in run_info.json read it from their dataset when it is here."""
  from midijax import runs
  info = json.loads((tiny_run / "run_info.json").read_text())
  assert info["conditioning"] == ["style", "tempo", "type"]
  src = next(f for f in groove_files if "beat" in f.name)
  out = tmp_path / "inferred"
  code, stdout, err = run_cli(capsys, "continue", "--workdir", tiny_run, "--prompt", src,
                              "--prompt_bars", 1, "--seconds", 2, "--num_samples", 2,
                              "--out", out)
  assert code == 0, err
  assert "no --style --type given; the prompt is most likely as style " in stdout
  settings = json.loads((out / "continue.json").read_text())["settings"]
  inferred = settings["inferred_conditions"]
  assert inferred["kinds"] == ["style", "type"] and inferred["candidates"] == 36
  assert list(settings["conditions"]) == ["style", "tempo", "type"]
  assert settings["conditions"]["style"] == inferred["values"]["style"]
  tokens = (out / "sample_00.txt").read_text().splitlines()
  assert tokens[1:5] == ["BOS", f"STYLE_{inferred['values']['style']}",
                         f"TEMPO_{settings['conditions']['tempo']}",
                         f"TYPE_{inferred['values']['type']}"]
  code, stdout, err = run_cli(capsys, "continue", "--workdir", tiny_run, "--prompt", src,
                              "--prompt_bars", 1, "--seconds", 2, "--num_samples", 1,
                              "--style", "funk", "--type", "fill", "--out", tmp_path / "given")
  assert code == 0, err
  settings = json.loads((tmp_path / "given" / "continue.json").read_text())["settings"]
  assert settings["inferred_conditions"] == {} and "most likely" not in stdout
  assert settings["conditions"]["style"] == "funk" and settings["conditions"]["type"] == "fill"
  # The record's fallback: the dataset's metadata.json, when the dataset is built here.
  config = json.loads((tiny_run / "config.json").read_text())
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "run_info.json").write_text(json.dumps({"git_commit": "x"}))
  import ml_collections
  assert runs.conditioning_kinds(old, ml_collections.ConfigDict(config)) == [
      "style", "tempo", "type"]
  config["data"]["data_dir"] = str(tmp_path / "nowhere")
  assert runs.conditioning_kinds(old, ml_collections.ConfigDict(config)) is None
  assert runs.conditioning_kinds(old) is None


def test_grammar_state_after_a_prompt():
  perf = encoding.get("performance")
  g = grammar.get(perf, 512)
  on, off = perf.note_on_base + 39, perf.note_off_base + 39  # pitch 60
  prompt = jnp.asarray([[perf.bos_id, perf.velocity_base + 20, on, perf.shift_base + 9]])
  allowed = np.asarray(g.allowed(g.init_state(1, prompt)))[0]
  assert allowed[off] and allowed[on] and not allowed[off + 1]
  assert not allowed[encoding.EOS_ID] and not allowed[perf.bos_id] and not allowed[0]
  after_vel = g.init_state(1, jnp.asarray([[perf.velocity_base]]))
  allowed = np.asarray(g.allowed(after_vel))[0]
  assert allowed.sum() == perf.num_pitches and allowed[on]
  assert grammar.grammar_violations([perf.bos_id, off, encoding.EOS_ID], perf) == 1
  assert grammar.grammar_violations([perf.bos_id, on, off, encoding.EOS_ID], perf) == 0


# ----------------------------------------------------------------------------- long samples
def test_max_seconds_cuts_at_the_time_limit(drums):
  model = make_model(drums, "rope")
  result = sampling.generate(model, drums, num_samples=8, max_new_tokens=60, temperature=1.0,
                             seed=2, max_seconds=0.5)
  for ids, reason, seconds in zip(result.tokens, result.stop_reasons, result.seconds):
    new = ids[result.prompt_length:]
    shifts = new[(new >= drums.shift_base) & (new < drums.velocity_base)]
    assert np.sum(shifts - drums.shift_base + 1) / 100 == pytest.approx(seconds)
    assert seconds <= 0.5
    assert reason in sampling.STOP_REASONS


def test_sliding_window_runs_past_the_context(drums):
  """Greedy with a 32-token context and 12 kept: the same tokens as re-running the full
  model on the window the sampler holds at every step."""
  max_len, keep = 32, 12
  model = make_model(drums, "relative", max_len=max_len)
  prompt = drums.with_specials([drums.drum_base + 1, drums.shift_base + 20],
                               {"style": "rock", "type": "beat"}, eos=False)
  out = sampling.sample_tokens(model, np.tile(prompt, (2, 1)), encoding=drums,
                               max_new_tokens=90, temperature=0.0, window_keep=keep,
                               min_new_tokens=90)
  tokens = out["tokens"]
  assert tokens.shape[1] == len(prompt) + 90 > 2 * max_len
  assert not np.any(grammar.grammar_violations(list(tokens), drums))
  forward = jax.jit(lambda t: model(t))
  context = list(range(len(prompt)))
  for n in range(len(prompt), tokens.shape[1]):
    window = tokens[:, context]
    logits = np.asarray(forward(jnp.asarray(np.pad(window, ((0, 0), (0, max_len - len(context)))))))
    logits = logits[:, len(context) - 1]
    allowed = np.asarray(grammar.get(drums, logits.shape[-1]).allowed(
        {"rows": jnp.zeros(2, jnp.int32)}))
    np.testing.assert_array_equal(tokens[:, n], np.where(allowed, logits, -1e9).argmax(-1))
    context.append(n)
    if len(context) == max_len:  # slide: the prefix and the last `keep` tokens
      context = list(range(3)) + list(range(n + 1 - keep, n + 1))  # BOS, STYLE, TYPE


# ----------------------------------------------------------------------------- sharding
SHARDED_CHILD = r"""
import json, os
import jax, numpy as np, ml_collections
from flax import nnx
from midijax import encoding, sampling, sharding
from midijax.models import transformer
enc = encoding.get("performance")
cfg = transformer.TransformerConfig(vocab_size=enc.vocab_size, emb_dim=32, qkv_dim=32,
    num_heads=2, num_layers=1, mlp_dim=64, max_len=64, position="rope", dropout_rate=0.0,
    attention_dropout_rate=0.0, deterministic=True)
make = lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))
kw = dict(num_samples=6, max_new_tokens=48, temperature=1.0, top_k=20, top_p=0.95, seed=4,
          conditions={"dataset": "maestro"})
report = {"devices": jax.device_count()}
for kv in ("model", "int8"):
  report["single", kv] = [t.tolist() for t in
                          sampling.generate(make(), enc, kv_cache=kv, **kw).tokens]
  for name, ici in (("data8", (8, 1, 1)), ("mixed", (2, 2, 2))):
    mesh = sharding.create_mesh(ml_collections.ConfigDict(
        {"ici_parallelism": ici, "dcn_parallelism": (1, 1, 1)}))
    model = sharding.create_sharded_model(make, mesh)
    result = sampling.generate(model, enc, mesh=mesh, kv_cache=kv, **kw)
    report[name, kv] = [t.tolist() for t in result.tokens]
report = {"devices": report.pop("devices"), **{"/".join(k): v for k, v in report.items()}}
print("REPORT=" + json.dumps(report))
"""


def test_sharded_sampling_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", SHARDED_CHILD], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.split("REPORT=")[-1])
  assert report["devices"] == 8
  for kv in ("model", "int8"):  # the int8 cache's scales are sharded like the cache
    # The batch split over 8 devices (6 rows padded), and data x fsdp x tensor.
    assert report[f"data8/{kv}"] == report[f"single/{kv}"]
    assert report[f"mixed/{kv}"] == report[f"single/{kv}"]


# ----------------------------------------------------------------------------- commands
class GrooveCrops:
  """A data source for train_and_evaluate: crops of real Groove files with a prefix."""

  def __init__(self, files, enc, seq_len, batch_size):
    self.enc, self.seq_len, self.batch_size = enc, seq_len, batch_size
    self.vocab_size = enc.vocab_size
    prefix = {"style": "funk", "tempo": "100-110", "type": "beat"}
    self.pieces = [enc.with_specials(enc.encode(midi_io.read_notes(f)), prefix) for f in files]

  def save_vocab(self, path):
    self.enc.save_vocab(path)

  def _batch(self, rng):
    rows = []
    for _ in range(self.batch_size):
      piece = self.pieces[rng.integers(len(self.pieces))]
      start = 4 + rng.integers(max(len(piece) - 4 - self.seq_len, 1))
      row = np.concatenate([piece[:4], piece[start:start + self.seq_len - 3]])
      rows.append(np.pad(row, (0, self.seq_len + 1 - len(row))))
    rows = np.stack(rows).astype(np.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "weights": (rows[:, 1:] != 0).astype(np.float32)}

  def train_batches(self, start_step):
    step = start_step
    while True:
      yield self._batch(np.random.default_rng(step))
      step += 1

  def eval_batches(self):
    return iter([self._batch(np.random.default_rng(-1 % 2**32))])


@pytest.fixture(scope="module")
def groove_run(tmp_path_factory, groove_files):
  """A tiny drums model trained for a few steps on 8 Groove files (a real workdir)."""
  from configs import default
  from midijax import train
  workdir = tmp_path_factory.mktemp("groove_run")
  config = default.get_config()
  config.model.update(emb_dim=32, qkv_dim=32, num_heads=2, num_layers=1, mlp_dim=64,
                      max_len=96, dropout_rate=0.0)
  config.data.update(seq_len=96, batch_size=8)
  config.train.update(num_steps=12, warmup_steps=2, log_every=12, eval_every=12,
                      checkpoint_every=12, learning_rate=3e-3, async_checkpointing=False)
  train.train_and_evaluate(config, workdir,
                           data=GrooveCrops(groove_files[:8], encoding.get("drums"), 96, 8))
  return workdir


def run_cli(capsys, *args):
  code = cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def test_generate_writes_midi_tokens_and_report(groove_run, tmp_path, capsys):
  out = tmp_path / "gen"
  code, stdout, err = run_cli(capsys, "generate", "--workdir", groove_run, "--num_samples", 3,
                              "--max_tokens", 120, "--temperature", 0.9, "--top_k", 30,
                              "--top_p", 0.95, "--seed", 1, "--style", "funk", "--bpm", 104,
                              "--type", "beat", "--out", out)
  assert code == 0, err
  report = json.loads((out / "generate.json").read_text())
  assert report["checkpoint_step"] == 12 and len(report["samples"]) == 3
  assert report["settings"]["conditions"] == {"style": "funk", "tempo": "104", "type": "beat"}
  assert report["timing"]["tokens_per_s"] > 0
  for i in range(3):
    notes = midi_io.read_notes(out / f"sample_{i:02d}.mid", allow_empty=True)
    assert notes.is_drum.all()
    lines = (out / f"sample_{i:02d}.txt").read_text().splitlines()
    assert lines[0].startswith("# midijax encoding=drums") and lines[1:5] == [
        "BOS", "STYLE_funk", "TEMPO_100-110", "TYPE_beat"]
  # The course project's positional form: generate LENGTH [TEMPERATURE] [TOP_K].
  code, _, err = run_cli(capsys, "generate", 120, 0.7, 30, "--workdir", groove_run,
                         "--num_samples", 3, "--top_p", 0.95, "--style", "funk", "--bpm", 104,
                         "--type", "beat", "--out", tmp_path / "course")
  assert code == 0, err
  settings = json.loads((tmp_path / "course" / "generate.json").read_text())["settings"]
  assert (settings["max_new_tokens"], settings["temperature"], settings["top_k"]) == (120, 0.7, 30)
  assert settings["kv_cache"] == "model"  # exact cache unless asked


def test_continue_a_groove_file(groove_run, groove_files, tmp_path, capsys):
  src = groove_files[20]
  out = tmp_path / "cont"
  code, stdout, err = run_cli(capsys, "continue", "--workdir", groove_run, "--prompt", src,
                              "--prompt_bars", 1, "--seconds", 4, "--num_samples", 2,
                              "--top_k", 20, "--kv_cache", "int8", "--guidance", 0.5,
                              "--out", out)
  assert code == 0, err
  prompt = midi_io.read_notes(out / "prompt.mid")
  report = json.loads((out / "continue.json").read_text())
  assert report["settings"]["kv_cache"] == "int8" and report["settings"]["guidance"] == 0.5
  cut = report["settings"]["prompt_seconds"]
  for i in range(2):
    full = midi_io.read_notes(out / f"sample_{i:02d}_full.mid")
    alone = midi_io.read_notes(out / f"sample_{i:02d}_continuation.mid", allow_empty=True)
    assert full.is_drum.all() and len(full) == len(prompt) + len(alone)
    # The full file starts with the prompt, unchanged (to the 10 ms grid).
    np.testing.assert_allclose(np.sort(full.start)[:len(prompt)], np.sort(prompt.start), atol=1e-3)
    assert alone.total_time <= 4.0 + 0.11  # 4 s of new hits, the last one 0.1 s long
    assert report["samples"][i]["stop_reason"] in sampling.STOP_REASONS
  assert cut == pytest.approx(midi_io.read_notes(src).qpm and sampling.bar_seconds(
      midi_io.read_notes(src)))


def test_bad_inputs_are_one_clear_line(groove_run, groove_files, tmp_path, capsys):
  bad_midi = tmp_path / "bad.mid"
  bad_midi.write_bytes(b"MThd\x00\x00\x00\x06garbage")
  empty = tmp_path / "empty"
  empty.mkdir()
  other_vocab = tmp_path / "other_vocab"
  other_vocab.mkdir()
  for name in ("config.json", "best.json"):
    (other_vocab / name).write_bytes((groove_run / name).read_bytes())
  os.symlink(groove_run / "checkpoints", other_vocab / "checkpoints")
  encoding.get("triples").save_vocab(other_vocab / "vocab.json")
  base = ["--workdir", groove_run, "--out", tmp_path / "x"]
  cases = [
      (["continue", "--prompt", tmp_path / "missing.mid", *base], "file not found"),
      (["continue", "--prompt", bad_midi, *base], "bad.mid"),
      (["generate", "--workdir", empty], "not a midijax workdir"),
      (["generate", "--workdir", other_vocab], "incompatible encoding"),
      (["generate", *base, "--style", "polka"], "funk"),  # lists the valid styles
      (["generate", *base, "--max_tokens", 5, "--temperature", -1], "temperature"),
      (["continue", "--prompt", groove_files[0], *base, "--guidance", -1], "--guidance"),
  ]
  for args, needle in cases:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, (args, err)
    assert len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    assert "Traceback" not in err
  assert not (tmp_path / "x").exists()
  # A prompt longer than the model's context is not an error: the model sees its end.
  long_out = tmp_path / "long"
  code, _, err = run_cli(capsys, "continue", "--prompt", groove_files[0], "--prompt_seconds",
                         60, "--workdir", groove_run, "--out", long_out, "--num_samples", 1,
                         "--max_tokens", 16)
  assert code == 0, err
  report = json.loads((long_out / "continue.json").read_text())
  assert report["settings"]["prompt_tokens"] > report["settings"]["cache_len"]
  assert (long_out / "sample_00_full.mid").exists()


def test_samplers_default_to_the_context_the_run_was_trained_on():
  from midijax import generation
  import ml_collections
  config = ml_collections.ConfigDict({"model": {"max_len": 512}, "data": {"seq_len": 256},
                                      "sample": {"temperature": 0.8}})
  enc = encoding.get("drums")
  assert generation.trained_context(config) == 256
  assert generation.sampling_settings(config, enc)["cache_len"] == 256
  assert generation.sampling_settings(config, enc, cache_len=512)["cache_len"] == 512
  config.data.seq_len = 1024  # rows longer than max_len: the model's positions bound it
  assert generation.sampling_settings(config, enc)["cache_len"] == 512


def test_a_prompt_longer_than_the_context_starts_as_a_slid_window(drums):
  """A prompt that does not fit `cache_len` is sampled from as the window would have slid:
  the same new tokens as from the prefix + the prompt's last window_keep tokens."""
  model = make_model(drums, "rope", max_len=64)
  rng = np.random.default_rng(0)
  events = rng.integers(drums.body_offset, drums.bos_id, size=(2, 50)).astype(np.int32)
  prefix = np.full((2, 1), drums.bos_id, np.int32)
  long_prompt = np.concatenate([prefix, events], 1)  # 51 tokens > cache_len 32
  kw = dict(encoding=drums, max_new_tokens=40, min_new_tokens=40, temperature=1.0, seed=5,
            cache_len=32, window_keep=16, prefix_len=1, cache_phases=1)
  a = sampling.sample_tokens(model, long_prompt, **kw)
  tail = np.concatenate([prefix, events[:, -16:]], 1)
  b = sampling.sample_tokens(model, tail, **kw)
  np.testing.assert_array_equal(a["tokens"][:, :51], long_prompt)  # the prompt is kept whole
  np.testing.assert_array_equal(a["tokens"][:, 51:], b["tokens"][:, 17:])
