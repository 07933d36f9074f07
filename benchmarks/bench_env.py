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


def run(main) -> None:
  """Runs a benchmark's `main()` as the `midijax` command runs a subcommand: a user error
  (a `MidijaxError`, e.g. a missing run or an unbuilt dataset, or a script's own one-line
  `SystemExit(message)`) prints one line and exits with status 2, not a traceback."""
  import os  # pylint: disable=g-import-not-at-top
  name = os.path.basename(sys.argv[0])
  from midijax.errors import MidijaxError  # pylint: disable=g-import-not-at-top
  try:
    code = main()
  except MidijaxError as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:
    if isinstance(e.code, str):  # sys.exit("message") / SystemExit("message")
      message = e.code if e.code.startswith(name.split(".")[0]) else f"{name}: {e.code}"
      print(message, file=sys.stderr)
      sys.exit(2)
    raise
  except KeyboardInterrupt:
    print(f"{name}: interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code if isinstance(code, int) else 0)
