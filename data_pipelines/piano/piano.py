"""`piano`: MAESTRO-layout piano performances (plus GiantMIDI-Piano) as token ids.

Sources, in ``--manual_dir`` (or the official MAESTRO v3 MIDI-only zip when none is
given):

* MAESTRO: a CSV with canonical_composer, canonical_title, split, year,
  midi_filename, duration (v2 and v3 column sets; extra columns ignored) and the
  MIDI files under its year folders, paths relative to the CSV. The CSV is found in
  the folder itself, in maestro/, or one folder down (e.g. maestro-v3.0.0/).
  Splits: the CSV's `split` column.
* GiantMIDI-Piano: a giantmidi/ folder beside it with metadata.csv (midi_filename,
  composer). It has no split column, so each file's split is hashed from
  'giantmidi/<midi_filename>' with the config's `split_ratios` (default 80/10/10,
  `common.hash_split`): stable when files are added, identical on every machine.

Sustain-pedal (CC 64) note extension is applied before encoding (note-seq's rule),
except in `performance_nosustain`. Configs::

  performance            MAESTRO + GiantMIDI, Music Transformer events (default)
  performance_maestro    MAESTRO only
  performance_nosustain  MAESTRO + GiantMIDI without the pedal applied
  triples                POS/NOTE_ON/DUR triples (quarter-note grid)

Every config prepends BOS and DATASET_<maestro|giantmidi>, and appends EOS.

    tfds build data_pipelines/piano --config performance --manual_dir ../shared/data/piano
"""
from __future__ import annotations

import csv
import io
import pathlib
import sys
from typing import List, Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

try:
  from data_pipelines import common
except ImportError:  # `tfds build data_pipelines/piano` puts only data_pipelines/ on sys.path.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from data_pipelines import common

# TODO(checksum): the MAESTRO v3 MIDI-only zip's size and sha256 are not registered (no
# machine with internet here); record them once with
# `tfds build data_pipelines/piano --register_checksums`.
URL = "https://storage.googleapis.com/magentadata/datasets/maestro/v3.0.0/maestro-v3.0.0-midi.zip"
MAESTRO_COLUMNS = {"canonical_composer", "canonical_title", "split", "year", "midi_filename",
                   "duration"}
GIANTMIDI_COLUMNS = {"midi_filename", "composer"}
# Conditioning prefix: which corpus a piece comes from (performances vs transcriptions).
CONDITIONING = ("dataset",)

_CITATION = """\
@inproceedings{hawthorne2018enabling,
  title={Enabling Factorized Piano Music Modeling and Generation with the {MAESTRO} Dataset},
  author={Curtis Hawthorne and Andriy Stasyuk and Adam Roberts and Ian Simon and
          Cheng-Zhi Anna Huang and Sander Dieleman and Erich Elsen and Jesse Engel and
          Douglas Eck},
  booktitle={International Conference on Learning Representations},
  year={2019},
}
@article{kong2022giantmidi,
  title={{GiantMIDI-Piano}: A large-scale {MIDI} dataset for classical piano music},
  author={Kong, Qiuqiang and Li, Bochen and Chen, Jitong and Wang, Yuxuan},
  journal={Transactions of the International Society for Music Information Retrieval},
  year={2022},
}
"""


def _config(name: str, description: str, **kw) -> common.MidiBuilderConfig:
  kw.setdefault("encoding", "performance")
  kw.setdefault("conditioning", CONDITIONING)
  kw.setdefault("sustain", True)
  kw.setdefault("sources", ("maestro", "giantmidi"))
  return common.MidiBuilderConfig(name=name, description=description, drum_policy="drop", **kw)


def _read_csv(path: epath.Path) -> List[dict]:
  return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def _has_columns(path: epath.Path, columns) -> bool:
  with path.open(encoding="utf-8") as f:
    header = next(csv.reader(f), [])
  return columns <= set(header)


def find_maestro_csv(root: epath.Path) -> Optional[epath.Path]:
  """The MAESTRO metadata CSV in `root`, root/maestro or one folder down; None if absent."""
  for pattern in ("*.csv", "maestro/*.csv", "*/*.csv"):
    for path in sorted(root.glob(pattern)):
      if _has_columns(path, MAESTRO_COLUMNS):
        return path
  return None


def find_giantmidi_csv(root: epath.Path) -> Optional[epath.Path]:
  path = root / "giantmidi" / "metadata.csv"
  return path if path.is_file() and _has_columns(path, GIANTMIDI_COLUMNS) else None


class Piano(common.MidiDatasetBuilder):
  """MAESTRO-layout piano performances (and GiantMIDI-Piano) tokenized with midijax."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: MAESTRO CSV splits + hashed GiantMIDI splits."}
  BUILDER_CONFIGS = [
      _config("performance", "MAESTRO + GiantMIDI, sustain applied, performance events."),
      _config("performance_maestro", "MAESTRO only, sustain applied, performance events.",
              sources=("maestro",)),
      _config("performance_nosustain", "MAESTRO + GiantMIDI, performance events, no pedal.",
              sustain=False),
      _config("triples", "MAESTRO + GiantMIDI, sustain applied, POS/NOTE_ON/DUR triples.",
              encoding="triples"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "performance"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. Without internet, pass a folder holding an extracted MAESTRO (its CSV and "
      "year folders; e.g. maestro-v3.0.0/ or maestro/) and optionally giantmidi/ with "
      "metadata.csv as --manual_dir.")
  DESCRIPTION = ("Piano performances (MAESTRO, GiantMIDI-Piano) as midijax token ids, sustain "
                 "pedal applied, with composer/title/year metadata.")
  HOMEPAGE = "https://magenta.tensorflow.org/datasets/maestro"
  CITATION = _CITATION
  CONDITIONING_KINDS = ("tempo", "meter", "family", "dataset")
  METADATA_FEATURES = {
      # '<source>/<midi_filename>', unique across sources.
      "id": tfds.features.Text(),
      "composer": tfds.features.Text(),
      "title": tfds.features.Text(),
      # Competition year (MAESTRO); 0 when unknown (GiantMIDI).
      "year": np.int32,
      # 'maestro' or 'giantmidi'.
      "source": tfds.features.Text(),
      # Path of the MIDI file relative to its source's CSV.
      "midi_filename": tfds.features.Text(),
  }

  def _source_roots(self, dl_manager):
    """(MAESTRO CSV or None, GiantMIDI CSV or None) for the configured sources."""
    sources = set(self.builder_config.sources)
    manual = self._manual_root(dl_manager)
    if manual is None:
      try:
        manual = epath.Path(dl_manager.download_and_extract(URL))
      except Exception as e:  # pylint: disable=broad-except
        raise common.BuildError(
            f"could not download {URL} ({type(e).__name__}: {e}); without internet, pass "
            "--manual_dir with an extracted MAESTRO folder (CSV + year folders)") from e
    maestro = find_maestro_csv(manual) if "maestro" in sources else None
    giant = find_giantmidi_csv(manual) if "giantmidi" in sources else None
    if maestro is None and giant is None:
      raise common.BuildError(
          f"{manual}: found no MAESTRO CSV (columns {sorted(MAESTRO_COLUMNS)}) here, in "
          f"maestro/ or one folder down{', nor giantmidi/metadata.csv' if giant is None else ''}"
          f" (sources: {sorted(sources)})")
    return maestro, giant

  def _split_generators(self, dl_manager):
    maestro, giant = self._source_roots(dl_manager)
    jobs = {}
    if maestro is not None:
      for row in _read_csv(maestro):
        meta = self._job_meta({
            "id": f"maestro/{row['midi_filename']}", "composer": row["canonical_composer"],
            "title": row["canonical_title"], "year": int(row["year"] or 0), "source": "maestro",
            "midi_filename": row["midi_filename"], "dataset": "maestro",
            "duration": float(row["duration"] or 0.0)})
        jobs.setdefault(row["split"], []).append(common.FileJob(
            key=meta["id"], path=str(maestro.parent / row["midi_filename"]), meta=meta))
    if giant is not None:
      for row in _read_csv(giant):
        name = row["midi_filename"]
        meta = self._job_meta({
            "id": f"giantmidi/{name}", "composer": row["composer"],
            "title": pathlib.Path(name).stem, "year": 0, "source": "giantmidi",
            "midi_filename": name, "dataset": "giantmidi"})
        split = common.hash_split(meta["id"], self.builder_config.split_ratios)
        jobs.setdefault(split, []).append(common.FileJob(
            key=meta["id"], path=str(giant.parent / name), meta=meta))
    return self._split_dict(jobs)
