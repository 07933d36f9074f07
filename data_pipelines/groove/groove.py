"""`groove`: the Groove MIDI Dataset (GMD v1.0.0, CC BY 4.0) as token ids.

1,150 drum performances by 10 drummers on a Roland TD-11 (1,090 in the released
MIDI-only zip), with style, tempo, beat/fill and meter for each. Splits come from
``info.csv``'s `split` column. Source: the official MIDI-only zip through TFDS's download
manager (checksum in checksums.tsv), or ``--manual_dir`` pointing at an extracted
``groove/`` folder (info.csv + drummerN/sessionM/*.mid), or its parent.

Configs (one per encoding, plus GMD's usual bar windows)::

  drums         GrooVAE's 9 drum classes, 10 ms microtiming, full performances (default)
  drums_beats   the same hits with time counted in beats (1/48 quarter note: microtiming as
                a fraction of the beat, the bar grid exact at any tempo), a BAR token at
                each bar line, and the meter as a conditioning token; full performances
  drums_beats_dv  drums_beats with each hit as [DRUM, VELOCITY]: its own velocity after the
                drum, instead of a velocity change before it
  drums_grid    the same hits as time shifts of 16th notes plus an offset token for each
                hit's microtiming (1/48 quarter note from its grid point), meter token;
                full performances
  drums_2bar    the same as drums, 2-bar windows at the file's tempo, 1-bar hop
  drums_4bar    the same, 4-bar windows, 1-bar hop
  drums_continuation  continuation pairs: 2 prompt bars, then the next 2 bars as the
                target (windows 2 bars apart, so each bar is a target once; no EOS)
  performance   Music Transformer events (drum pitches as notes), full performances
  triples       POS/NOTE_ON/DUR triples on a 24-per-quarter grid, full performances

Every config prepends BOS, STYLE_<primary style>, TEMPO_<bin of the CSV bpm> and
TYPE_<beat|fill> (drums_beats, drums_beats_dv, drums_grid: then METER_<meter>) and appends EOS (continuation pairs: no EOS, the music goes on).

Any config can be narrowed to some styles or drummers (`styles`, `drummers`: primary
styles and drummer names of info.csv) and pairs re-cut (`prompt_bars`, `target_bars`,
`hop_bars`), under a name of its own:

    tfds build data_pipelines/groove --config drums --manual_dir ../shared/data/groove
    midijax build-data groove --config drums_continuation --set styles=funk \
        --name drums_continuation_funk --manual_dir ../shared/data/groove
"""
from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import sys
from typing import Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

try:
  from data_pipelines import common
except ImportError:  # `tfds build data_pipelines/groove` puts only data_pipelines/ on sys.path.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from data_pipelines import common

URL = "https://storage.googleapis.com/magentadata/datasets/groove/groove-v1.0.0-midionly.zip"
# Conditioning prefix of every config: GMD's style, tempo bin and beat/fill.
CONDITIONING = ("style", "tempo", "type")

_CITATION = """\
@inproceedings{groove2019,
    Author = {Jon Gillick and Adam Roberts and Jesse Engel and Douglas Eck and David Bamman},
    Title = {Learning to Groove with Inverse Sequence Transformations},
    Booktitle = {International Conference on Machine Learning (ICML)},
    Year = {2019},
}
"""


@dataclasses.dataclass(eq=False)
class GrooveConfig(common.MidiBuilderConfig):
  """A groove builder config: `common.MidiBuilderConfig` plus a choice of files.

  Attributes:
    styles: keep only files of these primary styles (info.csv's style before '/', e.g.
      funk); empty = all.
    drummers: keep only files of these drummers (e.g. drummer1); empty = all.
  """
  styles: Tuple[str, ...] = ()
  drummers: Tuple[str, ...] = ()


def _config(name: str, description: str, **kw) -> GrooveConfig:
  kw.setdefault("conditioning", CONDITIONING)
  kw.setdefault("drum_policy", "only")
  return GrooveConfig(name=name, description=description, **kw)


class Groove(common.MidiDatasetBuilder):
  """The Groove MIDI Dataset tokenized with a midijax encoding."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: drums/performance/triples, 2- and 4-bar windows; "
                            "drums_beats, drums_grid, drums_beats_dv."}
  BUILDER_CONFIGS = [
      _config("drums", "GrooVAE 9-class drum hits, 10 ms timing, full performances.",
              encoding="drums"),
      _config("drums_beats", "GrooVAE 9-class drum hits, time in 1/48 quarter notes (the "
              "beat grid exact at any tempo), a BAR token at each bar line, meter "
              "conditioning, full performances.",
              encoding="drums", encoding_options={"time_unit": "beats", "bar_tokens": True},
              conditioning=CONDITIONING + ("meter",)),
      _config("drums_beats_dv", "drums_beats with each hit written as its DRUM token, "
              "then its own VELOCITY token.", encoding="drums",
              encoding_options={"time_unit": "beats", "bar_tokens": True,
                                "velocity_after": True},
              conditioning=CONDITIONING + ("meter",)),
      _config("drums_grid", "GrooVAE 9-class drum hits on a 16th-note grid with each hit's "
              "microtiming as an offset token (1/48 quarter note), meter conditioning, full "
              "performances.", encoding="drums",
              encoding_options={"time_unit": "grid", "max_shift_steps": 16},
              conditioning=CONDITIONING + ("meter",)),
      _config("drums_2bar", "drums, 2-bar windows at the file's tempo, 1-bar hop.",
              encoding="drums", window_bars=2),
      _config("drums_4bar", "drums, 4-bar windows at the file's tempo, 1-bar hop.",
              encoding="drums", window_bars=4),
      _config("drums_continuation", "drums continuation pairs: 2 prompt bars, then the "
              "next 2 bars as the target (2-bar hop, no EOS).", encoding="drums",
              prompt_bars=2, target_bars=2, hop_bars=2, eos=False),
      _config("performance", "Performance events (drum pitches as notes), full performances.",
              encoding="performance"),
      _config("triples", "POSITION/NOTE_ON/DURATION triples, full performances.",
              encoding="triples"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "drums"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. Without internet, extract groove-v1.0.0-midionly.zip and pass its groove/ "
      "folder (info.csv + drummerN/sessionM/*.mid) as --manual_dir.")
  DESCRIPTION = ("Groove MIDI Dataset v1.0.0 (drum performances by 10 drummers) as midijax "
                 "token ids with style/tempo/beat-fill conditioning tokens.")
  HOMEPAGE = "https://magenta.tensorflow.org/datasets/groove"
  CITATION = _CITATION
  DATASET_VALUE = "groove"
  CONDITIONING_KINDS = ("style", "tempo", "type", "meter", "family", "dataset")
  METADATA_FEATURES = {
      # GMD's id, e.g. 'drummer1/eval_session/1'.
      "id": tfds.features.Text(),
      "drummer": tfds.features.Text(),
      "session": tfds.features.Text(),
      # Primary style ('funk') and the full label ('funk/groove1').
      "style": tfds.features.Text(),
      "style_full": tfds.features.Text(),
      # Tempo from info.csv (beats per minute).
      "bpm": np.int32,
      # 'beat' or 'fill'.
      "beat_type": tfds.features.Text(),
      # Meter as in info.csv, e.g. '4-4'.
      "time_signature": tfds.features.Text(),
      # Path of the MIDI file relative to the groove/ folder.
      "midi_filename": tfds.features.Text(),
  }

  def _source_dir(self, dl_manager) -> epath.Path:
    manual = self._manual_root(dl_manager)
    if manual is not None:
      for root in (manual, manual / "groove"):
        if (root / "info.csv").is_file():
          return root
      raise common.BuildError(f"--manual_dir {manual}: no info.csv there or in groove/; pass "
                              "the extracted GMD folder (info.csv + drummerN/sessionM/*.mid)")
    try:
      return epath.Path(dl_manager.download_and_extract(URL)) / "groove"
    except Exception as e:  # pylint: disable=broad-except
      raise common.BuildError(
          f"could not download {URL} ({type(e).__name__}: {e}); without internet, pass "
          "--manual_dir pointing at an extracted groove/ folder") from e

  def _split_generators(self, dl_manager):
    root = self._source_dir(dl_manager)
    rows = list(csv.DictReader(io.StringIO((root / "info.csv").read_text(), newline="")))
    missing = {"id", "drummer", "session", "style", "bpm", "beat_type", "time_signature",
               "midi_filename", "duration", "split"} - set(rows[0] if rows else ())
    if missing:
      raise common.BuildError(f"{root / 'info.csv'}: missing column(s) {sorted(missing)}")
    rows = self._chosen(rows, root)
    jobs = {}
    for row in rows:
      style_full = row["style"]
      meta = self._job_meta({
          "id": row["id"], "drummer": row["drummer"], "session": row["session"],
          "style": style_full.split("/")[0], "style_full": style_full,
          "bpm": int(float(row["bpm"])), "beat_type": row["beat_type"],
          "time_signature": row["time_signature"], "midi_filename": row["midi_filename"],
          # Hints for the tokenizer: beat/fill conditioning and the recorded duration.
          "type": row["beat_type"], "duration": float(row["duration"] or 0.0),
      })
      jobs.setdefault(row["split"], []).append(
          common.FileJob(key=row["id"], path=str(root / row["midi_filename"]), meta=meta))
    return self._split_dict(jobs)

  def _chosen(self, rows, root):
    """The info.csv rows of the config's `styles` and `drummers` (all when empty)."""
    config = self.builder_config
    styles = tuple(getattr(config, "styles", ()) or ())
    drummers = tuple(getattr(config, "drummers", ()) or ())
    for field, wanted, column in (("styles", styles, lambda r: r["style"].split("/")[0]),
                                  ("drummers", drummers, lambda r: r["drummer"])):
      have = sorted({column(r) for r in rows})
      unknown = [w for w in wanted if w not in have]
      if unknown:
        raise common.BuildError(f"{field}={unknown}: not in {root / 'info.csv'}; it has "
                                f"{', '.join(have)}")
      if wanted:
        rows = [r for r in rows if column(r) in wanted]
    return rows
