"""Process start-up: run the `midijax` command (and benchmarks) under tcmalloc on Linux.

XLA:CPU allocates each step's temporaries afresh. glibc's malloc hands the large ones
back to the kernel when they are freed, so the next step page-faults and zeroes them
again: in the 6-layer width-512 training step (batch 8 x 1024 tokens) on the 2-core CPU
machine that was about 1M page faults and a third of the CPU time spent in the kernel
per step. tcmalloc keeps freed memory for reuse: the same step went from 9.9-11.4 s to
7.6 s (`benchmarks/train_throughput.py`, side by side in one session).

tcmalloc must be loaded before the process starts (LD_PRELOAD), so `reexec_with_tcmalloc`
re-executes the current command once with it preloaded. It does nothing when tcmalloc is
not installed (`apt-get install libtcmalloc-minimal4`; `launch/setup.sh --system` does),
when it is already loaded, off Linux, or when MIDIJAX_ALLOCATOR=system.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

# Debian/Ubuntu (libtcmalloc-minimal4, libgoogle-perftools4) and common other locations.
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc.so.4",
)
# MIDIJAX_ALLOCATOR=system keeps the C library's malloc.
ENV_CHOICE = "MIDIJAX_ALLOCATOR"
# Set in the re-executed process so it never re-executes again.
_ENV_DONE = "MIDIJAX_ALLOCATOR_REEXEC"


def find_tcmalloc() -> Optional[str]:
  """Path of an installed tcmalloc shared library, or None."""
  for path in TCMALLOC_CANDIDATES:
    if os.path.exists(path):
      return path
  return None


def current() -> str:
  """"tcmalloc" if this process runs with tcmalloc preloaded, else "system"."""
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def reexec_with_tcmalloc() -> None:
  """Re-executes this process (same interpreter and arguments) with tcmalloc preloaded.

  Call it first thing in a program's entry point, before JAX is imported. Returns
  without doing anything where it does not apply (see the module docstring); otherwise
  does not return.
  """
  choice = os.environ.get(ENV_CHOICE, "tcmalloc")
  if choice not in ("tcmalloc", "system"):
    print(f"midijax: {ENV_CHOICE}={choice!r} is not 'tcmalloc' or 'system'; using the "
          "system allocator", file=sys.stderr)
    return
  if (sys.platform != "linux" or choice == "system" or os.environ.get(_ENV_DONE)
      or current() == "tcmalloc"):
    return
  library = find_tcmalloc()
  if library is None:
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
  env[_ENV_DONE] = "1"
  # tcmalloc reports every allocation above 1 GiB on stderr by default; a dataset held
  # in memory can be that large on purpose.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
