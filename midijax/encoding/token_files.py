"""Token files: what `midijax midi2tokens` writes and `midijax tokens2midi` reads.

A token file is UTF-8 text with one token a line, under an optional header line::

    # midijax encoding=performance is_drum=0 ticks_per_quarter=480 qpm=120
    VELOCITY_20
    NOTE_ON_60
    ...

Tokens are names (``NOTE_ON_60``) or integer ids (``62``) of the encoding's vocabulary;
`triples` files may instead hold the course text (``POSITION_<tick>``, ``NOTE_ON_<pitch>``,
``DURATION_<ticks>``). Blank lines and other ``#`` lines are ignored. The header records
the encoding, whether the notes are drums, the resolution of triples' ticks and the tempo
(quarter notes a minute) of the source file; flags given to `tokens_to_midi` override it.

Reading streams the file line by line: memory grows with the notes kept, not with the
file. Every problem is one line naming the file and the line: a header value out of
range, a line that is not a token, not UTF-8 or too long, a time past what a MIDI file can
hold; `lenient` skips (and counts) bad token lines instead. Limits (`max_tokens`,
`max_seconds`, `max_notes`) refuse a file rather than truncate it; nothing is written
then, and a file that is written is readable by `midi2tokens`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from midijax.encoding import base
from midijax.encoding.base import TimeLimitError, quote_token
from midijax.errors import MidijaxError, TokenError
from midijax.limits import MAX_LINE_BYTES, MAX_SECONDS, MAX_TICK, MAX_TOKENS, MAX_WRITE_NOTES
from midijax.notes import Notes

PathLike = Union[str, os.PathLike]
HEADER_PREFIX = "# midijax "
# MIDI's tempo range: a 24-bit microseconds-per-quarter-note field (6e7 / qpm).
MIN_QPM = 6e7 / 0xFFFFFF
MAX_QPM = 6e7
# MIDI's resolution range: 15 bits of ticks per quarter note.
MAX_TICKS_PER_QUARTER = 0x7FFF
# Resolution of written performance and drums files (their tokens have no ticks).
DEFAULT_TICKS_PER_QUARTER = 480
# Notes `tokens_to_midi` writes at most (midijax/limits.py).
MAX_NOTES = MAX_WRITE_NOTES
# Ids decoded at a time.
_CHUNK = 4096
# A NUL byte in the first bytes marks a binary file.
_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Header:
  """The settings a token file's header line records.

  Attributes:
    encoding: encoding name.
    is_drum: whether the notes are drums (written on MIDI channel 10).
    ticks_per_quarter: resolution of triples' POSITION / DURATION ticks (1..32767).
    qpm: tempo, quarter notes a minute (MIN_QPM..MAX_QPM).
  """
  encoding: str = "performance"
  is_drum: bool = False
  ticks_per_quarter: int = DEFAULT_TICKS_PER_QUARTER
  qpm: float = 120.0

  def line(self) -> str:
    """The header line, newline included."""
    return (f"{HEADER_PREFIX}encoding={self.encoding} is_drum={int(self.is_drum)} "
            f"ticks_per_quarter={int(self.ticks_per_quarter)} qpm={self.qpm:g}\n")


def format_header(encoding: str, is_drum: bool, ticks_per_quarter: int, qpm: float) -> str:
  """The header line for these settings (see `Header`)."""
  return Header(encoding, bool(is_drum), int(ticks_per_quarter), float(qpm)).line()


def parse_header(line: str) -> Dict[str, str]:
  """The key=value fields of a header line ({} when `line` is not one); values unchecked."""
  if not line.startswith(HEADER_PREFIX):
    return {}
  return dict(part.split("=", 1) for part in line[len(HEADER_PREFIX):].split() if "=" in part)


def check_qpm(value: Union[str, float], where: str) -> float:
  """A tempo in MIDI's range, or MidijaxError naming `where` (e.g. 'header field qpm')."""
  try:
    qpm = float(value)
  except (TypeError, ValueError):
    raise MidijaxError(f"{where}: {quote_token(str(value))} is not a number") from None
  if not (math.isfinite(qpm) and MIN_QPM <= qpm <= MAX_QPM):
    raise MidijaxError(f"{where}: tempo {qpm:g} is outside what MIDI can hold "
                       f"({MIN_QPM:.4f} to {MAX_QPM:g} quarter notes a minute)")
  return qpm


def check_ticks_per_quarter(value: Union[str, int], where: str) -> int:
  """A resolution in MIDI's range (1..32767), or MidijaxError naming `where`."""
  text = str(value).strip()
  if not text.isascii() or not text.isdigit() or len(text) > 6:
    raise MidijaxError(f"{where}: {quote_token(text)} is not a whole number of ticks")
  tpq = int(text)
  if not 1 <= tpq <= MAX_TICKS_PER_QUARTER:
    raise MidijaxError(f"{where}: {tpq} ticks per quarter note is outside what MIDI can hold "
                       f"(1 to {MAX_TICKS_PER_QUARTER})")
  return tpq


def _check_is_drum(value: str, where: str) -> bool:
  if value not in ("0", "1"):
    raise MidijaxError(f"{where}: {quote_token(value)} is not 0 or 1")
  return value == "1"


def _check_encoding(value: str, where: str) -> str:
  from midijax.encoding import ENCODINGS  # pylint: disable=g-import-not-at-top
  if value not in ENCODINGS:
    raise MidijaxError(f"{where}: unknown encoding {quote_token(value)}; valid: "
                       f"{', '.join(ENCODINGS)}")
  return value


# ----------------------------------------------------------------------------- writing
def write_tokens(path: PathLike, enc: base.Encoding, notes: Notes, *, ids: bool = False,
                 header: bool = True, max_tokens: Optional[int] = MAX_TOKENS,
                 max_seconds: Optional[float] = MAX_SECONDS) -> int:
  """Writes the token file of `notes` (via a temporary file, then renamed); returns the count.

  Args:
    path: the token file to write (parent folders are created).
    enc: the encoding.
    notes: the notes (times finite, from a reader).
    ids: integer ids instead of names (for `triples`, names are the course text).
    header: write the header line.
    max_tokens, max_seconds: limits as for `Encoding.encode`, checked before the tokens are
      made.
  Raises:
    TokenError (TokenLimitError): notes over a limit, or times that cannot be encoded.
  """
  from midijax.encoding.triples import TriplesEncoding  # pylint: disable=g-import-not-at-top
  if isinstance(enc, TriplesEncoding) and not ids:
    on, dur, pitch = enc.course_rows(notes, max_tokens=max_tokens, max_seconds=max_seconds)
    rows = np.stack([on, pitch, dur], 1)
    lines = lambda a, b: "".join(f"POSITION_{o}\nNOTE_ON_{p}\nDURATION_{d}\n"
                                 for o, p, d in rows[a // 3:b // 3].tolist())
    count = 3 * len(rows)
  else:
    tokens = enc.encode(notes, max_tokens=max_tokens, max_seconds=max_seconds)
    names = enc.vocab.names
    if ids:
      lines = lambda a, b: "".join(f"{i}\n" for i in tokens[a:b].tolist())
    else:
      lines = lambda a, b: "".join(names[i] + "\n" for i in tokens[a:b].tolist())
    count = len(tokens)
  from midijax.encoding import is_drum_music  # pylint: disable=g-import-not-at-top
  is_drum = is_drum_music(enc, notes=notes)
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + ".tmp")
  step = 3 * 16384
  with open(tmp, "w", encoding="utf-8", newline="\n") as f:
    if header:
      f.write(format_header(enc.name, is_drum, notes.ticks_per_quarter, notes.qpm))
    for a in range(0, count, step):
      f.write(lines(a, a + step))
  os.replace(tmp, p)
  return count


def midi_to_tokens(midi_path: PathLike, out_path: PathLike, *, encoding: str = "performance",
                   ids: bool = False, sustain: bool = False, reader: str = "symusic",
                   header: bool = True, max_seconds: Optional[float] = MAX_SECONDS,
                   max_tokens: Optional[int] = MAX_TOKENS) -> Tuple[int, int]:
  """Reads a MIDI file and writes its token file (`midijax midi2tokens`).

  Args:
    midi_path, out_path: the MIDI file and the token file to write.
    encoding: encoding name. ids, header: as for `write_tokens`.
    sustain, reader: as for `midi_io.read_notes`.
    max_seconds: refuse a file whose music lasts longer (seconds); None: no limit.
    max_tokens: refuse a file that makes more tokens (or has more notes); None: no limit.
  Returns:
    (notes read, tokens written).
  Raises:
    MidijaxError: the file cannot be read or is over a limit; one line naming the file.
  """
  from midijax import encoding as encoding_lib  # pylint: disable=g-import-not-at-top
  from midijax import midi_io  # pylint: disable=g-import-not-at-top
  enc = encoding_lib.get(encoding)
  notes = midi_io.read_notes(midi_path, reader=reader, sustain=sustain, max_seconds=max_seconds,
                             max_notes=max_tokens)
  try:
    count = write_tokens(out_path, enc, notes, ids=ids, header=header, max_tokens=max_tokens,
                         max_seconds=max_seconds)
  except TokenError as e:
    raise MidijaxError(f"{midi_path}: {e}") from None
  return len(notes), count


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass
class TokenFile:
  """A token file read back.

  Attributes:
    notes: the decoded notes (one tempo, `header.qpm`; resolution `header.ticks_per_quarter`).
    header: the settings used (the file's header, overridden by flags, else defaults).
    tokens: valid token lines read.
    skipped: invalid lines skipped (with `lenient`), plus an unfinished triple at the end.
  """
  notes: Notes
  header: Header
  tokens: int
  skipped: int


def _lines(f, block: int = 1 << 20) -> Iterator[Tuple[int, Optional[str], Optional[str]]]:
  """(line number, stripped text or None, problem or None) for each line of a binary file.

  Reads `block` bytes at a time, so memory stays bounded by the block and MAX_LINE_BYTES
  however long a line is.
  """
  lineno, tail, overlong = 0, b"", False
  while True:
    data = f.read(block)
    if not data:
      break
    parts = (tail + data).split(b"\n")
    tail = parts.pop()
    for raw in parts:
      lineno += 1
      if overlong:  # the end of a line already reported as too long
        overlong = False
        continue
      if len(raw) <= MAX_LINE_BYTES:
        try:
          text = raw.decode("utf-8")
          if "\0" not in text:
            yield lineno, text.strip(), None
            continue
        except UnicodeDecodeError:
          pass
      yield _line(lineno, raw)
    if len(tail) > MAX_LINE_BYTES:
      if not overlong:
        yield lineno + 1, None, f"longer than {MAX_LINE_BYTES} bytes"
      overlong, tail = True, b""
  if tail and not overlong:
    yield _line(lineno + 1, tail)


def _line(lineno: int, raw: bytes) -> Tuple[int, Optional[str], Optional[str]]:
  if len(raw) > MAX_LINE_BYTES:
    return lineno, None, f"longer than {MAX_LINE_BYTES} bytes"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return lineno, None, "not UTF-8 text"
  if "\0" in text:
    return lineno, None, "not text (a NUL byte)"
  return lineno, text.strip(), None


class _Reader:
  """The state of one `read_tokens` pass (see there)."""

  def __init__(self, path: pathlib.Path, lenient: bool, max_tokens: Optional[int],
               max_notes: Optional[int]):
    self.path, self.lenient = path, lenient
    self.max_tokens, self.max_notes = max_tokens, max_notes
    self.tokens = self.skipped = 0
    self.ended = False  # an EOS was read: later ids are checked but not decoded
    self.ids: List[int] = []
    self.linenos: List[int] = []

  def error(self, lineno: Optional[int], message: str) -> MidijaxError:
    where = f"{self.path}: line {lineno}: " if lineno is not None else f"{self.path}: "
    return MidijaxError(where + message)

  def bad_line(self, lineno: int, message: str) -> None:
    """A line that is not a valid token: an error, or skipped and counted with `lenient`."""
    if not self.lenient:
      raise self.error(lineno, message)
    self.skipped += 1

  def count(self, lineno: int) -> None:
    """Counts a token line; raises past max_tokens."""
    self.tokens += 1
    if self.max_tokens is not None and self.tokens > self.max_tokens:
      raise self.too_many(lineno)

  def too_many(self, lineno: int) -> MidijaxError:
    return self.error(lineno, f"more tokens than the max_tokens limit ({self.max_tokens}; "
                              "raise --max_tokens to read it)")

  def check_notes(self, num_notes: int, lineno: int) -> None:
    if self.max_notes is not None and num_notes > self.max_notes:
      raise self.error(lineno, f"more notes than the max_notes limit ({self.max_notes}; "
                               "raise --max_notes to write them)")


def _time_limit(max_seconds: Optional[float], settings: Header) -> Tuple[float, str]:
  """The latest note end allowed (seconds) and what sets it: `max_seconds`, or the time of
  tick MAX_TICK at the file's tempo and resolution if that comes first."""
  # Computed as `CourseText` computes a note's end, so the two agree to the last bit.
  tick_limit = MAX_TICK * (60.0 / (settings.qpm * settings.ticks_per_quarter))
  if max_seconds is not None and max_seconds <= tick_limit:
    return float(max_seconds), "--max_seconds"
  flags = "--tempo or --ticks_per_quarter" if settings.encoding == "triples" else "--tempo"
  return tick_limit, f"tick {MAX_TICK}, the most a MIDI file can hold; lower {flags}"


def read_tokens(path: PathLike, *, encoding: Optional[str] = None, qpm: Optional[float] = None,
                ticks_per_quarter: Optional[int] = None, is_drum: Optional[bool] = None,
                lenient: bool = False, max_tokens: Optional[int] = MAX_TOKENS,
                max_seconds: Optional[float] = MAX_SECONDS,
                max_notes: Optional[int] = MAX_NOTES) -> TokenFile:
  """Reads a token file (streamed line by line) into notes.

  Args:
    path: the token file.
    encoding, qpm, ticks_per_quarter, is_drum: override the header (None: the header's, else
      performance, 120, 480, and drums for the drums encoding only).
    lenient: skip and count invalid token lines instead of failing on the first.
    max_tokens: refuse a file with more token lines; None: no limit.
    max_seconds: refuse a file whose notes end later (seconds); None: only MIDI's own limit
      (tick MAX_TICK at the tempo and resolution written).
    max_notes: refuse a file that decodes to more notes; None: no limit.
  Returns:
    A `TokenFile` (its notes may be empty).
  Raises:
    MidijaxError: one line naming the file and, where there is one, the line.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise MidijaxError(f"{p}: token file not found")
  r = _Reader(p, lenient, max_tokens, max_notes)
  with open(p, "rb") as f:
    head = f.read(_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
      raise r.error(None, f"not a token file: binary data (a NUL byte at byte {nul})")
    f.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)  # a UTF-8 byte-order mark
    lines = _lines(f)
    first = next(lines, None)
    fields = {}
    if first is not None and first[1] is not None and first[1].startswith(HEADER_PREFIX):
      fields = parse_header(first[1])
      first = None
    settings = _settings(r, fields, encoding, qpm, ticks_per_quarter, is_drum)
    from midijax import encoding as encoding_lib  # pylint: disable=g-import-not-at-top
    enc = encoding_lib.get(settings.encoding)
    limit, flag = _time_limit(max_seconds, settings)
    rest = lines if first is None else _chain(first, lines)
    if settings.encoding == "triples":
      notes = _read_triples(r, enc, rest, settings, limit, flag)
    else:
      notes = _read_ids(r, enc, enc.decoder(qpm=settings.qpm, is_drum=settings.is_drum,
                                             max_seconds=limit), rest, flag)
  return TokenFile(notes, settings, r.tokens, r.skipped)


def _chain(first, rest):
  yield first
  yield from rest


def _settings(r: _Reader, fields: Dict[str, str], encoding, qpm, ticks_per_quarter,
              is_drum) -> Header:
  """The header's fields, overridden by the flags given, checked where they are used."""
  where = lambda key: f"line 1: header field {key}"
  if encoding is None:
    encoding = _check_encoding(fields["encoding"], f"{r.path}: {where('encoding')}") \
        if "encoding" in fields else "performance"
  if qpm is None:
    qpm = check_qpm(fields["qpm"], f"{r.path}: {where('qpm')}") if "qpm" in fields else 120.0
  else:
    qpm = check_qpm(qpm, "--tempo")
  if ticks_per_quarter is None:
    ticks_per_quarter = (check_ticks_per_quarter(fields["ticks_per_quarter"],
                                                 f"{r.path}: {where('ticks_per_quarter')}")
                         if "ticks_per_quarter" in fields else DEFAULT_TICKS_PER_QUARTER)
  else:
    ticks_per_quarter = check_ticks_per_quarter(ticks_per_quarter, "--ticks_per_quarter")
  if encoding != "triples":
    # Performance and drums tokens carry no ticks; their files are written at 480.
    ticks_per_quarter = DEFAULT_TICKS_PER_QUARTER
  if is_drum is None:
    is_drum = encoding == "drums" or (
        "is_drum" in fields and _check_is_drum(fields["is_drum"], f"{r.path}: {where('is_drum')}"))
  return Header(encoding, bool(is_drum), int(ticks_per_quarter), float(qpm))


def _read_ids(r: _Reader, enc: base.Encoding, decoder: base.Decoder, lines,
              flag: str, first_token: Optional[Tuple[int, str]] = None) -> Notes:
  """Token names or ids -> notes through `decoder`, a chunk at a time."""
  # One dict lookup a line for names and plain ids; `token_id` for anything else.
  lookup = {**{str(i): i for i in range(enc.vocab_size)}, **enc.vocab.ids}
  lo, hi, eos = enc.body_offset, enc.bos_id, enc.eos_id
  limit = r.max_tokens if r.max_tokens is not None else float("inf")
  ids, linenos = r.ids, r.linenos

  def flush() -> None:
    try:
      decoder.feed(np.asarray(ids, np.int64))
    except TimeLimitError as e:
      raise r.error(linenos[e.index], f"{e.reason} ({flag})") from None
    r.check_notes(decoder.num_notes, linenos[-1])
    ids.clear()
    linenos.clear()

  if first_token is not None:
    lines = _chain((first_token[0], first_token[1], None), lines)
  for lineno, tok, problem in lines:
    if problem is not None:
      r.bad_line(lineno, problem)
      continue
    if not tok or tok[0] == "#":
      continue
    i = lookup.get(tok)
    if i is None:
      i = enc.token_id(tok)
      if i is None:
        r.bad_line(lineno, enc.invalid_token(tok))
        continue
    r.tokens += 1
    if r.tokens > limit:
      raise r.too_many(lineno)
    if r.ended:
      continue
    if lo <= i < hi:
      ids.append(i)
      linenos.append(lineno)
      if len(ids) >= _CHUNK:
        flush()
    elif i == eos:
      r.ended = True  # later lines are checked and counted, not decoded
  if ids:
    flush()
  try:
    notes = decoder.notes()
  except TimeLimitError as e:
    raise r.error(None, f"a note left sounding at the end of the file ends at {e.seconds:.2f} "
                        f"s, past the {e.limit:g} s limit ({flag})") from None
  r.check_notes(len(notes), None)
  return notes


def _read_triples(r: _Reader, enc, lines, settings: Header, limit: float, flag: str) -> Notes:
  """Triples: course text when the first token line starts POSITION_ or DURATION_, else
  vocabulary names or ids (a first line NOTE_ON_<p> is both, and out of order in both)."""
  for lineno, tok, problem in lines:
    if problem is not None:
      r.bad_line(lineno, problem)
      continue
    if not tok or tok.startswith("#"):
      continue
    if tok.startswith(("POSITION_", "DURATION_")):
      return _read_course(r, enc, _chain((lineno, tok, None), lines), settings, limit, flag)
    if tok.startswith("NOTE_ON_") or enc.token_id(tok) is None:
      r.bad_line(lineno, f"{quote_token(tok)} cannot start a triples file (course text starts "
                         f"POSITION_<tick>; vocabulary names POS_<k>; ids 0..{enc.vocab_size - 1})")
      continue
    decoder = enc.decoder(qpm=settings.qpm, ticks_per_quarter=settings.ticks_per_quarter,
                          is_drum=settings.is_drum, max_seconds=limit)
    return _read_ids(r, enc, decoder, lines, flag, first_token=(lineno, tok))
  return Notes.empty()


def _read_course(r: _Reader, enc, lines, settings: Header, limit: float, flag: str) -> Notes:
  """Course text (POSITION_<tick> / NOTE_ON_<pitch> / DURATION_<ticks>) -> notes."""
  parser = enc.course_parser(lenient=r.lenient, qpm=settings.qpm,
                             ticks_per_quarter=settings.ticks_per_quarter, max_seconds=limit)
  for lineno, tok, problem in lines:
    if problem is not None:
      r.bad_line(lineno, problem)
      parser.cur = []  # a bad line drops the partial note, as `CourseText` does
      continue
    if not tok or tok.startswith("#"):
      continue
    before = parser.skipped
    try:
      parser.feed(tok, lineno)
    except TimeLimitError as e:
      raise r.error(lineno, f"{e.reason} ({flag})") from None
    except TokenError as e:
      raise MidijaxError(f"{r.path}: {e}") from None
    if parser.skipped == before:
      r.count(lineno)
      r.check_notes(parser.num_notes, lineno)
  r.skipped += parser.skipped_total
  r.check_notes(parser.num_notes, None)
  return parser.notes(enc.velocity, is_drum=settings.is_drum)


def writable_notes(notes: Notes, qpm: float, ticks_per_quarter: int) -> Notes:
  """`notes` on the tick grid a MIDI file at this tempo and resolution has, every note at
  least one tick long (a zero-length note would vanish on reading), all within MAX_TICK.

  Raises MidijaxError (without a file name) for a note ending past MAX_TICK.
  """
  scale = 60.0 / (qpm * ticks_per_quarter)  # seconds per tick
  on = np.rint(notes.start / scale)
  off = np.maximum(np.rint(notes.end / scale), on + 1)
  if len(notes) and off.max() > MAX_TICK:
    raise MidijaxError(f"a note ends at tick {int(off.max())}, past tick {MAX_TICK}, the most "
                       "a MIDI file can hold (lower --tempo or --ticks_per_quarter)")
  return dataclasses.replace(notes, start=on * scale, end=off * scale,
                             tempos=np.array([[0.0, qpm]]), ticks_per_quarter=ticks_per_quarter)


def tokens_to_midi(path: PathLike, out_path: PathLike, **kw) -> TokenFile:
  """Reads a token file (`read_tokens`, keywords as there) and writes its MIDI file.

  Refuses (MidijaxError) a file that decodes to no notes; otherwise writes a MIDI file that
  `midi_io.read_notes` reads back, with the same limits. Nothing is written on error.
  """
  from midijax import midi_io  # pylint: disable=g-import-not-at-top
  tf = read_tokens(path, **kw)
  if len(tf.notes) == 0:
    skipped = f" ({tf.skipped} invalid lines skipped)" if tf.skipped else ""
    raise MidijaxError(f"{path}: no notes to write{skipped}; nothing written")
  try:
    notes = writable_notes(tf.notes, tf.header.qpm, tf.header.ticks_per_quarter)
  except MidijaxError as e:
    raise MidijaxError(f"{path}: {e}") from None
  midi_io.write_midi(notes, out_path)
  tf.notes = notes
  return tf
