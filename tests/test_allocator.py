"""The midijax command re-executes itself under tcmalloc when it is installed."""
import os
import pathlib
import subprocess
import sys

import pytest

from midijax import allocator

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE = "from midijax import allocator; allocator.reexec_with_tcmalloc(); print(allocator.current())"


def run_probe(**env):
  full = {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", "MIDIJAX_ALLOCATOR", "MIDIJAX_ALLOCATOR_REEXEC")}
  full.update(env)
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       env=full, cwd=REPO, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


@pytest.mark.skipif(allocator.find_tcmalloc() is None or sys.platform != "linux",
                    reason="tcmalloc not installed (apt-get install libtcmalloc-minimal4)")
def test_reexec_preloads_tcmalloc_once_and_can_be_turned_off():
  assert run_probe() == "tcmalloc"
  assert run_probe(MIDIJAX_ALLOCATOR="system") == "system"
  assert run_probe(MIDIJAX_ALLOCATOR="jemalloc") == "system"  # unknown: warns, no re-exec


def test_no_tcmalloc_means_no_reexec(monkeypatch):
  monkeypatch.setattr(allocator, "TCMALLOC_CANDIDATES", ("/nonexistent/libtcmalloc.so",))
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv("MIDIJAX_ALLOCATOR_REEXEC", raising=False)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not re-execute"))
  allocator.reexec_with_tcmalloc()  # returns
  assert allocator.current() == "system"
