"""The `midijax` command: a thin layer over the library's functions.

    midijax midi2tokens IN.mid OUT.txt [--encoding performance|drums|triples] [--ids]
    midijax tokens2midi IN.txt OUT.mid [--encoding ...] [--tempo 120] [--lenient]
    midijax encodings

Errors caused by input (a bad file, flag or config) print one line naming the file or field
and exit with status 2; nothing already written is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Callable, Dict, List, Optional

from midijax import process_env
from midijax.errors import MidijaxError

COMMANDS: Dict[str, Callable] = {}


def command(name: str, help: str):
  """Registers `fn(subparsers) -> parser` building the sub-command `name`."""
  def wrap(fn):
    COMMANDS[name] = (fn, help)
    return fn
  return wrap


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokens
HEADER = "# midijax encoding={enc} is_drum={drum} ticks_per_quarter={tpq} qpm={qpm:g}\n"


def _parse_header(text: str) -> dict:
  first = text.split("\n", 1)[0]
  if not first.startswith("# midijax "):
    return {}
  out = {}
  for part in first[len("# midijax "):].split():
    if "=" in part:
      k, v = part.split("=", 1)
      out[k] = v
  return out


@command("midi2tokens", "MIDI file -> token file (names one a line, or ids)")
def _midi2tokens_parser(sub):
  p = sub.add_parser("midi2tokens", help="MIDI file -> token file (names one a line, or ids)",
                     description="Reads a .mid/.midi file and writes its tokens, one a line.")
  p.add_argument("input", help="MIDI file (.mid or .midi)")
  p.add_argument("output", help="token text file to write")
  p.add_argument("--encoding", default="performance", choices=["performance", "drums", "triples"],
                 help="token encoding (see `midijax encodings`); default performance")
  p.add_argument("--ids", action="store_true", help="write integer ids instead of token names")
  p.add_argument("--sustain", action="store_true",
                 help="apply the sustain pedal (CC 64) before encoding, as for piano")
  p.add_argument("--reader", default="symusic", choices=["symusic", "note_seq"],
                 help="MIDI parser: symusic (fast, default) or note_seq (reference)")
  p.add_argument("--no_header", action="store_true",
                 help="omit the '# midijax ...' first line (encoding, drum flag, tempo)")
  p.set_defaults(func=run_midi2tokens)


def run_midi2tokens(args) -> int:
  from midijax import encoding, midi_io
  enc = encoding.get(args.encoding)
  notes = midi_io.read_notes(args.input, reader=args.reader, sustain=args.sustain)
  if args.ids:
    body = "".join(f"{i}\n" for i in enc.encode(notes).tolist())
  else:
    body = enc.notes_to_text(notes)
  drum = int(bool(len(notes)) and bool(notes.is_drum.all()))
  header = "" if args.no_header else HEADER.format(enc=enc.name, drum=drum,
                                                   tpq=notes.ticks_per_quarter, qpm=notes.qpm)
  out = pathlib.Path(args.output)
  _atomic_write_text(out, header + body)
  print(f"{args.input}: {len(notes)} notes -> {len(body.splitlines())} {enc.name} tokens -> {out}")
  return 0


@command("tokens2midi", "token file -> MIDI file (written by note-seq)")
def _tokens2midi_parser(sub):
  p = sub.add_parser("tokens2midi", help="token file -> MIDI file (written by note-seq)",
                     description="Reads token names or ids (one a line) and writes a MIDI file.")
  p.add_argument("input", help="token text file (names or integer ids, one a line)")
  p.add_argument("output", help="MIDI file to write")
  p.add_argument("--encoding", default=None, choices=["performance", "drums", "triples"],
                 help="token encoding; default: from the file's header, else performance")
  p.add_argument("--tempo", type=float, default=None,
                 help="tempo in quarter notes per minute for the MIDI file (and for triples' "
                      "ticks); default: from the header, else 120")
  p.add_argument("--ticks_per_quarter", type=int, default=None,
                 help="resolution of triples' POSITION/DURATION ticks; default header or 480")
  p.add_argument("--drums", choices=["auto", "yes", "no"], default="auto",
                 help="write notes on the drum channel; auto: from the header / encoding")
  p.add_argument("--lenient", action="store_true",
                 help="skip invalid tokens (and count them) instead of failing on the first")
  p.set_defaults(func=run_tokens2midi)


def run_tokens2midi(args) -> int:
  from midijax import encoding, midi_io
  path = pathlib.Path(args.input)
  if not path.is_file():
    raise MidijaxError(f"{path}: token file not found")
  text = path.read_text()
  header = _parse_header(text)
  name = args.encoding or header.get("encoding", "performance")
  enc = encoding.get(name)
  qpm = args.tempo or float(header.get("qpm", 120.0))
  tpq = args.ticks_per_quarter or int(header.get("ticks_per_quarter", 480))
  if args.drums == "auto":
    is_drum = name == "drums" or header.get("is_drum") == "1"
  else:
    is_drum = args.drums == "yes"
  stats: dict = {}
  try:
    notes = enc.text_to_notes(text, lenient=args.lenient, stats=stats, qpm=qpm,
                              ticks_per_quarter=tpq, is_drum=is_drum)
  except MidijaxError as e:
    raise MidijaxError(f"{path}: {e}") from None
  out = midi_io.write_midi(notes, args.output)
  skipped = stats.get("skipped", 0)
  print(f"{path}: {len(notes)} notes -> {out}" + (f" ({skipped} invalid tokens skipped)"
                                                  if skipped else ""))
  return 0


@command("encodings", "list the encodings, vocabulary sizes and what each keeps")
def _encodings_parser(sub):
  p = sub.add_parser("encodings", help="list the encodings, vocabulary sizes and what each keeps")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.set_defaults(func=run_encodings)


def run_encodings(args) -> int:
  from midijax import encoding
  rows = [encoding.get(n).describe() for n in encoding.ENCODINGS]
  if args.json:
    print(json.dumps(rows, indent=1))
    return 0
  print(f"{'encoding':<12} {'vocab':>5} {'events':>6}  keeps")
  for r in rows:
    print(f"{r['name']:<12} {r['vocab_size']:>5} {r['event_tokens']:>6}  {r['keeps']}")
  return 0


# ----------------------------------------------------------------------------- sampling
# Conditioning flags -> conditioning kinds (midijax.encoding.CONDITIONING); --bpm is binned.
CONDITION_FLAGS = {"style": "style", "bpm": "tempo", "type": "type", "meter": "meter",
                   "family": "family", "dataset": "dataset"}


def _add_sampling_flags(p, num_samples: int, seconds: Optional[float]) -> None:
  """Flags shared by `generate` and `continue`."""
  p.add_argument("--workdir", required=True,
                 help="training run folder (config.json, vocab.json, checkpoints/)")
  which = p.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None,
                     help="checkpoint step to load (default: the latest)")
  which.add_argument("--best", action="store_true",
                     help="load the checkpoint with the lowest validation loss")
  p.add_argument("--num_samples", type=int, default=num_samples,
                 help=f"samples, drawn as one batch (default {num_samples})")
  p.add_argument("--max_tokens", type=int, default=None,
                 help="new tokens per sample at most (default: the run's "
                      "config.sample.max_new_tokens, else 512)")
  p.add_argument("--temperature", type=float, default=None,
                 help="softmax temperature, 0 = greedy (default: config.sample, else 1.0)")
  p.add_argument("--top_k", type=int, default=None,
                 help="sample among the k most likely tokens, 0 = all (default: config.sample)")
  p.add_argument("--top_p", type=float, default=None,
                 help="nucleus sampling probability, 1 = off (default: config.sample)")
  p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same samples")
  p.add_argument("--seconds", type=float, default=seconds,
                 help="seconds of new music per sample at most" +
                      (f" (default {seconds:g})" if seconds else " (default: no limit)"))
  p.add_argument("--out", default=None, help="output folder (default: WORKDIR/samples)")
  cond = p.add_argument_group("conditioning (where the training data stored it)")
  cond.add_argument("--style", help="Groove style, e.g. funk, rock, jazz")
  cond.add_argument("--bpm", type=float, help="tempo in beats per minute (binned), e.g. 100")
  cond.add_argument("--type", help="beat or fill (Groove)")
  cond.add_argument("--meter", help="time signature, e.g. 4-4, 3-4, 6-8")
  cond.add_argument("--family", help="General MIDI instrument family, e.g. piano, drums")
  cond.add_argument("--dataset", help="source dataset of a mixture, e.g. groove, maestro")
  p.add_argument("--unconstrained", action="store_true",
                 help="sample without the encoding's grammar mask (counts violations)")
  p.add_argument("--context", type=int, default=None,
                 help="tokens of context before the window slides (default: the model's max_len)")
  p.add_argument("--window_keep", type=int, default=None,
                 help="recent tokens kept when the window slides (default: half the context)")
  p.add_argument("--kv_cache", choices=("model", "int8"), default=None,
                 help="key/value cache storage: the model's dtype (exact), or int8 with a "
                      "scale per vector (a quarter of float32's bytes: faster large batches "
                      "on CPU; default: config.sample.kv_cache, else model)")


@command("generate", "sample new pieces from a trained model (MIDI + token files)")
def _generate_parser(sub):
  p = sub.add_parser(
      "generate", help="sample new pieces from a trained model (MIDI + token files)",
      description="Samples pieces from a trained run and writes, per sample, a MIDI file "
                  "(note-seq) and its tokens, plus generate.json (settings, checkpoint, "
                  "timing). The course project's form `midijax generate LENGTH [TEMPERATURE] "
                  "[TOP_K] --workdir RUN` works too.")
  p.add_argument("length", nargs="?", type=int, default=None, metavar="LENGTH",
                 help="new tokens per sample (same as --max_tokens)")
  p.add_argument("pos_temperature", nargs="?", type=float, default=None, metavar="TEMPERATURE",
                 help="same as --temperature")
  p.add_argument("pos_top_k", nargs="?", type=int, default=None, metavar="TOP_K",
                 help="same as --top_k")
  _add_sampling_flags(p, num_samples=8, seconds=None)
  p.set_defaults(func=run_generate)


@command("continue", "continue the start of a MIDI file (a drum groove, a piano opening)")
def _continue_parser(sub):
  p = sub.add_parser(
      "continue", help="continue the start of a MIDI file (a drum groove, a piano opening)",
      description="Encodes the first seconds or bars of a MIDI file, samples continuations "
                  "and writes per sample prompt+continuation and the continuation alone as "
                  "MIDI, plus prompt.mid, the tokens and continue.json.")
  p.add_argument("--prompt", required=True, help="MIDI file to continue")
  cut = p.add_mutually_exclusive_group()
  cut.add_argument("--prompt_seconds", type=float, default=None,
                   help="use the first S seconds of the file as the prompt")
  cut.add_argument("--prompt_bars", type=float, default=None,
                   help="use the first N bars (file's tempo and meter; default 2)")
  _add_sampling_flags(p, num_samples=4, seconds=8.0)
  p.set_defaults(func=run_continue)


def _pick(name: str, flag_name: str, flag, positional, config, default):
  """A sampling setting: the flag, the course-style positional, config.sample.NAME, the
  default."""
  if flag is not None and positional is not None and flag != positional:
    raise MidijaxError(f"{flag_name} given twice: {positional} (positional) and "
                       f"--{flag_name} {flag}")
  for value in (flag, positional):
    if value is not None:
      return value
  sample = config.get("sample") if hasattr(config, "get") else None
  if sample is not None and sample.get(name) is not None:
    return sample.get(name)
  return default


def _use_compilation_cache() -> None:
  """Keeps compiled samplers on disk (~/.cache/midijax/jax) unless the user chose a place:
  compiling takes longer than sampling a few pieces, and a second run reuses it."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "midijax", "jax"))


def _sampling_setup(args, positional=(None, None, None)):
  """Loads the run and resolves the settings.

  Returns:
    (model, encoding, config, checkpoint step, mesh, logical axis rules, settings dict).
  """
  _use_compilation_cache()
  from midijax import sampling, sharding, train
  import ml_collections
  mesh = sharding.create_mesh(ml_collections.ConfigDict(
      {"ici_parallelism": (-1, 1, 1), "dcn_parallelism": (1, 1, 1)}))
  try:
    model, enc, config, step = train.load_run(args.workdir, step=args.step, best=args.best,
                                              mesh=mesh)
  except MidijaxError:
    raise
  except Exception as e:  # orbax / JSON errors of a damaged workdir: one line, no traceback
    raise MidijaxError(f"{args.workdir}: cannot load the run ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
  rules = sharding.get_logical_axis_rules(config.get("mesh")) \
      or sharding.DEFAULT_LOGICAL_AXIS_RULES
  length, temperature, top_k = positional
  settings = {
      "num_samples": args.num_samples,
      "max_new_tokens": int(_pick("max_new_tokens", "max_tokens", args.max_tokens, length,
                                  config, 512)),
      "temperature": float(_pick("temperature", "temperature", args.temperature, temperature,
                                 config, 1.0)),
      "top_k": int(_pick("top_k", "top_k", args.top_k, top_k, config, 0)),
      "top_p": float(_pick("top_p", "top_p", args.top_p, None, config, 1.0)),
      "seed": args.seed, "max_seconds": args.seconds,
      "constrained": not args.unconstrained, "cache_len": args.context,
      "window_keep": args.window_keep,
      "kv_cache": str(_pick("kv_cache", "kv_cache", args.kv_cache, None, config, "model")),
  }
  if settings["num_samples"] < 1 or settings["max_new_tokens"] < 1:
    raise MidijaxError("--num_samples and the token count must be at least 1")
  if settings["temperature"] < 0 or not 0 < settings["top_p"] <= 1 or settings["top_k"] < 0:
    raise MidijaxError("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
  conditions = {kind: getattr(args, flag) for flag, kind in CONDITION_FLAGS.items()
                if getattr(args, flag) is not None}
  if "tempo" in conditions:
    conditions["tempo"] = f"{conditions['tempo']:g}"
  for kind, value in conditions.items():
    enc.condition_id(kind, value)  # an unknown value lists the valid ones
  settings["conditions"] = sampling.ordered_conditions(conditions)
  return model, enc, config, step, mesh, rules, settings


def _tokens_text(enc, ids, is_drum: bool, qpm: float) -> str:
  """Token names one a line, under the header `midijax tokens2midi` reads."""
  from midijax.encoding.base import Encoding
  header = HEADER.format(enc=enc.name, drum=int(is_drum), tpq=480, qpm=qpm)
  return header + Encoding.to_text(enc, ids)  # names, also for triples (not course text)


def _sample_record(ids, notes, result, i: int, files: dict) -> dict:
  """One sample's entry in generate.json / continue.json."""
  return {**files, "tokens": int(len(ids)), "new_tokens": int(len(ids) - result.prompt_length),
          "notes": len(notes), "music_seconds": round(notes.total_time, 3),
          "stop_reason": result.stop_reasons[i]}


def run_generate(args) -> int:
  import numpy as np
  from midijax import midi_io, sampling
  from midijax.encoding import grammar
  model, enc, config, step, mesh, rules, s = _sampling_setup(
      args, (args.length, args.pos_temperature, args.pos_top_k))
  qpm = float(args.bpm or 120.0)
  data = config.get("data") or {}
  is_drum = (enc.name == "drums" or data.get("name") == "groove"
             or s["conditions"].get("family") == "drums")
  result = sampling.generate(
      model, enc, num_samples=s["num_samples"], max_new_tokens=s["max_new_tokens"],
      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
      conditions=s["conditions"], max_seconds=s["max_seconds"], constrained=s["constrained"],
      window_keep=s["window_keep"], cache_len=s["cache_len"], qpm=qpm,
      kv_cache=s["kv_cache"], mesh=mesh, rules=rules)
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "samples")
  violations = (grammar.grammar_violations(result.tokens, enc, model.config.padded_vocab_size)
                if not s["constrained"] else np.zeros(len(result.tokens), np.int64))
  samples = []
  for i, ids in enumerate(result.tokens):
    notes = enc.decode_notes(ids, is_drum=is_drum, qpm=qpm)
    midi, text = out / f"sample_{i:02d}.mid", out / f"sample_{i:02d}.txt"
    midi_io.write_midi(notes, midi)
    _atomic_write_text(text, _tokens_text(enc, ids, is_drum, qpm))
    samples.append({**_sample_record(ids, notes, result, i,
                                     {"midi": midi.name, "tokens_file": text.name}),
                    "grammar_violations": int(violations[i])})
  report = {"command": "generate", "workdir": str(pathlib.Path(args.workdir).absolute()),
            "checkpoint_step": int(step), "encoding": enc.config, "is_drum": is_drum,
            "qpm": qpm, "settings": s, "timing": result.timing, "samples": samples}
  _atomic_write_text(out / "generate.json", json.dumps(report, indent=1, default=str))
  t = result.timing
  print(f"{len(samples)} samples from {args.workdir} step {step} -> {out} "
        f"({t['new_tokens']} tokens in {t['sample_s']:.2f} s, {t['tokens_per_s']:,.0f} tokens/s; "
        f"compile {t['compile_s']:.1f} s)")
  return 0


def run_continue(args) -> int:
  from midijax import midi_io, sampling
  model, enc, config, step, mesh, rules, s = _sampling_setup(args)
  # The drummer's-first-two-bars use case: 2 bars unless told otherwise.
  bars = None if args.prompt_seconds is not None else (
      args.prompt_bars if args.prompt_bars is not None else 2.0)
  cont = sampling.continue_midi(
      model, enc, args.prompt, prompt_seconds=args.prompt_seconds, prompt_bars=bars,
      seconds=s["max_seconds"], max_new_tokens=args.max_tokens, num_samples=s["num_samples"],
      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
      conditions=s["conditions"], constrained=s["constrained"], window_keep=s["window_keep"],
      cache_len=s["cache_len"], kv_cache=s["kv_cache"], mesh=mesh, rules=rules)
  result = cont.result
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "samples")
  midi_io.write_midi(cont.prompt, out / "prompt.mid")
  samples = []
  for i, ids in enumerate(result.tokens):
    full, alone = out / f"sample_{i:02d}_full.mid", out / f"sample_{i:02d}_continuation.mid"
    text = out / f"sample_{i:02d}.txt"
    midi_io.write_midi(cont.full[i], full)
    midi_io.write_midi(cont.continuation[i], alone)
    _atomic_write_text(text, _tokens_text(enc, ids, cont.is_drum, cont.qpm))
    samples.append(_sample_record(ids, cont.continuation[i], result, i, {
        "full_midi": full.name, "continuation_midi": alone.name, "tokens_file": text.name}))
  settings = {**s, "max_new_tokens": args.max_tokens,
              "prompt": str(args.prompt), "prompt_seconds": cont.prompt_seconds,
              "prompt_bars": bars, "prompt_tokens": result.prompt_length}
  report = {"command": "continue", "workdir": str(pathlib.Path(args.workdir).absolute()),
            "checkpoint_step": int(step), "encoding": enc.config, "is_drum": cont.is_drum,
            "qpm": cont.qpm, "settings": settings, "timing": result.timing, "samples": samples}
  _atomic_write_text(out / "continue.json", json.dumps(report, indent=1, default=str))
  t = result.timing
  print(f"{args.prompt}: {cont.prompt_seconds:.2f} s prompt ({result.prompt_length} tokens), "
        f"{len(samples)} continuations from step {step} -> {out} ({t['new_tokens']} tokens in "
        f"{t['sample_s']:.2f} s; compile {t['compile_s']:.1f} s)")
  return 0


# ----------------------------------------------------------------------------- datasets
@command("build-data", "tokenize MIDI into sharded TFRecords (TFDS builders)")
def _build_data_parser(sub):
  p = sub.add_parser(
      "build-data", help="tokenize MIDI into sharded TFRecords (TFDS builders)",
      description="Builds a TFDS dataset (TFRecord shards, dataset_info.json, vocab.json and a "
                  "report of skipped files) with the builders in data_pipelines/.")
  p.add_argument("name", choices=["groove", "piano", "midi_folder"], help="builder")
  p.add_argument("--config", default=None,
                 help="builder config (groove: drums | drums_2bar | drums_4bar | performance | "
                      "triples ...; piano: performance | triples ...); default: the first")
  p.add_argument("--manual_dir", default=None,
                 help="an extracted copy of the data (groove/: info.csv + drummerN/; piano: a "
                      "MAESTRO-layout folder with its CSV; midi_folder: any folder of .mid/.midi)")
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir to write to; default TFDS's own ($TFDS_DATA_DIR or "
                      "~/tensorflow_datasets). Training reads it via config.data.data_dir")
  p.add_argument("--num_shards", type=int, default=None, help="TFRecord shards per split")
  p.add_argument("--num_workers", type=int, default=None, help="tokenizing processes (all cores)")
  p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
  p.set_defaults(func=run_build_data)


def run_build_data(args) -> int:
  import data_pipelines
  builder = data_pipelines.build(args.name, args.config, manual_dir=args.manual_dir,
                                 data_dir=args.data_dir, num_shards=args.num_shards,
                                 num_workers=args.num_workers, overwrite=args.overwrite)
  info = builder.info
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in info.splits.items())
  print(f"{args.name}/{builder.builder_config.name}: {splits} -> {builder.data_dir}")
  return 0


# ----------------------------------------------------------------------------- evidence
@command("evaluate", "held-out NLL, music statistics of samples vs real clips, validity")
def _evaluate_parser(sub):
  p = sub.add_parser(
      "evaluate", help="held-out NLL, music statistics of samples vs real clips, validity",
      description="Writes WORKDIR/eval/<step>/metrics.json, metrics.md and PNG plots, and "
                  "TensorBoard scalars: NLL per token and per note on the whole split, "
                  "Yang & Lerch (2020) feature distances (OA, KL) of generated vs real clips, "
                  "and the share of unconstrained samples that decode validly.")
  p.add_argument("--workdir", required=True, help="a trained run folder")
  p.add_argument("--split", default="test", help="held-out split (default test)")
  p.add_argument("--num_samples", type=int, default=64, help="generated (and real) clips")
  p.add_argument("--max_tokens", type=int, default=None,
                 help="tokens per clip (default: the training sequence length)")
  step = p.add_mutually_exclusive_group()
  step.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  step.add_argument("--best", action="store_true", help="the best checkpoint by validation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: the run's)")
  p.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/<step>)")
  p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
  from midijax import evaluation
  evaluation.evaluate_workdir(args.workdir, split=args.split, num_samples=args.num_samples,
                              max_new_tokens=args.max_tokens, step=args.step, best=args.best,
                              seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, data_dir=args.data_dir, out_dir=args.out)
  return 0


@command("export-listening", "blinded listening test: audio, rating page, key")
def _export_parser(sub):
  p = sub.add_parser(
      "export-listening", help="blinded listening test: audio, rating page, key",
      description="Renders free samples and prompted continuations of each run, and real "
                  "clips of the same length, to loudness-matched audio (FluidSynth, GM "
                  "soundfont); writes DIR/rater/index.html (a static rating page), the key "
                  "DIR/key.csv (never linked from the page), MIDI, piano rolls, manifest.json.")
  p.add_argument("--run", action="append", required=True, metavar="NAME=WORKDIR",
                 help="a run to include (repeat for several)")
  p.add_argument("--real", default="test", metavar="SPLIT", help="split of the real clips")
  p.add_argument("--num_clips", type=int, default=20, help="real pieces used (per condition)")
  p.add_argument("--seconds", type=float, default=20.0, help="length of every rated clip")
  p.add_argument("--prompt_seconds", type=float, default=None,
                 help="prompt length for continuations (default seconds / 4)")
  p.add_argument("--mode", choices=["free", "continuation", "both"], default="both")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: the runs')")
  p.add_argument("--out", required=True, help="output folder")
  p.set_defaults(func=run_export_listening)


def run_export_listening(args) -> int:
  from midijax import export
  runs = {}
  for item in args.run:
    if "=" not in item:
      raise MidijaxError(f"--run {item!r}: expected NAME=WORKDIR")
    name, workdir = item.split("=", 1)
    runs[name] = workdir
  try:
    clips = export.clips_from_runs(runs, real_split=args.real, num_clips=args.num_clips,
                                   seconds=args.seconds, prompt_seconds=args.prompt_seconds,
                                   mode=args.mode, seed=args.seed,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, data_dir=args.data_dir)
    settings = {"runs": runs, "real_split": args.real, "mode": args.mode,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    export.export_listening(clips, args.out, seconds=args.seconds, seed=args.seed)
  except (ValueError, RuntimeError) as e:
    raise MidijaxError(str(e)) from None
  # Record how the clips were made, so the study can be reproduced.
  manifest_path = pathlib.Path(args.out) / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest["generation"] = {**settings, "num_clips": args.num_clips, "seconds": args.seconds,
                            "prompt_seconds": args.prompt_seconds, "seed": args.seed}
  manifest_path.write_text(json.dumps(manifest, indent=1))
  print(f"{args.out}: {len(clips)} clips; send {args.out}/rater/ to raters, keep key.csv apart")
  return 0


@command("listening-results", "join rater CSVs with the key: MOS with 95%% CIs, preferences")
def _results_parser(sub):
  p = sub.add_parser("listening-results",
                     help="join rater CSVs with the key: MOS with 95%% CIs, preferences")
  p.add_argument("csv", nargs="+", help="answer CSVs downloaded from the rating page")
  p.add_argument("--key", required=True, help="the export's key.csv")
  p.add_argument("--plot", default=None, help="PNG to write (default beside the key)")
  p.set_defaults(func=run_listening_results)


def run_listening_results(args) -> int:
  from midijax import export
  for path in args.csv + [args.key]:
    if not pathlib.Path(path).is_file():
      raise MidijaxError(f"{path}: file not found")
  plot = args.plot or str(pathlib.Path(args.key).with_name("results.png"))
  try:
    results = export.listening_results(args.csv, args.key, plot_path=plot)
  except (ValueError, KeyError) as e:
    raise MidijaxError(str(e)) from None
  print(export.format_listening_results(results))
  print(f"plot: {plot}")
  return 0


def run_compile(argv: List[str]) -> int:
  """`midijax compile`: ahead-of-time compile check (midijax/aot.py)."""
  from midijax import aot
  return aot.main(argv)


# ----------------------------------------------------------------------------- training
TRAIN_USAGE = """usage: midijax train --config=configs/NAME.py --workdir=DIR [--config.FIELD=VALUE ...]

Trains (or resumes) the model a config file describes, checkpointing into DIR.

  --config          an ml-collections config file (see configs/); any field may be
                    overridden, e.g. --config.train.num_steps=200 --config.data.batch_size=16
                    (unknown fields are rejected)
  --workdir         run folder: checkpoints/, metrics.jsonl, tensorboard/, loss.png,
                    config.json; a workdir with checkpoints resumes from the latest
  --coordinator_address, --num_processes, --process_id
                    multi-host start-up (jax.distributed); also read from
                    MIDIJAX_COORDINATOR_ADDRESS / MIDIJAX_NUM_PROCESSES / MIDIJAX_PROCESS_ID
"""


def run_train(argv: List[str]) -> int:
  """`midijax train`: absl flags + ml_collections.config_flags, as Flax's examples do."""
  if not argv or any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(TRAIN_USAGE)
    return 0 if argv else 2
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=["midijax train"] + argv)
  flags.DEFINE_string("workdir", None, "run folder", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
  try:
    fv(["midijax train"] + argv)
    config = fv.config  # config files load lazily: surface their errors here
    if config is not None:
      config.to_dict()
  except OSError as e:
    first = str(e).splitlines()
    raise MidijaxError("cannot load the config file: " + " ".join(
        line.strip() for line in first[-2:])) from None
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    override = next((a.split("=")[0] for a in argv if a.startswith("--config.")), "")
    hint = f" (check {override}: unknown config fields are rejected)" if "KeyError" in repr(
        e) or isinstance(e, KeyError) or "'" in str(e)[:2] else ""
    raise MidijaxError(f"bad flags: {e}{hint}\n{TRAIN_USAGE}") from None
  if config is None or not fv.workdir:
    raise MidijaxError("--config and --workdir are required\n" + TRAIN_USAGE)
  from midijax import sharding, train
  sharding.maybe_initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
  train.train_and_evaluate(config, fv.workdir)
  return 0


# ----------------------------------------------------------------------------- entry point
# Commands whose flags absl parses (ml_collections config overrides).
ABSL_COMMANDS = {"train": run_train, "compile": run_compile}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="midijax",
      description="midijax: train and sample Transformer models of MIDI music with JAX.",
      epilog="train: midijax train --config=configs/NAME.py --workdir=DIR "
             "(see `midijax train --help`)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  sub.add_parser("train", help="train or resume a model from a config file (absl flags; "
                               "`midijax train --help`)")
  sub.add_parser("compile", help="ahead-of-time compile the train step for a topology and "
                                 "report per-device memory (`midijax compile --help`)")
  for fn, _ in COMMANDS.values():
    fn(sub)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  process_env.configure()  # Quiet stderr: set before TensorFlow or JAX loads.
  if argv is None:  # the `midijax` command itself (not a call from Python): see allocator.py
    from midijax import allocator
    allocator.reexec_with_tcmalloc()
  # TensorFlow (used by tf.data) logs C++ start-up chatter unless told otherwise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ABSL_COMMANDS:
    name = argv[0]
    try:
      return ABSL_COMMANDS[name](argv[1:])
    except MidijaxError as e:
      print(f"midijax {name}: error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print(f"midijax {name}: interrupted", file=sys.stderr)
      return 130
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except MidijaxError as e:
    print(f"midijax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"midijax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
