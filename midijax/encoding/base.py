"""The encoding interface, the vocabulary, and the reserved conditioning block.

Every vocabulary is laid out the same way::

    0              PAD
    1              EOS
    2 .. 2+B-1     the encoding's own event tokens (B of them)
    2+B            BOS
    2+B+1 ..       conditioning tokens (CONDITIONING, below), the same block for every encoding

so that the first 2+B ids of `performance` are exactly Magenta's ids, and a model trained on a
mixture can be conditioned by name. Vocabularies are saved and loaded as JSON.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from midijax.errors import TokenError
from midijax.notes import MAX_SECONDS, MAX_TOKENS, Notes, time_problem

PAD, EOS = "PAD", "EOS"
PAD_ID, EOS_ID = 0, 1

# Conditioning tokens reserved in every vocabulary: kind -> allowed values. Builders prepend
# them to a sequence (after BOS); sampling asks for them by name (e.g. style=funk).
GMD_STYLES = ("afrobeat", "afrocuban", "blues", "country", "dance", "funk", "gospel", "highlife",
              "hiphop", "jazz", "latin", "middleeastern", "neworleans", "pop", "punk", "reggae",
              "rock", "soul")
# Tempo bins, beats per minute: [lo, hi).
TEMPO_EDGES = (0, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 180, 200, 1000)
TEMPO_BINS = tuple(f"{lo}-{hi}" for lo, hi in zip(TEMPO_EDGES[:-1], TEMPO_EDGES[1:]))
# General MIDI instrument families (program // 8), plus drums.
GM_FAMILIES = ("piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble",
               "brass", "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic",
               "percussive", "sound_effects", "drums")
CONDITIONING: Dict[str, Tuple[str, ...]] = {
    "style": GMD_STYLES,
    "tempo": TEMPO_BINS,
    "type": ("beat", "fill"),
    "meter": ("3-4", "4-4", "5-4", "5-8", "6-8", "other"),
    "family": GM_FAMILIES,
    "dataset": ("groove", "maestro", "giantmidi", "midi_folder"),
}


def tempo_bin(bpm: float) -> str:
  """The tempo-bin value (e.g. '100-110') that holds `bpm`."""
  i = int(np.searchsorted(TEMPO_EDGES, float(bpm), side="right")) - 1
  return TEMPO_BINS[min(max(i, 0), len(TEMPO_BINS) - 1)]


def family_of_program(program: int, is_drum: bool = False) -> str:
  return "drums" if is_drum else GM_FAMILIES[int(program) // 8]


class Vocab:
  """Token names <-> ids."""

  def __init__(self, names: Sequence[str]):
    self.names: List[str] = list(names)
    self.ids: Dict[str, int] = {n: i for i, n in enumerate(self.names)}
    if len(self.ids) != len(self.names):
      raise ValueError("duplicate token names in vocabulary")

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, name: str) -> int:
    return self.ids[name]

  def __contains__(self, name: str) -> bool:
    return name in self.ids

  def to_json(self, path=None, **meta) -> str:
    text = json.dumps({**meta, "size": len(self.names), "tokens": self.names}, indent=1)
    if path is not None:
      from etils import epath  # local paths and gs:// alike
      epath.Path(path).write_text(text)
    return text

  @classmethod
  def from_json(cls, text_or_path) -> "Vocab":
    p = pathlib.Path(str(text_or_path))
    text = p.read_text() if not str(text_or_path).lstrip().startswith("{") else str(text_or_path)
    return cls(json.loads(text)["tokens"])


class Encoding:
  """Base class. Subclasses define `name`, `event_tokens()` and the numpy kernels.

  ids are int32 numpy arrays. `encode` gives the event ids only (no BOS/EOS/conditioning);
  `with_specials` adds them.
  """
  name: str = "base"
  description: str = ""
  keeps: str = ""

  def __init__(self, **options):
    self.options = dict(options)
    body = list(self.event_tokens())
    cond = [f"{kind.upper()}_{v}" for kind, values in CONDITIONING.items() for v in values]
    self.vocab = Vocab([PAD, EOS] + body + ["BOS"] + cond)
    self.pad_id, self.eos_id = PAD_ID, EOS_ID
    self.body_offset = 2
    self.num_events = len(body)
    self.bos_id = 2 + len(body)
    self.cond_offset = self.bos_id + 1

  # -- vocabulary ------------------------------------------------------------------------
  def event_tokens(self) -> Iterable[str]:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def bar_clock(self) -> Optional[np.ndarray]:
    """What each token does to the time since the last bar line, for encodings with BAR
    tokens: int32 [vocab_size], the time steps a token moves time on (0 for tokens that
    take no time), -1 for BAR. None for encodings without bar lines (the default)."""
    return None

  def echo_tables(self) -> Optional[dict]:
    """What a model needs to echo earlier bars' hits (`config.model.bar_echo`), for drum
    encodings with BAR tokens whose velocity comes before each hit: {"classes": int32
    [vocab_size] drum class of DRUM ids, -1 for others; "velocities": float32 [vocab_size]
    loudness in (0, 1] of VELOCITY ids, -1 for others; "cell": time steps of a 16th note}.
    None for other encodings (the default)."""
    return None

  @property
  def config(self) -> dict:
    """JSON-able description from which `midijax.encoding.get(**config)` rebuilds this."""
    return {"name": self.name, **self.options}

  def save_vocab(self, path) -> None:
    self.vocab.to_json(path, encoding=self.config)

  def condition_id(self, kind: str, value: str) -> int:
    """The id of a conditioning token, e.g. ('style', 'funk'); errors list valid values."""
    if kind not in CONDITIONING:
      raise TokenError(f"unknown conditioning kind {kind!r}; valid: {', '.join(CONDITIONING)}")
    value = str(value)
    if kind == "tempo" and value not in CONDITIONING["tempo"]:
      try:
        value = tempo_bin(float(value))
      except ValueError:
        pass
    if value not in CONDITIONING[kind]:
      raise TokenError(f"unknown {kind} {value!r}; valid: {', '.join(CONDITIONING[kind])}")
    return self.vocab[f"{kind.upper()}_{value}"]

  def is_condition(self, ids) -> np.ndarray:
    return np.asarray(ids) >= self.cond_offset

  def with_specials(self, ids: np.ndarray, conditions: Optional[Dict[str, str]] = None,
                    bos: bool = True, eos: bool = True) -> np.ndarray:
    """[BOS] + conditioning tokens + ids + [EOS]."""
    pre = ([self.bos_id] if bos else []) + [self.condition_id(k, v)
                                           for k, v in (conditions or {}).items()]
    return np.concatenate([np.asarray(pre, np.int32), np.asarray(ids, np.int32),
                           np.asarray([self.eos_id] if eos else [], np.int32)])

  def strip_specials(self, ids) -> np.ndarray:
    """Event ids only: drops PAD/BOS/conditioning, stops at the first EOS."""
    ids = np.asarray(ids, np.int64).ravel()
    eos = np.flatnonzero(ids == self.eos_id)
    if len(eos):
      ids = ids[:eos[0]]
    keep = (ids >= self.body_offset) & (ids < self.bos_id)
    return ids[keep].astype(np.int32)

  def is_event(self, i: int) -> bool:
    """Whether id `i` is one of the encoding's own event tokens (not PAD/EOS/BOS/conditioning)."""
    return self.body_offset <= i < self.bos_id

  # -- encode / decode ---------------------------------------------------------------------
  def encode(self, notes, *, max_tokens: Optional[int] = MAX_TOKENS,
             max_seconds: Optional[float] = MAX_SECONDS) -> np.ndarray:
    """Notes (or a NoteSequence) -> event ids (int32).

    Args:
      notes: `Notes` or a note-seq NoteSequence.
      max_tokens: refuse (TokenLimitError) notes that make more tokens; the count is made
        before the ids are allocated. None: no limit.
      max_seconds: refuse (TokenError) notes ending later (seconds). None: no limit.
    Raises:
      TokenError: times that are not finite, negative, or past `max_seconds`.
      TokenLimitError: more than `max_tokens` tokens.
    """
    return self._encode(self._checked(notes, max_seconds), max_tokens)

  def count_tokens(self, notes, *, max_seconds: Optional[float] = MAX_SECONDS) -> int:
    """How many event ids `encode(notes)` makes, without making them (memory in proportion to
    the notes, not to the music's length)."""
    return self._count(self._checked(notes, max_seconds))

  def _checked(self, notes, max_seconds: Optional[float]) -> Notes:
    if not isinstance(notes, Notes):
      notes = Notes.from_note_sequence(notes)
    problem = time_problem(notes, max_seconds)
    if problem is not None:
      raise TokenError(f"cannot encode {problem}")
    return notes

  def decode_notes(self, ids, **kw) -> Notes:
    """ids -> `Notes`; special tokens are skipped, decoding stops at EOS.

    Keywords go to `decoder` (e.g. is_drum, qpm, max_seconds).
    """
    return self._decode(self.strip_specials(ids), **kw)

  def decode(self, ids, **kw):
    """ids -> note-seq NoteSequence."""
    return self.decode_notes(ids, **kw).to_note_sequence()

  def decoder(self, **kw) -> "Decoder":
    """A `Decoder` that turns event ids into notes a chunk at a time (see `Decoder`)."""
    raise NotImplementedError

  def _encode(self, notes: Notes, max_tokens: Optional[int]) -> np.ndarray:
    raise NotImplementedError

  def _count(self, notes: Notes) -> int:
    raise NotImplementedError

  def _decode(self, ids: np.ndarray, **kw) -> Notes:
    d = self.decoder(**kw)
    d.feed(ids)
    return d.notes()

  # -- text ----------------------------------------------------------------------------------
  def to_text(self, ids) -> str:
    """Token names, one a line."""
    names = self.vocab.names
    return "".join(names[int(i)] + "\n" for i in np.asarray(ids).ravel())

  def token_id(self, tok: str) -> Optional[int]:
    """The id of a token name or of an integer id written as text; None when it is neither."""
    i = self.vocab.ids.get(tok)
    if i is None and _INTEGER.fullmatch(tok):
      i = int(tok)
      if i >= len(self.vocab):
        return None
    return i

  def from_text(self, text: str, lenient: bool = False, stats: Optional[dict] = None
                ) -> np.ndarray:
    """Token names (or integer ids), one a line -> ids.

    Blank lines and lines starting with '#' are ignored. An invalid line raises `TokenError`
    naming the line number, or with `lenient` is skipped and counted in stats['skipped'].
    """
    out, skipped = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
      tok = line.strip()
      if not tok or tok.startswith("#"):
        continue
      i = self.token_id(tok)
      if i is not None:
        out.append(i)
      elif lenient:
        skipped += 1
      else:
        raise TokenError(f"line {lineno}: {self.invalid_token(tok)}")
    if stats is not None:
      stats["skipped"] = skipped
    return np.asarray(out, np.int32)

  def invalid_token(self, tok: str) -> str:
    """Why `tok` is not a token of this encoding (a phrase for an error message)."""
    return (f"{quote_token(tok)} is not a {self.name} token (names like {self.vocab.names[2]!r} "
            f"or ids 0..{len(self.vocab) - 1})")

  def notes_to_text(self, notes: Notes, *, max_tokens: Optional[int] = MAX_TOKENS,
                    max_seconds: Optional[float] = MAX_SECONDS) -> str:
    """The text form of a file's notes (`midijax midi2tokens`); limits as for `encode`."""
    return self.to_text(self.encode(notes, max_tokens=max_tokens, max_seconds=max_seconds))

  def text_to_notes(self, text: str, lenient: bool = False, stats=None, **kw) -> Notes:
    """Parses text written by `notes_to_text` (or ids) back into notes."""
    return self.decode_notes(self.from_text(text, lenient=lenient, stats=stats), **kw)

  def describe(self) -> dict:
    return {"name": self.name, "vocab_size": self.vocab_size, "event_tokens": self.num_events,
            "description": self.description, "keeps": self.keeps, "options": self.options}


# Integer ids as text: ASCII digits (int() would also take '\u0663' or '1_0'), 9 at most.
_INTEGER = re.compile(r"[0-9]{1,9}")


def quote_token(tok: str, limit: int = 40) -> str:
  """`tok` quoted for an error message, shortened to `limit` characters."""
  return repr(tok if len(tok) <= limit else tok[:limit] + "...")


class TokenLimitError(TokenError):
  """Notes would make more tokens than a limit allows (`count` of them)."""

  def __init__(self, count: int, limit: int, name: str):
    self.count, self.limit = int(count), int(limit)
    super().__init__(f"more tokens than the max_tokens limit ({self.count} {name} tokens; "
                     f"limit {self.limit})")


class TimeLimitError(TokenError):
  """Decoded music runs past a time limit.

  Attributes:
    seconds: when the offending note ends.
    limit: the limit (seconds).
    index: position, in the chunk last given to `Decoder.feed`, of the id that made it; -1
      for a note that `Decoder.notes` ended, or for a text line (`lineno`).
    lineno: the text line that made it, when known.
  """

  def __init__(self, seconds: float, limit: float, index: int = -1,
               lineno: Optional[int] = None):
    self.seconds, self.limit, self.index, self.lineno = float(seconds), float(limit), int(
        index), lineno
    super().__init__(("" if lineno is None else f"line {lineno}: ") + self.reason)

  @property
  def reason(self) -> str:
    return f"a note ends at {self.seconds:.2f} s, past the {self.limit:g} s limit"


class Decoder:
  """Turns event ids into `Notes` a chunk at a time, so a token file can be streamed.

  Call `feed(ids)` any number of times with event ids (no PAD, EOS, BOS or conditioning),
  then `notes()` once. Memory grows with the notes kept, not with the ids fed. With
  `max_seconds`, a note ending later raises `TimeLimitError`.
  """

  def __init__(self, max_seconds: Optional[float] = None):
    self.max_seconds = max_seconds

  @property
  def num_notes(self) -> int:
    """Notes decoded so far."""
    raise NotImplementedError

  def feed(self, ids) -> None:
    raise NotImplementedError

  def notes(self) -> Notes:
    raise NotImplementedError

  def _check_end(self, seconds: float, index: int) -> None:
    if self.max_seconds is not None and seconds > self.max_seconds:
      raise TimeLimitError(seconds, self.max_seconds, index)


# ----------------------------------------------------------------------------- shared kernels
def stream_length(steps: np.ndarray, vel_ids: np.ndarray,
                  max_shift: int) -> Tuple[np.ndarray, np.ndarray]:
  """Per event, the time shifts and the velocity token `event_stream` writes before it.

  Returns (n_shift int64[E], need_vel int64[E]); the stream has
  sum(n_shift) + sum(need_vel) + E tokens. Memory in proportion to E, whatever the gaps.
  """
  E = len(steps)
  delta = np.diff(steps, prepend=0)
  n_shift = -(-delta // max_shift)  # ceil
  vel_idx = np.flatnonzero(vel_ids >= 0)
  v = vel_ids[vel_idx]
  changed = np.empty(len(v), bool)
  if len(v):
    changed[0] = True  # the initial velocity bin is 0, which no event has.
    changed[1:] = v[1:] != v[:-1]
  need_vel = np.zeros(E, np.int64)
  need_vel[vel_idx[changed]] = 1
  return n_shift, need_vel


def event_stream(steps: np.ndarray, event_ids: np.ndarray, vel_ids: np.ndarray,
                 shift_base: int, max_shift: int, max_tokens: Optional[int] = None,
                 name: str = "") -> np.ndarray:
  """Interleaves time shifts and velocity changes with already-ordered events (vectorised).

  Args:
    steps: int64[E] non-decreasing time step of each event.
    event_ids: int[E] id of each event's own token.
    vel_ids: int[E] id of the velocity token the event needs, or -1 for none (note-offs).
      A velocity token is written only when it differs from the last one written.
    shift_base: id of the 1-step time shift; shift s has id shift_base + s - 1.
    max_shift: largest single shift; longer gaps use several shift tokens (the last one
      carries the remainder), as Magenta's Performance does.
    max_tokens: raise TokenLimitError, before allocating the stream, when it would be longer.
    name: the encoding's name, for that error.
  Returns:
    int32 ids: for each event [shift tokens..., velocity token?, event token].
  """
  E = len(steps)
  if E == 0:
    return np.zeros(0, np.int32)
  delta = np.diff(steps, prepend=0)
  n_shift, need_vel = stream_length(steps, vel_ids, max_shift)
  counts = n_shift + need_vel + 1
  ends = np.cumsum(counts)
  if max_tokens is not None and int(ends[-1]) > max_tokens:
    raise TokenLimitError(int(ends[-1]), max_tokens, name)
  out = np.empty(int(ends[-1]), np.int64)
  starts = ends - counts
  out[ends - 1] = event_ids
  vi = np.flatnonzero(need_vel)
  out[ends[vi] - 2] = vel_ids[vi]
  si = np.flatnonzero(n_shift)
  if len(si):
    ns = n_shift[si]
    pos = np.repeat(starts[si], ns) + (np.arange(ns.sum()) - np.repeat(np.cumsum(ns) - ns, ns))
    last = np.zeros(ns.sum(), bool)
    last[np.cumsum(ns) - 1] = True
    rem = np.repeat(delta[si] - (ns - 1) * max_shift, ns)
    out[pos] = shift_base - 1 + np.where(last, rem, max_shift)
  return out.astype(np.int32)
