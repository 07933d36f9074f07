"""Token encodings: `get(name, **options)` returns an `Encoding`.

    enc = midijax.encoding.get("performance")
    ids = enc.encode(notes_or_note_sequence)     # int32 event ids
    ns = enc.decode(ids)                          # note-seq NoteSequence
    enc.to_text(ids); enc.from_text(text)         # token names, one a line
    enc.save_vocab("vocab.json"); load_vocab("vocab.json") -> Encoding
"""
import dataclasses
import json
import pathlib
from typing import Dict, Optional, Tuple

import numpy as np

from midijax.encoding.base import (CONDITIONING, EOS_ID, PAD_ID, Encoding, Vocab, family_of_program,
                                   tempo_bin)
from midijax.encoding.drums import DrumsEncoding
from midijax.encoding.performance import PerformanceEncoding
from midijax.encoding.triples import TriplesEncoding
from midijax.errors import ConfigError
from midijax.limits import MAX_TOKENS
from midijax.notes import Notes

ENCODINGS = {
    "performance": PerformanceEncoding,
    "drums": DrumsEncoding,
    "triples": TriplesEncoding,
}


def get(name: str, **options) -> Encoding:
  """The encoding called `name`, built with `options` (see each class)."""
  if name not in ENCODINGS:
    raise ConfigError(f"unknown encoding {name!r}; valid: {', '.join(ENCODINGS)}")
  try:
    return ENCODINGS[name](**options)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad options for encoding {name!r}: {e}") from None


def from_config(config: dict) -> Encoding:
  """Inverse of `Encoding.config`."""
  config = dict(config)
  return get(config.pop("name"), **config)


def is_drum_music(enc: Encoding, *, dataset: str = "", conditions=None, notes=None) -> bool:
  """Whether tokens of `enc` stand for drums (decoded onto the GM drum channel).

  The one rule every command and library function uses: drums when the encoding is
  `drums`, the run was trained on the Groove dataset (`dataset`, config.data.name), the
  conditioning asks for the drums family (`conditions`, {kind: value}), or a prompt's
  `notes` are all drum notes.
  """
  if enc.name == "drums" or dataset == "groove":
    return True
  if (conditions or {}).get("family") == "drums":
    return True
  return notes is not None and bool(len(notes)) and bool(notes.is_drum.all())


def family_of_notes(notes: Notes) -> Optional[str]:
  """The General MIDI family of the instrument with the most notes (drums for drum-channel
  notes); None without notes. The data builders' `family` conditioning for files whose
  metadata gives none."""
  if len(notes) == 0:
    return None
  keys = notes.is_drum.astype(np.int64) * 128 + notes.program
  top = int(np.bincount(keys).argmax())
  return family_of_program(top % 128, top >= 128)


def meter_value(num: int, den: int) -> str:
  """The `meter` conditioning value of a time signature: '4-4', or 'other' outside the
  vocabulary."""
  value = f"{int(num)}-{int(den)}"
  return value if value in CONDITIONING["meter"] else "other"


def conditions_of_notes(notes: Notes, kinds) -> Dict[str, str]:
  """Conditioning values a piece of music states itself, for the kinds of `kinds` that
  have one: tempo (bin of the first tempo), meter (first time signature, else 4/4; "other"
  outside the vocabulary) and family (`family_of_notes`). E.g. what `midijax continue`
  puts in a MIDI prompt's prefix."""
  out = {}
  if "tempo" in kinds:
    out["tempo"] = tempo_bin(notes.qpm)
  if "meter" in kinds:
    out["meter"] = meter_value(*(notes.time_signatures[0, 1:3] if len(notes.time_signatures)
                                 else (4, 4)))
  family = family_of_notes(notes) if "family" in kinds else None
  if family is not None:
    out["family"] = family
  return out


def load_vocab(path) -> Encoding:
  """Rebuilds the encoding saved by `Encoding.save_vocab` and checks the token list matches."""
  from etils import epath  # local paths and gs:// alike
  data = json.loads(epath.Path(path).read_text())
  enc = from_config(data["encoding"])
  if enc.vocab.names != data["tokens"]:
    raise ConfigError(f"{path}: vocabulary does not match encoding {data['encoding']}")
  return enc


def note_token_mask(enc: Encoding) -> np.ndarray:
  """bool [vocab_size]: ids that start a note (NOTE_ON_* / DRUM_*), the unit of NLL per
  note (comparable between encodings, unlike NLL per token)."""
  return np.array([n.startswith(("NOTE_ON_", "DRUM_")) for n in enc.vocab.names])


# Encodings whose time is the sum of their TIME_SHIFT tokens: a prompt and its continuation
# encode apart and join into one stream (`encode_prompt`, `continuation_pair`).
TIME_SHIFT_ENCODINGS = ("performance", "drums")


def encode_prompt(enc: Encoding, notes: Notes, cut_seconds: float, *,
                  max_tokens: Optional[int] = MAX_TOKENS) -> np.ndarray:
  """Event ids of the notes starting before `cut_seconds` (ends cut there), then time
  shifts up to the cut, so that what follows starts at the cut (e.g. on a bar line).

  The prompt `midijax continue` feeds the model and the prompt of a continuation pair
  (`continuation_pair`) are this, so training and use see the same tokens. Encodings
  without time shifts (`triples`) get no trailing shifts.

  Args:
    enc: the encoding; notes: the music (seconds from its start); cut_seconds: the cut.
    max_tokens: refuse (TokenLimitError) a prompt of more event tokens; None: no limit.
  """
  part = notes.select(notes.start < cut_seconds)
  part = dataclasses.replace(part, end=np.minimum(part.end, cut_seconds))
  ids = enc.encode(part, max_tokens=max_tokens)
  if enc.name in TIME_SHIFT_ENCODINGS and len(ids):
    max_shift = enc.max_shift_steps
    shifts = (ids >= enc.shift_base) & (ids < enc.shift_base + max_shift)
    last_step = int(np.sum(np.where(shifts, ids - enc.shift_base + 1, 0)))
    gap = int(enc.time_steps(np.float64(cut_seconds), notes)) - last_step
    tail = [max_shift] * (gap // max_shift) + ([gap % max_shift] if gap % max_shift else [])
    ids = np.concatenate([ids, enc.shift_base - 1 + np.asarray(tail, np.int32)]).astype(np.int32)
  return ids


def continuation_pair(enc: Encoding, notes: Notes, cut_seconds: float, end_seconds: float, *,
                      max_tokens: Optional[int] = MAX_TOKENS) -> Tuple[np.ndarray, np.ndarray]:
  """(prompt ids, target ids) of music split at `cut_seconds`: the prompt as
  `encode_prompt` makes it (ending on the cut), the target the notes starting in
  [cut_seconds, end_seconds), timed from the cut (ends cut at `end_seconds`). Joined, they
  are one token stream whose time runs on across the cut.

  Raises:
    ConfigError: the encoding has no time shifts (its prompt and target cannot be joined).
    TokenLimitError: either part makes more than `max_tokens` event tokens.
  """
  if enc.name not in TIME_SHIFT_ENCODINGS:
    raise ConfigError(f"continuation pairs need an encoding with time shifts "
                      f"({', '.join(TIME_SHIFT_ENCODINGS)}), not {enc.name!r}")
  prompt = encode_prompt(enc, notes, cut_seconds, max_tokens=max_tokens)
  later = notes.select((notes.start >= cut_seconds) & (notes.start < end_seconds))
  later = dataclasses.replace(later, start=later.start - cut_seconds,
                              end=np.minimum(later.end, end_seconds) - cut_seconds)
  return prompt, enc.encode(later, max_tokens=max_tokens)


__all__ = ["get", "from_config", "load_vocab", "Encoding", "Vocab", "CONDITIONING", "PAD_ID",
           "EOS_ID", "ENCODINGS", "tempo_bin", "family_of_program", "is_drum_music",
           "TIME_SHIFT_ENCODINGS", "encode_prompt", "continuation_pair", "note_token_mask",
           "family_of_notes", "meter_value", "conditions_of_notes"]
