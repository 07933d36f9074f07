"""Grammar constraints for the sampler: each encoding's grammar as a JAX state machine.

The rules themselves are tables in `midijax.encoding.grammar` (numpy); this module applies
them to a batch of sequences while sampling:

    g = constraints.get(enc, padded_vocab_size)
    state = g.init_state(batch_size, prompt)     # prompt: int [B, P] (BOS/conditioning ok)
    mask = g.allowed(state)                      # bool [B, padded_vocab_size]
    state = g.update(state, token)               # token: int [B]

State is a dict of arrays with leading dim B, so it rides in a `lax.while_loop` carry and
shards with the batch. `update` ignores PAD, BOS and conditioning tokens, so a prompt with
its prefix (or a finished row padded with PAD) leaves the state as its events left it.
`g.seconds` (float32 [V]) is how far each token moves time forward, which the sampler sums
to stop at a duration of music.

`grammar_violations(ids, enc)` counts the tokens of finished sequences that the grammar
forbids (to measure how often unconstrained sampling breaks it).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from midijax.encoding import grammar as tables_lib
from midijax.encoding.base import EOS_ID, Encoding

State = Dict[str, jax.Array]


class Grammar:
  """Base state machine: no state; subclasses say what is allowed and how state moves.

  Attributes:
    tables: the encoding's `GrammarTables`.
    encoding, vocab_size, qpm, seconds: the tables' (see `GrammarTables`).
  """

  def __init__(self, tables: tables_lib.GrammarTables):
    self.tables = tables
    self.encoding = tables.encoding
    self.vocab_size = tables.vocab_size
    self.qpm = tables.qpm
    self.seconds = tables.seconds

  # A grammar is a static argument of the jitted sampler: equal tables, equal grammar.
  def __hash__(self):
    return hash((type(self).__name__, self.tables))

  def __eq__(self, other):
    return type(other) is type(self) and self.tables == other.tables

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


class DrumsGrammar(Grammar):
  """`drums`: any event in any order, EOS anywhere.

  With BAR tokens (time in beats, `bar_tokens`), rows whose prefix named the meter
  (METER_<n-d>: `bar` steps a bar) and that have passed a BAR keep their bars whole:
  `pos` counts the steps since the last BAR; a time shift may not take it past `bar`;
  at `bar` only BAR or EOS may follow, and BAR only there. A row with no METER token, no
  BAR yet, or a prompt whose bars do not add up (pos > bar) samples unconstrained.

  With `velocity_after`, `owed` is 1 in rows whose last event was a DRUM: only a VELOCITY
  may follow it; 0 after any other event: no VELOCITY. Before the first event it is -1
  and either may come, as a window cut between a hit and its velocity starts with one.
  """

  def empty_state(self, batch_size):
    # `rows` gives the state a batch dimension even without bars.
    return {"rows": jnp.zeros((batch_size,), jnp.int32),
            "pos": jnp.full((batch_size,), -1, jnp.int32),
            "bar": jnp.zeros((batch_size,), jnp.int32),
            "owed": jnp.full((batch_size,), -1, jnp.int32)}

  def allowed(self, state):
    batch = state["rows"].shape[0]
    base = jnp.broadcast_to(jnp.asarray(self.tables.allowed), (batch, self.vocab_size))
    if self.tables.velocity_after:
      is_vel = jnp.asarray(self.tables.is_velocity)[None, :]
      owed = state["owed"][:, None]
      base = base & ((is_vel == (owed > 0)) | (owed < 0))
    if self.tables.bar_id < 0:
      return base
    pos, bar = state["pos"][:, None], state["bar"][:, None]
    steps = jnp.asarray(self.tables.shift_steps)[None, :]
    ids = jnp.arange(self.vocab_size)[None, :]
    is_bar = ids == self.tables.bar_id
    rule = jnp.where(steps > 0, pos + steps <= bar,
                     jnp.where(is_bar, pos == bar, (pos < bar) | (ids == EOS_ID)))
    bound = (bar > 0) & (pos >= 0) & (pos <= bar)
    if self.tables.velocity_after:
      # A velocity takes no time, so the bar never forbids one that is owed.
      rule = rule | jnp.asarray(self.tables.is_velocity)[None, :]
    return base & (rule | ~bound)

  def update(self, state, token):
    token = jnp.asarray(token, jnp.int32)
    safe = jnp.clip(token, 0, self.vocab_size - 1)
    if self.tables.velocity_after:
      # A drum owes a velocity; the velocity pays it; specials (PAD, prefix) leave it.
      is_drum = jnp.asarray(self.tables.is_drum)[safe] & (token == safe)
      is_event = jnp.asarray(self.tables.is_event)[safe] & (token == safe)
      state = dict(state, owed=jnp.where(is_event, is_drum.astype(jnp.int32), state["owed"]))
    if self.tables.bar_id < 0:
      return state
    meter = jnp.asarray(self.tables.meter_steps)[safe]
    steps = jnp.asarray(self.tables.shift_steps)[safe]
    pos = jnp.where(token == self.tables.bar_id, 0,
                    jnp.where((steps > 0) & (state["pos"] >= 0), state["pos"] + steps,
                              state["pos"]))
    is_meter = (token >= self.encoding.cond_offset) & (meter > 0)
    return dict(state, pos=pos, bar=jnp.where(is_meter, meter, state["bar"]))


class PerformanceGrammar(Grammar):
  """`performance`: NOTE_OFF only for sounding pitches, VELOCITY then NOTE_ON, EOS at rest."""

  def empty_state(self, batch_size):
    return {"sounding": jnp.zeros((batch_size, self.tables.num_pitches), jnp.int32),
            "after_velocity": jnp.zeros((batch_size,), bool)}

  def allowed(self, state):
    enc = self.encoding
    sounding = state["sounding"] > 0  # [B, n]
    after_velocity = state["after_velocity"]
    base = jnp.asarray(self.tables.by_pending_velocity)[after_velocity.astype(jnp.int32)]
    # NOTE_OFF ids sit in one block; write the per-pitch flags into it.
    offs = sounding & ~after_velocity[:, None]
    base = jax.lax.dynamic_update_slice(base, offs, (0, enc.note_off_base))
    at_rest = ~jnp.any(sounding, axis=1) & ~after_velocity
    return base.at[:, EOS_ID].set(at_rest)

  def update(self, state, token):
    enc = self.encoding
    n = self.tables.num_pitches
    token = jnp.asarray(token, jnp.int32)
    is_on = (token >= enc.note_on_base) & (token < enc.note_on_base + n)
    is_off = (token >= enc.note_off_base) & (token < enc.note_off_base + n)
    pitch = jnp.where(is_on, token - enc.note_on_base, token - enc.note_off_base)
    delta = is_on.astype(jnp.int32) - is_off.astype(jnp.int32)
    one_hot = jax.nn.one_hot(pitch, n, dtype=jnp.int32)
    # max(., 0): an unconstrained sample may switch off a silent pitch; the decoder ignores it.
    sounding = jnp.maximum(state["sounding"] + delta[:, None] * one_hot, 0)
    is_event = (token >= enc.body_offset) & (token < enc.bos_id)
    is_velocity = token >= enc.velocity_base
    after_velocity = jnp.where(is_event, is_velocity & is_event, state["after_velocity"])
    return {"sounding": sounding, "after_velocity": after_velocity}


class TriplesGrammar(Grammar):
  """`triples`: POS, NOTE_ON, DUR in turn; EOS only between notes."""

  def empty_state(self, batch_size):
    # slot: 0 expects POS (or EOS), 1 NOTE_ON, 2 DUR.
    return {"slot": jnp.zeros((batch_size,), jnp.int32)}

  def allowed(self, state):
    return jnp.asarray(self.tables.by_slot)[state["slot"]]

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


# Encoding name -> state machine class.
GRAMMARS: Dict[str, Callable[[tables_lib.GrammarTables], Grammar]] = {
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
  tables = tables_lib.get_tables(enc, vocab_size, qpm)
  return GRAMMARS[enc.name](tables)


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
      # The prefix is read too (a METER token sets the drums grammar's bar length).
      read = t < length
      return (jax.tree.map(lambda new, old: jnp.where(
          jnp.reshape(read, (-1,) + (1,) * (new.ndim - 1)), new, old),
          g.update(state, token), state), bad), None

    (_, bad), _ = jax.lax.scan(step, (state, jnp.zeros(ids.shape[0], jnp.int32)),
                               jnp.arange(ids.shape[1]))
    return bad

  return count


_VIOLATION_FNS: Dict[Grammar, Callable] = {}


def grammar_violations(ids, enc: Encoding, vocab_size: Optional[int] = None):
  """Tokens the grammar forbids, per sequence.

  Args:
    ids: one sequence (int [T]) or a batch (int [N, T], or a list of 1-D arrays of any
      lengths), each optionally starting with BOS / conditioning tokens.
    enc: the encoding.
    vocab_size: padded vocabulary (only matters for ids >= enc.vocab_size).

  Returns:
    An int for one sequence, else int64 [N]: the number of tokens after the prefix and up
    to the first EOS (inclusive) that `get(enc).allowed` would have masked.
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
    bounds[i] = tables_lib.sequence_bounds(r, enc)
  bad = np.asarray(fn(jnp.asarray(batch), jnp.asarray(bounds[:, 0]), jnp.asarray(bounds[:, 1])),
                   np.int64)
  return int(bad[0]) if single else bad
