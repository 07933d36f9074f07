"""`midi_folder`: any folder tree of .mid/.midi files, for a user's own data.

``--manual_dir`` is the folder (required). Every .mid/.midi file under it (any case)
is one example; its split is hashed from its path relative to the folder with the
config's `split_ratios` (default 80/10/10, `common.hash_split`), so a file keeps its
split when others are added and every machine agrees. Metadata comes from the path:
id (the relative path), folder, name.

Drum tracks (MIDI channel 10) and pitched tracks. The performance and triples token
streams carry no drum flag, so by default their configs DROP drum notes (a file of
drums only is skipped and reported) rather than let drum hits decode as piano notes;
`performance_keep_drums` keeps them in the one stream instead (such examples have
has_drums=True, are never transposed, and decode on one instrument). The `drums`
config keeps only drum notes. Configs::

  performance             pitched notes, Music Transformer events (default)
  performance_keep_drums  pitched and drum notes in one performance stream
  drums                   drum notes only, 9 GrooVAE classes
  triples                 pitched notes, POS/NOTE_ON/DUR triples

Conditioning prefix: BOS, FAMILY_<the family of the instrument with most notes> and
TEMPO_<bin of the first tempo> (drums: TEMPO only).

    tfds build data_pipelines/midi_folder --manual_dir ~/my_midi
"""
from __future__ import annotations

import os
import pathlib
import sys

import tensorflow_datasets as tfds

try:
  from data_pipelines import common
except ImportError:  # `tfds build` puts only data_pipelines/ on sys.path, not the repo root.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from data_pipelines import common


def _config(name: str, description: str, **kw) -> common.MidiBuilderConfig:
  kw.setdefault("encoding", "performance")
  kw.setdefault("conditioning", ("family", "tempo"))
  kw.setdefault("drum_policy", "drop")
  return common.MidiBuilderConfig(name=name, description=description, **kw)


class MidiFolder(common.MidiDatasetBuilder):
  """A folder of MIDI files tokenized with a midijax encoding."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: hashed splits, drum policies."}
  BUILDER_CONFIGS = [
      _config("performance", "Pitched notes (drums dropped) as performance events."),
      _config("performance_keep_drums", "Pitched and drum notes in one performance stream.",
              drum_policy="keep"),
      _config("drums", "Drum notes only, GrooVAE 9-class drum hits.", encoding="drums",
              drum_policy="only", conditioning=("tempo",)),
      _config("triples", "Pitched notes (drums dropped) as POS/NOTE_ON/DUR triples.",
              encoding="triples"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "performance"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder of .mid/.midi files as --manual_dir."
  DESCRIPTION = "A user's folder of MIDI files as midijax token ids, splits hashed from paths."
  HOMEPAGE = "https://github.com/midijax/midijax"
  CITATION = ""
  DATASET_VALUE = "midi_folder"
  METADATA_FEATURES = {
      # Path relative to the folder (POSIX separators).
      "id": tfds.features.Text(),
      # The relative path's parent folder ('' at the top).
      "folder": tfds.features.Text(),
      # File name without its suffix.
      "name": tfds.features.Text(),
  }

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    if root is None:
      raise common.BuildError("midi_folder needs --manual_dir: the folder of .mid/.midi files "
                              "(it must exist and not be empty)")
    files = common.find_midi_files(root)
    if not files:
      raise common.BuildError(f"{root}: no .mid or .midi files in this folder tree")
    jobs = {}
    for path in files:
      rel = path.relative_to(root).as_posix()
      parent = path.relative_to(root).parent.as_posix()
      meta = self._job_meta({"id": rel, "folder": "" if parent == "." else parent,
                             "name": path.stem})
      split = common.hash_split(rel, self.builder_config.split_ratios)
      jobs.setdefault(split, []).append(common.FileJob(key=rel, path=os.fspath(path), meta=meta))
    return self._split_dict(jobs)
