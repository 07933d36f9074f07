"""Token datasets built by data_pipelines/ -> numpy batches for training and evaluation.

Flax lm1b / MaxText style: each process reads its own share of the TFDS split
(`tfds.split_for_jax_process`) and yields per-process batches of
``batch_size // process_count`` rows; the trainer assembles the global batch with
`jax.make_array_from_process_local_data` (`midijax.sharding.host_local_to_global`).

Training batches are a pure function of (seed, process, step): step s makes
R = rows_per_process * draws_per_row draws numbered s * R + j, and every random choice
is a stateless op keyed on (seed, process, step) or on the draw number, so

* the same seed gives the same batches on any machine and thread count, and
* a run resumed at step k calls ``make_train_iterator(config, start_step=k)`` and sees
  exactly the batches an uninterrupted run would have seen from step k on; there is
  no iterator state to checkpoint.

Each draw picks a dataset (mixture weights, stateless categorical), then an example
through a per-(dataset, epoch) permutation of the draw numbers (TF's stateless
`index_shuffle`: with one dataset and no packing every example is used once per epoch
of N rows, in a new order each epoch) or, with ``piece_sampling="tokens"``, with
probability proportional to its scored tokens ("windows": at least a row's worth, so
pieces shorter than a row weigh one row), then a random crop of ``seq_len + 1`` tokens
that keeps the conditioning prefix (BOS + condition tokens) at the front: a uniform crop
start, or with "chunks" (drawn as "tokens") the row placed around the drawn token, so
that a long piece's last tokens are in rows at least half as often as its middle ones.
Short pieces are padded (weights 0), or with ``packing`` the row is filled with up to
`max_segments_per_row` pieces, each with its own prefix, marked by `segment_ids` (1, 2,
...; 0 = padding) and `positions` restarting at 0.

Augmentation (training only) happens on the fly on token ids, inside tf.data:
transposition shifts NOTE_ON/NOTE_OFF ids of `performance` pieces by k in
[-transpose_semitones, transpose_semitones] semitones, dropping notes pushed out of
the encoding's pitch range, never for pieces with drums (`has_drums`); time stretch
rescales the time-shift runs of `performance` and `drums` pieces by a factor in
[1 - time_stretch, 1 + time_stretch] (rounded to the 10 ms grid, no drift), which is a
tempo change: every hit moves with its beat, so microtiming relative to the beat is kept
(drums counted in beats, time_unit="beats", are tempo-invariant and refuse it);
velocity scaling makes `performance` and `drums` pieces louder or softer by a factor in
[1 - velocity_scale, 1 + velocity_scale] (a louder or softer take of the same playing;
accents keep their order): `velocity_curve="linear"` multiplies the velocity bins,
clipping at the top, "power" bends them with the top and bottom bins fixed. `triples`
pieces are never augmented. All are stateless functions of (seed, process, step).

Evaluation cuts every piece of the split into consecutive non-overlapping windows:
window c holds the prefix followed by body tokens [c*W, (c+1)*W), W = seq_len + 1 -
prefix length, so every event token and EOS is a weighted target exactly once and
eval NLL is comparable between runs and models with the same seq_len. With
`data.eval_context` = C > 0 the windows after a piece's first overlap instead: each
feeds the C body tokens before its targets as unscored context (the usual strided
evaluation of a language model), so every target except those of the first window is
predicted from at least C tokens of its piece; still every target is scored once.

Continuation pairs (datasets built with `prompt_bars`, e.g. groove/drums_continuation)
keep the whole prompt after the prefix, as given, never cropped, and never a loss
target: weights are 1 only on the target that follows it, so training optimises exactly
the continuation. The target is cut at the row's end (no random crop), packing packs
whole pairs, and the order stays a function of (seed, step). A prompt that leaves no
room for a target in a row is a ConfigError; pairs are not augmented. Evaluation gives
each pair one window (prefix + prompt + as much of the target as fits).

Batches are dicts of numpy arrays, [rows, seq_len]: inputs, targets (int32), weights
(float32: 1 for real targets, 0 for padding, conditioning tokens and packed-segment
boundaries) and, when packing, segment_ids and positions (int32).

Training rows come from an in-memory copy of each dataset's per-process share (flat
int32 ids), which random access needs; a process holds its 1/process_count of each
training split (MAESTRO v3 is ~100 MB of ids).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from midijax import encoding as encoding_lib
from midijax.errors import ConfigError

# Default builder config per dataset (as in data_pipelines/).
DEFAULT_BUILDER_CONFIGS = {"groove": "drums", "piano": "performance",
                           "midi_folder": "performance"}
# Body tokens read beyond the row before augmenting, so that transposition drops and
# time-stretch merges still leave a full row: W // 8 + 64 extra tokens.
_AUGMENT_SLACK_FRACTION = 8
_AUGMENT_SLACK_TOKENS = 64


# --------------------------------------------------------------------------- config
def _field(cfg: Any, name: str, default: Any) -> Any:
  """cfg.name if the ConfigDict (or dict) has it, else `default`."""
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  return getattr(cfg, name, default) if name in cfg else default


def _data_config(config: Any) -> Tuple[Any, int]:
  """(config.data or config itself, seed): the data fields and the data seed."""
  data = config.data if _field(config, "data", None) is not None else config
  seed = _field(data, "seed", None)
  if seed is None:
    seed = _field(config, "seed", 0)
  return data, int(seed)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of a (possibly one-element) mixture."""
  name: str
  builder_config: str
  weight: float
  version_dir: epath.Path


def find_dataset_dir(name: str, builder_config: Optional[str] = None,
                     data_dir: Optional[str] = None, version: Optional[str] = None
                     ) -> epath.Path:
  """The version directory of a built dataset: <data_dir>/<name>/<config>/<version>.

  Args:
    name: builder name (groove | piano | midi_folder).
    builder_config: config name; empty/None = the builder's default.
    data_dir: TFDS data dir; empty/None = $TFDS_DATA_DIR or ~/tensorflow_datasets.
    version: e.g. "1.0.0"; None = the newest built version.

  Raises:
    ConfigError: no such dataset has been built (the message says how to build it).
  """
  builder_config = builder_config or DEFAULT_BUILDER_CONFIGS.get(name, "")
  # epath: local folders and gs:// buckets alike (each TPU host reads its shards from GCS).
  root = epath.Path(data_dir or os.environ.get("TFDS_DATA_DIR") or
                    os.path.expanduser("~/tensorflow_datasets")).expanduser()
  config_dir = root / name / builder_config
  built = sorted((p for p in config_dir.glob("*") if (p / "dataset_info.json").is_file()),
                 key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
  if version is not None:
    built = [p for p in built if p.name == version]
  if not built:
    what = f"{name}/{builder_config}{':' + version if version else ''}"
    if name not in DEFAULT_BUILDER_CONFIGS:
      # Only builders that exist get a build command in the hint.
      raise ConfigError(f"data: no built dataset {what} under {root}, and {name!r} is not a "
                        f"midijax dataset (build-data knows {', '.join(DEFAULT_BUILDER_CONFIGS)})")
    others = sorted(p.name for p in (root / name).glob("*") if p.is_dir()) if (
        root / name).is_dir() else []
    also = f" (built configs of {name} there: {', '.join(others)})" if others else ""
    raise ConfigError(
        f"data: no built dataset {what} under {root}{also}; build it with `midijax build-data "
        f"{name} --config {builder_config} --data_dir {root} --manual_dir DIR`")
  return built[-1]


def dataset_specs(config: Any) -> List[DatasetSpec]:
  """The datasets `config.data` names: `mixture` entries, or `name`/`builder_config`.

  Mixture entries are "name/config:weight" strings ("name" alone: default config,
  weight 1) or dicts with those keys; weights are normalised.
  """
  data, _ = _data_config(config)
  data_dir = _field(data, "data_dir", "") or None
  entries = list(_field(data, "mixture", ()) or ())
  specs = []
  if not entries:
    name = _field(data, "name", "groove")
    entries = [{"name": name, "builder_config": _field(data, "builder_config", ""),
                "weight": 1.0}]
  for entry in entries:
    if isinstance(entry, str):
      head, _, weight = entry.partition(":")
      name, _, builder_config = head.partition("/")
      entry = {"name": name, "builder_config": builder_config, "weight": weight or 1.0}
    entry = dict(entry)
    try:
      weight = float(entry.get("weight", 1.0))
    except ValueError:
      raise ConfigError(f"data.mixture: bad weight in {entry}") from None
    if weight <= 0:
      raise ConfigError(f"data.mixture: weights must be > 0, got {entry}")
    version_dir = find_dataset_dir(entry["name"], entry.get("builder_config") or None,
                                   entry.get("data_dir") or data_dir)
    specs.append(DatasetSpec(entry["name"], version_dir.parent.name, weight, version_dir))
  return specs


def load_encoding(config_or_dir: Any) -> encoding_lib.Encoding:
  """The encoding (vocabulary) of the configured dataset(s), from vocab.json.

  Accepts a config (all mixture datasets must share one vocabulary) or a dataset's
  version directory.
  """
  if isinstance(config_or_dir, (str, os.PathLike)):
    return encoding_lib.load_vocab(epath.Path(config_or_dir) / "vocab.json")
  specs = dataset_specs(config_or_dir)
  encs = [encoding_lib.load_vocab(s.version_dir / "vocab.json") for s in specs]
  for spec, enc in zip(specs[1:], encs[1:]):
    if enc.vocab.names != encs[0].vocab.names:
      raise ConfigError(
          f"data.mixture: {spec.name}/{spec.builder_config} uses encoding {enc.config} but "
          f"{specs[0].name}/{specs[0].builder_config} uses {encs[0].config}; a mixture needs "
          "one vocabulary (e.g. groove/performance with piano/performance)")
  return encs[0]


def dataset_metadata(version_dir: os.PathLike) -> Dict[str, Any]:
  """metadata.json of a built dataset: encoding, conditioning kinds and their ids."""
  p = epath.Path(version_dir) / "metadata.json"
  return json.loads(p.read_text()) if p.is_file() else {}


def conditioning_kinds(config: Any) -> Optional[List[str]]:
  """The conditioning kinds the prefixes of the configured data carry (any dataset of a
  mixture), in the vocabulary's order (e.g. style, tempo, type, meter for groove/drums_beats);
  None when a dataset's metadata.json does not say.

  Raises:
    ConfigError: a dataset is not built.
  """
  kinds = set()
  for spec in dataset_specs(config):
    recorded = dataset_metadata(spec.version_dir).get("conditioning")
    if not isinstance(recorded, list):
      return None
    kinds.update(recorded)
  return [k for k in encoding_lib.CONDITIONING if k in kinds]


# --------------------------------------------------------------------------- token store
@dataclasses.dataclass
class TokenStore:
  """The pieces of one split (or one process's share), as flat numpy arrays.

  Attributes:
    values: int32[total] all token ids, piece after piece.
    starts: int64[N] offset of each piece in `values`.
    lengths: int64[N] tokens per piece.
    prefix_lengths: int64[N] BOS + conditioning tokens at the front of each piece.
    transposable: bool[N] pitched `performance` pieces (no drums).
    stretchable: bool[N] pieces whose time shifts may be rescaled.
    head_lengths: int64[N] tokens at the front that are given, never cropped or scored:
      the prefix, plus the prompt of a continuation pair (default: prefix_lengths).
  """
  values: np.ndarray
  starts: np.ndarray
  lengths: np.ndarray
  prefix_lengths: np.ndarray
  transposable: np.ndarray
  stretchable: np.ndarray
  head_lengths: Optional[np.ndarray] = None

  def __post_init__(self):
    if self.head_lengths is None:
      self.head_lengths = np.asarray(self.prefix_lengths, np.int64).copy()

  def __len__(self) -> int:
    return int(self.starts.shape[0])

  @property
  def is_pair(self) -> np.ndarray:
    """bool[N]: continuation pairs (a prompt after the prefix)."""
    return self.head_lengths > self.prefix_lengths

  @property
  def num_tokens(self) -> int:
    return int(self.values.shape[0])

  def piece(self, i: int) -> np.ndarray:
    return self.values[self.starts[i]:self.starts[i] + self.lengths[i]]

  @classmethod
  def concatenate(cls, stores: Sequence["TokenStore"]) -> "TokenStore":
    offsets = np.cumsum([0] + [s.num_tokens for s in stores[:-1]])
    return cls(values=np.concatenate([s.values for s in stores]),
               starts=np.concatenate([s.starts + o for s, o in zip(stores, offsets)]),
               **{f: np.concatenate([getattr(s, f) for s in stores])
                  for f in ("lengths", "prefix_lengths", "transposable", "stretchable",
                            "head_lengths")})


def load_split(version_dir: os.PathLike, split: str, process_index: int = 0,
               process_count: int = 1) -> TokenStore:
  """Reads a built split (this process's even share when process_count > 1) into memory.

  Pieces keep the shards' order (no file shuffling), so the store, and everything
  drawn from it, is the same on every run.
  """
  version_dir = epath.Path(version_dir)
  builder = tfds.builder_from_directory(os.fspath(version_dir))
  if split not in builder.info.splits:
    raise ConfigError(f"data: split {split!r} not in {version_dir} "
                      f"(has {', '.join(builder.info.splits)})")
  if process_count > 1:
    split = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count)
  meta = dataset_metadata(version_dir)
  enc = load_encoding(version_dir)
  bos_id = meta.get("bos_id")
  ds = builder.as_dataset(split=split, shuffle_files=False)
  # Continuation pairs store the length of their prompt (data_pipelines.common.PAIR_FEATURES).
  keys = ("tokens", "num_condition_tokens", "has_drums") + (
      ("num_prompt_tokens",) if "num_prompt_tokens" in builder.info.features else ())
  ds = ds.map(lambda ex: {k: ex[k] for k in keys})
  values, lengths, prefix, drums, prompts = [], [], [], [], []
  flat = ds.ragged_batch(1024).map(lambda ex: {
      **ex, "tokens": ex["tokens"].flat_values, "lengths": ex["tokens"].row_lengths()})
  for ex in flat.as_numpy_iterator():
    values.append(ex["tokens"].astype(np.int32))
    lengths.append(ex["lengths"])
    drums.append(ex["has_drums"])
    prefix.append(ex["num_condition_tokens"])
    prompts.append(ex.get("num_prompt_tokens", np.zeros_like(ex["num_condition_tokens"])))
  if not values:
    raise ConfigError(f"data: split {split} of {version_dir} is empty for this process")
  values, lengths = np.concatenate(values), np.concatenate(lengths).astype(np.int64)
  starts = np.cumsum(lengths) - lengths
  prefix_lengths = np.concatenate(prefix).astype(np.int64)
  if bos_id is not None:
    prefix_lengths += values[starts] == bos_id
  has_drums = np.concatenate(drums).astype(bool)
  n = len(lengths)
  return TokenStore(
      values=values, starts=starts, lengths=lengths, prefix_lengths=prefix_lengths,
      transposable=(~has_drums) & (enc.name == "performance"),
      stretchable=np.full(n, enc.name in ("performance", "drums")),
      head_lengths=prefix_lengths + np.concatenate(prompts).astype(np.int64))


def check_prompts_fit(store: TokenStore, seq_len: int, where: str,
                      field: str = "config.data.seq_len") -> None:
  """Raises ConfigError when a piece's given head (prefix + prompt) leaves no room for a
  target in a row of `seq_len` tokens; `where` names the dataset and split, `field` the
  setting that gave seq_len."""
  longest = int(store.head_lengths.max()) if len(store) else 0
  if longest < seq_len:
    return
  i = int(np.argmax(store.head_lengths))
  if store.is_pair[i]:
    raise ConfigError(
        f"{field}={seq_len} is shorter than the longest continuation prompt of {where} "
        f"({longest} tokens: {int(store.prefix_lengths[i])} prefix + "
        f"{longest - int(store.prefix_lengths[i])} prompt), so no target fits; raise it (and "
        "config.model.max_len), or build the pairs with fewer prompt_bars")
  raise ConfigError(f"{field}={seq_len} leaves no room after the {longest}-token "
                    f"conditioning prefix of {where}")


# --------------------------------------------------------------------------- augmentation
# A batch of pieces travels as flat `values` (int32 [n]) with `rows` (int64 [n], the
# piece of each token, non-decreasing): cheaper to trace and run than RaggedTensors.
def _ranges(begin: tf.Tensor, size: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(rows, index): the concatenated ranges [begin[i], begin[i] + size[i]) and their row i."""
  rows = tf.repeat(tf.range(tf.size(size, out_type=tf.int64)), size)
  first = tf.cumsum(size, exclusive=True)
  return rows, tf.range(tf.reduce_sum(size)) + tf.gather(begin - first, rows)


def _offsets(rows: tf.Tensor, nrows) -> Tuple[tf.Tensor, tf.Tensor]:
  """(position of each token within its row, tokens per row int64 [nrows])."""
  counts = tf.math.bincount(tf.cast(rows, tf.int32), minlength=nrows, maxlength=nrows,
                            dtype=tf.int64)
  index = tf.range(tf.size(rows, out_type=tf.int64))
  return index - tf.gather(tf.cumsum(counts, exclusive=True), rows), counts


def transpose_pieces(values: tf.Tensor, rows: tf.Tensor, semitones: tf.Tensor,
                     enc: encoding_lib.Encoding) -> Tuple[tf.Tensor, tf.Tensor]:
  """Shifts the pitch of `performance` NOTE_ON/NOTE_OFF ids; drops notes out of range.

  Args:
    values: int32 [n] token ids of several pieces (other tokens pass unchanged).
    rows: int64 [n] piece of each token.
    semitones: int32 [pieces] shift of each piece.
    enc: the `performance` encoding the ids belong to.
  Returns:
    (values, rows) without the tokens of notes pushed outside the pitch range (a
    dropped note loses its NOTE_ON and its NOTE_OFF).
  """
  shift = tf.gather(tf.cast(semitones, values.dtype), rows)
  p = enc.num_pitches
  on = (values >= enc.note_on_base) & (values < enc.note_on_base + p)
  off = (values >= enc.note_off_base) & (values < enc.note_off_base + p)
  is_note = on | off
  pitch = values - tf.where(on, enc.note_on_base, enc.note_off_base) + shift
  keep = ~is_note | ((pitch >= 0) & (pitch < p))
  moved = tf.where(is_note, values + shift, values)
  return tf.boolean_mask(moved, keep), tf.boolean_mask(rows, keep)


def stretch_pieces(values: tf.Tensor, rows: tf.Tensor, factors: tf.Tensor,
                   enc: encoding_lib.Encoding) -> Tuple[tf.Tensor, tf.Tensor]:
  """Rescales the TIME_SHIFT runs of `performance`/`drums` pieces.

  Each event's time (steps since the start of its piece) is multiplied by the piece's
  factor and rounded, so rounding never accumulates; the gaps are re-written as
  shifts of at most `max_shift_steps` steps, the last carrying the remainder, as the
  encoder writes them. Time shifts after a piece's last event are dropped.

  Args:
    values: int32 [n] token ids of several pieces.
    rows: int64 [n] piece of each token (non-decreasing).
    factors: float [pieces] time factor of each piece (1.05 = 5% slower).
    enc: the encoding (`shift_base`, `max_shift_steps`).
  Returns:
    (values, rows) of the stretched pieces.
  """
  shift_base, max_shift = enc.shift_base, enc.max_shift_steps
  is_shift = (values >= shift_base) & (values < shift_base + max_shift)
  amount = tf.cast(tf.where(is_shift, values - shift_base + 1, 0), tf.int64)
  # Steps since the start of each token's own piece.
  position, _ = _offsets(rows, tf.size(factors))
  ends = tf.cumsum(amount)
  steps = ends - tf.gather(ends - amount, tf.range(tf.size(rows, out_type=tf.int64)) - position)
  event = ~is_shift
  events, event_rows = tf.boolean_mask(values, event), tf.boolean_mask(rows, event)
  scale = tf.cast(tf.gather(factors, event_rows), tf.float64)
  when = tf.cast(tf.round(tf.cast(tf.boolean_mask(steps, event), tf.float64) * scale), tf.int64)
  first = event_rows != tf.concat([[-1], event_rows[:-1]], 0)
  gap = tf.where(first, when, when - tf.concat([[0], when[:-1]], 0))
  n_shift = (gap + max_shift - 1) // max_shift
  owner, offset = _ranges(tf.zeros_like(n_shift), n_shift + 1)  # shifts, then the event
  own_shifts = tf.gather(n_shift, owner)
  remainder = tf.gather(gap - (n_shift - 1) * max_shift, owner)
  shift_len = tf.cast(
      tf.where(offset < own_shifts - 1, tf.constant(max_shift, tf.int64), remainder),
      values.dtype)
  out = tf.where(offset == own_shifts, tf.gather(events, owner), shift_base - 1 + shift_len)
  return out, tf.gather(event_rows, owner)


VELOCITY_CURVES = ("linear", "power")


def scale_velocities(values: tf.Tensor, rows: tf.Tensor, factors: tf.Tensor,
                     enc: encoding_lib.Encoding,
                     curve: str = "linear") -> Tuple[tf.Tensor, tf.Tensor]:
  """Makes the VELOCITY bins of `performance`/`drums` pieces louder or softer by a factor.

  Bins are equal slices of MIDI velocity, b in 1..B (B = num_velocity_bins). With
  `curve="linear"`, bin b becomes round(b * factor), clipped to the bins: scaling the bin
  scales the velocity, and a louder take pushes its loudest hits into the top bin. With
  `curve="power"`, b becomes round(B * (b / B) ** (1 / factor)): the same direction (a
  factor above 1 is louder), but the top bin stays the top bin and nothing is clipped, so
  the share of hits at the instrument's ceiling (velocity 127 on an e-kit; about a tenth
  of GMD's hits) is that of the data, and the middle of the range moves by about half
  the factor's change. A VELOCITY token that now repeats the one before it in its piece
  is dropped, as the encoders write one only when the velocity changes.

  Args:
    values: int32 [n] token ids of several pieces.
    rows: int64 [n] piece of each token (non-decreasing).
    factors: float [pieces] velocity factor of each piece (1.1 = louder).
    enc: the encoding (`velocity_base`, `num_velocity_bins`).
    curve: "linear" or "power" (above).
  Returns:
    (values, rows) of the rescaled pieces.
  """
  if curve not in VELOCITY_CURVES:
    raise ValueError(f"velocity curve {curve!r}: expected one of {VELOCITY_CURVES}")
  base, bins = enc.velocity_base, enc.num_velocity_bins
  is_vel = (values >= base) & (values < base + bins)
  scale = tf.gather(tf.cast(factors, tf.float64), rows)
  b = tf.cast(values - base + 1, tf.float64)
  if curve == "power":
    b = bins * tf.pow(tf.clip_by_value(b, 1.0, bins) / bins, 1.0 / scale)
  else:
    b = b * scale
  scaled = tf.cast(tf.round(b), values.dtype)
  values = tf.where(is_vel, base - 1 + tf.clip_by_value(scaled, 1, bins), values)
  where = tf.where(is_vel)[:, 0]
  vel, vel_rows = tf.gather(values, where), tf.gather(rows, where)
  repeat = tf.concat([[False], (vel[1:] == vel[:-1]) & (vel_rows[1:] == vel_rows[:-1])], 0)
  drop = tf.scatter_nd(where[:, None], repeat, tf.shape(values, out_type=tf.int64))
  return tf.boolean_mask(values, ~drop), tf.boolean_mask(rows, ~drop)


def transpose_ids(ids, semitones: int, enc: encoding_lib.Encoding) -> np.ndarray:
  """`transpose_pieces` for one piece: int ids [n] -> int32 numpy ids."""
  values = tf.constant(ids, tf.int32)
  out, _ = transpose_pieces(values, tf.zeros(tf.shape(values), tf.int64),
                            tf.constant([semitones], tf.int32), enc)
  return out.numpy()


def stretch_ids(ids, factor: float, enc: encoding_lib.Encoding) -> np.ndarray:
  """`stretch_pieces` for one piece: int ids [n] -> int32 numpy ids."""
  values = tf.constant(ids, tf.int32)
  out, _ = stretch_pieces(values, tf.zeros(tf.shape(values), tf.int64),
                          tf.constant([factor], tf.float64), enc)
  return out.numpy()


def scale_velocity_ids(ids, factor: float, enc: encoding_lib.Encoding,
                       curve: str = "linear") -> np.ndarray:
  """`scale_velocities` for one piece: int ids [n] -> int32 numpy ids."""
  values = tf.constant(ids, tf.int32)
  out, _ = scale_velocities(values, tf.zeros(tf.shape(values), tf.int64),
                            tf.constant([factor], tf.float64), enc, curve)
  return out.numpy()


# --------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class _TrainSettings:
  seq_len: int
  rows: int  # per process
  packing: bool
  draws_per_row: int
  transpose: int
  stretch: float
  velocity_scale: float
  seed: int
  process_index: int
  pairs: bool = False  # some pieces are continuation pairs (weights 0 on their prompt)
  velocity_curve: str = "linear"
  input_noise: float = 0.0
  piece_sampling: str = "epoch"


# config.data.piece_sampling: how a training row's piece is drawn.
PIECE_SAMPLING = ("epoch", "tokens", "windows", "chunks")


class TrainIterator:
  """Infinite iterator of per-process training batches (dicts of numpy arrays).

  Attributes:
    step: the step of the next batch.
    per_process_batch_shape: (rows on this process, seq_len).
    global_batch_shape: (rows across all processes, seq_len).
    encoding: the datasets' `midijax.encoding.Encoding`.
    specs: the `DatasetSpec`s read.
    dataset: the underlying `tf.data.Dataset` of batches.
  """

  def __init__(self, dataset: tf.data.Dataset, start_step: int, per_process_batch_shape,
               global_batch_shape, enc, specs):
    self.dataset = dataset
    self.step = int(start_step)
    self.per_process_batch_shape = tuple(per_process_batch_shape)
    self.global_batch_shape = tuple(global_batch_shape)
    self.encoding = enc
    self.specs = specs
    self._it = dataset.as_numpy_iterator()

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._it)
    self.step += 1
    return batch


def _process_layout(config, process_index, process_count) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def _rows_per_process(data, batch_size_field: str, process_count: int) -> Tuple[int, int]:
  batch = int(_field(data, batch_size_field, 0) or _field(data, "batch_size", 32))
  if batch <= 0 or batch % process_count:
    raise ConfigError(f"data.{batch_size_field} = {batch} must be a positive multiple of the "
                      f"process count {process_count}")
  return batch, batch // process_count


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs so JAX gets all their memory (Flax examples do this)."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such device type.
      pass


def _train_settings(config: Any, process_index: int, process_count: int
                    ) -> Tuple[_TrainSettings, int]:
  """config.data's training fields, checked: (settings, global rows per batch)."""
  data, seed = _data_config(config)
  global_rows, rows = _rows_per_process(data, "batch_size", process_count)
  seq_len = int(_field(data, "seq_len", 256))
  packing = bool(_field(data, "packing", False))
  settings = _TrainSettings(
      seq_len=seq_len, rows=rows, packing=packing,
      draws_per_row=int(_field(data, "max_segments_per_row", 8)) if packing else 1,
      transpose=int(_field(data, "transpose_semitones", 0)),
      stretch=float(_field(data, "time_stretch", 0.0)),
      velocity_scale=float(_field(data, "velocity_scale", 0.0)), seed=seed,
      process_index=process_index,
      velocity_curve=str(_field(data, "velocity_curve", "linear")),
      input_noise=float(_field(data, "input_noise", 0.0)),
      piece_sampling=str(_field(data, "piece_sampling", "epoch")))
  if settings.piece_sampling not in PIECE_SAMPLING:
    raise ConfigError(f"config.data.piece_sampling={settings.piece_sampling!r} must be one of "
                      f"{', '.join(PIECE_SAMPLING)}")
  if not 0.0 <= settings.input_noise < 1.0:
    raise ConfigError(f"config.data.input_noise={settings.input_noise} must be in [0, 1) "
                      "(0 = off)")
  # Each field checked on its own, so the error names the one that is wrong.
  for field, value, ok, need in (
      ("seq_len", seq_len, seq_len >= 2, ">= 2"),
      ("max_segments_per_row", settings.draws_per_row, settings.draws_per_row >= 1, ">= 1"),
      ("transpose_semitones", settings.transpose, settings.transpose >= 0, ">= 0"),
      ("time_stretch", settings.stretch, 0.0 <= settings.stretch < 1.0, "in [0, 1)"),
      ("velocity_scale", settings.velocity_scale, 0.0 <= settings.velocity_scale < 1.0,
       "in [0, 1)")):
    if not ok:
      raise ConfigError(f"config.data.{field}={value} must be {need}")
  if settings.velocity_curve not in VELOCITY_CURVES:
    raise ConfigError(f"config.data.velocity_curve={settings.velocity_curve!r}: expected one "
                      f"of {', '.join(VELOCITY_CURVES)}")
  return settings, global_rows


def make_train_iterator(config: Any, start_step: int = 0, *,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> TrainIterator:
  """Training batches for this process, starting at `start_step`.

  Args:
    config: the run config (fields under `config.data`, seed `config.seed` unless
      `config.data.seed` is set) or the data ConfigDict itself.
    start_step: step of the first batch (0 for a new run, k to resume at step k).
    process_index, process_count: this process and the process count (default:
      `jax.process_index()`, `jax.process_count()`).

  Returns:
    A `TrainIterator` whose batches are dicts of numpy arrays of shape
    `per_process_batch_shape` = (batch_size // process_count, seq_len): inputs,
    targets (int32), weights (float32)[, segment_ids, positions (int32)].

  Raises:
    ConfigError: bad field values, unbuilt datasets, or mixed vocabularies.
  """
  hide_accelerators_from_tf()
  data, _ = _data_config(config)
  process_index, process_count = _process_layout(config, process_index, process_count)
  settings, global_rows = _train_settings(config, process_index, process_count)
  rows, seq_len = settings.rows, settings.seq_len
  specs = dataset_specs(config)
  enc = load_encoding(config)
  split = _field(data, "train_split", "train")
  stores = [load_split(s.version_dir, split, process_index, process_count) for s in specs]
  for spec, store in zip(specs, stores):
    check_prompts_fit(store, seq_len, f"{spec.name}/{spec.builder_config} {split}")
  pairs = any(bool(s.is_pair.any()) for s in stores)
  if pairs and (settings.transpose or settings.stretch or settings.velocity_scale):
    raise ConfigError("config.data.transpose_semitones / time_stretch / velocity_scale: "
                      "continuation pairs are not augmented (the target would change but not "
                      "its prompt); set them to 0")
  if settings.stretch and getattr(enc, "time_unit", "seconds") != "seconds":
    raise ConfigError("config.data.time_stretch: the drums encoding counts time in beats "
                      "here, so its tokens do not change with tempo; set it to 0")
  if settings.input_noise and not noise_kinds(enc):
    raise ConfigError(f"config.data.input_noise: the {enc.name} encoding has no drum or "
                      "velocity tokens to replace; set it to 0")
  settings = dataclasses.replace(settings, pairs=pairs)
  weights = np.array([s.weight for s in specs], np.float64)
  ds = _train_dataset(TokenStore.concatenate(stores), [len(s) for s in stores],
                      weights / weights.sum(), enc, settings, int(start_step))
  return TrainIterator(ds, start_step, (rows, seq_len), (global_rows, seq_len), enc, specs)


def noise_kinds(enc: encoding_lib.Encoding) -> List[Tuple[int, int]]:
  """The [lo, hi) id ranges `config.data.input_noise` draws replacements from: drums
  (which drum) and velocities (how hard). Neither moves the music's clock, so the bar
  positions and time-rope heads see the same times; time shifts and BAR are never
  replaced."""
  kinds = []
  if enc.name == "drums":
    kinds.append((enc.drum_base, enc.shift_base))
  if enc.name in ("drums", "performance") and getattr(enc, "num_velocity_bins", 0):
    kinds.append((enc.velocity_base, enc.velocity_base + enc.num_velocity_bins))
  return kinds


def add_input_noise(rows: tf.Tensor, kinds: Sequence[Tuple[int, int]], rate: float,
                    seed: tf.Tensor) -> tf.Tensor:
  """Each token of a kind in `kinds` replaced, with probability `rate`, by a uniformly
  drawn token of the same kind (it may draw itself); other tokens unchanged."""
  hit_seed, pick_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  hit = tf.random.stateless_uniform(tf.shape(rows), seed=hit_seed) < rate
  pick = tf.random.stateless_uniform(tf.shape(rows), seed=pick_seed)
  out = rows
  for lo, hi in kinds:
    drawn = lo + tf.minimum(tf.cast(pick * (hi - lo), tf.int32), hi - lo - 1)
    out = tf.where(hit & (rows >= lo) & (rows < hi), drawn, out)
  return out


# RandomIndexShuffle takes 3-word seeds; tf.random.experimental.index_shuffle pads a
# [2] seed with this word in front, but pads an [n, 2] seed on the wrong axis (TF 2.21),
# so batched seeds are built here the same way and the raw op is called.
_INDEX_SHUFFLE_SEED_WORD = 498247692


def _train_dataset(store: TokenStore, sizes: Sequence[int], weights: np.ndarray,
                   enc: encoding_lib.Encoding, s: _TrainSettings, start_step: int
                   ) -> tf.data.Dataset:
  """The tf.data pipeline: step numbers -> batches, each a pure function of its step.

  Step t draws R = rows * draws_per_row pieces, numbered t * R + j. Every random
  choice is a stateless op keyed on (seed, process, step); the example order is a
  per-(dataset, epoch) permutation of the draw numbers.
  """
  row_len = s.seq_len + 1
  draws = s.rows * s.draws_per_row
  values = tf.constant(store.values, tf.int32)
  starts = tf.constant(store.starts, tf.int64)
  lengths = tf.constant(store.lengths, tf.int64)
  # The kept, unscored front of each piece: its prefix (and a pair's prompt).
  prefix_lengths = tf.constant(store.head_lengths, tf.int64)
  is_pair = tf.constant(store.is_pair)
  transposable = tf.constant(store.transposable)
  ds_sizes = tf.constant(sizes, tf.int64)
  first_piece = np.cumsum([0] + list(sizes[:-1])).astype(np.int64)  # of each dataset
  ds_offsets = tf.constant(first_piece, tf.int64)
  log_weights = tf.constant(np.log(weights)[None, :], tf.float32)
  by_tokens = s.piece_sampling in ("tokens", "windows", "chunks")
  # "chunks": the row is placed around the drawn token, not cropped uniformly.
  around_token = s.piece_sampling == "chunks"
  if by_tokens:
    # Each piece weighs its scored tokens (at least 1; "windows": at least a row's worth,
    # so a piece shorter than a row weighs as much as one row of a long piece): the end
    # of each piece's span on one line over all pieces, and where each dataset's spans
    # begin and how long they are.
    floor = s.seq_len if s.piece_sampling == "windows" else 1
    scored = np.maximum(store.lengths - store.head_lengths, floor).astype(np.float64)
    span_end = tf.constant(np.cumsum(scored)[None, :], tf.float64)
    span_begin = tf.constant(np.concatenate([[0.0], np.cumsum(scored)])[first_piece],
                             tf.float64)
    span_total = tf.constant([scored[a:a + n].sum() for a, n in zip(first_piece, sizes)],
                             tf.float64)
  # Processes hold different shares of the data and must not mirror each other's draws.
  base_seed = tf.constant([s.seed, s.process_index], tf.int64)
  can_transpose = s.transpose > 0 and enc.name == "performance"
  can_stretch = s.stretch > 0 and enc.name in ("performance", "drums")
  can_scale = s.velocity_scale > 0 and enc.name in ("performance", "drums")
  slack = can_transpose or can_stretch or can_scale
  bos_id = enc.bos_id
  kinds = noise_kinds(enc) if s.input_noise else []

  def make_batch(step):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base_seed, step), num=4)
    draw = step * draws + tf.range(draws, dtype=tf.int64)
    if len(sizes) > 1:
      which = tf.random.stateless_categorical(log_weights, draws, seed=seeds[0])[0]
    else:
      which = tf.zeros([draws], tf.int64)
    n = tf.gather(ds_sizes, which)
    if by_tokens:
      # A piece with probability proportional to its scored tokens (within its dataset):
      # every token is as likely to be in a row as any other, as when a corpus is
      # concatenated and chunked. A point drawn on the dataset's span of the line falls
      # in one piece's span.
      u = tf.random.stateless_uniform(
          [draws], seed=tf.random.experimental.stateless_fold_in(seeds[0], 5),
          dtype=tf.float64)
      point = tf.gather(span_begin, which) + u * tf.gather(span_total, which)
      i = tf.searchsorted(span_end, point[None, :], side="right")[0]
      first = tf.gather(ds_offsets, which)
      i = tf.clip_by_value(tf.cast(i, tf.int64), first, first + n - 1)
    else:
      # Epoch e of dataset d visits its pieces in the permutation keyed on
      # (seed, process, d, e).
      perm_seed = tf.stack([tf.fill([draws], tf.constant(_INDEX_SHUFFLE_SEED_WORD, tf.int64)),
                            s.seed * 65536 + s.process_index * 1024 + which, draw // n],
                           axis=1)
      i = tf.gather(ds_offsets, which) + tf.raw_ops.RandomIndexShuffle(
          index=draw % n, seed=perm_seed, max_index=n - 1, rounds=4)
    start, length = tf.gather(starts, i), tf.gather(lengths, i)
    prefix = tf.gather(prefix_lengths, i)
    body_len = length - prefix
    room = row_len - prefix  # body tokens that fit in a row after the prefix
    spare = tf.maximum(body_len - room, 0)
    if s.pairs:  # a pair's target starts right after its prompt: cut at the end, not cropped
      spare = tf.where(tf.gather(is_pair, i), tf.zeros_like(spare), spare)
    u = tf.random.stateless_uniform([draws], seed=seeds[1], dtype=tf.float64)
    if around_token:
      # The drawn token's place in its piece's body (its span on the line ends at span_end).
      token_at = tf.cast(tf.floor(point - (tf.gather(span_end[0], i) -
                                           tf.cast(body_len, tf.float64))), tf.int64)
      # The drawn token at a uniform place in the row, the crop clipped to the piece: every
      # token of a long piece is in a row about as often, its first and last room tokens
      # at least half as often (a uniform crop start puts the last token in 1 of
      # spare + 1 crops), much as when a corpus is concatenated and chunked, where every
      # token, the last included, is in a row equally often.
      back = tf.cast(tf.floor(u * tf.cast(room, tf.float64)), tf.int64)
      crop = tf.clip_by_value(token_at - back, 0, spare)
    else:
      crop = tf.minimum(tf.cast(tf.floor(u * tf.cast(spare + 1, tf.float64)), tf.int64),
                        spare)
    # Augmentation may drop or merge tokens: read a little more, cut to `room` after.
    take = room + (room // _AUGMENT_SLACK_FRACTION + _AUGMENT_SLACK_TOKENS if slack else 0)
    begin = start + prefix + crop
    rows, index = _ranges(begin, tf.minimum(take, body_len - crop))
    body = tf.gather(values, index)
    if can_transpose:
      k = tf.random.stateless_uniform([draws], seed=seeds[2], minval=-s.transpose,
                                      maxval=s.transpose + 1, dtype=tf.int32)
      body, rows = transpose_pieces(body, rows, tf.where(tf.gather(transposable, i), k, 0), enc)
    if can_stretch:
      f = tf.random.stateless_uniform([draws], seed=seeds[3], minval=1.0 - s.stretch,
                                      maxval=1.0 + s.stretch, dtype=tf.float64)
      body, rows = stretch_pieces(body, rows, f, enc)
    if can_scale:
      # Its own seed, folded in, so runs without it keep the batches they had.
      v_seed = tf.random.experimental.stateless_fold_in(seeds[3], 1)
      v = tf.random.stateless_uniform([draws], seed=v_seed, minval=1.0 - s.velocity_scale,
                                      maxval=1.0 + s.velocity_scale, dtype=tf.float64)
      body, rows = scale_velocities(body, rows, v, enc, s.velocity_curve)
    position, body_lens = _offsets(rows, draws)
    if slack:
      fits = position < tf.gather(room, rows)
      body, rows, position = (tf.boolean_mask(x, fits) for x in (body, rows, position))
      body_lens = tf.minimum(body_lens, room)
    head_rows, head_index = _ranges(start, prefix)
    head_position, _ = _offsets(head_rows, draws)
    # Each piece is its prefix then its body; position = index within the piece.
    tokens = tf.concat([tf.gather(values, head_index), body], 0)
    piece = tf.concat([head_rows, rows], 0)
    position = tf.concat([head_position, tf.gather(prefix, rows) + position], 0)
    # Packing: pieces fill their row in draw order; the one that overflows is cut and
    # the draws after it go unused. Without packing a row has one piece.
    per_row = tf.reshape(prefix + body_lens, [s.rows, s.draws_per_row])
    before = tf.cumsum(per_row, axis=1, exclusive=True)
    used = tf.reshape(tf.clip_by_value(row_len - before, 0, per_row), [draws])
    keep = position < tf.gather(used, piece)
    tokens, piece, position = (tf.boolean_mask(x, keep) for x in (tokens, piece, position))
    column = tf.gather(tf.reshape(before, [draws]), piece) + position
    where = tf.stack([piece // s.draws_per_row, column], 1)

    def to_rows(flat):
      return tf.scatter_nd(where, flat, [s.rows, row_len])

    batch = to_rows(tokens)
    noisy = None
    if s.input_noise:
      # The model reads the noisy tokens and predicts the real ones (its own seed, folded
      # in, so runs without it keep the batches they had).
      noisy = add_input_noise(batch, kinds, s.input_noise,
                              tf.random.experimental.stateless_fold_in(seeds[3], 2))
    # Pairs: only tokens after the head (prefix + prompt) are scored.
    scored = None
    if s.pairs:
      scored = to_rows(tf.cast(position >= tf.gather(prefix, piece), tf.int32)) > 0
    if not s.packing:
      return _to_batch(batch, None, None, bos_id, scored, noisy)
    segments = to_rows(tf.cast(piece % s.draws_per_row + 1, tf.int32))
    return _to_batch(batch, segments, to_rows(tf.cast(position, tf.int32)), bos_id, scored,
                     noisy)

  steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
  # make_batch branches only on Python constants: skip autograph's slow conversion.
  batches = steps.map(tf.autograph.experimental.do_not_convert(make_batch),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  return batches.with_options(options).prefetch(tf.data.AUTOTUNE)


def _to_batch(rows, segments, positions, bos_id: int, scored=None,
              noisy_rows=None) -> Dict[str, tf.Tensor]:
  """[B, seq_len + 1] rows -> inputs/targets/weights[/segment_ids/positions]; `scored`
  (bool [B, seq_len + 1], optional) marks the tokens that may be loss targets;
  `noisy_rows` (optional, the rows with input noise) are read as the inputs."""
  inputs, targets = (rows if noisy_rows is None else noisy_rows)[:, :-1], rows[:, 1:]
  # No loss on padding or on BOS/conditioning targets: they are given, not generated.
  weights = (targets != encoding_lib.PAD_ID) & (targets < bos_id)
  if scored is not None:
    weights &= scored[:, 1:]
  out = {"inputs": inputs, "targets": targets}
  if segments is not None:
    weights &= (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    out["segment_ids"] = segments[:, :-1]
    out["positions"] = positions[:, :-1]
  out["weights"] = tf.cast(weights, tf.float32)
  return out


# --------------------------------------------------------------------------- evaluation
def eval_windows(store: TokenStore, seq_len: int, where: str = "the eval split",
                 context: int = 0, field: str = "config.data.eval_context") -> np.ndarray:
  """(piece, body start, scored length, context) rows of the eval windows, int64[M, 4].

  Piece i with head H (prefix, or prefix + prompt for a continuation pair) and body
  length L (events + EOS, or the target) fits W = seq_len + 1 - H body tokens a window.
  With context C = 0 the windows do not overlap: ceil(L / W) of them, head +
  body[c*W:(c+1)*W]. With C > 0 the first window is the same and every later one
  scores W - C new tokens after the C body tokens before them (fed, not scored), so a
  target is predicted from at least C tokens of its piece unless it is in the first
  window. Either way every body token is scored exactly once. A pair gets only its first
  window (the target is scored given its real prompt, as far as it fits). A context that
  is negative or leaves no target after a head is a ConfigError naming `field`.
  """
  check_prompts_fit(store, seq_len, where)
  room = seq_len + 1 - store.head_lengths
  body = store.lengths - store.head_lengths
  context = int(context)
  free = room[~store.is_pair]  # pairs get one window, without context
  if context < 0 or (len(free) and context >= int(free.min())):
    raise ConfigError(
        f"{field}={context}: must be >= 0 and leave room for a target after every "
        f"prefix of {where} (at most {int(free.min()) - 1} with seq_len={seq_len})")
  step = room - context
  # First window: W tokens; later ones W - C each.
  later = np.maximum(body - room, 0)
  count = np.where(store.is_pair, np.minimum(1, body),
                   np.where(body > 0, 1 + -(-later // step), 0))
  piece = np.repeat(np.arange(len(store)), count)
  c = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
  begin = np.where(c == 0, 0, room[piece] + (c - 1) * step[piece])
  size = np.where(c == 0, room[piece], step[piece])
  ctx = np.where(c == 0, 0, context)
  return np.stack([piece, begin, np.minimum(size, body[piece] - begin), ctx], 1).astype(np.int64)


class EvalIterator:
  """Re-iterable evaluation batches: each pass yields every window once, in order.

  Attributes:
    num_batches: batches per pass (the same on every process).
    num_windows: windows of the whole split (all processes).
    num_targets: weighted targets of the whole split (event tokens + EOS).
    per_process_batch_shape, global_batch_shape: as for training.
  """

  def __init__(self, store: TokenStore, windows: np.ndarray, seq_len: int, rows: int,
               global_rows: int, process_index: int, process_count: int, bos_id: int,
               max_batches: int = -1):
    self.store, self.seq_len, self.rows, self.bos_id = store, seq_len, rows, bos_id
    self.num_windows = int(len(windows))
    self.num_targets = int(windows[:, 2].sum())
    # Target tokens of continuation pairs past the end of their window (not scored).
    self.num_cut_targets = int((store.lengths - store.head_lengths).sum() - self.num_targets)
    # Window w goes to process w % process_count; every process runs as many batches.
    self._windows = windows[process_index::process_count]
    per_process = -(-self.num_windows // process_count)
    self.num_batches = -(-per_process // rows)
    if max_batches is not None and max_batches >= 0:
      self.num_batches = min(self.num_batches, int(max_batches))
    # The windows every process together evaluates (all of them unless max_batches cuts).
    self._evaluated = np.concatenate(
        [windows[p::process_count][:self.num_batches * rows] for p in range(process_count)])
    self.per_process_batch_shape = (rows, seq_len)
    self.global_batch_shape = (global_rows, seq_len)

  def __len__(self) -> int:
    return self.num_batches

  def batch_pieces(self) -> list:
    """Per batch of this process, int64 [rows]: the piece (index in the split) each row's
    window comes from, -1 for padding rows (e.g. to look up each window's tempo)."""
    out = []
    for b in range(self.num_batches):
      rows = self._windows[b * self.rows:(b + 1) * self.rows, 0]
      out.append(np.concatenate([rows, np.full(self.rows - len(rows), -1, np.int64)]))
    return out

  def count_scored(self, token_mask: np.ndarray) -> int:
    """How many scored targets, over all processes' batches, have `token_mask[id]` true
    (e.g. `encoding.note_token_mask`: the notes, for NLL per note)."""
    s = self.store
    if not len(self._evaluated):
      return 0
    piece, begin, size = (self._evaluated[:, k] for k in range(3))  # scored spans
    first = s.starts[piece] + s.head_lengths[piece] + begin
    index = np.repeat(first - np.cumsum(size) + size, size) + np.arange(int(size.sum()))
    return int(np.asarray(token_mask)[s.values[index]].sum())

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    s, row_len = self.store, self.seq_len + 1
    for b in range(self.num_batches):
      batch = np.zeros((self.rows, row_len), np.int32)
      heads = np.zeros((self.rows, 1), np.int64)
      for r, (piece, begin, size, ctx) in enumerate(
          self._windows[b * self.rows:(b + 1) * self.rows]):
        start, prefix = s.starts[piece], s.head_lengths[piece]
        heads[r] = prefix + ctx
        batch[r, :prefix] = s.values[start:start + prefix]
        batch[r, prefix:prefix + ctx + size] = s.values[start + prefix + begin - ctx:
                                                        start + prefix + begin + size]
      targets = batch[:, 1:]
      # Scored: real event targets after the head (a pair's prompt is given, not scored)
      # and after the window's context tokens.
      after_head = np.arange(1, row_len)[None, :] >= heads
      yield {"inputs": batch[:, :-1], "targets": targets,
             "weights": ((targets != encoding_lib.PAD_ID) & (targets < self.bos_id) &
                         after_head).astype(np.float32)}


def make_eval_iterator(config: Any, split: Optional[str] = None, *,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> EvalIterator:
  """Deterministic evaluation batches of one split (default `data.eval_split`).

  Every process reads the whole split (eval splits are small) and takes every
  process_count-th window, so all processes run `num_batches` batches; missing rows
  are all padding (weights 0). With a mixture, the first dataset is evaluated.

  Returns:
    An `EvalIterator` of dicts inputs, targets (int32), weights (float32), each of
    shape (eval_batch_size // process_count, seq_len).
  """
  hide_accelerators_from_tf()
  data, _ = _data_config(config)
  process_index, process_count = _process_layout(config, process_index, process_count)
  global_rows, rows = _rows_per_process(data, "eval_batch_size", process_count)
  seq_len = int(_field(data, "seq_len", 256))
  spec = dataset_specs(config)[0]
  enc = load_encoding(spec.version_dir)
  split = split or _field(data, "eval_split", "validation")
  store = load_split(spec.version_dir, split)
  windows = eval_windows(store, seq_len, f"{spec.name}/{spec.builder_config} {split}",
                         int(_field(data, "eval_context", 0)))
  return EvalIterator(store, windows, seq_len, rows, global_rows,
                      process_index, process_count, enc.bos_id,
                      int(_field(data, "max_eval_batches", -1)))


# --------------------------------------------------------------------------- for train.py
class DataSource:
  """What training needs from the data: the vocabulary, training and evaluation batches.

      data = DataSource(config)
      data.vocab_size; data.save_vocab(workdir / "vocab.json")
      for batch in data.train_batches(start_step): ...   # per-process numpy batches
      for batch in data.eval_batches(): ...              # every eval window once
  """

  def __init__(self, config: Any, *, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.config = config
    self.process_index, self.process_count = _process_layout(config, process_index,
                                                             process_count)
    # The training fields are checked here, before a trainer writes its workdir.
    _train_settings(config, self.process_index, self.process_count)
    self.encoding = load_encoding(config)
    self.vocab_size = self.encoding.vocab_size
    self._eval: Dict[str, EvalIterator] = {}

  def save_vocab(self, path: os.PathLike) -> None:
    self.encoding.save_vocab(path)

  def conditioning_kinds(self) -> Optional[List[str]]:
    return conditioning_kinds(self.config)

  def train_batches(self, start_step: int = 0) -> TrainIterator:
    """Training batches from `start_step` on (resuming needs nothing else)."""
    return make_train_iterator(self.config, start_step, process_index=self.process_index,
                               process_count=self.process_count)

  def eval_batches(self, split: Optional[str] = None) -> EvalIterator:
    """The evaluation batches of `split` (default data.eval_split); read once, re-iterable."""
    split = split or _field(_data_config(self.config)[0], "eval_split", "validation")
    if split not in self._eval:
      self._eval[split] = make_eval_iterator(self.config, split,
                                             process_index=self.process_index,
                                             process_count=self.process_count)
    return self._eval[split]
