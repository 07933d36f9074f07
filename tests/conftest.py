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
