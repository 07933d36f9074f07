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
                                  lock_config=True)
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
ABSL_COMMANDS = {"train": run_train}


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
  for fn, _ in COMMANDS.values():
    fn(sub)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
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
