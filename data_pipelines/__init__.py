"""TFDS builders that tokenize MIDI corpora into sharded TFRecords, and `build`.

    import data_pipelines
    builder = data_pipelines.build("groove", manual_dir="../shared/data/groove")
    ds = builder.as_dataset(split="train")

Builders (each a `tfds.core.GeneratorBasedBuilder`; importing
``data_pipelines.<name>`` registers it with TFDS, and ``tfds build
data_pipelines/<name>`` builds it too):

* ``groove``: the Groove MIDI Dataset (configs drums, drums_2bar, drums_4bar,
  performance, triples).
* ``piano``: MAESTRO-layout piano performances plus a giantmidi/ folder beside them
  (configs performance, performance_maestro, performance_nosustain, triples).
* ``midi_folder``: any folder tree of .mid/.midi files (configs performance, drums,
  performance_keep_drums, triples).

Each dataset's version directory holds the TFRecord shards, dataset_info.json,
features.json, metadata.json (encoding and conditioning ids), vocab.json and
build_report.json (skipped files and reasons, files/s).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

BUILDERS = {"groove": "Groove", "piano": "Piano", "midi_folder": "MidiFolder"}


def builder_class(name: str):
  """The builder class called `name` (importing, and so registering, its module)."""
  from data_pipelines import common  # pylint: disable=g-import-not-at-top
  if name not in BUILDERS:
    raise common.BuildError(f"unknown dataset {name!r}; valid: {', '.join(BUILDERS)}")
  module = importlib.import_module(f"data_pipelines.{name}.{name}")
  return getattr(module, BUILDERS[name])


def config_encoding(name: str, config: Optional[str] = None):
  """The `midijax.encoding.Encoding` that builder config `config` of dataset `name` writes,
  without building anything (e.g. for `midijax compile` before the data exists).

  Raises:
    midijax.errors.MidijaxError (`common.BuildError`): unknown dataset, config or options.
  """
  from data_pipelines import common  # pylint: disable=g-import-not-at-top
  cls = builder_class(name)
  config = config or cls.DEFAULT_BUILDER_CONFIG_NAME
  found = {c.name: c for c in cls.BUILDER_CONFIGS}
  if config not in found:
    raise common.BuildError(f"unknown {name} config {config!r}; valid: {', '.join(found)}")
  return common.Recipe.from_config(found[config]).make_encoding()


def default_data_dir() -> str:
  """TFDS's data dir: $TFDS_DATA_DIR when set (read now), else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def build(name: str, config: Optional[str] = None, manual_dir: Optional[str] = None,
          data_dir: Optional[str] = None, num_shards: Optional[int] = None, *,
          num_workers: Optional[int] = None, overwrite: bool = False,
          download_dir: Optional[str] = None, config_name: Optional[str] = None,
          beam_options=None, **overrides):
  """Builds a dataset (download or --manual_dir, tokenize, write shards); returns the builder.

  Args:
    name: "groove", "piano" or "midi_folder".
    config: builder config name (default: the builder's default, e.g. groove's "drums").
    manual_dir: source folder, a local path or a gs:// (s3://, ...) URL read through
      etils.epath (required for midi_folder; without it groove and piano download the
      official zip).
    data_dir: root of the TFDS data dir (default `default_data_dir()`).
    num_shards: shards per split (default: the config's `num_shards`, 8), lowered to
      the example count for small splits.
    num_workers: tokenizing processes (default: every core, or $MIDIJAX_BUILD_WORKERS).
    overwrite: rebuild even if the dataset already exists (else it is reused).
    download_dir: where downloads go (default <data_dir>/downloads).
    config_name: name for a config changed by `overrides` (default: derived from them).
    beam_options: generate on Apache Beam (needs the `beam` extra): pipeline options as
      `tfds build --beam_pipeline_options` takes them, e.g.
      "runner=DirectRunner,direct_num_workers=0,direct_running_mode=multi_processing",
      or an `apache_beam.options.pipeline_options.PipelineOptions`. Default: the local
      process pool.
    **overrides: `MidiBuilderConfig` fields to change, e.g. ``split_ratios=(.9, .05, .05)``,
      ``conditioning=("tempo",)``, ``sustain=False``, ``window_bars=2``, or the limits a
      file must keep to (else it is skipped and listed in build_report.json):
      ``max_seconds=7200.0``, ``max_tokens=2_000_000``, ``max_bytes``.

  Returns:
    The prepared `tfds.core.DatasetBuilder` (`builder.data_dir` is the version dir).

  Raises:
    midijax.errors.MidijaxError (`common.BuildError`): unknown name/config/field,
      missing source, or no usable file in a split.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_pipelines import common  # pylint: disable=g-import-not-at-top
  cls = builder_class(name)
  configs = {c.name: c for c in cls.BUILDER_CONFIGS}
  config = config or cls.DEFAULT_BUILDER_CONFIG_NAME
  if config not in configs:
    raise common.BuildError(f"{name}: unknown config {config!r}; valid: {', '.join(configs)}")
  if name == "midi_folder" and not manual_dir:
    raise common.BuildError("midi_folder needs --manual_dir (the folder of .mid/.midi files)")
  if manual_dir is not None:
    manual_dir = epath.Path(manual_dir)
    if common.is_local(manual_dir):
      manual_dir = epath.Path(os.path.abspath(manual_dir))
    if not manual_dir.is_dir():
      raise common.BuildError(f"--manual_dir {manual_dir} is not a folder")
  if isinstance(beam_options, str):
    beam = tfds.core.lazy_imports.apache_beam
    beam_options = beam.options.pipeline_options.PipelineOptions(
        flags=[f"--{option}" for option in beam_options.split(",") if option])
  builder_config = common.config_with_overrides(configs[config], name=config_name, **overrides)
  builder = cls(config=builder_config, data_dir=data_dir or default_data_dir())
  builder.num_workers = num_workers
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir, num_shards=num_shards, download_mode=mode, try_download_gcs=False,
      beam_options=beam_options)
  builder.download_and_prepare(download_dir=download_dir, download_config=download_config)
  return builder


__all__ = ["BUILDERS", "build", "builder_class", "default_data_dir"]
