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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from midijax.errors import TokenError
from midijax.notes import Notes

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

  # -- encode / decode ---------------------------------------------------------------------
  def encode(self, notes) -> np.ndarray:
    """Notes (or a NoteSequence) -> event ids (int32)."""
    if not isinstance(notes, Notes):
      notes = Notes.from_note_sequence(notes)
    return self._encode(notes)

  def decode_notes(self, ids, **kw) -> Notes:
    """ids -> `Notes`; special tokens are skipped, decoding stops at EOS."""
    return self._decode(self.strip_specials(ids), **kw)

  def decode(self, ids, **kw):
    """ids -> note-seq NoteSequence."""
    return self.decode_notes(ids, **kw).to_note_sequence()

  def _encode(self, notes: Notes) -> np.ndarray:
    raise NotImplementedError

  def _decode(self, ids: np.ndarray, **kw) -> Notes:
    raise NotImplementedError

  # -- text ----------------------------------------------------------------------------------
  def to_text(self, ids) -> str:
    """Token names, one a line."""
    names = self.vocab.names
    return "".join(names[int(i)] + "\n" for i in np.asarray(ids).ravel())

  def from_text(self, text: str, lenient: bool = False, stats: Optional[dict] = None
                ) -> np.ndarray:
    """Token names (or integer ids), one a line -> ids.

    Blank lines and lines starting with '#' are ignored. An invalid line raises `TokenError`
    naming the line number, or with `lenient` is skipped and counted in stats['skipped'].
    """
    out, skipped = [], 0
    n = len(self.vocab)
    for lineno, line in enumerate(text.splitlines(), 1):
      tok = line.strip()
      if not tok or tok.startswith("#"):
        continue
      if tok in self.vocab.ids:
        out.append(self.vocab.ids[tok])
      elif tok.lstrip("-").isdigit() and 0 <= int(tok) < n:
        out.append(int(tok))
      elif lenient:
        skipped += 1
      else:
        raise TokenError(f"line {lineno}: {tok!r} is not a {self.name} token "
                         f"(names like {self.vocab.names[2]!r} or ids 0..{n - 1})")
    if stats is not None:
      stats["skipped"] = skipped
    return np.asarray(out, np.int32)

  def notes_to_text(self, notes: Notes) -> str:
    """The text form of a file's notes (`midijax midi2tokens`)."""
    return self.to_text(self.encode(notes))

  def text_to_notes(self, text: str, lenient: bool = False, stats=None, **kw) -> Notes:
    """Parses text written by `notes_to_text` (or ids) back into notes."""
    return self.decode_notes(self.from_text(text, lenient=lenient, stats=stats), **kw)

  def describe(self) -> dict:
    return {"name": self.name, "vocab_size": self.vocab_size, "event_tokens": self.num_events,
            "description": self.description, "keeps": self.keeps, "options": self.options}


# ----------------------------------------------------------------------------- shared kernels
def event_stream(steps: np.ndarray, event_ids: np.ndarray, vel_ids: np.ndarray,
                 shift_base: int, max_shift: int) -> np.ndarray:
  """Interleaves time shifts and velocity changes with already-ordered events (vectorised).

  Args:
    steps: int64[E] non-decreasing time step of each event.
    event_ids: int[E] id of each event's own token.
    vel_ids: int[E] id of the velocity token the event needs, or -1 for none (note-offs).
      A velocity token is written only when it differs from the last one written.
    shift_base: id of the 1-step time shift; shift s has id shift_base + s - 1.
    max_shift: largest single shift; longer gaps use several shift tokens (the last one
      carries the remainder), as Magenta's Performance does.
  Returns:
    int32 ids: for each event [shift tokens..., velocity token?, event token].
  """
  E = len(steps)
  if E == 0:
    return np.zeros(0, np.int32)
  delta = np.diff(steps, prepend=0)
  n_shift = -(-delta // max_shift)  # ceil
  has_vel = vel_ids >= 0
  vel_idx = np.flatnonzero(has_vel)
  v = vel_ids[vel_idx]
  changed = np.empty(len(v), bool)
  if len(v):
    changed[0] = True  # the initial velocity bin is 0, which no event has.
    changed[1:] = v[1:] != v[:-1]
  need_vel = np.zeros(E, np.int64)
  need_vel[vel_idx[changed]] = 1
  counts = n_shift + need_vel + 1
  ends = np.cumsum(counts)
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
