"""Evaluating a trained run: `midijax evaluate --workdir RUN` (`evaluate_workdir`).

Held-out NLL per token, per note and per second of music over a whole split; music
statistics of generated clips against real clips of the same split (`midijax.music_stats`);
the share of unconstrained samples that decode validly; and the classifier two-sample test
(`midijax.two_sample`): for prompts cut from the split, can a classifier tell the model's
continuation from the real one? Written as reports (`midijax.reports`) and TensorBoard
scalars (`midijax.metric_writers`).

The C2ST part, as functions a Python user can call:

    windows = prompt_windows(store, enc, prompt_tokens=64, length=128, max_windows=128)
    result = continuation_c2st(model, enc, windows, settings={"temperature": 1.0, ...})
    result["accuracy"]   # the stronger classifier's held-out accuracy; 0.5 = cannot tell
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from midijax import checkpoint as ckpt_lib
from midijax import encoding
from midijax import generation
from midijax import metric_writers
from midijax import music_stats
from midijax import reports
from midijax import two_sample
from midijax.errors import MidijaxError
from midijax.notes import Notes

# Continuation lengths (tokens) of the C2ST, prompts per length, prompt tokens and folds.
C2ST_LENGTHS = (128, 512)
C2ST_PROMPTS = 128
C2ST_PROMPT_TOKENS = 64
C2ST_FOLDS = 5
# Rows per sampler call: bounds the KV cache's memory; a whole split fits in a few calls.
SAMPLE_BATCH = 128


# ----------------------------------------------------------------------------- NLL
def note_token_mask(enc, ids: np.ndarray) -> np.ndarray:
  """True where an id starts a note (NOTE_ON / DRUM hit): the unit of NLL per note."""
  names = np.array([n.startswith(("NOTE_ON_", "DRUM_")) for n in enc.vocab.names])
  ids = np.asarray(ids)
  return np.where(ids < len(names), names[np.minimum(ids, len(names) - 1)], False)


def window_units(enc, batches, qpm=120.0) -> dict:
  """Notes and seconds of music the scored targets of eval batches stand for.

  Every scored target (weight > 0) counts: note-starting ids as notes (`note_token_mask`),
  and the seconds each id moves time forward, from the encoding's grammar table (the
  time a decoder gives it; beat-based encodings at `qpm`).

  Args:
    enc: the encoding; batches: eval batches (inputs, targets, weights).
    qpm: one tempo for every row, or a list with float [rows] per batch (each window's
      piece's tempo, `batch_qpm`): beat-based encodings (`triples`, `drums` in beats)
      advance time by beats, so their seconds depend on it.

  Returns:
    {"tokens", "notes", "seconds"} summed over all batches (floats, weighted).
  """
  tables = {}

  def advance_at(q):
    q = float(q)
    if q not in tables:
      tables[q] = two_sample.seconds_per_token(enc, q)
    return tables[q]

  tokens = notes = seconds = 0.0
  for i, b in enumerate(batches):
    t, w = np.asarray(b["targets"]), np.asarray(b["weights"], np.float64)
    tokens += float(w.sum())
    notes += float((note_token_mask(enc, t) * w).sum())
    row_qpm = np.broadcast_to(np.asarray(qpm[i] if not np.isscalar(qpm) else qpm,
                                         np.float64), (len(t),))
    for r in range(len(t)):
      advance = advance_at(row_qpm[r])
      seconds += float((advance[np.minimum(t[r], len(advance) - 1)] * w[r]).sum())
  return {"tokens": tokens, "notes": notes, "seconds": seconds}


def batch_qpm(batches, version_dir, split: str):
  """Per batch, float64 [rows]: the tempo of each row's piece (`piece_meters`), 120 for
  padding rows and datasets without tempo metadata; the `qpm` of `window_units`."""
  meters = piece_meters(version_dir, split)
  out = []
  for pieces in batches.batch_pieces():
    q = np.full(len(pieces), 120.0)
    if meters is not None:
      ok = pieces >= 0
      q[ok] = [meters[p][0] for p in pieces[ok]]
    out.append(q)
  return out


def split_nll(model, config, split: str) -> dict:
  """Mean NLL per token (nats), per note and per second of music, perplexity and accuracy
  over a whole split, on the deterministic eval windows (same numbers on every run):
  non-overlapping, or with `config.data.eval_context` tokens of context before each later
  window's targets ("eval_context" in the result)."""
  from midijax import input_pipeline, losses  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.max_eval_batches = -1  # the whole split, always
  data = input_pipeline.DataSource(config)
  iterator = data.eval_batches(split)
  batches = list(iterator)
  summary = losses.score_batches(model, batches)
  spec = input_pipeline.dataset_specs(config)[0]
  units = window_units(data.encoding, batches, batch_qpm(iterator, spec.version_dir, split))
  loss_sum = summary["loss"] * summary["tokens"]
  return {"nll_per_token": summary["loss"], "perplexity": summary["perplexity"],
          "accuracy": summary["accuracy"], "tokens": summary["tokens"],
          "notes": units["notes"], "seconds": units["seconds"],
          "nll_per_note": loss_sum / max(units["notes"], 1.0),
          "nll_per_second": loss_sum / max(units["seconds"], 1e-9),
          "eval_context": int(config.data.get("eval_context", 0))}


# ----------------------------------------------------------------------------- prompts
def piece_meters(version_dir, split: str) -> Optional[list]:
  """(qpm, (numerator, denominator)) of each piece of a built split, in `load_split`'s
  order, from the examples' `bpm` and `time_signature` fields ("4-4"); None when the
  dataset has no `bpm` field (tempo then defaults to 120, meter to 4/4)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(str(version_dir))
  feats = builder.info.features
  if "bpm" not in feats:
    return None
  has_ts = "time_signature" in feats
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: {k: ex[k] for k in ("bpm", "time_signature") if k in ex})
  out = []
  for ex in ds.as_numpy_iterator():
    meter = (4, 4)
    if has_ts:
      parts = ex["time_signature"].decode().replace("/", "-").split("-")
      if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        meter = (int(parts[0]), int(parts[1]))
    bpm = float(ex["bpm"])
    out.append((bpm if bpm > 0 else 120.0, meter))
  return out


@dataclasses.dataclass
class PromptWindows:
  """Prompts cut from a split's pieces, each with the real continuation that followed.

  Window w of piece p starts its continuation at event index s = prompt_tokens + j * length
  (j = 0, 1, ...): its prompt is the piece's BOS + conditioning prefix and events
  [s - prompt_tokens, s), its real continuation events [s, s + length). Continuations of
  one piece do not overlap.

  Attributes:
    prompts: int32 arrays [prefix + prompt_tokens] to sample from.
    contexts: int32 arrays: the piece before each continuation (prefix + events [0, s)),
      the clock both continuations are decoded on.
    real: int32 arrays [length]: the real continuations.
    pieces: int64 [n] piece index of each window (the C2ST's group).
    offsets: int64 [n] event index s where each continuation starts.
    qpm: float64 [n] tempo of each window's piece (quarter notes per minute).
    meters: (numerator, denominator) of each window's piece.
    prompt_tokens, length: the window's sizes in event tokens.
  """
  prompts: list
  contexts: list
  real: list
  pieces: np.ndarray
  offsets: np.ndarray
  qpm: np.ndarray
  meters: list
  prompt_tokens: int
  length: int

  def __len__(self) -> int:
    return len(self.real)


def windows_per_piece(store, enc, prompt_tokens: int, length: int) -> np.ndarray:
  """int64 [pieces]: how many prompt + continuation windows each piece of `store` holds."""
  events = np.array([len(enc.strip_specials(store.piece(i))) for i in range(len(store))],
                    np.int64)
  return np.maximum(events - prompt_tokens, 0) // length


def prompt_windows(store, enc, *, prompt_tokens: int, length: int, max_windows: int,
                   seed: int = 0, meters: Optional[Sequence] = None) -> PromptWindows:
  """Up to `max_windows` prompt + continuation windows of a split, spread over its pieces.

  Pieces take turns (in a seeded order): every piece long enough gives one window before
  any gives a second, so the windows cover as many pieces as possible; which windows of a
  piece are used is a seeded draw.

  Args:
    store: the split's `input_pipeline.TokenStore`.
    enc: its encoding.
    prompt_tokens, length: event tokens of each prompt and of each continuation.
    max_windows: windows wanted (fewer when the split holds fewer).
    seed: the draw.
    meters: optional (qpm, (numerator, denominator)) per piece (`piece_meters`).

  Returns:
    `PromptWindows`, in the order drawn (possibly empty).
  """
  counts = windows_per_piece(store, enc, prompt_tokens, length)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(store))
  picks = {int(p): rng.permutation(int(counts[p])) for p in order if counts[p] > 0}
  chosen = []
  for turn in range(int(counts.max()) if len(counts) else 0):
    for p in order:
      if len(chosen) >= max_windows:
        break
      if turn < counts[p]:
        chosen.append((int(p), int(picks[int(p)][turn])))
  prompts, contexts, real, pieces, offsets, qpm, meter_list = [], [], [], [], [], [], []
  for p, j in chosen:
    ids = store.piece(p)
    k = int(store.prefix_lengths[p])
    prefix, events = ids[:k], enc.strip_specials(ids[k:])
    s = prompt_tokens + j * length
    prompts.append(np.concatenate([prefix, events[s - prompt_tokens:s]]).astype(np.int32))
    contexts.append(np.concatenate([prefix, events[:s]]).astype(np.int32))
    real.append(events[s:s + length].astype(np.int32))
    pieces.append(p)
    offsets.append(s)
    q, m = meters[p] if meters is not None else (120.0, (4, 4))
    qpm.append(q)
    meter_list.append(tuple(m))
  return PromptWindows(prompts, contexts, real, np.asarray(pieces, np.int64),
                       np.asarray(offsets, np.int64), np.asarray(qpm, np.float64), meter_list,
                       int(prompt_tokens), int(length))


def check_c2st_windows(store, enc, *, split: str, prompt_tokens: int, length: int,
                       num_prompts: int, n_folds: int, min_per_class: int = 10) -> None:
  """Raises a one-line `TwoSampleError` when the C2ST cannot run on this split (checked
  before any sampling): too few prompts asked for k-fold cross-validation, or a split
  without enough windows of prompt_tokens + length event tokens in enough pieces."""
  need = max(n_folds, min_per_class)
  if num_prompts < need:
    raise two_sample.TwoSampleError(
        f"too few prompts for {n_folds}-fold cross-validation: --c2st_prompts "
        f"{num_prompts}, needs at least {need}")
  counts = windows_per_piece(store, enc, prompt_tokens, length)
  windows, pieces = int(counts.sum()), int((counts > 0).sum())
  if windows < need or pieces < n_folds:
    raise two_sample.TwoSampleError(
        f"split {split!r} has {windows} windows of {prompt_tokens} + {length} event tokens "
        f"in {pieces} pieces; the C2ST needs at least {need} in {n_folds} pieces "
        f"(ask for shorter --c2st_lengths or --c2st_prompt_tokens)")


def feature_kind(enc, is_drum: bool, asked: str = "auto") -> str:
  """The C2ST's feature kind for a run: "drums" or "pitched" ("auto": what the run makes).

  Raises:
    TwoSampleError: the run's encoding cannot make notes of the kind asked for (drum
      features of a piano model, pitched features of a `drums` model).
  """
  if asked == "auto":
    return "drums" if is_drum else "pitched"
  if asked not in two_sample.FEATURE_KINDS:
    raise two_sample.TwoSampleError(
        f"--c2st_features {asked!r}: expected auto or one of "
        f"{', '.join(two_sample.FEATURE_KINDS)}")
  if asked == "drums" and not is_drum:
    raise two_sample.TwoSampleError(
        f"--c2st_features drums: the run's encoding {enc.name!r} makes no drum notes "
        "(use --c2st_features pitched or auto)")
  if asked == "pitched" and enc.name == "drums":
    raise two_sample.TwoSampleError(
        "--c2st_features pitched: the run's encoding 'drums' makes only drum notes "
        "(use --c2st_features drums or auto)")
  return asked


# ----------------------------------------------------------------------------- sampling
def sample_continuations(model, enc, prompts: Sequence[np.ndarray], *, length: int,
                         temperature: float, top_k: int, top_p: float, seed: int = 0,
                         constrained: bool = True, cache_len: Optional[int] = None,
                         window_keep: Optional[int] = None, guidance: float = 0.0,
                         batch_size: int = SAMPLE_BATCH) -> list:
  """Exactly `length` new tokens after each prompt (EOS masked until then).

  `cache_len` is the context before the sampler's window slides (`sampling.sample_tokens`;
  default the model's max_len; `generation.trained_context` keeps it within the trained
  positions); `window_keep` the recent tokens kept when it slides (default half of it);
  `guidance` the prompt guidance (`sampling.sample_tokens`).

  Prompts of one length are sampled together, `batch_size` rows a call (the last call
  padded with copies so every call has one compiled shape); call c uses seed
  (seed * 9973 + c) mod 2^31, so no two rows share a random stream.

  Returns:
    int32 arrays: each prompt's new tokens (PAD after an early stop removed).
  """
  from midijax import sampling  # pylint: disable=g-import-not-at-top  # JAX
  out = [None] * len(prompts)
  by_len: dict = {}
  for i, p in enumerate(prompts):
    by_len.setdefault(len(p), []).append(i)
  call = 0
  for plen, rows in sorted(by_len.items()):
    for c0 in range(0, len(rows), batch_size):
      idx = rows[c0:c0 + batch_size]
      size = min(batch_size, len(rows))
      batch = np.stack([prompts[i] for i in idx] + [prompts[idx[-1]]] * (size - len(idx)))
      res = sampling.sample_tokens(
          model, batch.astype(np.int32), encoding=enc, max_new_tokens=length,
          min_new_tokens=length, seed=(seed * 9973 + call) % (1 << 31),
          temperature=temperature, top_k=top_k, top_p=top_p, constrained=constrained,
          cache_len=cache_len, window_keep=window_keep, guidance=guidance)
      call += 1
      for r, i in enumerate(idx):
        row = sampling.trim_sample(np.asarray(res["tokens"][r]), plen)[plen:]
        out[i] = row[row != enc.eos_id].astype(np.int32)
  return out


def _strict_decode(enc, ids, is_drum, constraints):
  """Decodes ids, raising when they break the encoding's grammar (invalid for the record)."""
  bad = int(constraints.grammar_violations(np.asarray(ids, np.int32), enc))
  if bad:
    raise GrammarViolation(f"{bad} tokens break the {enc.name} grammar")
  return enc.decode_notes(ids, is_drum=is_drum)


class GrammarViolation(ValueError):
  pass


# ----------------------------------------------------------------------------- the C2ST
def continuation_clips(enc, windows: PromptWindows, continuations: Sequence[np.ndarray],
                       is_drum: bool, start: int = 0, stop: Optional[int] = None) -> tuple:
  """(clips, durations in seconds): each continuation decoded after its window's context,
  on its piece's clock (`two_sample.continuation_clip`). With `start` / `stop`, only its
  tokens [start, stop), decoded after the context and its own tokens before `start`."""
  clips, durations, tables = [], [], {}
  for i, cont in enumerate(continuations):
    q = float(windows.qpm[i])
    if q not in tables:
      tables[q] = two_sample.seconds_per_token(enc, q)
    context = windows.contexts[i]
    if start:
      context = np.concatenate([context, cont[:start]]).astype(np.int32)
    clip, dur = two_sample.continuation_clip(
        enc, context, cont[start:stop], qpm=q, is_drum=is_drum, token_seconds=tables[q],
        time_signature=windows.meters[i])
    clips.append(clip)
    durations.append(dur)
  return clips, np.asarray(durations, np.float64)


def continuation_c2st(model, enc, windows: PromptWindows, *, settings: Mapping,
                      is_drum: bool, kind: str, seed: int = 0, n_folds: int = C2ST_FOLDS,
                      cache_len: Optional[int] = None, window_keep: Optional[int] = None,
                      importance_repeats: int = 5, log=print) -> dict:
  """The C2ST of generated against real continuations of the same prompts.

  For every window, a constrained sample of `windows.length` tokens continues its prompt;
  it and the real continuation are decoded on the piece's clock, described by
  `two_sample.clip_feature_matrix`, and `two_sample.c2st` cross-validates classifiers
  with the windows of a piece in one fold (prompts of one piece share its music).

  Args:
    model, enc: the run (`runs.load_run`).
    windows: from `prompt_windows`.
    settings: temperature, top_k, top_p (and guidance, default 0) of the samples.
    is_drum: decode onto the drum channel; kind: "drums" or "pitched" features.
    seed: sampling, folds, trees and permutations.
    n_folds: k of the k-fold cross-validation.
    cache_len, window_keep: the sampler's context and what it keeps when its window
      slides (see `sample_continuations`).
    importance_repeats: permutation-importance shuffles (0 skips the feature ranking).

  Returns:
    The `two_sample.c2st` dict plus "prompt_tokens", "continuation_tokens", "n_windows",
    "n_pieces", "feature_kind", "real_seconds_mean", "generated_seconds_mean",
    "constrained_validity" (`music_stats.grammar_validity` of prompt + sample),
    "sample_s" (seconds spent sampling).

  Raises:
    TwoSampleError: too few windows or pieces, or features that do not fit the clips.
  """
  from midijax import constraints  # pylint: disable=g-import-not-at-top  # JAX
  t0 = time.perf_counter()
  generated = sample_continuations(
      model, enc, windows.prompts, length=windows.length, temperature=settings["temperature"],
      top_k=settings["top_k"], top_p=settings["top_p"], seed=seed, cache_len=cache_len,
      window_keep=window_keep, guidance=settings.get("guidance", 0.0))
  sample_s = time.perf_counter() - t0
  validity = music_stats.grammar_validity(
      [np.concatenate([p, g]) for p, g in zip(windows.prompts, generated)],
      decode=lambda ids: _strict_decode(enc, ids, is_drum, constraints))
  real_clips, real_s = continuation_clips(enc, windows, windows.real, is_drum)
  gen_clips, gen_s = continuation_clips(enc, windows, generated, is_drum)
  real = two_sample.clip_feature_matrix(real_clips, kind=kind, durations=real_s)
  gen = two_sample.clip_feature_matrix(gen_clips, kind=kind, durations=gen_s)
  t1 = time.perf_counter()
  result = two_sample.c2st(real.values, gen.values, real_groups=windows.pieces,
                           generated_groups=windows.pieces, feature_names=real.names,
                           n_folds=n_folds, seed=seed,
                           importance_repeats=importance_repeats)
  log(f"C2ST at {windows.length} tokens: {len(windows)} prompts from "
      f"{len(np.unique(windows.pieces))} pieces, sampled in {sample_s:.1f} s, classifiers "
      f"{time.perf_counter() - t1:.1f} s: " + ", ".join(
          f"{n} {100 * r['accuracy']:.1f}% ({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}%)"
          for n, r in result["classifiers"].items()))
  result.update({
      "prompt_tokens": windows.prompt_tokens, "continuation_tokens": windows.length,
      "n_windows": len(windows), "n_pieces": int(len(np.unique(windows.pieces))),
      "feature_kind": kind, "real_seconds_mean": float(real_s.mean()),
      "generated_seconds_mean": float(gen_s.mean()), "constrained_validity": validity,
      "context_tokens": int(cache_len or model.config.max_len), "sample_s": sample_s})
  return result


# ----------------------------------------------------------------------------- evaluate
def _prefix_length(enc, ids: np.ndarray) -> int:
  ids = np.asarray(ids)
  special = ids >= enc.bos_id
  return int(np.argmin(special)) if not special.all() else len(ids)


def resolve_sampling(config, temperature: Optional[float] = None,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     guidance: Optional[float] = None) -> dict:
  """temperature, top_k, top_p, guidance: each the argument when given, else the run's
  config.sample field, else 1.0 / 0 / 1.0 / 0 (sampling from the model as it is).

  Raises:
    MidijaxError: temperature < 0, top_k < 0, top_p outside (0, 1] or guidance < 0.
  """
  sample = config.get("sample") if hasattr(config, "get") else None
  sample = sample or {}
  pick = lambda v, name, d: v if v is not None else (
      sample.get(name) if sample.get(name) is not None else d)
  out = {"temperature": float(pick(temperature, "temperature", 1.0)),
         "top_k": int(pick(top_k, "top_k", 0)), "top_p": float(pick(top_p, "top_p", 1.0)),
         "guidance": float(pick(guidance, "guidance", 0.0))}
  if (out["temperature"] < 0 or out["top_k"] < 0 or not 0 < out["top_p"] <= 1
      or not 0 <= out["guidance"] < float("inf")):
    raise MidijaxError(f"sampling settings out of range: temperature {out['temperature']} "
                       f"(>= 0), top_k {out['top_k']} (>= 0), top_p {out['top_p']} (0 to 1], "
                       f"guidance {out['guidance']} (finite, >= 0)")
  return out


def evaluate_workdir(workdir, *, split: str = "test", num_samples: int = 64,
                     max_new_tokens: Optional[int] = None, step: Optional[int] = None,
                     best: bool = False, seed: int = 0, temperature: Optional[float] = None,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     guidance: Optional[float] = None,
                     data_dir: Optional[str] = None, out_dir=None,
                     c2st_prompts: int = C2ST_PROMPTS,
                     c2st_lengths: Sequence[int] = C2ST_LENGTHS,
                     c2st_prompt_tokens: int = C2ST_PROMPT_TOKENS,
                     c2st_folds: int = C2ST_FOLDS, c2st_features: str = "auto",
                     eval_context: Optional[int] = None, log=print) -> dict:
  """NLL on `split`, music statistics of samples vs real clips, grammar validity and the
  C2ST of continuations; writes `eval/<step>/metrics.json`, `metrics.md`, plots, and
  TensorBoard scalars.

  Music statistics: samples are conditioned on the prefixes (BOS + conditioning) of real
  clips of the split, and real clips are cut to the same number of event tokens.
  C2ST: for each length in `c2st_lengths`, up to `c2st_prompts` prompts of
  `c2st_prompt_tokens` event tokens (`prompt_windows`), a constrained continuation each
  (`continuation_c2st`); `c2st_prompts=0` or no lengths skips it.
  Sampling settings are the arguments when given, else the run's config.sample.
  NLL windows: `eval_context` tokens of context before each later window's targets when
  given, else the run's config.data.eval_context (`input_pipeline.eval_windows`).

  Every setting is checked, and every C2ST window counted, before anything is computed
  or written; the reports are written only at the end, each file through a rename.

  Returns:
    The metrics dict (as written to metrics.json).

  Raises:
    MidijaxError (one line): a missing run, bad settings, or a C2ST that cannot run
      (`check_c2st_windows`, `feature_kind`).
  """
  # pylint: disable=g-import-not-at-top
  from midijax import constraints, input_pipeline, runs, sampling
  model, enc, config, step = runs.load_run(workdir, step=step, best=best)
  if data_dir:
    config.data.data_dir = data_dir
  settings = resolve_sampling(config, temperature, top_k, top_p, guidance)
  context = generation.trained_context(config)
  workdir_p = ckpt_lib.workdir_path(workdir)
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(str(workdir_p / "eval" / str(step)))
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, split)
  if eval_context is not None:
    input_pipeline.eval_windows(store, config.data.seq_len, f"{spec.name} {split}",
                                eval_context, field="--eval_context")
    with config.unlocked():
      config.data.eval_context = int(eval_context)

  lengths = [int(n) for n in c2st_lengths] if c2st_prompts else []
  kind = None
  if lengths:
    kind = feature_kind(enc, is_drum, c2st_features)
    if c2st_prompt_tokens < 1 or min(lengths) < 1:
      raise MidijaxError("--c2st_prompt_tokens and --c2st_lengths must be at least 1")
    longest_prefix = int(store.prefix_lengths.max())
    if longest_prefix + c2st_prompt_tokens >= context:
      raise MidijaxError(
          f"--c2st_prompt_tokens {c2st_prompt_tokens}: prompts of {longest_prefix} + "
          f"{c2st_prompt_tokens} tokens do not fit the {context}-token context the model "
          "was trained on; give a shorter --c2st_prompt_tokens, or --c2st_prompts 0 to skip "
          "the C2ST")
    for n in lengths:
      check_c2st_windows(store, enc, split=split, prompt_tokens=c2st_prompt_tokens,
                         length=n, num_prompts=c2st_prompts, n_folds=c2st_folds)

  t0 = time.perf_counter()
  nll = split_nll(model, config, split)
  log(f"{split}: NLL {nll['nll_per_token']:.4f} nats/token, {nll['nll_per_note']:.4f} "
      f"nats/note, {nll['nll_per_second']:.3f} nats/s, perplexity {nll['perplexity']:.3f} "
      f"({nll['tokens']:,.0f} tokens, {time.perf_counter() - t0:.1f} s)")

  n_new = int(max_new_tokens or min(config.data.seq_len, config.model.max_len) - 8)
  pieces = [store.piece(i) for i in range(len(store))]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(pieces))[:num_samples]
  real, prompts = [], []
  for i in order:
    p = pieces[i]
    k = _prefix_length(enc, p)
    prompts.append(p[:k])
    real.append(enc.decode_notes(p[k:k + n_new], is_drum=is_drum))
  generated, unconstrained_ids = [], []
  by_len: dict = {}
  for j, pr in enumerate(prompts):
    by_len.setdefault(len(pr), []).append(j)
  t0 = time.perf_counter()
  for length, rows in sorted(by_len.items()):
    batch = np.stack([prompts[j] for j in rows]).astype(np.int32)
    for constrained in (True, False):
      res = sampling.sample_tokens(model, batch, encoding=enc, max_new_tokens=n_new, seed=seed,
                                   constrained=constrained, cache_len=context, **settings)
      for row in np.asarray(res["tokens"]):
        row = sampling.trim_sample(row, length)[length:]
        row = row[row != enc.eos_id]
        if constrained:
          generated.append(enc.decode_notes(row, is_drum=is_drum))
        else:
          unconstrained_ids.append(row)
  log(f"sampled {len(generated)} constrained + {len(unconstrained_ids)} unconstrained clips of "
      f"up to {n_new} tokens in {time.perf_counter() - t0:.1f} s")
  validity = music_stats.grammar_validity(
      unconstrained_ids, decode=lambda ids: _strict_decode(enc, ids, is_drum, constraints))
  comparison = music_stats.compare_sets(generated, real)
  examples = {f"generated_{i}": g for i, g in enumerate(generated[:2])}
  examples.update({f"real_{i}": r for i, r in enumerate(real[:2])})

  c2st = {}
  if lengths:
    meters = piece_meters(spec.version_dir, split)
    for n in lengths:
      windows = prompt_windows(store, enc, prompt_tokens=c2st_prompt_tokens, length=n,
                               max_windows=c2st_prompts, seed=seed, meters=meters)
      c2st[str(n)] = continuation_c2st(model, enc, windows, settings=settings,
                                          is_drum=is_drum, kind=kind, seed=seed,
                                          n_folds=c2st_folds, cache_len=context, log=log)
  extra = {"step": step, "split": split, "num_samples": len(generated),
           "tokens_per_clip": n_new, "nll": nll, "seed": seed, "context_tokens": context,
           **settings}
  reports.write_reports(out, comparison, validity=validity, extra=extra, examples=examples,
                        c2st=c2st or None)
  scalars = {f"eval_{split}/{k}": v for k, v in nll.items()}
  scalars[f"eval_{split}/unconstrained_validity"] = validity["rate"]
  scalars.update({f"eval_{split}/{k}": v for k, v in reports.flat_scalars(comparison).items()})
  for n, result in c2st.items():
    scalars.update(two_sample.c2st_scalars(result, prefix=f"eval_{split}/c2st_{n}"))
    scalars[f"eval_{split}/c2st_{n}/constrained_validity"] = float(
        result["constrained_validity"]["rate"])
  metric_writers.write_tensorboard_scalars(pathlib.Path(str(workdir_p / "tensorboard")),
                                           scalars, step)
  log(f"wrote {out}/metrics.json, metrics.md and plots")
  return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- continuation
def evaluate_continuation(workdir, *, data: Optional[str] = None, split: str = "test",
                          seq_len: Optional[int] = None, step: Optional[int] = None,
                          best: bool = False, data_dir: Optional[str] = None, out_dir=None,
                          log=print) -> dict:
  """NLL of continuation targets given their real prompts (`midijax evaluate --task
  continuation`).

  Every pair of the split (a dataset built with `prompt_bars`, e.g.
  groove/drums_continuation) is scored in one window: BOS + conditioning + the real
  prompt, given, then the target tokens, each scored given everything before it. Runs
  evaluated with the same `data`, `split` and `seq_len` score exactly the same tokens.

  Args:
    workdir: the run; step / best: its checkpoint (default the latest).
    data: "NAME/BUILDER_CONFIG" of the pairs (default: the run's own dataset).
    split: the split scored.
    seq_len: window length in tokens (default the model's max_len); target tokens past it
      are not scored and are counted as `cut_targets`.
    data_dir: TFDS data dir (default: the run's config.data.data_dir).
    out_dir: where continuation_<builder config>_<split>.json goes (default
      WORKDIR/eval/<step>/).

  Returns:
    The metrics: nll_per_token, nll_per_note, perplexity, accuracy, tokens (scored
    targets), notes, pairs, cut_targets, plus step, data, split and seq_len.

  Raises:
    MidijaxError: the dataset is not continuation pairs, uses another vocabulary than the
      run, or has a prompt longer than the window.
  """
  # pylint: disable=g-import-not-at-top
  from midijax import input_pipeline, runs
  from midijax.errors import MidijaxError
  model, enc, config, step = runs.load_run(workdir, step=step, best=best)
  config = config.copy_and_resolve_references()
  seq_len = int(seq_len or model.config.max_len)
  with config.unlocked():
    if data:
      name, _, builder_config = data.partition("/")
      config.data.name, config.data.builder_config = name, builder_config
    config.data.mixture = ()
    if data_dir:
      config.data.data_dir = data_dir
    config.data.seq_len = seq_len
  spec = input_pipeline.dataset_specs(config)[0]
  where = f"{spec.name}/{spec.builder_config}"
  data_enc = input_pipeline.load_encoding(spec.version_dir)
  if data_enc.vocab.names != enc.vocab.names:
    raise MidijaxError(f"{where}: its vocabulary ({data_enc.config}) is not the run's "
                       f"({enc.config}); evaluate on data of the run's encoding")
  store = input_pipeline.load_split(spec.version_dir, split)
  if not store.is_pair.any():
    raise MidijaxError(f"{where} {split}: not continuation pairs; build some with "
                       f"`midijax build-data groove --config drums_continuation` and pass "
                       f"--data groove/drums_continuation")
  if seq_len > model.config.max_len:
    raise MidijaxError(f"--seq_len {seq_len} is above the model's max_len "
                       f"{model.config.max_len}")
  input_pipeline.check_prompts_fit(store, seq_len, f"{where} {split}", field="--seq_len")
  t0 = time.perf_counter()
  nll = split_nll(model, config, split)
  iterator = input_pipeline.make_eval_iterator(config, split, process_index=0, process_count=1)
  metrics = {**nll, "pairs": int(store.is_pair.sum()), "cut_targets": iterator.num_cut_targets,
             "step": int(step), "data": where, "split": split, "seq_len": seq_len,
             "workdir": str(workdir)}
  log(f"{where} {split}: continuation NLL {nll['nll_per_token']:.4f} nats/token, "
      f"{nll['nll_per_note']:.4f} nats/note over {metrics['pairs']} prompts "
      f"({nll['tokens']:,.0f} target tokens scored, {metrics['cut_targets']:,} past the "
      f"{seq_len}-token window; {time.perf_counter() - t0:.1f} s)")
  workdir_p = ckpt_lib.workdir_path(workdir)
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(str(workdir_p / "eval" / str(step)))
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"continuation_{spec.builder_config}_{split}.json"
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(metrics, indent=1))
  tmp.replace(path)
  metric_writers.write_tensorboard_scalars(
      pathlib.Path(str(workdir_p / "tensorboard")),
      {f"continuation_{split}/{k}": v for k, v in nll.items()}, step)
  return metrics


def c2st_summary(metrics: Mapping) -> dict:
  """The headline C2ST numbers of a metrics.json document, per continuation length:
  {length: {"accuracy", "strongest", "ci_low", "ci_high", "n", "prompt_tokens",
  "classifiers": {name: accuracy}}} (empty when the evaluation ran no C2ST)."""
  out = {}
  for n, r in (metrics.get("c2st") or {}).items():
    best = r["classifiers"][r["strongest"]]
    out[n] = {"accuracy": r["accuracy"], "strongest": r["strongest"],
              "ci_low": best["ci_low"], "ci_high": best["ci_high"], "n": best["n"],
              "prompt_tokens": r.get("prompt_tokens"),
              "classifiers": {k: v["accuracy"] for k, v in r["classifiers"].items()}}
  return out
