"""What every benchmark script does first: `import bench_env` before any other import.

Puts the repository, not benchmarks/, first on the import path (benchmarks/tokenize.py
would shadow the standard library's tokenize, which dataclasses and inspect import), and
runs midijax's process set-up before TensorFlow or JAX loads: a quiet start-up (no
libtpu lines on a machine without a TPU), as the `midijax` command has.
"""
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
_HERE = pathlib.Path(__file__).resolve().parent
if sys.path and sys.path[0] and pathlib.Path(sys.path[0]).resolve() == _HERE:
  sys.path[0] = str(REPO)  # a script of this folder runs: its folder leaves the path
else:
  sys.path.insert(0, str(REPO))

from midijax import process_env  # noqa: E402  pylint: disable=wrong-import-position

process_env.configure()
