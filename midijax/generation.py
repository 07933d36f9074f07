"""Generation outputs: sample from a trained run and write MIDI, token files and a report.

What `midijax generate` and `midijax continue` write, as functions a Python user can call:

    model, enc, config, step = runs.load_run(workdir)
    settings = generation.sampling_settings(config, enc, num_samples=4, conditions={"style": "funk"})
    report = generation.generate_files(model, enc, "out/", settings, config=config, step=step,
                                       workdir=workdir)

`generate_files` writes, per sample, `sample_NN.mid` and `sample_NN.txt` (token names one a
line under the header `midijax tokens2midi` reads) and `generate.json` (settings,
checkpoint, timing, per-sample counts and grammar violations). `continue_files` writes
`prompt.mid`, per sample `sample_NN_full.mid` (prompt + continuation),
`sample_NN_continuation.mid` and `sample_NN.txt`, and `continue.json`. Every file is
written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from midijax import encoding as encoding_lib
from midijax import midi_io
from midijax.errors import MidijaxError

# Defaults of the sampling settings a run's config.sample does not set.
DEFAULT_SETTINGS = {"max_new_tokens": 512, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "kv_cache": "model", "guidance": 0.0}
# Ticks per quarter note written in token-file headers (triples' POSITION/DURATION unit).
TOKEN_FILE_TICKS_PER_QUARTER = 480


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename (parents created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def trained_context(config) -> int:
  """Tokens of context a run was trained on: its rows' length (data.seq_len), at most the
  model's max_len. Samplers slide their window within it by default: positions beyond it
  are ones the model never saw in training, and its predictions there get worse with
  every token (groove_beats, 256-token rows, max_len 512: 2.10-2.14 nats/token at
  positions 128-256 of 512-token windows, 2.46 at 448-512)."""
  return int(min(config.model.max_len, config.data.seq_len))


def sampling_settings(config, enc, *, num_samples: int = 8,
                      max_new_tokens: Optional[int] = None,
                      temperature: Optional[float] = None, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, seed: int = 0,
                      max_seconds: Optional[float] = None, constrained: bool = True,
                      cache_len: Optional[int] = None, window_keep: Optional[int] = None,
                      kv_cache: Optional[str] = None, guidance: Optional[float] = None,
                      conditions: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The settings a sample is drawn with, resolved and checked.

  Each of max_new_tokens, temperature, top_k, top_p, kv_cache and guidance (prompt
  guidance, `sampling.sample_tokens`) is the argument when
  given, else the run's `config.sample.NAME`, else DEFAULT_SETTINGS. The context before
  the window slides (`cache_len`) is the argument, else the length the run was trained on
  (`trained_context`). Conditions are
  {kind: value} (tempo in beats per minute is binned); an unknown value raises an error
  listing the valid ones.

  Returns:
    The settings dict that `generate_files` / `continue_files` take and record.

  Raises:
    MidijaxError: a count below 1, a negative temperature, top_k or guidance, top_p outside
      (0, 1], or an unknown condition.
  """
  from midijax import sampling  # pylint: disable=g-import-not-at-top  # JAX

  sample = config.get("sample") if hasattr(config, "get") else None

  def pick(name, value):
    if value is not None:
      return value
    if sample is not None and sample.get(name) is not None:
      return sample.get(name)
    return DEFAULT_SETTINGS[name]

  settings = {
      "num_samples": int(num_samples),
      "max_new_tokens": int(pick("max_new_tokens", max_new_tokens)),
      "temperature": float(pick("temperature", temperature)),
      "top_k": int(pick("top_k", top_k)), "top_p": float(pick("top_p", top_p)),
      "seed": int(seed), "max_seconds": max_seconds, "constrained": bool(constrained),
      "cache_len": int(cache_len if cache_len is not None else trained_context(config)),
      "window_keep": window_keep,
      "kv_cache": str(pick("kv_cache", kv_cache)),
      "guidance": float(pick("guidance", guidance)),
  }
  if settings["num_samples"] < 1 or settings["max_new_tokens"] < 1:
    raise MidijaxError("--num_samples and the token count must be at least 1")
  if settings["temperature"] < 0 or not 0 < settings["top_p"] <= 1 or settings["top_k"] < 0:
    raise MidijaxError("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
  if not 0 <= settings["guidance"] < float("inf"):
    raise MidijaxError(f"--guidance must be a finite number >= 0, got {settings['guidance']:g}")
  conditions = {k: v for k, v in (conditions or {}).items() if v is not None}
  if "tempo" in conditions and not isinstance(conditions["tempo"], str):
    conditions["tempo"] = f"{conditions['tempo']:g}"
  for kind, value in conditions.items():
    enc.condition_id(kind, value)  # an unknown value lists the valid ones
  settings["conditions"] = sampling.ordered_conditions(conditions)
  return settings


def token_file_text(enc, ids, *, is_drum: bool, qpm: float) -> str:
  """Token names one a line (triples too, not the course's text form), under the header
  `midijax tokens2midi` reads."""
  from midijax.encoding.base import Encoding  # pylint: disable=g-import-not-at-top
  from midijax.encoding.token_files import format_header  # pylint: disable=g-import-not-at-top
  header = format_header(enc.name, is_drum, TOKEN_FILE_TICKS_PER_QUARTER, qpm)
  return header + Encoding.to_text(enc, ids)


def _sample_record(ids, notes, result, i: int, files: dict) -> dict:
  """One sample's entry in generate.json / continue.json."""
  return {**files, "tokens": int(len(ids)), "new_tokens": int(len(ids) - result.prompt_length),
          "notes": len(notes), "music_seconds": round(notes.total_time, 3),
          "stop_reason": result.stop_reasons[i]}


def _report(command: str, workdir, step: int, enc, is_drum: bool, qpm: float,
            settings: Mapping[str, Any], result, samples: list) -> dict:
  return {"command": command, "workdir": str(pathlib.Path(str(workdir)).absolute()),
          "checkpoint_step": int(step), "encoding": enc.config, "is_drum": is_drum,
          "qpm": qpm, "settings": dict(settings), "timing": result.timing, "samples": samples}


def generate_files(model, enc, out_dir, settings: Mapping[str, Any], *, config, step: int,
                   workdir, qpm: float = 120.0, mesh=None, rules=None) -> dict:
  """Samples pieces from BOS + conditioning and writes them (see the module docstring).

  Args:
    model, enc, config, step: the loaded run (`runs.load_run`); workdir: its folder.
    out_dir: output folder (created).
    settings: from `sampling_settings`.
    qpm: tempo written to the MIDI files (quarter notes per minute).
    mesh, rules: sample sharded over a mesh (`sampling.sample_tokens`).

  Returns:
    The report, also written as out_dir/generate.json.
  """
  from midijax import constraints, sampling  # pylint: disable=g-import-not-at-top  # JAX
  s = settings
  data = config.get("data") or {}
  is_drum = encoding_lib.is_drum_music(enc, dataset=data.get("name", ""),
                                       conditions=s["conditions"])
  result = sampling.generate(
      model, enc, num_samples=s["num_samples"], max_new_tokens=s["max_new_tokens"],
      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
      conditions=s["conditions"], max_seconds=s["max_seconds"], constrained=s["constrained"],
      window_keep=s["window_keep"], cache_len=s["cache_len"], qpm=qpm,
      kv_cache=s["kv_cache"], guidance=s["guidance"], mesh=mesh, rules=rules)
  out = pathlib.Path(out_dir)
  violations = (constraints.grammar_violations(result.tokens, enc,
                                               model.config.padded_vocab_size)
                if not s["constrained"] else np.zeros(len(result.tokens), np.int64))
  samples = []
  for i, ids in enumerate(result.tokens):
    notes = enc.decode_notes(ids, is_drum=is_drum, qpm=qpm)
    midi, text = out / f"sample_{i:02d}.mid", out / f"sample_{i:02d}.txt"
    midi_io.write_midi(notes, midi)
    write_text_atomic(text, token_file_text(enc, ids, is_drum=is_drum, qpm=qpm))
    samples.append({**_sample_record(ids, notes, result, i,
                                     {"midi": midi.name, "tokens_file": text.name}),
                    "grammar_violations": int(violations[i])})
  report = _report("generate", workdir, step, enc, is_drum, qpm, s, result, samples)
  write_text_atomic(out / "generate.json", json.dumps(report, indent=1, default=str))
  return report


def continue_files(model, enc, prompt_path, out_dir, settings: Mapping[str, Any], *,
                   step: int, workdir, prompt_seconds: Optional[float] = None,
                   prompt_bars: Optional[float] = None, max_new_tokens: Optional[int] = None,
                   mesh=None, rules=None, condition_kinds: Optional[Sequence[str]] = None
                   ) -> dict:
  """Continues the start of a MIDI file and writes the results (see the module docstring).

  Args:
    model, enc, step: the loaded run (`runs.load_run`); workdir: its folder.
    prompt_path: the MIDI file; cut at `prompt_seconds`, or after `prompt_bars` bars, or
      (neither) its whole length.
    out_dir: output folder (created).
    settings: from `sampling_settings`; its max_seconds is the length of each continuation.
    max_new_tokens: tokens per continuation (default: from max_seconds, see
      `sampling.continue_midi`).
    mesh, rules: sample sharded over a mesh.
    condition_kinds: the run's conditioning kinds (`runs.conditioning_kinds`): the
      prompt's prefix gets each of them (`sampling.continue_midi`).

  Returns:
    The report, also written as out_dir/continue.json; its settings hold the conditions
    used and, under "inferred_conditions", what the model chose.
  """
  from midijax import sampling  # pylint: disable=g-import-not-at-top  # JAX
  s = settings
  cont = sampling.continue_midi(
      model, enc, prompt_path, prompt_seconds=prompt_seconds, prompt_bars=prompt_bars,
      seconds=s["max_seconds"], max_new_tokens=max_new_tokens, num_samples=s["num_samples"],
      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
      conditions=s["conditions"], constrained=s["constrained"], window_keep=s["window_keep"],
      cache_len=s["cache_len"], kv_cache=s["kv_cache"], guidance=s["guidance"], mesh=mesh,
      rules=rules, condition_kinds=condition_kinds)
  result = cont.result
  out = pathlib.Path(out_dir)
  midi_io.write_midi(cont.prompt, out / "prompt.mid")
  samples = []
  for i, ids in enumerate(result.tokens):
    full, alone = out / f"sample_{i:02d}_full.mid", out / f"sample_{i:02d}_continuation.mid"
    text = out / f"sample_{i:02d}.txt"
    midi_io.write_midi(cont.full[i], full)
    midi_io.write_midi(cont.continuation[i], alone)
    write_text_atomic(text, token_file_text(enc, ids, is_drum=cont.is_drum, qpm=cont.qpm))
    samples.append(_sample_record(ids, cont.continuation[i], result, i, {
        "full_midi": full.name, "continuation_midi": alone.name, "tokens_file": text.name}))
  recorded = {**s, "conditions": cont.conditions, "inferred_conditions": cont.inferred,
              "max_new_tokens": max_new_tokens, "prompt": str(prompt_path),
              "prompt_seconds": cont.prompt_seconds, "prompt_bars": prompt_bars,
              "prompt_tokens": result.prompt_length}
  report = _report("continue", workdir, step, enc, cont.is_drum, cont.qpm, recorded, result,
                   samples)
  write_text_atomic(out / "continue.json", json.dumps(report, indent=1, default=str))
  return report
