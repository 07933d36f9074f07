"""Token encodings: `get(name, **options)` returns an `Encoding`.

    enc = midijax.encoding.get("performance")
    ids = enc.encode(notes_or_note_sequence)     # int32 event ids
    ns = enc.decode(ids)                          # note-seq NoteSequence
    enc.to_text(ids); enc.from_text(text)         # token names, one a line
    enc.save_vocab("vocab.json"); load_vocab("vocab.json") -> Encoding
"""
import json
import pathlib

from midijax.encoding.base import (CONDITIONING, EOS_ID, PAD_ID, Encoding, Vocab, family_of_program,
                                   tempo_bin)
from midijax.encoding.drums import DrumsEncoding
from midijax.encoding.performance import PerformanceEncoding
from midijax.encoding.triples import TriplesEncoding
from midijax.errors import ConfigError

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
  except TypeError as e:
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


def load_vocab(path) -> Encoding:
  """Rebuilds the encoding saved by `Encoding.save_vocab` and checks the token list matches."""
  from etils import epath  # local paths and gs:// alike
  data = json.loads(epath.Path(path).read_text())
  enc = from_config(data["encoding"])
  if enc.vocab.names != data["tokens"]:
    raise ConfigError(f"{path}: vocabulary does not match encoding {data['encoding']}")
  return enc


__all__ = ["get", "from_config", "load_vocab", "Encoding", "Vocab", "CONDITIONING", "PAD_ID",
           "EOS_ID", "ENCODINGS", "tempo_bin", "family_of_program", "is_drum_music"]
