"""Process set-up for midijax's entry points: a quiet stderr that says only what matters.

`configure()` runs first thing in an entry point (the `midijax` command's `main`,
`data_pipelines.common.tfds_build_cli`), before TensorFlow or JAX is imported: their C++
libraries read these variables once, when they load. Every variable is only a default
(`os.environ.setdefault`), so a user's own setting wins, e.g. TF_CPP_MIN_LOG_LEVEL=0 to
see TensorFlow's start-up log again.

What it silences, and why each setting:

* TF_CPP_MIN_LOG_LEVEL=2: TensorFlow's and XLA's C++ INFO and WARNING lines, among them
  absl's "WARNING: All log messages before absl::InitializeLog() is called are written
  to STDERR" and the CPU-feature notice (errors still print).
* TF_ENABLE_ONEDNN_OPTS=0: TensorFlow 2.21 prints "oneDNN custom operations are on ..."
  on CPUs where it enables them, whatever TF_CPP_MIN_LOG_LEVEL says. midijax runs only
  tf.data input ops on TensorFlow (the model is JAX), so the oneDNN kernels buy nothing.
* TQDM_DISABLE=1 when stderr is not a terminal: TFDS's progress bars (tqdm) would
  write carriage returns and cursor-up escapes into a log file. On a terminal the bars
  stay. midijax's own bars pass `disable=None` (off when not a terminal) explicitly.
* JAX_PLATFORMS=cpu where libtpu is installed (the `tpu` and `test` extras) but the
  machine has no accelerator at all (no TPU, NVIDIA or AMD PCI device, no /dev/accel*
  or /dev/vfio, no TPU_* variable): JAX would otherwise start libtpu, which prints a
  dozen lines about a missing TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES and takes a
  machine-wide lock (/tmp/libtpu_lockfile), before falling back to the CPU anyway.
  AOT compiles for TPU targets (`midijax compile --topology=tpu:...`) use libtpu without
  a TPU backend and are not affected. ALLOW_MULTIPLE_LIBTPU_LOAD=1 in the same case: with no
  TPU to guard, two AOT compiles may load libtpu at once.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Dict, MutableMapping, Optional, TextIO

# Defaults set on every run.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
}
# Set only when stderr is not a terminal.
NO_TERMINAL_ENV = {
    "TQDM_DISABLE": "1",
}


# PCI vendor ids of accelerators JAX may use: Google (TPU), NVIDIA, AMD (GPU).
ACCELERATOR_PCI_VENDORS = ("0x1ae0", "0x10de", "0x1002")


def accelerator_attached() -> bool:
  """Whether this machine shows a TPU or GPU: device files, or a PCI device of their vendors.

  Cloud TPU VMs expose /dev/accel* (v2-v4) or /dev/vfio (v5e and later) and their chips as
  PCI devices of Google's vendor id, which is what JAX itself looks for.
  """
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    return True
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() in ACCELERATOR_PCI_VENDORS:
          return True
    except OSError:
      continue
  return False


# TPU_* variables that JAX itself exports on import (jax._src.cloud_tpu_init) on any machine
# with libtpu installed, TPU or not; a child of a process that imported JAX inherits them.
# They say nothing about a TPU being the target, unlike TPU_ACCELERATOR_TYPE,
# TPU_WORKER_HOSTNAMES and the like.
JAX_SET_TPU_ENV = frozenset({"TPU_SKIP_MDS_QUERY", "TPU_LIBRARY_PATH", "TPU_ML_PLATFORM",
                             "TPU_ML_PLATFORM_VERSION"})


def _libtpu_without_accelerator() -> bool:
  if not sys.platform.startswith("linux") or importlib.util.find_spec("libtpu") is None:
    return False
  return not accelerator_attached()


def _tpu_requested(environ: MutableMapping[str, str]) -> bool:
  return "JAX_PLATFORMS" in environ or any(k.startswith("TPU_") and k not in JAX_SET_TPU_ENV
                                           for k in environ)


def _is_terminal(stream: Optional[TextIO]) -> bool:
  try:
    return bool(stream is not None and stream.isatty())
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


def configure(environ: Optional[MutableMapping[str, str]] = None,
              stderr: Optional[TextIO] = None) -> Dict[str, str]:
  """Sets the quiet defaults for this process (and the processes it starts).

  Args:
    environ: the environment to change (default `os.environ`).
    stderr: the stream whose terminal-ness decides about progress bars (default
      `sys.stderr`).

  Returns:
    The variables this call set (those the environment did not have already).
  """
  environ = os.environ if environ is None else environ
  stderr = sys.stderr if stderr is None else stderr
  wanted = dict(QUIET_ENV)
  if not _is_terminal(stderr):
    wanted.update(NO_TERMINAL_ENV)
  if _libtpu_without_accelerator():
    if not _tpu_requested(environ):
      wanted["JAX_PLATFORMS"] = "cpu"
    # No TPU to guard: ahead-of-time TPU compiles (which load libtpu for its compiler) may
    # run side by side instead of failing on libtpu's machine-wide lockfile.
    wanted["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  added = {k: v for k, v in wanted.items() if k not in environ}
  environ.update(added)
  return added
