#!/usr/bin/env python3
"""Runs `midijax train` as N processes on this machine: a multi-host job in miniature.

Each process gets `--devices_per_process` CPU devices and talks to the others through
JAX's gloo CPU collectives, exactly as hosts of a pod slice do over the network: the
same `jax.distributed.initialize`, per-process data shards, global arrays and Orbax
checkpoints written by all processes. Use it to check a multi-host config (mesh,
batch split, checkpoint restore) before paying for the hardware.

    .venv/bin/python launch/local_multiprocess.py [--num_processes=2]
        [--devices_per_process=4] [--port=0] [--timeout=0] -- \\
        --config=configs/groove_tiny.py --workdir=/tmp/run [--config.x.y=...]

Arguments after `--` go to `midijax train`. Output lines are prefixed with `[pI]`. The
exit status is the first failing process's (the others are then stopped), else 0.
SIGINT / SIGTERM are passed on to every process (SIGTERM makes training save a
checkpoint and exit, as on a preempted TPU VM).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each process runs: configure JAX's CPU devices and collectives before anything
# initializes a backend, then the real command line, with the coordinator flags.
_BOOTSTRAP = """\
import sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from midijax import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def process_command(process_id: int, num_processes: int, devices_per_process: int, port: int,
                    train_args: Sequence[str]) -> List[str]:
  """The command line of process `process_id` (the bootstrap running `midijax train`)."""
  return [sys.executable, "-c", _BOOTSTRAP, str(devices_per_process), "train", *train_args,
          f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def process_env(base: Optional[dict] = None) -> dict:
  """The environment of each process: CPU only, no forced device count, repo importable."""
  env = dict(os.environ if base is None else base)
  env["JAX_PLATFORMS"] = "cpu"
  # jax_num_cpu_devices sets the device count; a forced count in XLA_FLAGS would clash.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  for name in ("MIDIJAX_COORDINATOR_ADDRESS", "MIDIJAX_NUM_PROCESSES", "MIDIJAX_PROCESS_ID"):
    env.pop(name, None)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
  """Copies `stream` line by line to `out`, each line prefixed."""
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", "replace").rstrip("\n")
    with lock:
      out.write(f"{prefix}{line}\n")
      out.flush()
  stream.close()


def launch(train_args: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
           port: int = 0, timeout: float = 0.0, out=None) -> int:
  """Starts the processes, relays their output and waits for them.

  Args:
    train_args: flags for `midijax train` (--config=..., --workdir=..., overrides).
    num_processes: processes to start.
    devices_per_process: CPU devices each process has.
    port: coordinator port on 127.0.0.1; 0 picks a free one.
    timeout: seconds before every process is stopped (status 124); 0 = no limit.
    out: where the prefixed output goes (default sys.stdout).

  Returns:
    0 if every process succeeded; else the first failure's exit status (128 + signal
    number for a process killed by a signal), or 124 on timeout.
  """
  out = sys.stdout if out is None else out
  port = port or free_port()
  env = process_env()
  lock = threading.Lock()
  procs: List[subprocess.Popen] = []
  pumps: List[threading.Thread] = []
  with lock:
    out.write(f"[launch] {num_processes} processes x {devices_per_process} CPU devices, "
              f"coordinator 127.0.0.1:{port}\n")
    out.flush()
  for i in range(num_processes):
    proc = subprocess.Popen(
        process_command(i, num_processes, devices_per_process, port, train_args),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        cwd=os.getcwd(),
        # Own process group: a terminal's Ctrl-C reaches only this launcher, which passes
        # it on once (rather than every process getting it twice).
        start_new_session=True)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", out, lock), daemon=True)
    pump.start()
    pumps.append(pump)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, forward)
  status = 0
  deadline = time.monotonic() + timeout if timeout > 0 else None
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        status = 128 - code if code < 0 else code
        with lock:
          out.write(f"[launch] process {i} exited with status {code}; stopping the others\n")
          out.flush()
        break
      if all(c == 0 for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        with lock:
          out.write(f"[launch] timeout after {timeout:g} s; stopping every process\n")
          out.flush()
        break
      time.sleep(0.1)
  finally:
    _stop(procs)
    for pump in pumps:
      pump.join(timeout=5)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return status


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
  """SIGTERM to the processes still running, SIGKILL to those alive after `grace_s`."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    p.terminate()
  end = time.monotonic() + grace_s
  for p in alive:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    own, train_args = argv[:split], argv[split + 1:]
  else:
    own, train_args = argv, []
  parser = argparse.ArgumentParser(
      prog="launch/local_multiprocess.py",
      description="Run `midijax train` as N local processes with CPU devices and gloo "
                  "collectives (flags for train go after --).")
  parser.add_argument("--num_processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="CPU devices per process (default 4)")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--timeout", type=float, default=0.0,
                      help="stop everything after this many seconds (default: no limit)")
  args, unknown = parser.parse_known_args(own)
  train_args = unknown + train_args
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  if not any(a.startswith("--config") for a in train_args):
    parser.error("give the train flags after --, e.g. -- --config=configs/groove_tiny.py "
                 "--workdir=/tmp/run")
  return launch(train_args, args.num_processes, args.devices_per_process, args.port,
                args.timeout)


if __name__ == "__main__":
  sys.exit(main())
