"""Token grammars: which ids may come next, as small JAX state machines for the sampler.

Each encoding's grammar is a pure-JAX state machine over a batch of sequences:

    g = grammar.get(enc, padded_vocab_size)
    state = g.init_state(batch_size, prompt)     # prompt: int [B, P] (BOS/conditioning ok)
    mask = g.allowed(state)                      # bool [B, padded_vocab_size]
    state = g.update(state, token)               # token: int [B]

State is a dict of arrays with leading dim B, so it rides in a `lax.while_loop` carry and
shards with the batch. The rules, shared by every encoding: PAD, BOS, conditioning tokens
and the vocabulary's padding ids never come after the prefix; on top of that

* `triples`: POS -> NOTE_ON -> DUR, repeating; EOS only before a POS (between notes).
* `performance`: NOTE_OFF only for a pitch that is sounding (a per-pitch count of open
  notes); after VELOCITY comes its NOTE_ON (the encoder always writes them together);
  EOS only when no note is sounding and no VELOCITY is waiting.
* `drums`: hits, time shifts and velocities in any order; EOS anywhere.

`update` ignores PAD, BOS and conditioning tokens, so a prompt with its prefix (or a
finished row padded with PAD) leaves the state as its events left it. Each grammar also
has `seconds` (float32 [padded_vocab_size]): how far a token moves time forward, which
the sampler sums to stop at a duration of music.

`grammar_violations(ids, enc)` counts the tokens of finished sequences that the grammar
forbids (to measure how often unconstrained sampling breaks it).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from midijax.encoding.base import EOS_ID, PAD_ID, Encoding

State = Dict[str, jax.Array]


class Grammar:
  """Base grammar: event tokens and EOS anywhere, specials and padding never.

  Attributes:
    encoding: the `Encoding` whose ids this grammar reads.
    vocab_size: padded vocabulary size V (the model's logits width).
    seconds: float32 [V], seconds of music each token advances (0 for most).
  """

  def __init__(self, enc: Encoding, vocab_size: Optional[int] = None, qpm: float = 120.0):
    self.encoding = enc
    self.vocab_size = int(vocab_size or enc.vocab_size)
    if self.vocab_size < enc.vocab_size:
      raise ValueError(f"vocab_size={self.vocab_size} is smaller than the {enc.name} "
                       f"vocabulary ({enc.vocab_size})")
    self.qpm = float(qpm)
    ids = np.arange(self.vocab_size)
    # Body (event) tokens; everything else except EOS is a special or padding id.
    self.is_event = (ids >= enc.body_offset) & (ids < enc.bos_id)
    self.seconds = np.zeros(self.vocab_size, np.float32)

  # A grammar is a static argument of the jitted sampler: equal settings, equal grammar.
  def _key(self):
    return (type(self).__name__, tuple(sorted(self.encoding.config.items())), self.vocab_size,
            self.qpm)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, Grammar) and self._key() == other._key()

  # -- the state machine -------------------------------------------------------------------
  def empty_state(self, batch_size: int) -> State:
    """State before any event token."""
    del batch_size
    return {}

  def init_state(self, batch_size: int, prompt: Optional[jax.Array] = None) -> State:
    """State after reading `prompt` (int [B, P], prefix and PAD allowed), or empty."""
    state = self.empty_state(batch_size)
    if prompt is None or prompt.shape[1] == 0:
      return state
    state, _ = jax.lax.scan(lambda s, tok: (self.update(s, tok), None), state,
                            jnp.asarray(prompt, jnp.int32).T)
    return state

  def allowed(self, state: State) -> jax.Array:
    """bool [B, V]: the ids that may come next in each row."""
    raise NotImplementedError

  def update(self, state: State, token: jax.Array) -> State:
    """State after `token` (int [B]); specials leave it unchanged."""
    del token
    return state

  def _event_mask(self) -> np.ndarray:
    """bool [V]: event tokens plus EOS."""
    mask = self.is_event.copy()
    mask[EOS_ID] = True
    return mask


class DrumsGrammar(Grammar):
  """`drums`: any event in any order, EOS anywhere; time from TIME_SHIFT tokens."""

  def __init__(self, enc, vocab_size=None, qpm=120.0):
    super().__init__(enc, vocab_size, qpm)
    shifts = np.arange(enc.max_shift_steps)
    self.seconds[enc.shift_base + shifts] = (shifts + 1) / enc.steps_per_second
    self._allowed = self._event_mask()

  def empty_state(self, batch_size):
    # One dummy leaf gives the state a batch dimension (keeps shapes uniform for callers).
    return {"rows": jnp.zeros((batch_size,), jnp.int32)}

  def allowed(self, state):
    batch = state["rows"].shape[0]
    return jnp.broadcast_to(jnp.asarray(self._allowed), (batch, self.vocab_size))


class PerformanceGrammar(Grammar):
  """`performance`: NOTE_OFF only for sounding pitches, VELOCITY then NOTE_ON, EOS at rest."""

  def __init__(self, enc, vocab_size=None, qpm=120.0):
    super().__init__(enc, vocab_size, qpm)
    ids = np.arange(self.vocab_size)
    n = enc.num_pitches
    self.num_pitches = n
    shifts = np.arange(enc.max_shift_steps)
    self.seconds[enc.shift_base + shifts] = (shifts + 1) / enc.steps_per_second
    self.is_note_on = (ids >= enc.note_on_base) & (ids < enc.note_on_base + n)
    self.is_note_off = (ids >= enc.note_off_base) & (ids < enc.note_off_base + n)
    self.is_velocity = (ids >= enc.velocity_base) & (ids < enc.velocity_base +
                                                      enc.num_velocity_bins)
    # Row 0: free (no VELOCITY pending); row 1: after a VELOCITY only its NOTE_ON.
    # NOTE_OFF and EOS are switched on per row in `allowed`.
    free = self.is_event & ~self.is_note_off
    self._base = np.stack([free, self.is_note_on])

  def empty_state(self, batch_size):
    return {"sounding": jnp.zeros((batch_size, self.num_pitches), jnp.int32),
            "after_velocity": jnp.zeros((batch_size,), bool)}

  def allowed(self, state):
    enc = self.encoding
    sounding = state["sounding"] > 0  # [B, n]
    after_velocity = state["after_velocity"]
    base = jnp.asarray(self._base)[after_velocity.astype(jnp.int32)]  # [B, V]
    # NOTE_OFF ids sit in one block; write the per-pitch flags into it.
    offs = sounding & ~after_velocity[:, None]
    base = jax.lax.dynamic_update_slice(base, offs, (0, enc.note_off_base))
    at_rest = ~jnp.any(sounding, axis=1) & ~after_velocity
    return base.at[:, EOS_ID].set(at_rest)

  def update(self, state, token):
    enc = self.encoding
    token = jnp.asarray(token, jnp.int32)
    is_on = (token >= enc.note_on_base) & (token < enc.note_on_base + self.num_pitches)
    is_off = (token >= enc.note_off_base) & (token < enc.note_off_base + self.num_pitches)
    pitch = jnp.where(is_on, token - enc.note_on_base, token - enc.note_off_base)
    delta = is_on.astype(jnp.int32) - is_off.astype(jnp.int32)
    one_hot = jax.nn.one_hot(pitch, self.num_pitches, dtype=jnp.int32)
    # max(., 0): an unconstrained sample may switch off a silent pitch; the decoder ignores it.
    sounding = jnp.maximum(state["sounding"] + delta[:, None] * one_hot, 0)
    is_event = (token >= enc.body_offset) & (token < enc.bos_id)
    is_velocity = token >= enc.velocity_base
    after_velocity = jnp.where(is_event, is_velocity & is_event, state["after_velocity"])
    return {"sounding": sounding, "after_velocity": after_velocity}


class TriplesGrammar(Grammar):
  """`triples`: POS, NOTE_ON, DUR in turn; EOS only between notes; time from POS deltas."""

  def __init__(self, enc, vocab_size=None, qpm=120.0):
    super().__init__(enc, vocab_size, qpm)
    ids = np.arange(self.vocab_size)
    steps = np.arange(enc.max_position_steps + 1)
    self.seconds[enc.pos_base + steps] = steps * 60.0 / (self.qpm * enc.steps_per_quarter)
    is_pos = (ids >= enc.pos_base) & (ids < enc.pitch_base)
    is_pitch = (ids >= enc.pitch_base) & (ids < enc.dur_base)
    is_dur = (ids >= enc.dur_base) & (ids < enc.bos_id)
    expect_pos = is_pos.copy()
    expect_pos[EOS_ID] = True
    self._table = np.stack([expect_pos, is_pitch, is_dur])  # [3, V] by slot

  def empty_state(self, batch_size):
    # slot: 0 expects POS (or EOS), 1 NOTE_ON, 2 DUR.
    return {"slot": jnp.zeros((batch_size,), jnp.int32)}

  def allowed(self, state):
    return jnp.asarray(self._table)[state["slot"]]

  def update(self, state, token):
    enc = self.encoding
    token = jnp.asarray(token, jnp.int32)
    kind = jnp.where(token < enc.pitch_base, 0, jnp.where(token < enc.dur_base, 1, 2))
    slot = state["slot"]
    # Out-of-order tokens (unconstrained sampling) resync as the decoder does: a POS
    # starts a new note, anything else waits for the next POS.
    moved = jnp.where(kind == slot, (slot + 1) % 3, jnp.where(kind == 0, 1, 0))
    is_event = (token >= enc.body_offset) & (token < enc.bos_id)
    return {"slot": jnp.where(is_event, moved, slot)}


# Encoding name -> grammar class (the per-encoding "grammar() hook").
GRAMMARS: Dict[str, Callable[..., Grammar]] = {
    "drums": DrumsGrammar,
    "performance": PerformanceGrammar,
    "triples": TriplesGrammar,
}


def get(enc: Encoding, vocab_size: Optional[int] = None, qpm: float = 120.0) -> Grammar:
  """The grammar of `enc` over a (padded) vocabulary of `vocab_size` ids.

  Args:
    enc: the encoding.
    vocab_size: logits width (the model's padded vocabulary); default enc.vocab_size.
    qpm: tempo (quarter notes per minute) for encodings that count time in beats
      (`triples`), used only for `seconds`.
  """
  if enc.name not in GRAMMARS:
    raise ValueError(f"no grammar for encoding {enc.name!r}; known: {', '.join(GRAMMARS)}")
  return GRAMMARS[enc.name](enc, vocab_size, qpm)


# ----------------------------------------------------------------------------- checking
def _violations_fn(g: Grammar):
  """Jitted [N, T] ids, int [N] prefix lengths, int [N] lengths -> int [N] violations."""

  @jax.jit
  def count(ids, prefix, length):
    state = g.empty_state(ids.shape[0])

    def step(carry, t):
      state, bad = carry
      token = ids[:, t]
      ok = jnp.take_along_axis(g.allowed(state), token[:, None], axis=1)[:, 0]
      counted = (t >= prefix) & (t < length)
      bad = bad + (counted & ~ok).astype(jnp.int32)
      # The prefix feeds nothing into the state (update ignores specials anyway).
      return (jax.tree.map(lambda new, old: jnp.where(
          jnp.reshape(counted, (-1,) + (1,) * (new.ndim - 1)), new, old),
          g.update(state, token), state), bad), None

    (_, bad), _ = jax.lax.scan(step, (state, jnp.zeros(ids.shape[0], jnp.int32)),
                               jnp.arange(ids.shape[1]))
    return bad

  return count


_VIOLATION_FNS: Dict[Grammar, Callable] = {}


def sequence_bounds(ids: np.ndarray, enc: Encoding):
  """(prefix length, length) of one sequence for checking.

  The prefix is the leading run of BOS / conditioning tokens. The sequence ends after its
  first EOS; without one, trailing PAD (a sample cut at its token or time limit) is not
  part of it.
  """
  ids = np.asarray(ids).ravel()
  prefix = 0
  while prefix < len(ids) and ids[prefix] >= enc.bos_id:
    prefix += 1
  eos = np.flatnonzero(ids == EOS_ID)
  if len(eos):
    return prefix, int(eos[0]) + 1
  real = np.flatnonzero(ids != PAD_ID)
  return prefix, (int(real[-1]) + 1 if len(real) else 0)


def grammar_violations(ids, enc: Encoding, vocab_size: Optional[int] = None):
  """Tokens the grammar forbids, per sequence.

  Args:
    ids: one sequence (int [T]) or a batch (int [N, T], or a list of 1-D arrays of any
      lengths), each optionally starting with BOS / conditioning tokens.
    enc: the encoding.
    vocab_size: padded vocabulary (only matters for ids >= enc.vocab_size).

  Returns:
    An int for one sequence, else int64 [N]: the number of tokens after the prefix and up
    to the first EOS (inclusive) that `grammar.get(enc).allowed` would have masked.
  """
  single = (np.ndim(ids[0]) == 0 if isinstance(ids, (list, tuple)) and len(ids)
            else not isinstance(ids, (list, tuple)) and np.asarray(ids).ndim == 1)
  rows = [np.asarray(ids).ravel()] if single else [np.asarray(r).ravel() for r in ids]
  if not rows:
    return np.zeros(0, np.int64)
  top = max(int(max((r.max() for r in rows if len(r)), default=0)) + 1, enc.vocab_size)
  g = get(enc, max(vocab_size or 0, top))
  fn = _VIOLATION_FNS.get(g)
  if fn is None:
    fn = _VIOLATION_FNS[g] = _violations_fn(g)
  # Pad to a power-of-two width so checking many lengths compiles a handful of times.
  width = max(8, 1 << int(np.ceil(np.log2(max(max(len(r) for r in rows), 1)))))
  batch = np.zeros((len(rows), width), np.int32)
  bounds = np.zeros((len(rows), 2), np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
    bounds[i] = sequence_bounds(r, enc)
  bad = np.asarray(fn(jnp.asarray(batch), jnp.asarray(bounds[:, 0]), jnp.asarray(bounds[:, 1])),
                   np.int64)
  return int(bad[0]) if single else bad
