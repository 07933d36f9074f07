"""Listening-test export: blinded audio, a static rating page, and the analysis of answers.

`export_listening` takes clips that are already generated (model samples, real excerpts,
prompts) and writes::

  out_dir/
    rater/              the folder to send to raters (zip it); nothing in it names a
      index.html        condition, run, checkpoint or source file
      clips.json        the data the page embeds (ids, audio paths, shown texts)
      audio/<id>.wav    loudness-matched renders (+ <id>.mp3/.ogg when an encoder exists)
    key.csv             id -> condition, role, pair group, gain, clip meta (never shipped)
    manifest.json       settings, tools, counts
    midi/<id>.mid       what was rendered (drums on MIDI channel 10)
    pianoroll/<id>.png

`index.html` is self-contained (no server, no network, works from file://): it plays the
clips in an order shuffled per rater, asks for a 1-5 rating of each, asks which of two
continuations fits their prompt better, keeps the answers in localStorage and downloads
them as CSV. `listening_results` joins such CSVs with `key.csv`.

Audio: FluidSynth with the General MIDI soundfont from Debian's fluid-soundfont-gm,
rendered as float so nothing clips, cut to the same length, faded out, and scaled to the
same gated RMS loudness (BS.1770-style 400 ms blocks with absolute and relative gates, no
K-weighting) so that no condition stands out by volume.
"""
from __future__ import annotations

import base64
import concurrent.futures
import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import pathlib
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import wave
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from midijax import midi_io
from midijax.notes import Notes

PathLike = Union[str, os.PathLike]

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
ROLES = ("single", "prompt", "continuation")
PAGE_DIR = pathlib.Path(__file__).resolve().parent / "export_page"

DEFAULT_SETTINGS = {
    # Rater-facing texts (plain text; the page never parses them as HTML).
    "title": "Listening test",
    "instructions": (
        "Please use headphones in a quiet place. Listen to each clip and rate it from 1 "
        "(bad) to 5 (excellent). For each pair, listen to the prompt first, then choose the "
        "continuation that fits it better. Your answers stay in this browser until you "
        "press the download button; then send the downloaded CSV file back."),
    "question": "How good is this clip as music?",
    "pair_question": "Which continuation fits the prompt better?",
    "rating_labels": ["Bad", "Poor", "Fair", "Good", "Excellent"],
    # Audio.
    "sample_rate": 44100,  # Hz
    "soundfont": DEFAULT_SOUNDFONT,
    "fluidsynth_gain": 0.5,  # FluidSynth master gain before normalization (float output)
    "target_loudness_dbfs": -20.0,  # gated RMS, dB re full scale
    "peak_dbfs": -1.0,  # no sample exceeds this after normalization
    "fade_out_s": 0.5,  # seconds of linear fade at the cut (at most a quarter of the clip)
    "prompt_seconds": None,  # length of prompt clips (seconds); None = `seconds`
    "compress": "auto",  # "auto" | "none" | "mp3" | "ogg" | "opus"
    "workers": None,  # parallel renders; None = CPU count
}


@dataclasses.dataclass
class Clip:
  """One clip to export.

  Attributes:
    condition: what produced it (run name, "real", ...); written only to key.csv.
    notes: `Notes` or a note-seq NoteSequence; cut to [0, seconds).
    meta: anything identifying (checkpoint, seed, prompt, real file); key.csv only.
    pair_group: clips sharing it form a continuation set: one role="prompt" clip and
      two or more role="continuation" clips; every two continuations make a pair.
    role: "single" (rated), "continuation" (rated, and compared in pairs) or "prompt"
      (playable context of its pair group, not rated).
    display: plain text shown to the rater with the clip (e.g. the style that was asked
      for); it must not reveal the condition.
  """
  condition: str
  notes: Any
  meta: dict = dataclasses.field(default_factory=dict)
  pair_group: Optional[str] = None
  role: str = "single"
  display: str = ""


# -----------------------------------------------------------------------------------------
# Notes -> MIDI -> audio
# -----------------------------------------------------------------------------------------

def as_notes(notes_or_sequence) -> Notes:
  """`Notes` from `Notes` or a note-seq NoteSequence."""
  if isinstance(notes_or_sequence, Notes):
    return notes_or_sequence
  return Notes.from_note_sequence(notes_or_sequence)


def cut_notes(notes: Notes, seconds: float) -> Notes:
  """The notes sounding in [0, seconds): later ones dropped, ends clipped to `seconds`."""
  keep = (notes.start < seconds) & (notes.end > 0)
  out = notes.select(keep)
  out = dataclasses.replace(out, start=np.clip(out.start, 0.0, None),
                            end=np.minimum(out.end, seconds))
  out = out.select(out.end > out.start)
  cc = notes.cc_time < seconds
  return dataclasses.replace(
      out, cc_time=np.clip(notes.cc_time[cc], 0.0, None), cc_number=notes.cc_number[cc],
      cc_value=notes.cc_value[cc], cc_instrument=notes.cc_instrument[cc],
      cc_program=notes.cc_program[cc], cc_is_drum=notes.cc_is_drum[cc])


def fluidsynth_version() -> Optional[str]:
  exe = shutil.which("fluidsynth")
  if not exe:
    return None
  out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
  return (out.stdout.splitlines() or ["unknown"])[0].strip()


def render_midi(midi_path: PathLike, *, sample_rate: int = 44100,
                soundfont: str = DEFAULT_SOUNDFONT, gain: float = 0.5) -> np.ndarray:
  """Renders a MIDI file with FluidSynth; returns float32[frames, 2] (about -1..1)."""
  exe = shutil.which("fluidsynth")
  if exe is None:
    raise RuntimeError("fluidsynth not found; install Debian packages fluidsynth and "
                       "fluid-soundfont-gm")
  if not os.path.exists(soundfont):
    raise RuntimeError(f"soundfont not found: {soundfont} (Debian: fluid-soundfont-gm)")
  with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, "out.raw")
    # Raw little-endian float: no clipping at render time, read without a WAV parser.
    cmd = [exe, "-ni", "-q", "-F", raw, "-T", "raw", "-O", "float", "-E", "little",
           "-r", str(int(sample_rate)), "-g", str(float(gain)),
           "-o", "synth.lock-memory=0", soundfont, str(midi_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(raw):
      raise RuntimeError(f"fluidsynth failed ({proc.returncode}): {proc.stderr.strip()}")
    return np.fromfile(raw, dtype="<f4").reshape(-1, 2)


def fit_length(audio: np.ndarray, frames: int, fade_frames: int) -> np.ndarray:
  """Cuts or zero-pads audio[frames, ch] to `frames` and fades out the last `fade_frames`."""
  out = np.zeros((frames, audio.shape[1]), np.float64)
  n = min(frames, len(audio))
  out[:n] = audio[:n]
  if fade_frames > 0:
    out[frames - fade_frames:] *= np.linspace(1.0, 0.0, fade_frames)[:, None]
  return out


def gated_loudness_dbfs(audio: np.ndarray, sample_rate: int) -> float:
  """Gated RMS loudness of audio[frames, ch] in dBFS; -inf for silence.

  BS.1770's gating without its K-weighting filter: mean power (over channels) in 400 ms
  blocks every 100 ms, blocks below -70 dBFS dropped, then blocks 10 dB below the mean
  of the rest dropped; the mean power of what remains. Gating keeps silent stretches and
  fade-outs from making a sparse clip look quiet.
  """
  power = np.mean(np.asarray(audio, np.float64) ** 2, axis=1)
  block, hop = int(0.4 * sample_rate), int(0.1 * sample_rate)
  if len(power) <= block:
    blocks = np.array([power.mean()]) if len(power) else np.zeros(0)
  else:
    c = np.concatenate([[0.0], np.cumsum(power)])
    starts = np.arange(0, len(power) - block + 1, hop)
    blocks = (c[starts + block] - c[starts]) / block
  blocks = blocks[blocks > 10 ** (-70 / 10)]
  if len(blocks) == 0:
    return float("-inf")
  blocks = blocks[blocks > blocks.mean() * 10 ** (-10 / 10)]
  return float(10 * np.log10(blocks.mean()))


def peak_dbfs(audio: np.ndarray) -> float:
  peak = float(np.max(np.abs(audio))) if np.size(audio) else 0.0
  return 20 * math.log10(peak) if peak > 0 else float("-inf")


def write_wav(path: PathLike, audio: np.ndarray, sample_rate: int) -> pathlib.Path:
  """Writes float audio[frames, ch] (-1..1) as 16-bit PCM WAV."""
  pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
  with wave.open(str(path), "wb") as w:
    w.setnchannels(pcm.shape[1])
    w.setsampwidth(2)
    w.setframerate(int(sample_rate))
    w.writeframes(pcm.tobytes())
  return pathlib.Path(path)


def read_wav(path: PathLike) -> tuple:
  """(float64[frames, ch] in -1..1, sample rate) of a 16-bit PCM WAV."""
  with wave.open(str(path), "rb") as w:
    if w.getsampwidth() != 2:
      raise ValueError(f"{path}: only 16-bit PCM is read")
    frames = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return frames.reshape(-1, w.getnchannels()) / 32767.0, w.getframerate()


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A command-line audio encoder: `argv(wav, out)` writes `out` (extension `ext`)."""
  name: str
  ext: str
  mime: str
  tool: str

  def argv(self, wav: str, out: str) -> list:
    if self.tool == "ffmpeg":
      codec = {"mp3": "libmp3lame", "ogg": "libvorbis", "opus": "libopus"}[self.name]
      quality = ["-q:a", "4"] if self.name != "opus" else ["-b:a", "96k"]
      return ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", wav, "-c:a", codec,
              *quality, out]
    if self.tool == "lame":
      return ["lame", "--quiet", "-V", "4", wav, out]
    if self.tool == "oggenc":
      return ["oggenc", "-Q", "-q", "4", "-o", out, wav]
    if self.tool == "opusenc":
      return ["opusenc", "--quiet", "--bitrate", "96", wav, out]
    if self.tool == "sox":
      return ["sox", wav, out]
    raise ValueError(self.tool)


_FORMATS = {"mp3": ("mp3", "audio/mpeg"), "ogg": ("ogg", "audio/ogg"),
            "opus": ("opus", "audio/ogg; codecs=opus")}


def find_encoder(preference: Sequence[str] = ("mp3", "ogg", "opus")) -> Optional[Encoder]:
  """The first installed encoder for the formats in `preference` order, or None.

  mp3 comes first by default: every current browser (Safari included) plays it.
  Tools tried per format: ffmpeg (if built with the codec), then lame / oggenc /
  opusenc, then sox (if built with the format).
  """
  ffmpeg_encoders = sox_formats = None
  for fmt in preference:
    ext, mime = _FORMATS[fmt]
    if shutil.which("ffmpeg"):
      if ffmpeg_encoders is None:
        ffmpeg_encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"],
                                         capture_output=True, text=True, check=False).stdout
      codec = {"mp3": "libmp3lame", "ogg": "libvorbis", "opus": "libopus"}[fmt]
      if codec in ffmpeg_encoders:
        return Encoder(fmt, ext, mime, "ffmpeg")
    tool = {"mp3": "lame", "ogg": "oggenc", "opus": "opusenc"}[fmt]
    if shutil.which(tool):
      return Encoder(fmt, ext, mime, tool)
    if shutil.which("sox"):
      if sox_formats is None:
        help_text = subprocess.run(["sox", "-h"], capture_output=True, text=True,
                                   check=False).stdout
        line = [ln for ln in help_text.splitlines() if ln.startswith("AUDIO FILE FORMATS")]
        sox_formats = set(line[0].split(":", 1)[1].split()) if line else set()
      if fmt in sox_formats and fmt != "opus":
        return Encoder(fmt, ext, mime, "sox")
  return None


# -----------------------------------------------------------------------------------------
# Export
# -----------------------------------------------------------------------------------------

def _new_ids(rng, n: int, prefix: str, taken: set) -> list:
  ids = []
  while len(ids) < n:
    # A letter first: ids stay strings in spreadsheets ("1e5" would become a number).
    candidate = prefix + f"{rng.getrandbits(40):010x}"
    if candidate not in taken:
      taken.add(candidate)
      ids.append(candidate)
  return ids


def _script_json(obj) -> str:
  """JSON safe inside <script type="application/json">: no '<', '>' or '&' characters."""
  text = json.dumps(obj, ensure_ascii=True, indent=1, sort_keys=True)
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _validate(clips: Sequence[Clip]) -> dict:
  """Checks roles and pair groups; returns {pair_group: (prompt index, [continuation indices])}."""
  groups: dict = {}
  for i, c in enumerate(clips):
    if c.role not in ROLES:
      raise ValueError(f"clip {i}: role {c.role!r} not in {ROLES}")
    if c.role != "single" and not c.pair_group:
      raise ValueError(f"clip {i}: role {c.role!r} needs a pair_group")
    if c.role == "single" and c.pair_group:
      raise ValueError(f"clip {i}: a single clip has no pair_group ({c.pair_group!r})")
    if not str(c.condition):
      raise ValueError(f"clip {i}: empty condition")
    if c.pair_group:
      groups.setdefault(c.pair_group, ([], []))[0 if c.role == "prompt" else 1].append(i)
  out = {}
  for g, (prompts, conts) in groups.items():
    if len(prompts) != 1 or len(conts) < 2:
      raise ValueError(f"pair_group {g!r}: needs exactly one prompt and at least two "
                       f"continuations (has {len(prompts)} and {len(conts)})")
    out[g] = (prompts[0], conts)
  return out


def _check_blinding(texts: Iterable[str], clips: Sequence[Clip]) -> None:
  """Raises if rater-facing text names a condition or a file path from a clip's meta.

  Whole-word, case-insensitive matches. Condition names under 3 characters are not
  checked: "A" or "B" would match ordinary words of the instructions.
  """
  secrets_ = {str(c.condition) for c in clips if len(str(c.condition)) >= 3}
  for c in clips:
    for v in c.meta.values():
      if isinstance(v, (str, os.PathLike)) and re.search(r"[/\\]|\.midi?$", str(v)):
        secrets_.add(str(v))
        secrets_.add(os.path.basename(str(v)))
  blob = "\n".join(texts)
  for s in sorted(secrets_):
    if s and re.search(r"(?<![A-Za-z0-9])" + re.escape(s) + r"(?![A-Za-z0-9])", blob,
                       re.IGNORECASE):
      raise ValueError(f"rater-facing text would reveal {s!r} (a condition or a source "
                       "path); change the title/instructions/display texts")


def _render_one(job) -> np.ndarray:
  midi, settings = job
  return render_midi(midi, sample_rate=settings["sample_rate"], soundfont=settings["soundfont"],
                     gain=settings["fluidsynth_gain"])


def export_listening(clips: Sequence[Clip], out_dir: PathLike, seconds: float,
                     seed: Optional[int] = None,
                     settings: Optional[Mapping[str, Any]] = None,
                     generation: Optional[Mapping[str, Any]] = None) -> dict:
  """Writes a blinded listening test for `clips` into `out_dir` (see the module docstring).

  Args:
    clips: the clips; every prompt/continuation set is checked (one prompt, >= 2
      continuations per pair_group).
    out_dir: created if missing; existing files of the same names are overwritten.
    seconds: every rated clip is cut (and its audio cut or padded) to this length.
    seed: makes ids and thus the whole export reproducible; None draws ids from
      `secrets` (raters cannot guess them from anything).
    settings: overrides of DEFAULT_SETTINGS (texts shown, audio options).
    generation: how the clips were made (runs, sampling settings), recorded in the
      manifest so the study can be reproduced.

  Returns:
    The manifest (also written as manifest.json): resolved settings, paths, counts,
    encoder, the common loudness and the ids of silent clips.

  Raises:
    ValueError: on inconsistent clips, or when a shown text would reveal a condition.
    RuntimeError: when fluidsynth or the soundfont is missing.
  """
  unknown = set(settings or {}) - set(DEFAULT_SETTINGS)
  if unknown:
    raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULT_SETTINGS)}")
  cfg = {**DEFAULT_SETTINGS, **dict(settings or {})}
  if seconds <= 0:
    raise ValueError(f"seconds must be positive, got {seconds}")
  if len(cfg["rating_labels"]) != 5:
    raise ValueError("rating_labels needs 5 labels (ratings 1..5)")
  clips = list(clips)
  if not clips:
    raise ValueError("no clips to export")
  pair_groups = _validate(clips)
  shown = [str(cfg["title"]), str(cfg["instructions"]), str(cfg["question"]),
           str(cfg["pair_question"]), *map(str, cfg["rating_labels"]),
           *(str(c.display) for c in clips)]
  _check_blinding(shown, clips)

  rng = random.Random(seed) if seed is not None else secrets.SystemRandom()
  taken: set = set()
  clip_ids = _new_ids(rng, len(clips), "c", taken)
  study_id = _new_ids(rng, 1, "s", taken)[0]
  pairs = []  # (pair id, group, prompt id, clip id a, clip id b)
  for g in sorted(pair_groups):
    p, conts = pair_groups[g]
    for a, b in itertools.combinations(conts, 2):
      pairs.append((_new_ids(rng, 1, "p", taken)[0], g, clip_ids[p], clip_ids[a], clip_ids[b]))

  out = pathlib.Path(out_dir)
  rater_dir, audio_dir = out / "rater", out / "rater" / "audio"
  midi_dir, roll_dir = out / "midi", out / "pianoroll"
  for d in (audio_dir, midi_dir, roll_dir):
    d.mkdir(parents=True, exist_ok=True)

  sr = int(cfg["sample_rate"])
  prompt_seconds = float(cfg["prompt_seconds"] or seconds)
  lengths = [prompt_seconds if c.role == "prompt" else float(seconds) for c in clips]
  cut = [cut_notes(as_notes(c.notes), s) for c, s in zip(clips, lengths)]
  midi_paths = [midi_io.write_midi(n, midi_dir / f"{i}.mid") for n, i in zip(cut, clip_ids)]
  workers = int(cfg["workers"] or os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    rendered = list(pool.map(_render_one, [(m, cfg) for m in midi_paths]))
  audio = [fit_length(a, int(round(s * sr)), int(round(min(cfg["fade_out_s"], s / 4) * sr)))
           for a, s in zip(rendered, lengths)]

  # One target for all: the requested loudness, lowered until the clip with the largest
  # crest factor still fits under the peak limit. Equal loudness beats loud.
  loud = [gated_loudness_dbfs(a, sr) for a in audio]
  peaks = [peak_dbfs(a) for a in audio]
  audible = [i for i, l in enumerate(loud) if math.isfinite(l)]
  target = float(cfg["target_loudness_dbfs"])
  for i in audible:
    target = min(target, cfg["peak_dbfs"] - (peaks[i] - loud[i]))
  gains_db = [target - loud[i] if i in audible else 0.0 for i in range(len(clips))]
  silent = [clip_ids[i] for i in range(len(clips)) if i not in audible]

  encoder = None
  if cfg["compress"] == "auto":
    encoder = find_encoder()
  elif cfg["compress"] != "none":
    encoder = find_encoder((cfg["compress"],))
    if encoder is None:
      raise RuntimeError(f"no encoder for {cfg['compress']!r} installed")
  sources = {}
  for i, cid in enumerate(clip_ids):
    wav = write_wav(audio_dir / f"{cid}.wav", audio[i] * 10 ** (gains_db[i] / 20), sr)
    srcs = []
    if encoder is not None:
      comp = audio_dir / f"{cid}.{encoder.ext}"
      proc = subprocess.run(encoder.argv(str(wav), str(comp)), capture_output=True,
                            text=True, check=False)
      if proc.returncode != 0 or not comp.exists():
        raise RuntimeError(f"{encoder.tool} failed on {wav}: {proc.stderr.strip()}")
      srcs.append({"src": f"audio/{comp.name}", "type": encoder.mime})
    srcs.append({"src": f"audio/{wav.name}", "type": "audio/wav"})
    sources[cid] = srcs

  from midijax import reports  # pylint: disable=g-import-not-at-top  # matplotlib: slow import
  for n, cid, s in zip(cut, clip_ids, lengths):
    reports.plot_pianoroll(n, roll_dir / f"{cid}.png", title=cid, seconds=s)

  # Rater-facing data: ids, audio paths and the shown texts only; sorted by id so the
  # order of `clips` (which usually follows the conditions) is not visible.
  def item(i):
    return {"id": clip_ids[i], "audio": sources[clip_ids[i]], "display": str(clips[i].display)}

  page_data = {
      "study_id": study_id,
      "title": str(cfg["title"]), "instructions": str(cfg["instructions"]),
      "question": str(cfg["question"]), "pair_question": str(cfg["pair_question"]),
      "rating_labels": [str(x) for x in cfg["rating_labels"]],
      "seconds": float(seconds),
      "clips": sorted((item(i) for i, c in enumerate(clips) if c.role != "prompt"),
                      key=lambda d: d["id"]),
      "prompts": sorted((item(i) for i, c in enumerate(clips) if c.role == "prompt"),
                        key=lambda d: d["id"]),
      "pairs": sorted(({"id": pid, "prompt": pr, "clips": [a, b]}
                       for pid, _, pr, a, b in pairs), key=lambda d: d["id"]),
  }
  (rater_dir / "clips.json").write_text(json.dumps(page_data, indent=1, sort_keys=True) + "\n")
  (rater_dir / "index.html").write_text(build_page(page_data), encoding="utf-8")

  meta_keys = sorted({str(k) for c in clips for k in c.meta})
  key_path = out / "key.csv"
  with open(key_path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "kind", "condition", "role", "pair_group", "prompt_id", "members",
                "seconds", "loudness_dbfs", "gain_db", "midi", "audio"] +
               [f"meta_{k}" for k in meta_keys])
    for i, (c, cid) in enumerate(zip(clips, clip_ids)):
      prompt_id = clip_ids[pair_groups[c.pair_group][0]] if c.pair_group else ""
      w.writerow([cid, "clip", c.condition, c.role, c.pair_group or "",
                  prompt_id if c.role == "continuation" else "", "", lengths[i],
                  f"{loud[i]:.2f}", f"{gains_db[i]:.2f}",
                  os.path.relpath(midi_paths[i], out), f"rater/audio/{cid}.wav"] +
                 [_csv_value(c.meta.get(k, "")) for k in meta_keys])
    for pid, g, pr, a, b in pairs:
      w.writerow([pid, "pair", "", "", g, pr, f"{a} {b}", "", "", "", "", ""] +
                 [""] * len(meta_keys))

  manifest = {
      "study_id": study_id,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "seconds": float(seconds), "seed": seed,
      "settings": cfg,
      "counts": {"clips": len(clips),
                 "rated": sum(c.role != "prompt" for c in clips),
                 "prompts": sum(c.role == "prompt" for c in clips),
                 "pairs": len(pairs),
                 "conditions": sorted({str(c.condition) for c in clips})},
      "audio": {"sample_rate": sr, "channels": 2, "loudness_dbfs": target,
                "loudness": "gated RMS, 400 ms blocks, -70 dBFS and -10 dB relative gates",
                "encoder": dataclasses.asdict(encoder) if encoder else None,
                "fluidsynth": fluidsynth_version(),
                "soundfont": str(cfg["soundfont"]),
                "silent_clips": silent},
      "files": {"rater_dir": "rater", "index_html": "rater/index.html",
                "clips_json": "rater/clips.json", "key_csv": "key.csv",
                "midi_dir": "midi", "pianoroll_dir": "pianoroll"},
  }
  if generation is not None:
    manifest["generation"] = dict(generation)
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def _csv_value(v) -> str:
  if isinstance(v, (dict, list, tuple)):
    return json.dumps(v, sort_keys=True, default=str)
  return str(v)


def build_page(page_data: Mapping[str, Any]) -> str:
  """index.html with the page's CSS, JS and `page_data` inlined (one self-contained file).

  The data goes in as JSON in a non-executed script element with '<', '>' and '&'
  escaped, so no value can close the element; the page shows every text with
  textContent; and the page's Content-Security-Policy allows only its own script (by
  hash), no network and no other origin.
  """
  html = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
  css = (PAGE_DIR / "listening.css").read_text(encoding="utf-8")
  js = (PAGE_DIR / "listening.js").read_text(encoding="utf-8")
  if "</" in js.replace("<\\/", "") or "</style" in css:
    raise ValueError("page assets must not contain '</' (it would end the inline element)")
  # The Content-Security-Policy lets only this exact script run: text that somehow became
  # markup still could not execute.
  script_hash = "'sha256-" + base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()
                                             ).decode("ascii") + "'"
  # The data goes in last so that text inside it is never taken for a placeholder.
  for placeholder, value in (("/*__STYLE__*/", css), ("/*__SCRIPT__*/", js),
                             ("__SCRIPT_HASH__", script_hash),
                             ("__STUDY_DATA__", _script_json(dict(page_data)))):
    if html.count(placeholder) != 1:
      raise ValueError(f"page template needs exactly one {placeholder}")
    html = html.replace(placeholder, value)
  return html


# -----------------------------------------------------------------------------------------
# Results
# -----------------------------------------------------------------------------------------

def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
  """Mean, sample std and the Student t confidence interval of the mean (scipy.stats)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(x.mean()) if n else float("nan")
  std = float(x.std(ddof=1)) if n > 1 else float("nan")
  half = (float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1
          else float("nan"))
  return {"n": n, "mean": mean, "std": std, "ci95": half,
          "ci95_low": mean - half, "ci95_high": mean + half}


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple:
  """Wilson score interval (low, high) of a proportion k / n; NaNs when n is 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if n == 0:
    return float("nan"), float("nan")
  ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
  return float(ci.low), float(ci.high)


def sign_test(k: int, n: int) -> float:
  """Exact two-sided sign-test p-value of k successes in n at p = 0.5; NaN when n is 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.binomtest(k, n, 0.5).pvalue) if n else float("nan")


def read_key(key_csv: PathLike) -> dict:
  """{id: row dict} from key.csv."""
  with open(key_csv, newline="", encoding="utf-8") as f:
    return {row["id"]: row for row in csv.DictReader(f)}


def listening_results(csv_paths: Sequence[PathLike], key_csv: PathLike, *,
                      plot_path: Optional[PathLike] = None) -> dict:
  """Joins downloaded answer CSVs with key.csv.

  Args:
    csv_paths: CSVs the page downloaded (one or more per rater; for a repeated
      (rater, item) the answer with the latest timestamp counts).
    key_csv: the export's key.csv.
    plot_path: optional PNG: MOS with 95% CIs per condition and preference rates.

  Returns:
    {"n_raters", "n_ratings", "n_preferences",
     "mos": {condition: {n, raters, mean, std, ci95 (half-width, t-distribution over
             all ratings), ci95_low, ci95_high}},
     "preferences": {"A vs B": {a, b, a_wins, b_wins, n, a_rate, ci95_low/high (Wilson,
             of a_rate), p_value (exact two-sided sign test)}},
     "same_condition_pairs": answers whose two clips share a condition,
     "mismatched_pairs": answers whose clips are not the pair's members (ignored),
     "unknown_ids": ids in the answers that the key does not have (ignored), "plot"}.
  """
  key = read_key(key_csv)
  latest: dict = {}
  unknown = set()
  for path in csv_paths:
    with open(path, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        kind = row.get("item", "")
        ident = row.get("clip_id") if kind == "rating" else row.get("pair_id")
        if kind not in ("rating", "preference") or not ident:
          continue
        k = (row.get("study_id", ""), row.get("rater", ""), kind, ident)
        if k not in latest or row.get("timestamp", "") >= latest[k].get("timestamp", ""):
          latest[k] = row

  ratings: dict = {}
  raters_by_cond: dict = {}
  prefs: dict = {}
  same = mismatched = 0
  raters = set()
  n_ratings = n_prefs = 0
  for (_, rater, kind, ident), row in sorted(latest.items()):
    if kind == "rating":
      clip = key.get(ident)
      if clip is None or clip["kind"] != "clip":
        unknown.add(ident)
        continue
      try:
        value = float(row["rating"])
      except (TypeError, ValueError):
        continue
      cond = clip["condition"]
      ratings.setdefault(cond, []).append(value)
      raters_by_cond.setdefault(cond, set()).add(rater)
      raters.add(rater)
      n_ratings += 1
    else:
      win, lose = row.get("preferred_clip_id", ""), row.get("other_clip_id", "")
      pair = key.get(ident)
      if pair is None or win not in key or lose not in key:
        unknown.update(x for x in (win, lose, ident) if x and x not in key)
        continue
      if pair["kind"] != "pair" or sorted(pair["members"].split()) != sorted((win, lose)):
        mismatched += 1
        continue
      cw, cl = key[win]["condition"], key[lose]["condition"]
      raters.add(rater)
      n_prefs += 1
      if cw == cl:
        same += 1
        continue
      a, b = sorted((cw, cl))
      entry = prefs.setdefault(f"{a} vs {b}", {"a": a, "b": b, "a_wins": 0, "b_wins": 0})
      entry["a_wins" if cw == a else "b_wins"] += 1

  mos = {}
  for cond in sorted(ratings):
    mos[cond] = {**mean_ci(ratings[cond]), "raters": len(raters_by_cond[cond])}
  for entry in prefs.values():
    n = entry["a_wins"] + entry["b_wins"]
    entry["n"] = n
    entry["a_rate"] = entry["a_wins"] / n if n else float("nan")
    entry["ci95_low"], entry["ci95_high"] = proportion_ci(entry["a_wins"], n)
    entry["p_value"] = sign_test(entry["a_wins"], n)
  results = {"n_raters": len(raters), "n_ratings": n_ratings, "n_preferences": n_prefs,
             "mos": mos, "preferences": dict(sorted(prefs.items())),
             "same_condition_pairs": same, "mismatched_pairs": mismatched,
             "unknown_ids": sorted(unknown), "plot": None}
  if plot_path is not None:
    results["plot"] = str(plot_listening_results(results, plot_path))
  return results


def plot_listening_results(results: Mapping[str, Any], path: PathLike) -> pathlib.Path:
  """PNG: MOS per condition with 95% CIs, and preference rates with Wilson CIs."""
  from midijax.reports import agg_figure  # pylint: disable=g-import-not-at-top
  mos, prefs = results["mos"], results["preferences"]
  fig = agg_figure(10, 3.5 + 0.35 * max(len(mos), len(prefs)))
  ax1, ax2 = fig.subplots(1, 2)
  conds = list(mos)
  y = np.arange(len(conds))
  means = [mos[c]["mean"] for c in conds]
  err = [0.0 if not math.isfinite(mos[c]["ci95"]) else mos[c]["ci95"] for c in conds]
  ax1.barh(y, means, xerr=err, color="tab:blue", alpha=0.8, capsize=4)
  ax1.set_yticks(y, [f"{c} (n={mos[c]['n']})" for c in conds], fontsize=8)
  ax1.set_xlim(1, 5)
  ax1.set_xlabel("mean opinion score (1-5), 95% CI")
  names = list(prefs)
  y = np.arange(len(names))
  rates = [prefs[k]["a_rate"] for k in names]
  lo = [max(prefs[k]["a_rate"] - prefs[k]["ci95_low"], 0) for k in names]
  hi = [max(prefs[k]["ci95_high"] - prefs[k]["a_rate"], 0) for k in names]
  ax2.barh(y, rates, xerr=[lo, hi], color="tab:orange", alpha=0.8, capsize=4)
  ax2.axvline(0.5, color="gray", lw=1, ls="--")
  ax2.set_yticks(y, [f"{prefs[k]['a']} over {prefs[k]['b']} (n={prefs[k]['n']})"
                     for k in names], fontsize=8)
  ax2.set_xlim(0, 1)
  ax2.set_xlabel("share preferring the first, 95% CI")
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path)
  return path


def format_listening_results(results: Mapping[str, Any]) -> str:
  """Plain-text tables of `listening_results`."""
  lines = [f"{results['n_raters']} raters, {results['n_ratings']} ratings, "
           f"{results['n_preferences']} preferences", "",
           f"{'condition':<24} {'n':>5} {'raters':>6} {'MOS':>6} {'95% CI':>17}"]
  for cond, m in results["mos"].items():
    ci = (f"[{m['ci95_low']:.2f}, {m['ci95_high']:.2f}]" if math.isfinite(m["ci95"])
          else "n/a")
    lines.append(f"{cond:<24} {m['n']:>5} {m['raters']:>6} {m['mean']:>6.2f} {ci:>17}")
  if results["preferences"]:
    lines += ["", f"{'pair':<40} {'wins':>9} {'rate':>6} {'95% CI':>15} {'p':>7}"]
    for name, p in results["preferences"].items():
      lines.append(f"{p['a'] + ' over ' + p['b']:<40} {p['a_wins']:>4}/{p['n']:<4} "
                   f"{p['a_rate']:>6.2f} [{p['ci95_low']:.2f}, {p['ci95_high']:.2f}] "
                   f"{p['p_value']:>7.3f}")
  if results.get("same_condition_pairs"):
    lines.append(f"({results['same_condition_pairs']} preferences between clips of one "
                 "condition left out)")
  if results.get("unknown_ids"):
    lines.append(f"ids not in the key (ignored): {', '.join(results['unknown_ids'])}")
  return "\n".join(lines)


def print_listening_results(results: Mapping[str, Any]) -> None:
  print(format_listening_results(results))


# -----------------------------------------------------------------------------------------
# From trained runs: `midijax export-listening --run NAME=WORKDIR ...`
# -----------------------------------------------------------------------------------------

def clips_from_runs(runs: Mapping[str, str], *, real_split: str = "test", num_clips: int = 20,
                    seconds: float = 20.0, prompt_seconds: Optional[float] = None,
                    mode: str = "both", seed: int = 0, temperature: Optional[float] = None,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    guidance: Optional[float] = None, data_dir: Optional[str] = None,
                    log=print) -> list:
  """Builds the clips of a listening test from trained runs and real data.

  Each run samples with its own config.sample settings (the ones tuned for it), except
  those of temperature, top_k, top_p and guidance given here, which apply to every run.
  For each of `num_clips` real pieces of `real_split` (the same pieces for every run):
    * "free" (mode free/both): each run samples a piece conditioned on the real piece's
      BOS + conditioning prefix (style, tempo, ...); the real piece is rated beside them.
    * "continuation" (mode continuation/both): the first `prompt_seconds` of the real piece
      are the prompt; each run continues it, and the real continuation is the reference;
      raters hear the prompt and compare continuations in pairs.
  Every clip is later cut to `seconds`. The key records run, workdir, checkpoint step, seed,
  prompt and real piece index.
  """
  # pylint: disable=g-import-not-at-top
  from midijax import encoding as encoding_lib
  from midijax import evaluation, generation, input_pipeline, runs as runs_lib, sampling
  if mode not in ("free", "continuation", "both"):
    raise ValueError(f"mode must be free, continuation or both, got {mode!r}")
  prompt_seconds = seconds / 4 if prompt_seconds is None else prompt_seconds
  loaded, draw = {}, {}
  for name, workdir in runs.items():
    model, enc, config, step = runs_lib.load_run(workdir, best=_has_best(workdir))
    if data_dir:
      config.data.data_dir = data_dir
    loaded[name] = (model, enc, config, step, str(workdir))
    draw[name] = evaluation.resolve_sampling(config, temperature, top_k, top_p, guidance)
  first = next(iter(loaded.values()))
  enc, config = first[1], first[2]
  for name, (_, e, c, _, w) in loaded.items():
    if e.vocab.names != enc.vocab.names or c.data.name != config.data.name:
      raise ValueError(f"run {name} ({w}) uses another encoding or dataset than "
                       f"{next(iter(loaded))}; compare runs of one dataset")
  is_drum = encoding_lib.is_drum_music(enc, dataset=config.data.name)
  spec = input_pipeline.dataset_specs(config)[0]
  store = input_pipeline.load_split(spec.version_dir, real_split)
  # Each piece's tempo: encodings that count time in beats decode at it.
  meters = evaluation.piece_meters(spec.version_dir, real_split)
  rng = np.random.default_rng(seed)
  picks = rng.permutation(len(store))[:num_clips]
  clips = []
  for i in picks:
    piece = store.piece(int(i))
    qpm = float(meters[int(i)][0]) if meters else 120.0
    k = int(np.argmin(piece >= enc.bos_id)) if not (piece >= enc.bos_id).all() else len(piece)
    prefix, body = piece[:k], piece[k:]
    real_notes = enc.decode_notes(body, is_drum=is_drum, qpm=qpm)
    cond_names = [enc.vocab.names[t] for t in prefix[1:]]
    meta_real = {"real_split": real_split, "real_index": int(i), "conditions": cond_names,
                 "dataset": f"{config.data.name}/{config.data.builder_config}"}
    if mode in ("free", "both"):
      clips.append(Clip("real", real_notes, meta=meta_real))
      for name, (model, e, c, step, w) in loaded.items():
        res = sampling.sample_tokens(model, prefix[None].astype(np.int32), encoding=e,
                                     max_new_tokens=_token_budget(seconds),
                                     seed=seed + int(i), max_seconds=seconds, qpm=qpm,
                                     cache_len=generation.trained_context(c),
                                     **draw[name])
        toks = sampling.trim_sample(np.asarray(res["tokens"])[0], len(prefix))[len(prefix):]
        clips.append(Clip(name, e.decode_notes(toks, is_drum=is_drum, qpm=qpm),
                          meta={"run": name, "workdir": w, "step": step, "seed": seed + int(i),
                                "kind": "free", **draw[name], **meta_real}))
    if mode in ("continuation", "both"):
      group = f"p{int(i)}"
      prompt_ids = encoding_lib.encode_prompt(enc, real_notes, prompt_seconds)
      prompt_notes = real_notes.select(real_notes.start < prompt_seconds)
      prompt_notes.end = np.minimum(prompt_notes.end, prompt_seconds)
      clips.append(Clip("real", prompt_notes,
                        meta={**meta_real, "prompt_seconds": prompt_seconds},
                        pair_group=group, role="prompt"))
      clips.append(Clip("real", real_notes, meta={**meta_real, "kind": "real continuation"},
                        pair_group=group, role="continuation"))
      for name, (model, e, c, step, w) in loaded.items():
        prompt = np.concatenate([prefix, prompt_ids]).astype(np.int32)
        if len(prompt) >= generation.trained_context(c) - 8:
          log(f"skipping prompt {group}: {len(prompt)} tokens fill the context")
          continue
        res = sampling.sample_tokens(model, prompt[None], encoding=e,
                                     max_new_tokens=_token_budget(seconds - prompt_seconds),
                                     seed=seed + int(i), max_seconds=seconds - prompt_seconds,
                                     qpm=qpm, cache_len=generation.trained_context(c),
                                     **draw[name])
        toks = sampling.trim_sample(np.asarray(res["tokens"])[0], len(prefix))[len(prefix):]
        clips.append(Clip(name, e.decode_notes(toks, is_drum=is_drum, qpm=qpm),
                          pair_group=group,
                          role="continuation",
                          meta={"run": name, "workdir": w, "step": step, "seed": seed + int(i),
                                "kind": "continuation", **draw[name], **meta_real,
                                "prompt_seconds": prompt_seconds}))
    log(f"clip set {len(clips)} clips (piece {int(i)})")
  return clips


def _token_budget(seconds: float) -> int:
  """New tokens that surely cover `seconds` of music (200 a second, as `continue` allows):
  the clip stops at its seconds, not at a token count, so it is never shorter than the
  real one (the sampler's window slides past the trained context)."""
  return int(min(max(seconds, 1.0) * 200, 1 << 14))


def _has_best(workdir) -> bool:
  from midijax import checkpoint as ckpt_lib
  b = ckpt_lib.best_step(workdir)
  return b is not None and b in ckpt_lib.available_steps(workdir)


def run_quality(workdir) -> dict:
  """What `midijax evaluate` measured for the checkpoint an export uses (the best, else
  the latest): {"step", "eval" (its metrics.json), "split", "nll_per_token", "c2st"
  (`evaluation.c2st_summary`: accuracy with its interval per continuation length)}, or
  {"step", "eval": None, "note"} when that checkpoint has no evaluation report."""
  from midijax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from midijax import evaluation  # pylint: disable=g-import-not-at-top
  step = (ckpt_lib.best_step(workdir) if _has_best(workdir)
          else max(ckpt_lib.available_steps(workdir), default=None))
  path = ckpt_lib.workdir_path(workdir) / "eval" / str(step) / "metrics.json"
  if step is None or not path.exists():
    return {"step": step, "eval": None,
            "note": f"no report: run `midijax evaluate --workdir {workdir}` for step {step}"}
  metrics = json.loads(path.read_text())
  return {"step": step, "eval": str(path), "split": metrics.get("split"),
          "nll_per_token": (metrics.get("nll") or {}).get("nll_per_token"),
          "c2st": evaluation.c2st_summary(metrics)}


def export_runs(runs: Mapping[str, str], out_dir: PathLike, *, real_split: str = "test",
                num_clips: int = 20, seconds: float = 20.0,
                prompt_seconds: Optional[float] = None, mode: str = "both", seed: int = 0,
                temperature: Optional[float] = None, top_k: Optional[int] = None,
                top_p: Optional[float] = None, guidance: Optional[float] = None,
                data_dir: Optional[str] = None, log=print) -> dict:
  """A listening test of trained runs against real clips: `clips_from_runs` (see there for
  the arguments) then `export_listening`. manifest.json records the settings, each run's
  sampling settings, and each run's quality as `midijax evaluate` measured it
  (`run_quality`: NLL and the C2ST accuracies).

  Returns:
    The manifest (also out_dir/manifest.json).
  """
  from midijax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from midijax import evaluation  # pylint: disable=g-import-not-at-top
  clips = clips_from_runs(runs, real_split=real_split, num_clips=num_clips, seconds=seconds,
                          prompt_seconds=prompt_seconds, mode=mode, seed=seed,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          guidance=guidance, data_dir=data_dir, log=log)
  sampling = {name: evaluation.resolve_sampling(
      json.loads((ckpt_lib.workdir_path(w) / "config.json").read_text()),
      temperature, top_k, top_p, guidance) for name, w in runs.items()}
  generation = {"runs": dict(runs), "real_split": real_split, "mode": mode,
                "sampling": sampling, "num_clips": num_clips, "seconds": seconds,
                "prompt_seconds": prompt_seconds, "seed": seed,
                "quality": {name: run_quality(w) for name, w in runs.items()}}
  return export_listening(clips, out_dir, seconds=seconds, seed=seed, generation=generation)
