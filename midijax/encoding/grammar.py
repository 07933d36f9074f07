"""Token grammars as tables: which ids may follow which, per encoding (numpy only).

The rules, shared by every encoding: PAD, BOS, conditioning tokens and the vocabulary's
padding ids never come after the prefix; on top of that

* `triples`: POS -> NOTE_ON -> DUR, repeating; EOS only before a POS (between notes).
* `performance`: NOTE_OFF only for a pitch that is sounding (a per-pitch count of open
  notes); after VELOCITY comes its NOTE_ON (the encoder always writes them together);
  EOS only when no note is sounding and no VELOCITY is waiting.
* `drums`: hits, time shifts and velocities in any order; EOS anywhere (time shifts in
  seconds or, with time_unit="beats", in beats at `qpm`). With `velocity_after`, each
  DRUM is followed by its VELOCITY and a VELOCITY comes only after a DRUM (or first, in
  a window cut between the two). With BAR tokens and a METER token in the prefix, bars
  stay whole: no time shift crosses a bar line, and a BAR (or EOS) comes exactly when
  the bar is full.

Each encoding's tables (`get_tables(enc, vocab_size)`) hold boolean masks over the padded
vocabulary and `seconds` (float32 [vocab_size]): how far each token moves time forward.
The state machines that apply them while sampling, and the violation counter, run in JAX
and live beside the sampler in `midijax.constraints`, so the encodings import no JAX.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from midijax.encoding.base import CONDITIONING, EOS_ID, PAD_ID, Encoding


class GrammarTables:
  """Tables every grammar has.

  Attributes:
    encoding: the `Encoding` whose ids the grammar reads.
    vocab_size: padded vocabulary size V (the model's logits width).
    qpm: tempo (quarter notes per minute) for encodings that count time in beats.
    is_event: bool [V], event (body) tokens.
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

  def key(self) -> tuple:
    """Equal keys, equal tables (grammars are static arguments of jitted functions)."""
    return (type(self).__name__, tuple(sorted(self.encoding.config.items())), self.vocab_size,
            self.qpm)

  def __hash__(self):
    return hash(self.key())

  def __eq__(self, other):
    return isinstance(other, GrammarTables) and self.key() == other.key()

  def event_mask(self) -> np.ndarray:
    """bool [V]: event tokens plus EOS."""
    mask = self.is_event.copy()
    mask[EOS_ID] = True
    return mask


class DrumsTables(GrammarTables):
  """`drums`: every event and EOS always allowed (`allowed`); time from TIME_SHIFT tokens.

  With BAR tokens (`bar_tokens`), also what keeps bars whole: `shift_steps` (int32 [V],
  the steps each TIME_SHIFT moves), `bar_id`, and `meter_steps` (int32 [V], the steps of a
  bar for each METER_<n-d> conditioning token; 0 elsewhere and for METER_other).
  With `velocity_after`, `is_drum` and `is_velocity` (bool [V]): a DRUM is followed by
  its VELOCITY, and a VELOCITY comes only there.
  """

  def __init__(self, enc, vocab_size=None, qpm=120.0):
    super().__init__(enc, vocab_size, qpm)
    shifts = np.arange(enc.max_shift_steps)
    self.seconds[enc.shift_base + shifts] = (shifts + 1) * enc.step_seconds(self.qpm)
    self.allowed = self.event_mask()
    self.bar_id = int(getattr(enc, "bar_id", -1))
    self.shift_steps = np.zeros(self.vocab_size, np.int32)
    self.shift_steps[enc.shift_base + shifts] = shifts + 1
    self.meter_steps = np.zeros(self.vocab_size, np.int32)
    self.velocity_after = bool(getattr(enc, "velocity_after", False))
    ids = np.arange(self.vocab_size)
    self.is_drum = (ids >= enc.drum_base) & (ids < enc.drum_base + enc.num_drums)
    self.is_velocity = (ids >= enc.velocity_base) & (ids < enc.velocity_base +
                                                      enc.num_velocity_bins)
    if self.bar_id >= 0:
      for value in CONDITIONING["meter"]:
        num, _, den = value.partition("-")
        if num.isdigit() and den.isdigit():
          steps = int(num) * 4 * enc.steps_per_quarter / int(den)
          self.meter_steps[enc.condition_id("meter", value)] = int(round(steps))


class PerformanceTables(GrammarTables):
  """`performance`: masks of NOTE_ON / NOTE_OFF / VELOCITY ids, and `by_pending_velocity`
  (bool [2, V]): row 0 what may come with no VELOCITY pending (NOTE_OFF and EOS are
  switched on per sequence from the sounding pitches), row 1 after a VELOCITY (NOTE_ON)."""

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
    free = self.is_event & ~self.is_note_off
    self.by_pending_velocity = np.stack([free, self.is_note_on])


class TriplesTables(GrammarTables):
  """`triples`: `by_slot` (bool [3, V]): POS (or EOS), NOTE_ON, DUR in turn; time from
  POS deltas at `qpm`."""

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
    self.by_slot = np.stack([expect_pos, is_pitch, is_dur])


# Encoding name -> its tables (the per-encoding "grammar() hook").
TABLES: Dict[str, Callable[..., GrammarTables]] = {
    "drums": DrumsTables,
    "performance": PerformanceTables,
    "triples": TriplesTables,
}


def get_tables(enc: Encoding, vocab_size: Optional[int] = None,
               qpm: float = 120.0) -> GrammarTables:
  """The grammar tables of `enc` over a (padded) vocabulary of `vocab_size` ids.

  Args:
    enc: the encoding.
    vocab_size: logits width (the model's padded vocabulary); default enc.vocab_size.
    qpm: tempo (quarter notes per minute) for encodings that count time in beats
      (`triples`, `drums` with time_unit="beats"), used only for `seconds`.
  """
  if enc.name not in TABLES:
    raise ValueError(f"no grammar for encoding {enc.name!r}; known: {', '.join(TABLES)}")
  return TABLES[enc.name](enc, vocab_size, qpm)


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
