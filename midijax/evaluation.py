"""Evaluating a trained run: `midijax evaluate --workdir RUN` (`evaluate_workdir`).

Held-out NLL per token and per note over a whole split, music statistics of generated clips
against real clips of the same split (`midijax.music_stats`), the share of unconstrained
samples that decode validly, written as reports (`midijax.reports`) and TensorBoard
scalars (`midijax.metric_writers`).
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Optional

import numpy as np

from midijax import checkpoint as ckpt_lib
from midijax import encoding
from midijax import metric_writers
from midijax import music_stats
from midijax import reports
from midijax.notes import Notes


def note_token_mask(enc, ids: np.ndarray) -> np.ndarray:
  """True where an id starts a note (NOTE_ON / DRUM hit): the unit of NLL per note."""
  names = np.array([n.startswith(("NOTE_ON_", "DRUM_")) for n in enc.vocab.names])
  return names[np.asarray(ids)]


def split_nll(model, config, split: str) -> dict:
  """Mean NLL per token (nats) and per note, perplexity and accuracy over a whole split,
  on the deterministic non-overlapping eval windows (same numbers on every run)."""
  from midijax import input_pipeline, losses  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.max_eval_batches = -1  # the whole split, always
  data = input_pipeline.DataSource(config)
  batches = list(data.eval_batches(split))
  summary = losses.score_batches(model, batches)
  notes = sum(float((note_token_mask(data.encoding, b["targets"]) * b["weights"]).sum())
              for b in batches)
  loss_sum = summary["loss"] * summary["tokens"]
  return {"nll_per_token": summary["loss"], "perplexity": summary["perplexity"],
          "accuracy": summary["accuracy"], "tokens": summary["tokens"], "notes": notes,
          "nll_per_note": loss_sum / max(notes, 1.0)}


def _prefix_length(enc, ids: np.ndarray) -> int:
  ids = np.asarray(ids)
  special = ids >= enc.bos_id
  return int(np.argmin(special)) if not special.all() else len(ids)


def _decode_clip(enc, ids, is_drum: bool) -> Notes:
  return enc.decode_notes(ids, is_drum=is_drum)


def evaluate_workdir(workdir, *, split: str = "test", num_samples: int = 64,
                     max_new_tokens: Optional[int] = None, step: Optional[int] = None,
                     best: bool = False, seed: int = 0, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, data_dir: Optional[str] = None,
                     out_dir=None, log=print) -> dict:
  """NLL on `split`, music statistics of samples vs real clips, grammar validity; writes
  `eval/<step>/metrics.json`, `metrics.md`, plots, and TensorBoard scalars.

  Samples are conditioned on the prefixes (BOS + conditioning) of real clips of the split,
  and real clips are cut to the same number of event tokens, so both sets are alike in
  length and conditions. Returns the metrics dict.
  """
  # pylint: disable=g-import-not-at-top
  from midijax import constraints, input_pipeline, runs, sampling
  model, enc, config, step = runs.load_run(workdir, step=step, best=best)
  if data_dir:
    config.data.data_dir = data_dir
  workdir_p = ckpt_lib.workdir_path(workdir)
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(str(workdir_p / "eval" / str(step)))
  out.mkdir(parents=True, exist_ok=True)
  is_drum = encoding.is_drum_music(enc, dataset=config.data.name)
  t0 = time.perf_counter()
  nll = split_nll(model, config, split)
  log(f"{split}: NLL {nll['nll_per_token']:.4f} nats/token, {nll['nll_per_note']:.4f} "
      f"nats/note, perplexity {nll['perplexity']:.3f} ({nll['tokens']:,.0f} tokens, "
      f"{time.perf_counter() - t0:.1f} s)")

  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, split)
  n_new = int(max_new_tokens or min(config.data.seq_len, config.model.max_len) - 8)
  pieces = [store.piece(i) for i in range(len(store))]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(pieces))[:num_samples]
  real, prompts = [], []
  for i in order:
    p = pieces[i]
    k = _prefix_length(enc, p)
    prompts.append(p[:k])
    real.append(_decode_clip(enc, p[k:k + n_new], is_drum))
  generated, unconstrained_ids = [], []
  by_len: dict = {}
  for j, pr in enumerate(prompts):
    by_len.setdefault(len(pr), []).append(j)
  t0 = time.perf_counter()
  for length, rows in sorted(by_len.items()):
    batch = np.stack([prompts[j] for j in rows]).astype(np.int32)
    for constrained in (True, False):
      res = sampling.sample_tokens(model, batch, encoding=enc, max_new_tokens=n_new, seed=seed,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   constrained=constrained)
      toks = np.asarray(res["tokens"])[:, length:]
      for row in toks:
        row = row[:np.argmax(row == enc.eos_id)] if (row == enc.eos_id).any() else row
        row = row[row != enc.pad_id]
        if constrained:
          generated.append(_decode_clip(enc, row, is_drum))
        else:
          unconstrained_ids.append(row)
  log(f"sampled {len(generated)} constrained + {len(unconstrained_ids)} unconstrained clips of "
      f"up to {n_new} tokens in {time.perf_counter() - t0:.1f} s")
  validity = music_stats.grammar_validity(
      unconstrained_ids, decode=lambda ids: _strict_decode(enc, ids, is_drum, constraints))
  comparison = music_stats.compare_sets(generated, real)
  examples = {f"generated_{i}": g for i, g in enumerate(generated[:2])}
  examples.update({f"real_{i}": r for i, r in enumerate(real[:2])})
  extra = {"step": step, "split": split, "num_samples": len(generated),
           "tokens_per_clip": n_new, "nll": nll, "seed": seed, "temperature": temperature,
           "top_k": top_k, "top_p": top_p}
  reports.write_reports(out, comparison, validity=validity, extra=extra, examples=examples)
  scalars = {f"eval_{split}/{k}": v for k, v in nll.items()}
  scalars[f"eval_{split}/unconstrained_validity"] = validity["rate"]
  scalars.update({f"eval_{split}/{k}": v for k, v in reports.flat_scalars(comparison).items()})
  metric_writers.write_tensorboard_scalars(pathlib.Path(str(workdir_p / "tensorboard")),
                                           scalars, step)
  log(f"wrote {out}/metrics.json, metrics.md and plots")
  return json.loads((out / "metrics.json").read_text())


def _strict_decode(enc, ids, is_drum, constraints):
  """Decodes ids, raising when they break the encoding's grammar (invalid for the record)."""
  bad = int(constraints.grammar_violations(np.asarray(ids, np.int32), enc))
  if bad:
    raise GrammarViolation(f"{bad} tokens break the {enc.name} grammar")
  return _decode_clip(enc, ids, is_drum)


class GrammarViolation(ValueError):
  pass


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
