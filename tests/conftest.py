"""Shared test set-up: real-data paths, CI rules, JAX's persistent compilation cache.

Integration tests read the real MIDI corpus in ``../shared/data`` in place. Outside CI a
missing corpus skips those tests with a reason; under ``CI=true`` a missing corpus fails.
"""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("MIDIJAX_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Compiled XLA programs are cached across test processes and runs (keeps the suite fast on 2 cores).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        if IN_CI:
            pytest.fail(f"CI=true but the shared corpus is missing: {path}")
        pytest.skip(f"shared corpus not found at {path} (set MIDIJAX_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real corpus root (``../shared/data``)."""
    return _require(DATA)


@pytest.fixture(scope="session")
def groove_dir() -> pathlib.Path:
    return _require(DATA / "groove")


@pytest.fixture(scope="session")
def piano_dir() -> pathlib.Path:
    return _require(DATA / "piano")


@pytest.fixture(scope="session")
def groove_files(groove_dir):
    return sorted(groove_dir.glob("*/*/*.mid"))


@pytest.fixture(scope="session")
def piano_files(piano_dir):
    files = sorted(piano_dir.glob("maestro/**/*.mid*")) + sorted(piano_dir.glob("giantmidi/*.mid"))
    return files


def copy_groove_subset(groove_dir, dest, counts, beat_types=("beat", "fill")):
  """Copies real GMD files into `dest` with a trimmed info.csv: for each split in `counts`,
  counts[split] // len(beat_types) files of each beat type. Returns the kept rows."""
  import csv
  import shutil
  with open(groove_dir / "info.csv", newline="") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  kept = []
  for split, n in counts.items():
    for beat_type in beat_types:
      kept += [r for r in rows if r["split"] == split and r["beat_type"] == beat_type
               ][:n // len(beat_types)]
  for row in kept:
    target = dest / row["midi_filename"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(groove_dir / row["midi_filename"], target)
  with open(dest / "info.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
  return kept


@pytest.fixture(scope="session")
def groove_tfds(tmp_path_factory, groove_dir):
  """A `groove/drums` TFDS dataset built from a small copied subset of the real GMD
  (16 train, 4 validation, 4 test files, half beats, half fills), in 2 shards per split."""
  import data_pipelines
  src = tmp_path_factory.mktemp("groove_src")
  copy_groove_subset(groove_dir, src, {"train": 16, "validation": 4, "test": 4})
  out = tmp_path_factory.mktemp("tfds")
  data_pipelines.build("groove", "drums", manual_dir=str(src), data_dir=str(out), num_shards=2)
  return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, groove_tfds):
  """A groove_tiny model trained 30 steps on `groove_tfds`: a real workdir to sample from."""
  import configs.groove_tiny as groove_tiny
  from midijax import train
  config = groove_tiny.get_config()
  config.data.data_dir = str(groove_tfds)
  config.train.update(num_steps=30, eval_every=15, checkpoint_every=15, log_every=15,
                      async_checkpointing=False)
  workdir = tmp_path_factory.mktemp("tiny_run")
  train.train_and_evaluate(config, str(workdir))
  return workdir
