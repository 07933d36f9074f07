"""The `midijax` command: one argparse parser over the library's functions.

    midijax train --config=configs/NAME.py --workdir=DIR [--config.FIELD=VALUE ...]
    midijax reproduce RUN --workdir NEW
    midijax compare-runs RUN1 RUN2 ... [--out curves.png]
    midijax compile --config=configs/NAME.py [--topology=cpu:8|tpu:v4-8|local] [--json]
    midijax build-data groove|piano|midi_folder --manual_dir DIR [--data_dir DIR]
    midijax generate [LENGTH [TEMPERATURE [TOP_K]]] --workdir RUN [--style funk ...]
    midijax continue --workdir RUN --prompt FILE.mid [--prompt_bars 2 | --prompt_seconds S]
    midijax evaluate --workdir RUN [--split test] [--num_samples 64]
    midijax evaluate --workdir RUN --task continuation [--data groove/drums_continuation]
    midijax export --workdir RUN [--best] --out NEW
    midijax export-listening --run NAME=RUN [--run ...] --out DIR
    midijax listening-results ANSWERS.csv ... --key DIR/key.csv
    midijax midi2tokens IN.mid OUT.txt [--encoding performance|drums|triples] [--ids]
    midijax tokens2midi IN.txt OUT.mid [--encoding ...] [--tempo 120] [--lenient]
    midijax encodings [--json]

`midijax --help` lists every command with its flags; `midijax COMMAND --help` explains
them. `train` and `compile` read an ml_collections config file whose fields any
`--config.FIELD=VALUE` flag overrides (`load_config`).

Each command parses its flags and calls library functions; heavy modules (JAX,
TensorFlow, note-seq) are imported inside the commands that need them, so `--help`,
`encodings`, `midi2tokens` and `tokens2midi` start in well under a second. Errors caused by
input (a bad file, flag or config) print one line naming the file or field and exit with
status 2; nothing already written is touched.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from midijax import process_env
from midijax.errors import ConfigError, MidijaxError

# Sub-command name -> (one-line help, description, add_flags(parser)).
COMMANDS: Dict[str, Tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {}
# Commands that run JAX (or TensorFlow's input pipeline): they re-execute under tcmalloc.
COMPUTE_COMMANDS = ("train", "compile", "build-data", "generate", "continue", "evaluate",
                    "export-listening", "reproduce", "export")
# Commands whose config file takes --config.FIELD=VALUE overrides.
CONFIG_COMMANDS = ("train", "compile")
OVERRIDE_PREFIX = "--config."


def command(name: str, help: str, description: str = ""):
  """Registers `add_flags(parser)`: it adds the flags of sub-command `name` and sets
  `func` (the function the command runs). `help` is its line in `midijax --help`."""
  def wrap(add_flags):
    COMMANDS[name] = (help, description or help, add_flags)
    return add_flags
  return wrap


# ----------------------------------------------------------------------------- configs
def split_config_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Separates `--config.FIELD=VALUE` (or `--config.FIELD VALUE`) flags from the rest.

  Returns:
    (the other arguments, the overrides as --config.FIELD=VALUE strings).
  """
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(OVERRIDE_PREFIX):
      if "=" not in arg and i + 1 < len(args):
        arg, i = f"{arg}={args[i + 1]}", i + 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _unknown_override(config, overrides: Sequence[str]) -> Optional[str]:
  """The first override naming a field `config` does not have, described; else None."""
  for override in overrides:
    path = override[len(OVERRIDE_PREFIX):].split("=", 1)[0].split(".")
    node, where = config, "config"
    for part in path:
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {where}.{close[0]}?" if close else ""
        return (f"{OVERRIDE_PREFIX}{'.'.join(path)}: unknown config field ({where} has no "
                f"field {part!r}{hint})")
      node, where = node[part], f"{where}.{part}"
  return None


def load_config(path: str, overrides: Sequence[str] = ()):
  """Loads an ml_collections config file (`get_config()`) and applies overrides.

  Args:
    path: the config file, e.g. configs/groove_small.py.
    overrides: "--config.FIELD=VALUE" strings (ml_collections' config_flags syntax;
      tuples as "(1,8,1)").

  Returns:
    The locked ConfigDict.

  Raises:
    ConfigError: naming the file, or the override that names an unknown field or has a
      value of the wrong type.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def parse(extra):
    fv = flags.FlagValues()
    argv = ["midijax", f"--config={path}", *extra]
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv(argv)
    config = fv.config
    config.to_dict()  # config files load lazily: surface their errors here
    return config

  try:
    return parse(overrides)
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines()[-2:]]
    raise ConfigError(f"cannot load the config file {path}: {' '.join(lines)}") from None
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    error = e
  try:
    unknown = _unknown_override(parse(()), overrides)
  except Exception:  # pylint: disable=broad-except  # the file itself is broken
    unknown = None
  if unknown:
    raise ConfigError(unknown)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if "Error whilst parsing config file" in str(error) and lines:
    # ml_collections puts the config file's own traceback in the message: its last line
    # is the error get_config() raised.
    raise ConfigError(f"cannot load the config file {path}: {lines[-1]}")
  raise ConfigError(f"bad config override: {error}".splitlines()[0])


def _add_config_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True,
                 help="an ml-collections config file (configs/NAME.py)")
  p.add_argument(OVERRIDE_PREFIX + "FIELD", dest="override_help", metavar="VALUE",
                 help="override any config field, e.g. --config.train.num_steps=200 "
                      "--config.mesh.ici_parallelism=(1,8,1); repeatable; unknown fields "
                      "are rejected")


# ----------------------------------------------------------------------------- tokens
def _positive(kind):
  """An argparse type: a positive number of `kind` (int or float)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if not value > 0 or value != value or value == float("inf"):
      raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value
  return parse


def _add_limit_flags(p, notes: bool = False) -> None:
  """--max_seconds and --max_tokens (and --max_notes): the limits of token_files."""
  from midijax.limits import MAX_SECONDS, MAX_TOKENS, MAX_WRITE_NOTES
  p.add_argument("--max_seconds", type=_positive(float), default=MAX_SECONDS,
                 help=f"refuse music lasting longer, seconds (default {MAX_SECONDS:g}: 2 hours)")
  p.add_argument("--max_tokens", type=_positive(int), default=MAX_TOKENS,
                 help=f"refuse a file of more tokens (default {MAX_TOKENS})")
  if notes:
    p.add_argument("--max_notes", type=_positive(int), default=MAX_WRITE_NOTES,
                   help=f"refuse to write more notes (default {MAX_WRITE_NOTES})")


@command("midi2tokens", "MIDI file -> token file (names one a line, or ids)",
         "Reads a .mid/.midi file and writes its tokens, one a line, under a '# midijax ...' "
         "header line. A file that cannot be read or is over a limit is refused with one "
         "line saying why.")
def _midi2tokens_flags(p):
  p.add_argument("input", help="MIDI file (.mid or .midi)")
  p.add_argument("output", help="token text file to write")
  p.add_argument("--encoding", default="performance", choices=["performance", "drums", "triples"],
                 help="token encoding (see `midijax encodings`); default performance")
  p.add_argument("--ids", action="store_true", help="write integer ids instead of token names")
  p.add_argument("--sustain", action="store_true",
                 help="apply the sustain pedal (CC 64) before encoding, as for piano")
  p.add_argument("--reader", default="symusic", choices=["symusic", "note_seq"],
                 help="MIDI parser: symusic (fast, default) or note_seq (reference; files up "
                      "to 4 MB)")
  p.add_argument("--no_header", action="store_true",
                 help="omit the '# midijax ...' first line (encoding, drum flag, tempo)")
  _add_limit_flags(p)
  p.set_defaults(func=run_midi2tokens)


def run_midi2tokens(args) -> int:
  from midijax.encoding import token_files
  num_notes, num_tokens = token_files.midi_to_tokens(
      args.input, args.output, encoding=args.encoding, ids=args.ids, sustain=args.sustain,
      reader=args.reader, header=not args.no_header, max_seconds=args.max_seconds,
      max_tokens=args.max_tokens)
  print(f"{args.input}: {num_notes} notes -> {num_tokens} {args.encoding} tokens -> "
        f"{args.output}")
  return 0


@command("tokens2midi", "token file -> MIDI file",
         "Reads tokens (one a line) and writes a MIDI file that `midijax midi2tokens` reads "
         "back. A bad line is an error naming it (or, with --lenient, skipped and counted).")
def _tokens2midi_flags(p):
  p.add_argument("input", help="token text file: names or integer ids, one a line; for "
                               "triples also the course text (POSITION_<tick>, "
                               "NOTE_ON_<pitch>, DURATION_<ticks>)")
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
  _add_limit_flags(p, notes=True)
  p.set_defaults(func=run_tokens2midi)


def run_tokens2midi(args) -> int:
  from midijax.encoding import token_files
  is_drum = None if args.drums == "auto" else args.drums == "yes"
  tf = token_files.tokens_to_midi(
      args.input, args.output, encoding=args.encoding, qpm=args.tempo,
      ticks_per_quarter=args.ticks_per_quarter, is_drum=is_drum, lenient=args.lenient,
      max_tokens=args.max_tokens, max_seconds=args.max_seconds, max_notes=args.max_notes)
  print(f"{args.input}: {len(tf.notes)} notes -> {args.output}" +
        (f" ({tf.skipped} invalid tokens skipped)" if tf.skipped else ""))
  return 0


@command("encodings", "list the encodings, vocabulary sizes and what each keeps")
def _encodings_flags(p):
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
  p.add_argument("--guidance", type=float, default=None,
                 help="prompt guidance, 0 = off: lean each token further towards what the "
                      "prompt makes likely, at twice the sampling cost (default: "
                      "config.sample.guidance, else 0)")
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
                 help="tokens of context before the window slides (default: the length "
                      "the run was trained on, data.seq_len)")
  p.add_argument("--window_keep", type=int, default=None,
                 help="recent tokens kept when the window slides (default: half the context)")
  p.add_argument("--kv_cache", choices=("model", "int8"), default=None,
                 help="key/value cache storage: the model's dtype (exact), or int8 with a "
                      "scale per vector (a quarter of float32's bytes: faster large batches "
                      "on CPU; default: config.sample.kv_cache, else model)")


@command("generate", "sample new pieces from a trained model (MIDI + token files)",
         "Samples pieces from a trained run and writes, per sample, a MIDI file and its "
         "tokens, plus generate.json (settings, checkpoint, timing). The course project's "
         "form `midijax generate LENGTH [TEMPERATURE] [TOP_K] --workdir RUN` works too.")
def _generate_flags(p):
  p.add_argument("length", nargs="?", type=int, default=None, metavar="LENGTH",
                 help="new tokens per sample (same as --max_tokens)")
  p.add_argument("pos_temperature", nargs="?", type=float, default=None, metavar="TEMPERATURE",
                 help="same as --temperature")
  p.add_argument("pos_top_k", nargs="?", type=int, default=None, metavar="TOP_K",
                 help="same as --top_k")
  _add_sampling_flags(p, num_samples=8, seconds=None)
  p.set_defaults(func=run_generate)


@command("continue", "continue the start of a MIDI file (a drum groove, a piano opening)",
         "Encodes the first seconds or bars of a MIDI file, samples continuations and "
         "writes per sample prompt+continuation and the continuation alone as MIDI, plus "
         "prompt.mid, the tokens and continue.json.")
def _continue_flags(p):
  p.add_argument("--prompt", required=True, help="MIDI file to continue")
  cut = p.add_mutually_exclusive_group()
  cut.add_argument("--prompt_seconds", type=float, default=None,
                   help="use the first S seconds of the file as the prompt")
  cut.add_argument("--prompt_bars", type=float, default=None,
                   help="use the first N bars (file's tempo and meter; default 2)")
  _add_sampling_flags(p, num_samples=4, seconds=8.0)
  p.set_defaults(func=run_continue)


def _one_of(name: str, flag, positional):
  """A setting given as a flag, the course-style positional, or neither (None)."""
  if flag is not None and positional is not None and flag != positional:
    raise MidijaxError(f"{name} given twice: {positional} (positional) and --{name} {flag}")
  return flag if flag is not None else positional


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
  from midijax import generation, runs, sharding
  mesh = runs.inference_mesh()
  model, enc, config, step = runs.load_run(args.workdir, step=args.step, best=args.best,
                                           mesh=mesh)
  rules = sharding.get_logical_axis_rules(config.get("mesh"))
  length, temperature, top_k = positional
  settings = generation.sampling_settings(
      config, enc, num_samples=args.num_samples,
      max_new_tokens=_one_of("max_tokens", args.max_tokens, length),
      temperature=_one_of("temperature", args.temperature, temperature),
      top_k=_one_of("top_k", args.top_k, top_k), top_p=args.top_p, guidance=args.guidance,
      seed=args.seed,
      max_seconds=args.seconds, constrained=not args.unconstrained, cache_len=args.context,
      window_keep=args.window_keep, kv_cache=args.kv_cache,
      conditions={kind: getattr(args, flag) for flag, kind in CONDITION_FLAGS.items()})
  return model, enc, config, step, mesh, rules, settings


def run_generate(args) -> int:
  from midijax import generation
  model, enc, config, step, mesh, rules, s = _sampling_setup(
      args, (args.length, args.pos_temperature, args.pos_top_k))
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "samples")
  report = generation.generate_files(model, enc, out, s, config=config, step=step,
                                     workdir=args.workdir, qpm=float(args.bpm or 120.0),
                                     mesh=mesh, rules=rules)
  t = report["timing"]
  print(f"{len(report['samples'])} samples from {args.workdir} step {step} -> {out} "
        f"({t['new_tokens']} tokens in {t['sample_s']:.2f} s, {t['tokens_per_s']:,.0f} tokens/s; "
        f"compile {t['compile_s']:.1f} s)")
  return 0


def run_continue(args) -> int:
  from midijax import generation, runs
  model, enc, config, step, mesh, rules, s = _sampling_setup(args)
  # The drummer's-first-two-bars use case: 2 bars unless told otherwise.
  bars = None if args.prompt_seconds is not None else (
      args.prompt_bars if args.prompt_bars is not None else 2.0)
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "samples")
  report = generation.continue_files(
      model, enc, args.prompt, out, s, step=step, workdir=args.workdir,
      prompt_seconds=args.prompt_seconds, prompt_bars=bars, max_new_tokens=args.max_tokens,
      mesh=mesh, rules=rules, condition_kinds=runs.conditioning_kinds(args.workdir, config))
  t, recorded = report["timing"], report["settings"]
  inferred = recorded["inferred_conditions"]
  if inferred:
    chosen = ", ".join(f"{k} {v}" for k, v in inferred["values"].items())
    flags = " ".join(f"--{k}" for k in inferred["values"])
    print(f"{args.prompt}: no {flags} given; the prompt is most likely as {chosen} "
          f"(of {inferred['candidates']} prefixes scored)")
  print(f"{args.prompt}: {recorded['prompt_seconds']:.2f} s prompt "
        f"({recorded['prompt_tokens']} tokens), {len(report['samples'])} continuations from "
        f"step {step} -> {out} ({t['new_tokens']} tokens in {t['sample_s']:.2f} s; compile "
        f"{t['compile_s']:.1f} s)")
  return 0


# ----------------------------------------------------------------------------- training
@command("train", "train or resume a model from a config file",
         "Trains (or resumes) the model a config file describes, checkpointing into "
         "--workdir: checkpoints/, metrics.jsonl, tensorboard/, loss.png, config.json. A "
         "workdir with checkpoints resumes from the latest.")
def _train_flags(p):
  _add_config_flags(p)
  p.add_argument("--workdir", required=True, help="run folder (local path or gs://...)")
  hosts = p.add_argument_group(
      "multi-host start-up (jax.distributed); also read from MIDIJAX_COORDINATOR_ADDRESS / "
      "MIDIJAX_NUM_PROCESSES / MIDIJAX_PROCESS_ID")
  hosts.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  hosts.add_argument("--num_processes", type=int, default=None, help="number of processes")
  hosts.add_argument("--process_id", type=int, default=None, help="this process's index")
  p.set_defaults(func=run_train)


def run_train(args) -> int:
  config = load_config(args.config, args.config_overrides)
  from midijax import sharding, train
  sharding.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
  train.train_and_evaluate(config, args.workdir)
  return 0


@command("reproduce", "train a recorded run again from its saved config",
         "Re-runs the run in WORKDIR from its config.json in a new folder, after warning "
         "about each difference between its run_info.json and this machine (git commit, "
         "uncommitted changes, package versions, Python, devices). With none, the new "
         "run's checkpoints equal the original's bit for bit.")
def _reproduce_flags(p):
  p.add_argument("run", metavar="WORKDIR", help="the recorded run")
  p.add_argument("--workdir", required=True, help="a new folder for the re-run")
  p.set_defaults(func=run_reproduce)


def run_reproduce(args) -> int:
  from midijax import experiments
  experiments.reproduce(args.run, args.workdir,
                        warn=lambda line: print(f"midijax reproduce: warning: {line}",
                                                file=sys.stderr, flush=True))
  return 0


@command("compare-runs", "a table and a plot of several runs' configs and validation NLL",
         "Prints, for each run, the config fields that differ from the first run's, the "
         "best validation NLL and its step, the steps trained, median tokens/s and wall "
         "time (from each workdir's config.json, metrics.jsonl and run_info.json), and "
         "writes their validation curves as a PNG. Runs with different encodings are "
         "compared by NLL per note (NLL per token is not comparable between them).")
def _compare_runs_flags(p):
  p.add_argument("runs", nargs="+", metavar="WORKDIR", help="run folders (the first is the "
                                                            "reference)")
  p.add_argument("--out", default="compare_runs.png", help="PNG of the validation curves "
                                                           "(default compare_runs.png)")
  p.add_argument("--json", action="store_true", help="print JSON instead of the table")
  p.set_defaults(func=run_compare_runs)


def run_compare_runs(args) -> int:
  from midijax import experiments
  result = experiments.compare_runs(args.runs, out_png=args.out)
  print(json.dumps(result, indent=1) if args.json else experiments.format_comparison(result))
  return 0


@command("compile", "ahead-of-time compile the train step for a topology: memory, FLOPs",
         "Compiles the train step ahead of time for a device topology and reports memory "
         "per device and FLOPs, so you know whether a config fits before renting the "
         "hardware. No data needed. Exit status: 0 compiled and fits (or no memory figure "
         "to compare), 1 compiled but does not fit, 2 bad flags / config, or the target "
         "cannot be compiled for here.")
def _compile_flags(p):
  _add_config_flags(p)
  p.add_argument("--topology", default="cpu:8",
                 help="cpu:N (N fake CPU devices; default cpu:8), local (this process's "
                      "devices), tpu:ACCELERATOR_TYPE (v4-8, v4-32, v5litepod-16, v5e-16, "
                      "v5p-8, v6e-8) or tpu:GEN:AxB[xC]; TPU targets need libtpu "
                      "(pip install 'jax[tpu]==JAX_VERSION'), no TPU")
  p.add_argument("--vocab_size", type=int, default=0,
                 help="vocabulary size (default: config.model.vocab_size, else the built "
                      "dataset's, else that of the encoding config.data.builder_config "
                      "writes)")
  p.add_argument("--memory_per_device", default="",
                 help="compare with this memory: GiB or a name (v4, v5e, v5p, v6e, h100, "
                      "h200, a100-40gb, a100-80gb, l4); TPU targets know theirs")
  p.add_argument("--num_slices", type=int, default=1,
                 help="TPU slices joined over DCN (set config.mesh.dcn_parallelism)")
  p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
  p.set_defaults(func=run_compile)


def _unbuilt_encoding(config, vocab_size: int = 0):
  """The encoding config.data's builder config writes, when that dataset is not built yet
  and the compile needs it: for the vocabulary size (none given) or a bar clock. None when
  the dataset is built, for mixtures, and for datasets without a builder here."""
  from midijax import aot
  data, model = config.data, config.model
  needed = (not (vocab_size or model.get("vocab_size", 0)) or model.get("bar_positions", 0)
            or model.get("time_rope_heads", 0) or model.get("bar_echo", 0))
  if not needed or data.get("mixture", ()) or aot.built_vocab(config) is not None:
    return None
  import data_pipelines
  if data.get("name", "") not in data_pipelines.BUILDERS:
    return None
  try:
    return data_pipelines.config_encoding(data.name, data.get("builder_config", "") or None)
  except MidijaxError as e:
    # e.g. a config derived with build-data --set: only its built dataset knows it.
    raise ConfigError(f"config.data.builder_config: not built under config.data.data_dir="
                      f"{data.get('data_dir', '') or '(default)'}, and {e}; build it "
                      "first (midijax build-data)") from None


def run_compile(args) -> int:
  """Exit status 0 compiled and fits (or nothing to compare with), 1 does not fit."""
  config = load_config(args.config, args.config_overrides)
  from midijax import aot
  topology = aot.parse_topology(args.topology, args.num_slices)
  devices = aot.target_devices(topology)
  report = aot.compile_train_step(config, topology, devices, vocab_size=args.vocab_size,
                                  memory_per_device=args.memory_per_device,
                                  encoding_if_unbuilt=_unbuilt_encoding(config,
                                                                        args.vocab_size))
  print(json.dumps(report.to_json()) if args.json else aot.format_report(report), flush=True)
  return 1 if report.fits is False else 0


# ----------------------------------------------------------------------------- datasets
@command("build-data", "tokenize MIDI into sharded TFRecords (TFDS builders)",
         "Builds a TFDS dataset (TFRecord shards, dataset_info.json, vocab.json and a report "
         "of skipped files) with the builders in data_pipelines/.")
def _build_data_flags(p):
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
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="change a field of the builder config (repeatable), e.g. "
                      "styles=funk,rock | drummers=drummer1 | prompt_bars=4 | "
                      "target_bars=1 | hop_bars=1 | window_bars=8; lists comma-separated. "
                      "The dataset gets a name of its own (--name, or CONFIG_<hash>)")
  p.add_argument("--name", dest="dataset_name", default=None,
                 help="name of the dataset made with --set (what config.data.builder_config "
                      "then names), e.g. drums_continuation_funk")
  p.set_defaults(func=run_build_data)


def builder_overrides(name: str, config: Optional[str], items: Sequence[str]) -> Dict:
  """--set FIELD=VALUE items -> {field: value}, each value of the type of the config's
  field (int, float, bool, or a tuple of comma-separated values)."""
  import data_pipelines
  cls = data_pipelines.builder_class(name)
  base = {c.name: c for c in cls.BUILDER_CONFIGS}.get(config or cls.DEFAULT_BUILDER_CONFIG_NAME)
  out = {}
  for item in items:
    field, sep, text = item.partition("=")
    if not sep or base is None or not hasattr(base, field) or field in ("name", "description"):
      raise MidijaxError(f"--set {item!r}: expected FIELD=VALUE with a field of the {name} "
                         "builder config (e.g. styles=funk)")
    default = getattr(base, field)
    try:
      if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
          raise ValueError(text)
        value = text.lower() in ("true", "1", "yes")
      elif isinstance(default, tuple):
        kind = type(default[0]) if default else str
        value = tuple(kind(x) for x in text.split(",") if x)
      elif isinstance(default, (int, float, str)):
        value = type(default)(text)
      else:
        raise MidijaxError(f"--set {item!r}: field {field} cannot be set from the command line")
    except ValueError:
      raise MidijaxError(f"--set {item!r}: {text!r} is not a {type(default).__name__}") from None
    out[field] = value
  return out


def run_build_data(args) -> int:
  import data_pipelines
  overrides = builder_overrides(args.name, args.config, args.set)
  if args.dataset_name and not overrides:
    raise MidijaxError("--name names a dataset made with --set FIELD=VALUE; without --set "
                       "the dataset is the builder config itself")
  builder = data_pipelines.build(args.name, args.config, manual_dir=args.manual_dir,
                                 data_dir=args.data_dir, num_shards=args.num_shards,
                                 num_workers=args.num_workers, overwrite=args.overwrite,
                                 config_name=args.dataset_name, **overrides)
  info = builder.info
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in info.splits.items())
  print(f"{args.name}/{builder.builder_config.name}: {splits} -> {builder.data_dir}")
  return 0


# ----------------------------------------------------------------------------- evidence
def _add_decoding_flags(p) -> None:
  """Flags shared by `evaluate` and `export-listening`: how samples are drawn, real data."""
  p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same clips")
  p.add_argument("--temperature", type=float, default=None,
                 help="softmax temperature, 0 = greedy (default: the run's "
                      "config.sample.temperature, else 1)")
  p.add_argument("--top_k", type=int, default=None,
                 help="sample among the k most likely tokens, 0 = all (default: the run's "
                      "config.sample.top_k, else 0)")
  p.add_argument("--top_p", type=float, default=None,
                 help="nucleus sampling probability, 1 = off (default: the run's "
                      "config.sample.top_p, else 1)")
  p.add_argument("--guidance", type=float, default=None,
                 help="prompt guidance of continuations, 0 = off (default: the run's "
                      "config.sample.guidance, else 0)")
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir of the real clips (default: the run's config)")


@command("evaluate", "held-out NLL, music statistics, validity, classifier two-sample test",
         "Writes WORKDIR/eval/<step>/metrics.json, metrics.md and PNG plots, and "
         "TensorBoard scalars: NLL per token, per note and per second of music on the whole "
         "split, Yang & Lerch (2020) feature distances (OA, KL) of generated vs real clips, "
         "the share of unconstrained samples that decode validly, and a classifier "
         "two-sample test (C2ST): for prompts cut from the split, the held-out accuracy of "
         "classifiers telling the model's constrained continuation from the real one "
         "(50% = cannot tell), with a binomial 95% interval and the most telling "
         "features.")
def _evaluate_flags(p):
  p.add_argument("--workdir", required=True, help="a trained run folder")
  p.add_argument("--split", default="test", help="held-out split (default test)")
  p.add_argument("--num_samples", type=int, default=64, help="generated (and real) clips")
  p.add_argument("--max_tokens", type=int, default=None,
                 help="tokens per clip (default: the training sequence length)")
  step = p.add_mutually_exclusive_group()
  step.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  step.add_argument("--best", action="store_true", help="the best checkpoint by validation")
  _add_decoding_flags(p)
  c2st = p.add_argument_group("classifier two-sample test of continuations")
  c2st.add_argument("--c2st_prompts", type=int, default=128,
                    help="prompts per continuation length, spread over the split's pieces "
                         "(fewer when the split holds fewer; 0 skips the test; default 128)")
  c2st.add_argument("--c2st_lengths", default="128,512",
                    help="continuation lengths in tokens, comma-separated (default 128,512)")
  c2st.add_argument("--c2st_prompt_tokens", type=int, default=64,
                    help="event tokens of each prompt (default 64)")
  c2st.add_argument("--c2st_folds", type=int, default=5,
                    help="k of the k-fold cross-validation (default 5)")
  c2st.add_argument("--c2st_features", choices=["auto", "drums", "pitched"], default="auto",
                    help="feature set (default auto: drums for drum models, else pitched)")
  p.add_argument("--eval_context", type=int, default=None,
                 help="NLL windows: tokens of context before each later window's targets "
                      "(default: the run's config.data.eval_context; 0 = non-overlapping)")
  p.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/<step>)")
  task = p.add_argument_group("--task continuation: NLL of continuation targets given their "
                              "real prompts (no sampling)")
  task.add_argument("--task", choices=("lm", "continuation"), default="lm",
                    help="lm: the whole split's NLL and samples vs real clips (default); "
                         "continuation: NLL per token and per note of the targets of a "
                         "continuation-pairs dataset, given each real prompt")
  task.add_argument("--data", default=None, metavar="NAME/CONFIG",
                    help="the continuation-pairs dataset, e.g. groove/drums_continuation "
                         "(default: the run's own dataset)")
  task.add_argument("--seq_len", type=_positive(int), default=None,
                    help="window in tokens: prompt + target, the rest of a target is not "
                         "scored (default: the model's max_len); use one value to compare runs")
  p.set_defaults(func=run_evaluate)


def _int_list(flag: str, text: str) -> List[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise MidijaxError(f"{flag} {text!r}: expected comma-separated whole numbers") from None


def run_evaluate(args) -> int:
  from midijax import evaluation
  if args.task == "continuation":
    evaluation.evaluate_continuation(args.workdir, data=args.data, split=args.split,
                                     seq_len=args.seq_len, step=args.step, best=args.best,
                                     data_dir=args.data_dir, out_dir=args.out)
    return 0
  evaluation.evaluate_workdir(args.workdir, split=args.split, num_samples=args.num_samples,
                              max_new_tokens=args.max_tokens, step=args.step, best=args.best,
                              seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, guidance=args.guidance,
                              data_dir=args.data_dir, out_dir=args.out,
                              c2st_prompts=args.c2st_prompts,
                              c2st_lengths=_int_list("--c2st_lengths", args.c2st_lengths),
                              c2st_prompt_tokens=args.c2st_prompt_tokens,
                              c2st_folds=args.c2st_folds, c2st_features=args.c2st_features,
                              eval_context=args.eval_context)
  return 0


@command("export", "a run's parameters alone, as a new run folder (a smaller checkpoint)",
         "Writes the parameters of one checkpoint (no optimizer state) with config.json, "
         "vocab.json and run_info.json into a new folder that generate, continue and "
         "evaluate load like any run, and prints both checkpoints' sizes. LoRA adapters "
         "are merged into their kernels (config.model.lora_rank becomes 0).")
def _export_run_flags(p):
  p.add_argument("--workdir", required=True, help="the trained run")
  which = p.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  which.add_argument("--best", action="store_true", help="the best checkpoint by validation")
  p.add_argument("--out", required=True, help="a new folder for the exported run")
  p.set_defaults(func=run_export)


def run_export(args) -> int:
  from midijax import finetune
  r = finetune.export_run(args.workdir, args.out, step=args.step, best=args.best)
  print(f"{args.workdir} step {r['step']}: {r['params']:,} parameters -> {r['out']} "
        f"({r['bytes'] / 2**20:.2f} MiB; the training checkpoint is "
        f"{r['source_bytes'] / 2**20:.2f} MiB)")
  if "lora_merged" in r:
    print(f"LoRA adapters (rank {r['lora_merged']['rank']}, alpha "
          f"{r['lora_merged']['alpha']:g}) merged into their kernels: a plain model "
          "(config.model.lora_rank=0)")
  return 0


@command("export-listening", "blinded listening test: audio, rating page, key",
         "Renders free samples and prompted continuations of each run, and real clips of the "
         "same length, to loudness-matched audio (FluidSynth, GM soundfont); writes "
         "DIR/rater/index.html (a static rating page), the key DIR/key.csv (never linked "
         "from the page), MIDI, piano rolls, manifest.json.")
def _export_flags(p):
  p.add_argument("--run", action="append", required=True, metavar="NAME=WORKDIR",
                 help="a run to include (repeat for several)")
  p.add_argument("--real", default="test", metavar="SPLIT",
                 help="split of the real clips and of the continuations' prompts (default "
                      "test: kept out of training and of tuning the sampling settings)")
  p.add_argument("--num_clips", type=int, default=20, help="real pieces used (per condition)")
  p.add_argument("--seconds", type=float, default=20.0, help="length of every rated clip")
  p.add_argument("--prompt_seconds", type=float, default=None,
                 help="prompt length for continuations (default seconds / 4)")
  p.add_argument("--mode", choices=["free", "continuation", "both"], default="both")
  _add_decoding_flags(p)
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
    manifest = export.export_runs(
        runs, args.out, real_split=args.real, num_clips=args.num_clips, seconds=args.seconds,
        prompt_seconds=args.prompt_seconds, mode=args.mode, seed=args.seed,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        guidance=args.guidance, data_dir=args.data_dir)
  except (ValueError, RuntimeError) as e:
    raise MidijaxError(str(e)) from None
  print(f"{args.out}: {manifest['counts']['clips']} clips; send {args.out}/rater/ to raters, "
        "keep key.csv apart")
  return 0


@command("listening-results", "join rater CSVs with the key: MOS with 95%% CIs, preferences",
         "Joins the answer CSVs raters downloaded with the export's key.csv: mean opinion "
         "score per condition with 95% confidence intervals, pairwise preferences with "
         "Wilson intervals and sign-test p-values, and a plot.")
def _results_flags(p):
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


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
  """The `midijax` parser: one sub-parser per registered command.

  `midijax --help` lists every command with its one-line help and then every command's
  flags (its usage line); `midijax COMMAND --help` explains each flag.
  """
  parser = argparse.ArgumentParser(
      prog="midijax", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="midijax: train and sample Transformer models of MIDI music with JAX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
  sub.required = True
  usages = []
  for name in COMMAND_ORDER:
    help, description, add_flags = COMMANDS[name]
    p = sub.add_parser(name, help=help, description=description)
    add_flags(p)
    usages.append(p.format_usage().replace("usage: ", "  ", 1).rstrip())
  parser.epilog = ("flags of every command (`midijax COMMAND --help` explains them):\n" +
                   "\n".join(usages))
  return parser


# The order of `midijax --help`: the path from data to listening tests, then the tools.
COMMAND_ORDER = ("build-data", "train", "reproduce", "compare-runs", "compile", "generate",
                 "continue", "evaluate", "export", "export-listening", "listening-results",
                 "midi2tokens", "tokens2midi", "encodings")


def main(argv: Optional[List[str]] = None) -> int:
  """The `midijax` command; `argv` holds the arguments after the program name."""
  process_env.configure()  # Quiet stderr: set before TensorFlow or JAX loads.
  from_shell = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  name = next((a for a in argv if not a.startswith("-")), "")
  if from_shell and name in COMPUTE_COMMANDS:
    # Before JAX is imported; see midijax/allocator.py.
    from midijax import allocator
    allocator.reexec_with_tcmalloc()
  rest, overrides = split_config_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  if overrides and args.command not in CONFIG_COMMANDS:
    parser.error(f"{overrides[0]}: only {' and '.join(CONFIG_COMMANDS)} take config overrides")
  args.config_overrides = overrides
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
