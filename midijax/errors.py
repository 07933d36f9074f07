"""User-facing errors. The CLI prints these as one clear line (no traceback) and exits 2."""


class MidijaxError(Exception):
  """Base class for errors caused by user input (files, configs, flags)."""


class MidiReadError(MidijaxError):
  """A MIDI file could not be read; names the file and the reason."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


class TokenError(MidijaxError):
  """A token (or token file line) is not valid for the encoding."""


class ConfigError(MidijaxError, ValueError):
  """A config field has a bad value; the message names the field."""
