#!/usr/bin/env bash
# Creates ./.venv and installs midijax (editable) with the pinned runtime set
# (requirements.txt) and its beam and test extras (requirements-beam.txt,
# requirements-test.txt): what CI and the quick start use. Python 3.11+.
# With --system also installs the Debian packages the tests and the listening-test export
# use (needs root or sudo): fluidsynth + a General MIDI soundfont, chromium for the browser
# test, shellcheck for the launch scripts, g++ (builds the CPU attention kernel,
# midijax/kernels), and tcmalloc (the midijax command runs under it:
# CPU training steps about 1.3x faster, see midijax/allocator.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    PKGS=(fluidsynth fluid-soundfont-gm lame chromium chromium-driver shellcheck g++
          libtcmalloc-minimal4)
    # Skip apt (and its index update) when every package is installed already.
    missing=$(dpkg-query -W -f='${db:Status-Status}\n' "${PKGS[@]}" 2>&1 \
              | grep -cv '^installed$' || true)
    if [[ "$missing" != "0" ]]; then
      $SUDO apt-get update -qq
      $SUDO apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
    fi
  else
    echo "setup.sh: apt-get not found; install fluidsynth, a GM soundfont and chromium yourself" >&2
  fi
fi

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile: byte-compiling every installed module (TensorFlow's and JAX's thousands)
# takes minutes on 2 cores; Python compiles what it imports, on first import.
.venv/bin/python -m pip install -q --no-compile -e ".[beam,test]"
echo "setup.sh: ready (.venv/bin/midijax)"
