"""What the midijax TFDS builders share: configs, the tokenizing pool, build reports.

Every builder (groove, piano, midi_folder) is a `MidiDatasetBuilder`: its
`_split_generators` lists the MIDI files of each split as `FileJob`s (path plus the
metadata features of that file), and this module's `_generate_examples` tokenizes
them on every core with a `multiprocessing.Pool`, yielding examples in the jobs'
order so the same input always gives the same shards. Given a Beam runner or Beam
pipeline options, each split is instead a Beam transform that TFDS runs (`_beam_examples`);
the report's counts then come back from the pipeline's counters, and its skipped files
from the pipeline's own output.
A file that cannot be read or encoded is skipped and listed (file and reason) in
``build_report.json``, written next to the shards with the vocabulary (``vocab.json``)
and the conditioning table (``metadata.json``, which TFDS writes from `info.metadata`).

Source files are read through `etils.epath`, as TFDS reads its own: the source folder
(``--manual_dir``) may be a local path or a gs:// (s3://, ...) URL.

Per example the features are the token ids (`tokens`, int32, variable length:
[BOS] + conditioning tokens + events + [EOS]) and `num_condition_tokens`, plus the
window it covers, note count, drum flag, duration and the builder's own metadata.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import shard_utils
import tqdm

from midijax import encoding as encoding_lib
from midijax import midi_io
from midijax import notes as notes_lib
from midijax.encoding.base import TokenLimitError
from midijax.errors import MidijaxError, MidiReadError
from midijax.notes import Notes

# Files written into the dataset's version directory next to the shards.
VOCAB_FILE = "vocab.json"
REPORT_FILE = "build_report.json"
METADATA_FILE = "metadata.json"  # TFDS's name for `info.metadata`.
# Standard split names, in the order splits are generated.
SPLITS = ("train", "validation", "test")
# Shards per split when neither the config nor the caller asks for a count; small
# splits get fewer (one example at least per shard).
DEFAULT_NUM_SHARDS = 8
# Environment variable that sets the tokenizing process count (default: every core).
WORKERS_ENV = "MIDIJAX_BUILD_WORKERS"
MIDI_SUFFIXES = (".mid", ".midi")
# Namespace of the Beam counters a build reports: "<split>/<count>" (`result_counts`).
BEAM_NAMESPACE = "midijax"
# Under Beam, each split's report entries (`report_entries`: skipped and too-short files)
# are gathered by the pipeline into this JSON file in the dataset's folder, read back
# into build_report.json and deleted.
BEAM_ENTRIES_FILE = "midijax_report_entries-{split}.json"
_ENTRIES_TAG = "report_entries"


class BuildError(MidijaxError):
  """A dataset could not be built (no usable files, missing source, bad config)."""


class NoUsableFilesError(BuildError):
  """Every file of a split (or of the whole dataset) failed to read or encode."""


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass(eq=False)
class MidiBuilderConfig(tfds.core.BuilderConfig):
  """What a builder config changes in the generated data.

  Attributes:
    encoding: token encoding name ("performance" | "drums" | "triples").
    encoding_options: keyword options for `midijax.encoding.get`.
    conditioning: conditioning kinds prepended after BOS, in this order (kinds of
      `midijax.encoding.CONDITIONING`: style, tempo, type, meter, family, dataset).
    bos: prepend BOS. eos: append EOS.
    window_bars: 0 for full performances; else examples are windows of this many bars
      at the file's tempo and meter.
    hop_bars: bars between window starts.
    sustain: apply the sustain pedal (CC 64) before encoding.
    drum_policy: what happens to drum notes: "only" (keep drums, drop pitched notes),
      "drop" (keep pitched notes) or "keep" (everything, one token stream).
    split_ratios: train/validation/test fractions for files without a given split
      (hashed from the relative path, see `hash_split`).
    sources: builder-specific source folders to read (piano: "maestro", "giantmidi").
    num_shards: shards per split unless the caller asks for a count (capped at the
      split's example count).
    max_bytes: files larger than this are skipped (bytes).
    max_seconds: files whose music lasts longer are skipped (seconds; the last note's end).
    max_tokens: files that make more tokens (all their windows together), or have more
      notes, are skipped; counted before the tokens are made.
    prompt_bars, target_bars: continuation pairs when prompt_bars > 0: each example is a
      window of prompt_bars + target_bars bars (windows `hop_bars` apart; window_bars is
      not used), split at the bar line after prompt_bars: the prompt as `midijax continue`
      encodes it (`midijax.encoding.continuation_pair`), then the target; the example's
      `num_prompt_tokens` says where the target starts. Windows with no note in the
      prompt or in the target are skipped. Encodings with time shifts only.
  """
  encoding: str = "performance"
  encoding_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  conditioning: Tuple[str, ...] = ()
  bos: bool = True
  eos: bool = True
  window_bars: int = 0
  hop_bars: int = 1
  sustain: bool = False
  drum_policy: str = "drop"
  split_ratios: Tuple[float, float, float] = (0.8, 0.1, 0.1)
  sources: Tuple[str, ...] = ()
  num_shards: int = DEFAULT_NUM_SHARDS
  max_bytes: int = midi_io.DEFAULT_MAX_BYTES
  max_seconds: float = notes_lib.MAX_SECONDS
  max_tokens: int = notes_lib.MAX_TOKENS
  prompt_bars: int = 0
  target_bars: int = 0


def config_with_overrides(base: MidiBuilderConfig, name: Optional[str] = None,
                          **overrides) -> MidiBuilderConfig:
  """A copy of `base` with some fields changed, under a name of its own.

  TFDS refuses a custom config named like a built-in one, and the name is the
  dataset's directory, so without `name` the result is called
  ``<base>_<8 hex digits of the overrides>`` (the same overrides, the same name).
  """
  fields = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise BuildError(f"unknown config field(s) {unknown}; valid: {sorted(fields)}")
  if not overrides and name is None:
    return base
  for key, value in overrides.items():  # tuple fields (conditioning, sources, ...) from lists
    if isinstance(getattr(base, key), tuple):
      overrides[key] = (value,) if isinstance(value, str) else tuple(value)
  if "split_ratios" in overrides:
    overrides["split_ratios"] = tuple(float(r) for r in overrides["split_ratios"])
  if name is None:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode())
    name = f"{base.name}_{digest.hexdigest()[:8]}"
  return dataclasses.replace(base, name=name, description=(
      f"{base.description} Overrides: {json.dumps(overrides, sort_keys=True, default=str)}"),
                             **overrides)


# --------------------------------------------------------------------------- splits
def hash_split(relpath: str, ratios: Sequence[float] = (0.8, 0.1, 0.1),
               names: Sequence[str] = SPLITS) -> str:
  """The split of a file, from a hash of its relative path (POSIX separators).

  The first 8 bytes of sha256(relpath) as a fraction u in [0, 1) pick the split
  whose cumulative ratio first exceeds u, so a file keeps its split when other files
  are added or removed, on any machine.
  """
  if len(ratios) != len(names) or min(ratios) < 0 or sum(ratios) <= 0:
    raise BuildError(f"split_ratios must be {len(names)} non-negative numbers, got {ratios}")
  u = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") / 2.0**64
  edges = np.cumsum(np.asarray(ratios, np.float64) / float(sum(ratios)))
  return names[min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)]


def find_midi_files(root: epath.PathLike) -> List[epath.Path]:
  """All .mid/.midi files under `root` (any case, local or gs:// ...), sorted by relative path."""
  root = epath.Path(root)
  # walk() lists a gs:// tree one folder at a time; rglob would stat every entry.
  files = [folder / name for folder, _, names in root.walk() for name in names
           if pathlib.PurePosixPath(name).suffix.lower() in MIDI_SUFFIXES]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on the local file system (no gs://, s3:// ... scheme)."""
  return "://" not in os.fspath(path)


@contextlib.contextmanager
def local_copy(path: epath.PathLike, max_bytes: int) -> Iterator[str]:
  """A local file with the bytes of `path`: `path` itself when local, else a temporary copy.

  The MIDI readers (symusic, note-seq) parse local files, so a gs:// (s3://, ...) file is
  copied through `etils.epath` first; one larger than `max_bytes` is refused (MidiReadError)
  before any byte is read. The copy is deleted on exit.
  """
  if is_local(path):
    yield os.fspath(path)
    return
  p = epath.Path(path)
  size = p.stat().st_size
  if size > max_bytes:
    raise MidiReadError(p, f"file is {size} bytes, above the {max_bytes}-byte limit (max_bytes)")
  with tempfile.TemporaryDirectory(prefix="midijax_src_") as tmp:
    copy = os.path.join(tmp, p.name)
    with open(copy, "wb") as f:
      f.write(p.read_bytes())
    yield copy


# --------------------------------------------------------------------------- jobs
@dataclasses.dataclass(frozen=True)
class FileJob:
  """One source file to tokenize.

  Attributes:
    key: unique, stable example key (windows append ':<index>').
    path: the file: an absolute local path or a gs:// (s3://, ...) URL.
    meta: the builder's metadata features for this file, plus optional hints the
      tokenizer reads: 'bpm' (quarter notes per minute) and 'time_signature'
      ('4-4'), used for bar windows and conditioning instead of the file's own.
  """
  key: str
  path: str
  meta: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a worker turns a file into examples (picklable; built from the config)."""
  encoding: Mapping[str, Any]
  conditioning: Tuple[str, ...]
  bos: bool
  eos: bool
  window_bars: int
  hop_bars: int
  sustain: bool
  drum_policy: str
  max_bytes: int
  max_seconds: float = notes_lib.MAX_SECONDS
  max_tokens: int = notes_lib.MAX_TOKENS
  prompt_bars: int = 0
  target_bars: int = 0

  @property
  def pairs(self) -> bool:
    """Whether examples are continuation pairs (prompt bars, then target bars)."""
    return self.prompt_bars > 0

  @property
  def windowed(self) -> bool:
    """Whether a file gives several examples (bar windows or pairs), keyed by window."""
    return bool(self.window_bars) or self.pairs

  @classmethod
  def from_config(cls, config: MidiBuilderConfig) -> "Recipe":
    if config.drum_policy not in ("only", "drop", "keep"):
      raise BuildError(f"drum_policy must be 'only', 'drop' or 'keep', got {config.drum_policy!r}")
    unknown = [k for k in config.conditioning if k not in encoding_lib.CONDITIONING]
    if unknown:
      raise BuildError(f"unknown conditioning kind(s) {unknown}; valid: "
                       f"{', '.join(encoding_lib.CONDITIONING)}")
    if config.window_bars < 0 or config.hop_bars < 1:
      raise BuildError("window_bars must be >= 0 and hop_bars >= 1")
    if not config.max_seconds > 0 or not config.max_tokens > 0:
      raise BuildError("max_seconds and max_tokens must be positive")
    if config.prompt_bars < 0 or (config.prompt_bars > 0) != (config.target_bars > 0):
      raise BuildError("continuation pairs need prompt_bars > 0 and target_bars > 0 "
                       f"(got {config.prompt_bars} and {config.target_bars})")
    if config.prompt_bars and config.encoding not in encoding_lib.TIME_SHIFT_ENCODINGS:
      raise BuildError(f"continuation pairs need an encoding with time shifts "
                       f"({', '.join(encoding_lib.TIME_SHIFT_ENCODINGS)}), not "
                       f"{config.encoding!r}")
    return cls(encoding={"name": config.encoding, **dict(config.encoding_options)},
               conditioning=tuple(config.conditioning), bos=bool(config.bos), eos=bool(config.eos),
               window_bars=int(config.window_bars), hop_bars=int(config.hop_bars),
               sustain=bool(config.sustain), drum_policy=config.drum_policy,
               max_bytes=int(config.max_bytes), max_seconds=float(config.max_seconds),
               max_tokens=int(config.max_tokens), prompt_bars=int(config.prompt_bars),
               target_bars=int(config.target_bars))

  def make_encoding(self) -> encoding_lib.Encoding:
    return encoding_lib.from_config(dict(self.encoding))


@dataclasses.dataclass
class FileResult:
  """A tokenized file: its examples, or why it gave none.

  `error` is set for a file that could not be read or encoded (counted as skipped);
  `too_short` marks a good file shorter than one window of the config (counted
  apart, e.g. GMD's 1-bar fills in a 2-bar config).
  """
  job: FileJob
  examples: List[Dict[str, Any]]
  error: Optional[str] = None
  too_short: bool = False


def _meter(notes: Notes, meta: Mapping[str, Any]) -> Tuple[int, int]:
  """(numerator, denominator) from the metadata ('4-4') or the file's first meter."""
  ts = meta.get("time_signature")
  if ts:
    num, den = str(ts).split("-")
    return int(num), int(den)
  return int(notes.time_signatures[0, 1]), int(notes.time_signatures[0, 2])


def _qpm(notes: Notes, meta: Mapping[str, Any]) -> float:
  """Quarter notes per minute from the metadata ('bpm') or the file's first tempo."""
  return float(meta["bpm"]) if meta.get("bpm") else notes.qpm


def condition_value(kind: str, notes: Notes, meta: Mapping[str, Any]) -> Optional[str]:
  """The conditioning value of `kind` for a file, or None when it has none.

  Values come from the metadata when the builder gives them (GMD style, beat type,
  dataset, family) and otherwise from the notes: tempo from the first tempo, meter
  from the first time signature, family from the instrument with the most notes.
  """
  values = encoding_lib.CONDITIONING[kind]
  if kind == "tempo":
    return encoding_lib.tempo_bin(_qpm(notes, meta))
  if kind == "meter":
    return encoding_lib.meter_value(*_meter(notes, meta))
  if kind == "family" and not meta.get("family"):
    return encoding_lib.family_of_notes(notes)
  value = meta.get(kind)
  return str(value) if value is not None and str(value) in values else None


def _window_notes(notes: Notes, t0: float, t1: float) -> Notes:
  """Notes starting in [t0, t1), shifted to start at 0 and cut at the window's end."""
  sel = notes.select((notes.start >= t0) & (notes.start < t1))
  return dataclasses.replace(sel, start=sel.start - t0, end=np.minimum(sel.end, t1) - t0)


def _windows_with_notes(notes: Notes, bar: float, total_bars: int, window_bars: int,
                        hop_bars: int) -> Iterator[Tuple[int, float, float, Notes]]:
  """(index, t0, t1, notes of the window) for each bar window that has notes, in order.

  The windows start every `hop_bars` bars from 0 to `total_bars - window_bars`; only those
  near a note are looked at, and each one's notes are a slice of the notes sorted by start,
  so the work grows with the notes, not with the bars (a file's tempo or meter may make
  billions of them). Each window's notes are those of `_window_notes`, in the same order.
  """
  order = np.argsort(notes.start, kind="stable")
  starts = notes.start[order]
  bars = np.unique(np.floor(starts / bar)).astype(np.int64)
  # Windows that may hold a note of bar b start in [b - window_bars + 1, b]; one more bar
  # each side covers rounding in start / bar.
  first = (bars - window_bars) // hop_bars * hop_bars
  span = window_bars // hop_bars + 3
  cand = np.unique((first[:, None] + hop_bars * np.arange(span)[None, :]).ravel())
  cand = cand[(cand >= 0) & (cand <= total_bars - window_bars)]
  lo = np.searchsorted(starts, cand * bar, side="left")
  hi = np.searchsorted(starts, (cand + window_bars) * bar, side="left")
  for i, a, b in zip(cand.tolist(), lo.tolist(), hi.tolist()):
    if b > a:
      t0, t1 = i * bar, (i + window_bars) * bar
      yield i, t0, t1, _window_notes(notes.select(np.sort(order[a:b])), t0, t1)


def tokenize_file(job: FileJob, recipe: Recipe, enc: encoding_lib.Encoding) -> FileResult:
  """Reads, filters, windows and encodes one file; never raises for a bad file.

  A file over the recipe's limits (max_bytes, max_seconds, max_tokens for all its windows
  together) is skipped with the limit named in its reason; the limits are checked before
  anything proportional to the music's length is made.
  """
  specials = 0  # BOS, conditioning and EOS tokens of each example
  try:
    with local_copy(job.path, recipe.max_bytes) as path:
      notes = midi_io.read_notes(path, sustain=recipe.sustain, max_bytes=recipe.max_bytes,
                                 max_seconds=recipe.max_seconds, max_notes=recipe.max_tokens)
    if recipe.drum_policy == "only":
      notes = notes.select(notes.is_drum)
      if len(notes) == 0:
        return FileResult(job, [], "no drum notes (drum_policy='only')")
    elif recipe.drum_policy == "drop":
      notes = notes.select(~notes.is_drum)
      if len(notes) == 0:
        return FileResult(job, [], "no pitched notes (drum_policy='drop')")
    conditions = {}
    for kind in recipe.conditioning:
      value = condition_value(kind, notes, job.meta)
      if value is not None:
        conditions[kind] = value
    window_bars = recipe.prompt_bars + recipe.target_bars if recipe.pairs else recipe.window_bars
    bar = 0.0
    if window_bars:
      num, den = _meter(notes, job.meta)
      bar = 60.0 / _qpm(notes, job.meta) * num * 4.0 / den  # seconds per bar
      # As TFDS's GMD builder: the last bar counts if at least half of it is played.
      total_bars = int(round(notes.total_time / bar))
      if total_bars < window_bars:
        return FileResult(job, [], f"shorter than {window_bars} bars "
                                   f"({notes.total_time:.2f} s, {bar:.2f} s a bar)",
                          too_short=True)
      # A silent window teaches nothing; skipped, not reported.
      windows = _windows_with_notes(notes, bar, total_bars, window_bars, recipe.hop_bars)
    else:
      windows = [(0, 0.0, None, notes)]
    examples, budget = [], recipe.max_tokens
    specials = int(recipe.bos) + len(conditions) + int(recipe.eos)
    for index, t0, t1, part in windows:
      pair = {}
      if recipe.pairs:
        prompt, target = encoding_lib.continuation_pair(
            enc, part, recipe.prompt_bars * bar, window_bars * bar,
            max_tokens=max(budget - specials, 0))
        if len(prompt) == 0 or len(target) == 0:
          continue  # no note in the prompt, or none in the target: not a pair
        events = np.concatenate([prompt, target]).astype(np.int32)
        pair = {"num_prompt_tokens": np.int32(len(prompt))}
      else:
        events = enc.encode(part, max_tokens=max(budget - specials, 0),
                            max_seconds=recipe.max_seconds)
      if len(events) == 0:
        continue
      tokens = enc.with_specials(events, conditions=conditions, bos=recipe.bos, eos=recipe.eos)
      budget -= len(tokens)
      if t1 is not None:
        duration = t1 - t0
      else:  # A duration in the metadata (e.g. GMD's info.csv) beats the last note-off.
        duration = float(job.meta.get("duration") or part.total_time)
      examples.append({
          "tokens": tokens.astype(np.int32),
          "num_condition_tokens": np.int32(len(conditions)),
          "window_index": np.int32(index),
          "start_seconds": np.float32(t0),
          "duration": np.float32(duration),
          "num_notes": np.int32(len(part)),
          "has_drums": bool(part.is_drum.any()),
          **pair,
      })
    if not examples:
      return FileResult(job, [], f"no notes the {enc.name} encoding keeps")
    return FileResult(job, examples)
  except MidiReadError as e:
    return FileResult(job, [], e.reason)
  except TokenLimitError as e:
    made = (f"its windows make over {recipe.max_tokens}" if recipe.window_bars
            else f"{e.count + specials}")  # e.count: one window's events
    return FileResult(job, [], f"more tokens than the max_tokens limit ({made} {enc.name} "
                               f"tokens; limit {recipe.max_tokens})")
  except MidijaxError as e:
    return FileResult(job, [], str(e))
  except Exception as e:  # pylint: disable=broad-except
    # A bad file must never abort a build; the reason goes to the report.
    return FileResult(job, [], f"{type(e).__name__}: {e}")


def result_counts(result: FileResult) -> Dict[str, int]:
  """What one tokenized file adds to its split's counts, in the build report and as Beam
  counters: files, then ok/examples/tokens, skipped or too_short (zero counts left out)."""
  if result.too_short:
    return {"files": 1, "too_short": 1}
  if result.error is not None:
    return {"files": 1, "skipped": 1}
  return {"files": 1, "ok": 1, "examples": len(result.examples),
          "tokens": int(sum(len(e["tokens"]) for e in result.examples))}


def report_entries(split: str, result: FileResult) -> List[Tuple[str, Any]]:
  """(report list, JSON value) pairs that a file without examples adds to the build report.

  A skipped file goes to "skipped_files" as {file, split, reason}; a file shorter than one
  window to "too_short_files" as its path. Under Beam the same pairs travel through the
  pipeline (`_beam_tokenize`), so every reason the tokenizer writes reaches the report
  either way.
  """
  if result.too_short:
    return [("too_short_files", result.job.path)]
  if result.error is not None:
    return [("skipped_files", {"file": result.job.path, "split": split, "reason": result.error})]
  return []


def keyed_example(job: FileJob, example: Dict[str, Any], windowed: bool,
                  meta_keys: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
  """(TFDS key, features) of one example: the file's key (+ ':<window>') and metadata."""
  key = f"{job.key}:{int(example['window_index']):04d}" if windowed else job.key
  return key, {**{k: job.meta[k] for k in meta_keys}, **example}


# Encodings built by Beam workers, by encoding config (JSON).
_BEAM_ENCODINGS: Dict[str, encoding_lib.Encoding] = {}


def _beam_tokenize(job: FileJob, recipe: Recipe, windowed: bool, meta_keys: Sequence[str],
                   split: str):
  """Beam FlatMap body: one file -> its (key, example) pairs.

  Its counts (`result_counts`) go to the counters "<split>/<count>" (namespace
  BEAM_NAMESPACE), and the report entries of a file without examples (`report_entries`)
  to the side output _ENTRIES_TAG; the builder reads both back into build_report.json.
  """
  beam = tfds.core.lazy_imports.apache_beam
  name = json.dumps(dict(recipe.encoding), sort_keys=True)
  if name not in _BEAM_ENCODINGS:
    _BEAM_ENCODINGS[name] = recipe.make_encoding()
  result = tokenize_file(job, recipe, _BEAM_ENCODINGS[name])
  for count, value in result_counts(result).items():
    beam.metrics.Metrics.counter(BEAM_NAMESPACE, f"{split}/{count}").inc(value)
  for entry in report_entries(split, result):
    yield beam.pvalue.TaggedOutput(_ENTRIES_TAG, entry)
  if result.error is not None and not result.too_short:
    logging.warning("midijax: skipped %s: %s", job.path, result.error)
  for ex in result.examples:
    yield keyed_example(job, ex, windowed, meta_keys)


def _write_report_entries(entries: List[Tuple[str, Any]], path: str) -> None:
  """Beam Map body: writes a split's gathered report entries (JSON) for the builder."""
  epath.Path(path).write_text(json.dumps(entries))


def read_beam_counts(pipeline_result) -> Dict[str, Dict[str, int]]:
  """The counts per split that `_beam_tokenize` recorded in the pipeline's counters.

  Args:
    pipeline_result: the finished pipeline's `apache_beam.runners.runner.PipelineResult`.

  Returns:
    {split: {count: value}}: committed values where the runner gives them (retried
    bundles counted once), else attempted ones.
  """
  beam = tfds.core.lazy_imports.apache_beam
  found = pipeline_result.metrics().query(
      beam.metrics.MetricsFilter().with_namespace(BEAM_NAMESPACE))

  def value(result):
    return result.committed if result.committed is not None else result.attempted

  counts: Dict[str, collections.Counter] = {}
  for result in found["counters"]:
    split, count = result.key.metric.name.rsplit("/", 1)
    counts.setdefault(split, collections.Counter())[count] += int(value(result))
  return {split: dict(c) for split, c in counts.items()}


# The worker's recipe and encoding, set once per process by `_init_worker`.
_WORKER: Dict[str, Any] = {}


def _init_worker(recipe: Recipe) -> None:
  _WORKER["recipe"] = recipe
  _WORKER["encoding"] = recipe.make_encoding()


def _work(job: FileJob) -> FileResult:
  return tokenize_file(job, _WORKER["recipe"], _WORKER["encoding"])


def default_num_workers() -> int:
  """Tokenizing processes: $MIDIJAX_BUILD_WORKERS, else every core this process may use."""
  if os.environ.get(WORKERS_ENV):
    return max(1, int(os.environ[WORKERS_ENV]))
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # Not on Linux.
    return max(1, os.cpu_count() or 1)


def tokenize_all(jobs: Sequence[FileJob], recipe: Recipe, num_workers: Optional[int] = None,
                 desc: str = "Tokenizing") -> Iterator[FileResult]:
  """Tokenizes `jobs` on `num_workers` processes; yields results in the jobs' order.

  `Pool.imap` returns results in submission order whatever the worker count, which is
  what makes the shards byte-identical between runs. One worker (or a daemonic
  process, which may not have children, e.g. under `tfds build --num-processes`)
  tokenizes in this process.
  """
  num_workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
  num_workers = min(num_workers, max(1, len(jobs)))
  bar = tqdm.tqdm(total=len(jobs), desc=desc, unit=" files", mininterval=0.5, disable=None,
                  leave=False)
  try:
    if num_workers == 1 or multiprocessing.current_process().daemon:
      enc = recipe.make_encoding()
      for job in jobs:
        yield tokenize_file(job, recipe, enc)
        bar.update(1)
      return
    # fork shares the imported modules (no re-import of TF per worker); the workers
    # touch only numpy and symusic, never TensorFlow's threads.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    chunksize = max(1, min(16, len(jobs) // (num_workers * 8)))
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(recipe,)) as pool:
      for result in pool.imap(_work, jobs, chunksize=chunksize):
        yield result
        bar.update(1)
  finally:
    bar.close()


# --------------------------------------------------------------------------- report
class BuildReport:
  """Counts, timings and skipped files of one build; written as JSON next to the shards.

  `runner` is "local" (the process pool, `num_workers` processes) or the Beam runner's
  name (then `num_workers` is None: the runner decides).
  """
  LISTS = ("skipped_files", "too_short_files")

  def __init__(self, dataset: str, config: str, version: str, num_workers: Optional[int],
               runner: str = "local"):
    self.dataset, self.config, self.version = dataset, config, version
    self.num_workers = num_workers
    self.runner = runner
    self.splits: Dict[str, Dict[str, Any]] = {}
    self.lists: Dict[str, List[Any]] = {name: [] for name in self.LISTS}
    self.note = ""
    self.start = time.perf_counter()

  @property
  def skipped(self) -> List[Dict[str, str]]:
    return self.lists["skipped_files"]

  @property
  def too_short(self) -> List[str]:
    return self.lists["too_short_files"]

  def add(self, split: str, result: FileResult) -> None:
    self.add_counts(split, result_counts(result))
    for name, entry in report_entries(split, result):
      self.lists.setdefault(name, []).append(entry)

  def add_counts(self, split: str, counts: Mapping[str, int]) -> None:
    s = self.splits.setdefault(split, collections.Counter())
    s.update({k: v for k, v in counts.items() if v})

  def set_seconds(self, split: str, seconds: float) -> None:
    self.splits.setdefault(split, collections.Counter())["seconds"] = round(seconds, 3)

  def totals(self) -> Dict[str, Any]:
    tot = collections.Counter()
    for s in self.splits.values():
      tot.update({k: v for k, v in s.items() if k != "seconds"})
    seconds = time.perf_counter() - self.start
    return {"files": tot["files"], "ok": tot["ok"], "skipped": tot["skipped"],
            "too_short": tot["too_short"],
            "examples": tot["examples"], "tokens": tot["tokens"], "seconds": round(seconds, 3),
            "files_per_second": round(tot["files"] / max(seconds, 1e-9), 1)}

  def to_json(self) -> Dict[str, Any]:
    return {"dataset": self.dataset, "config": self.config, "version": self.version,
            "runner": self.runner, "num_workers": self.num_workers, **self.totals(),
            "note": self.note, "splits": {k: dict(v) for k, v in self.splits.items()},
            **self.lists}

  def write(self, path: epath.PathLike) -> epath.Path:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(self.to_json(), indent=1) + "\n")
    return p

  def summary(self) -> str:
    t = self.totals()
    # Wall time includes TFDS's one-off TensorFlow import and shard writing; the split
    # times cover tokenizing plus example serialization.
    split_seconds = sum(v.get("seconds", 0.0) for v in self.splits.values())
    if self.runner == "local":
      how = (f"{t['files'] / max(split_seconds, 1e-9):.0f} files/s in the split generators, "
             f"{self.num_workers} workers")
    else:
      how = f"on Apache Beam, {self.runner}"
    line = (f"{self.dataset}/{self.config}: {t['files']} files in {t['seconds']:.1f} s "
            f"({t['files_per_second']:.0f} files/s overall, {how}): {t['ok']} ok, "
            f"{t['skipped']} skipped, {t['too_short']} too short for a window; "
            f"{t['examples']} examples, {t['tokens']} tokens; "
            + ", ".join(f"{k} {v.get('examples', 0)}" for k, v in self.splits.items()))
    if self.skipped:
      reasons = collections.Counter(s["reason"].split(" (")[0] for s in self.skipped)
      line += "; skipped: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common(5))
    return line


# --------------------------------------------------------------------------- shard count
@dataclasses.dataclass(frozen=True)
class _CappedShardConfig(shard_utils.ShardConfig):
  """A fixed shard count, lowered to the example count for small splits.

  TFDS's own fixed count fails on a split with fewer examples than shards.
  """

  def get_number_shards(self, total_size: int, num_examples: int,
                        uses_precise_sharding: bool = True) -> int:
    if self.num_shards:
      return max(1, min(int(self.num_shards), int(num_examples)))
    return super().get_number_shards(total_size, num_examples, uses_precise_sharding)


@dataclasses.dataclass(eq=False)
class _CappedDownloadConfig(tfds.download.DownloadConfig):

  def get_shard_config(self) -> shard_utils.ShardConfig:
    return _CappedShardConfig(num_shards=self.num_shards, min_shard_size=self.min_shard_size,
                              max_shard_size=self.max_shard_size)


# --------------------------------------------------------------------------- builder
COMMON_FEATURES = {
    # [BOS] + conditioning tokens + event tokens + [EOS] (int32 ids; vocab.json).
    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    # Conditioning tokens right after BOS.
    "num_condition_tokens": np.int32,
    # Bar window index (0 for full performances).
    "window_index": np.int32,
    # Window start in the source file (seconds; 0 for full performances).
    "start_seconds": np.float32,
    # Length of the piece or window (seconds).
    "duration": np.float32,
    # Notes encoded (after drum filtering and windowing).
    "num_notes": np.int32,
    # Whether the token stream contains drum notes (never transposed).
    "has_drums": np.bool_,
}
# Features of continuation-pair configs (prompt_bars > 0) only.
PAIR_FEATURES = {
    # Event tokens of the prompt, right after BOS + conditioning; the target follows.
    "num_prompt_tokens": np.int32,
}


class MidiDatasetBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the midijax builders: subclasses define `_split_generators` and metadata.

  Subclasses set BUILDER_CONFIGS (`MidiBuilderConfig`s), VERSION, METADATA_FEATURES
  (feature name -> TFDS feature of the per-file metadata their `FileJob.meta`
  carries), DESCRIPTION, HOMEPAGE, CITATION and DATASET_VALUE (the `dataset`
  conditioning value). `_split_generators` returns
  ``{split: self._generate_examples(jobs=[FileJob, ...], split=split)}``.
  """
  METADATA_FEATURES: Dict[str, Any] = {}
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  DATASET_VALUE: Optional[str] = None
  # Conditioning kinds whose values this builder's metadata or notes provide.
  CONDITIONING_KINDS: Tuple[str, ...] = ("tempo", "meter", "family", "dataset")

  # Tokenizing processes for this instance; None: `default_num_workers()`.
  num_workers: Optional[int] = None

  @property
  def encoding(self) -> encoding_lib.Encoding:
    if not hasattr(self, "_encoding"):
      self._encoding = self.recipe.make_encoding()
    return self._encoding

  @property
  def recipe(self) -> Recipe:
    return Recipe.from_config(self.builder_config)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    bad = [k for k in config.conditioning if k not in self.CONDITIONING_KINDS]
    if bad:
      raise BuildError(f"{self.name}: conditioning kind(s) {bad} are not available; this "
                       f"builder provides {', '.join(self.CONDITIONING_KINDS)}")
    enc = self.encoding
    metadata = tfds.core.MetadataDict(
        encoding=enc.config, vocab_file=VOCAB_FILE, vocab_size=enc.vocab_size,
        pad_id=enc.pad_id, eos_id=enc.eos_id, bos_id=enc.bos_id if config.bos else None,
        conditioning=list(config.conditioning),
        # Every id sampling may ask for by name, e.g. condition_ids["style"]["funk"].
        condition_ids={k: {v: enc.condition_id(k, v) for v in encoding_lib.CONDITIONING[k]}
                       for k in config.conditioning},
        window_bars=config.window_bars, hop_bars=config.hop_bars, sustain=config.sustain,
        drum_policy=config.drum_policy, dataset=self.DATASET_VALUE,
        **({"prompt_bars": config.prompt_bars, "target_bars": config.target_bars}
           if config.prompt_bars else {}))
    pairs = PAIR_FEATURES if config.prompt_bars else {}
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({**COMMON_FEATURES, **pairs,
                                             **self.METADATA_FEATURES}),
        homepage=self.HOMEPAGE, citation=self.CITATION, metadata=metadata,
        disable_shuffling=False)

  def _manual_root(self, dl_manager) -> Optional[epath.Path]:
    """The --manual_dir folder (local or gs:// ...), or None when none was given (or empty)."""
    try:
      return epath.Path(dl_manager.manual_dir)
    except AssertionError:
      return None

  def _job_meta(self, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """`meta` with the `dataset` conditioning value added for the tokenizer."""
    meta = dict(meta)
    if self.DATASET_VALUE:
      meta.setdefault("dataset", self.DATASET_VALUE)
    return meta

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    num_shards = download_config.num_shards or self.builder_config.num_shards
    fields = {f.name: getattr(download_config, f.name)
              for f in dataclasses.fields(tfds.download.DownloadConfig)}
    fields["num_shards"] = num_shards
    capped = _CappedDownloadConfig(**fields)
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    if self._use_beam:
      self._report = BuildReport(self.name, self.builder_config.name, str(self.version), None,
                                 runner=beam_runner_name(download_config))
    else:
      self._report = BuildReport(self.name, self.builder_config.name, str(self.version),
                                 self.num_workers or default_num_workers())
    try:
      super()._download_and_prepare(dl_manager, capped)
    except Exception as e:  # pylint: disable=broad-except
      # TFDS's Beam writer stops the pipeline on a split without examples, before its
      # metrics can be read back: say so as the local build does (NoUsableFilesError).
      empty = re.search(r"generated examples is 0 for split (\S+?)\.", str(e))
      if not (self._use_beam and empty):
        raise
      split = empty.group(1)
      raise NoUsableFilesError(
          f"{self.name}/{self.builder_config.name}: all {len(self._all_jobs.get(split, ()))} "
          f"files of split '{split}' failed to read or encode, so the split cannot be "
          "written; the Beam workers' logs name each skipped file and its reason") from e
    self.encoding.save_vocab(epath.Path(self.data_dir) / VOCAB_FILE)
    self._report.write(epath.Path(self.data_dir) / REPORT_FILE)
    # self.data_dir is TFDS's temporary folder until the build succeeds; name the final one.
    final = epath.Path(self.data_dir_root) / self.name / self.builder_config.name / str(
        self.version) / REPORT_FILE
    logging.info("%s (report: %s)", self._report.summary(), final)
    print(f"{self._report.summary()}\nReport: {final}", file=sys.stderr)

  def _generate_examples(self, jobs: Sequence[FileJob], split: str
                         ) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Tokenizes the split's files in parallel; yields (key, example) in file order."""
    jobs = list(jobs)
    start = time.perf_counter()
    kept = 0
    desc = f"Tokenizing {self.name}/{self.builder_config.name} {split}"
    windowed = self.recipe.windowed
    for result in tokenize_all(jobs, self.recipe, self.num_workers, desc=desc):
      self._report.add(split, result)
      for ex in result.examples:
        kept += 1
        yield keyed_example(result.job, ex, windowed, tuple(self.METADATA_FEATURES))
    seconds = time.perf_counter() - start
    self._report.set_seconds(split, seconds)
    logging.info("%s: %d files in %.2f s (%.0f files/s)", desc, len(jobs), seconds,
                 len(jobs) / max(seconds, 1e-9))
    if kept == 0 and jobs:
      self._fail_empty_split(split, jobs)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """TFDS's hook after the Beam pipeline ran: fills the build report.

    The counts per split come from the pipeline's counters; the skipped files with
    their reasons and the too-short files from the entries each split's pipeline
    branch gathered (`_beam_examples`), put in the order of the local build (split,
    then file), so both builds write the same report. (A split without examples never
    gets here: TFDS's Beam writer stops the pipeline first, see `_download_and_prepare`.)
    """
    counts = read_beam_counts(pipeline_result)
    for split, jobs in self._all_jobs.items():
      self._report.add_counts(split, counts.get(split, {}))
      path = epath.Path(self.data_dir) / BEAM_ENTRIES_FILE.format(split=split)
      entries = json.loads(path.read_text())
      path.unlink()
      index = {job.path: i for i, job in enumerate(jobs)}

      def place(pair, index=index):
        entry = pair[1]
        return index.get(entry["file"] if isinstance(entry, dict) else entry, len(index))

      for name, entry in sorted(entries, key=place):
        self._report.lists.setdefault(name, []).append(entry)

  def _fail_empty_split(self, split: str, jobs: Sequence[FileJob]) -> None:
    """Raises a clear error for a split with files but no examples (TFDS can't write it).

    The files of the splits not yet generated are checked too, so the error says
    whether every file of the dataset failed, and the report lists them all.
    """
    done = set(self._report.splits)
    for other, other_jobs in getattr(self, "_all_jobs", {}).items():
      if other not in done:
        for result in tokenize_all(other_jobs, self.recipe, self.num_workers,
                                   desc=f"Checking {other}"):
          self._report.add(other, result)
    self._raise_no_usable_files(split, jobs)

  def _raise_no_usable_files(self, split: str, jobs: Sequence[FileJob]) -> None:
    """Writes the report as <version>.failed_build_report.json and raises NoUsableFilesError."""
    totals = self._report.totals()
    path = epath.Path(self.data_dir_root) / self.name / self.builder_config.name / (
        f"{self.version}.failed_{REPORT_FILE}")
    self._report.write(path)
    first = "; ".join(f"{epath.Path(s['file']).name}: {s['reason']}"
                      for s in self._report.skipped[:5]) or "all shorter than one window"
    if totals["ok"] == 0:
      raise NoUsableFilesError(
          f"{self.name}/{self.builder_config.name}: every file failed to read or encode "
          f"({totals['files']} of {totals['files']}); nothing was written. First reasons: {first}. "
          f"Full list: {path}")
    raise NoUsableFilesError(
        f"{self.name}/{self.builder_config.name}: all {len(jobs)} files of split '{split}' "
        f"failed to read or encode, so the split cannot be written ({totals['ok']} of "
        f"{totals['files']} files in the dataset are usable). First reasons: {first}. "
        f"Full list: {path}")

  def _split_dict(self, jobs_by_split: Mapping[str, Sequence[FileJob]]):
    """`{split: generator}` in SPLITS order, splits without files left out.

    Under Apache Beam (a beam runner or beam options in the DownloadConfig) each split
    is a Beam PTransform instead, which TFDS runs on the pipeline.
    """
    ordered = {s: list(jobs_by_split[s]) for s in SPLITS if jobs_by_split.get(s)}
    ordered.update({s: list(j) for s, j in sorted(jobs_by_split.items())
                    if s not in ordered and j})
    if not ordered:
      raise NoUsableFilesError(f"{self.name}: no MIDI files found in the source")
    self._all_jobs = ordered
    if getattr(self, "_use_beam", False):
      return {s: self._beam_examples(j, s) for s, j in ordered.items()}
    return {s: self._generate_examples(jobs=j, split=s) for s, j in ordered.items()}

  def _beam_examples(self, jobs: Sequence[FileJob], split: str):
    """The split as a Beam PTransform: files -> (key, example), tokenized on the workers.

    Counts go to the pipeline's counters (namespace BEAM_NAMESPACE) and the skipped and
    too-short files to BEAM_ENTRIES_FILE; `_process_pipeline_result` reads both back.
    TFDS sorts examples by key, so the examples are those of the local build.
    """
    beam = tfds.core.lazy_imports.apache_beam
    jobs = list(jobs)
    entries_path = os.fspath(epath.Path(self.data_dir) / BEAM_ENTRIES_FILE.format(split=split))
    tokenize = beam.FlatMap(_beam_tokenize, recipe=self.recipe,
                            windowed=self.recipe.windowed,
                            meta_keys=tuple(self.METADATA_FEATURES), split=split)

    def expand(pbegin):
      out = (pbegin | f"List {split}" >> beam.Create(jobs)
             | f"Tokenize {split}" >> tokenize.with_outputs(_ENTRIES_TAG, main="examples"))
      # Skipped-file entries are gathered by the pipeline itself: Beam's metrics cannot
      # carry them (the DirectRunner keeps one bundle's string-set values per step, and
      # string sets hold at most 1 MB).
      _ = (out[_ENTRIES_TAG] | f"Gather {split} report entries" >> beam.combiners.ToList()
           | f"Write {split} report entries" >> beam.Map(_write_report_entries,
                                                          path=entries_path))
      return out.examples

    return beam.ptransform_fn(expand)()


def beam_runner_name(download_config) -> str:
  """The Beam runner of a DownloadConfig, e.g. "DirectRunner (multi_processing)"."""
  if download_config.beam_runner is not None:
    runner = download_config.beam_runner
    return runner if isinstance(runner, str) else type(runner).__name__
  options = download_config.beam_options.get_all_options(drop_default=True)
  runner = options.get("runner") or "DirectRunner"
  runner = runner if isinstance(runner, str) else type(runner).__name__
  if runner.split(".")[-1] in ("DirectRunner", "direct") and options.get("direct_running_mode"):
    runner += f" ({options['direct_running_mode']})"
  return runner


# --------------------------------------------------------------------------- reading back
def read_json(version_dir: epath.PathLike, name: str) -> Dict[str, Any]:
  p = epath.Path(version_dir) / name
  return json.loads(p.read_text()) if p.exists() else {}


# --------------------------------------------------------------------------- tfds build
def tfds_build_cli(argv: Optional[Sequence[str]] = None) -> None:
  """TFDS's own `tfds build` command, without the `tfds` entry point's other commands.

  With the `beam` extra installed, the `tfds` script itself works (`tfds build
  data_pipelines/groove ...`). Without it, tensorflow-datasets 4.9.10's `tfds` script dies
  with "No module named 'apache_beam'" (its convert_format command subclasses
  `apache_beam.DoFn` at import time), although TFDS's `build` command needs no Beam; this
  runs that command alone, with midijax's quiet process set-up
  (`midijax.process_env.configure`):

      python -c "from data_pipelines.common import tfds_build_cli; tfds_build_cli()" \\
          data_pipelines/groove --config drums --manual_dir ../shared/data/groove

  Args:
    argv: the command line (argv[0] is ignored); default sys.argv.
  """
  # pylint: disable=g-import-not-at-top
  from midijax import process_env
  process_env.configure()
  from absl import app
  from tensorflow_datasets.scripts.cli import build as tfds_build
  from tensorflow_datasets.scripts.cli import cli_utils
  # pylint: enable=g-import-not-at-top
  parser = cli_utils.make_flags_parser(tfds_build.Args, "tfds build (TFDS's build command)")
  app.run(lambda args: args.execute(), flags_parser=parser,
          argv=list(argv) if argv is not None else None)
