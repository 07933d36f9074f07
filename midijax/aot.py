"""Ahead-of-time compile check: will a config fit on a pod before you rent it?

    midijax compile --config=configs/NAME.py --topology=tpu:v4-8 [--config.x.y=...]
    midijax compile --config=configs/groove_tiny.py --topology=cpu:8

Lowers and compiles the real train step (`midijax.train.jit_train_step`: the function
`train_and_evaluate` runs, with the same parameter, optimizer-state and batch shardings)
for a target set of devices, without any data and without allocating a parameter, then
reports per device:

* memory from XLA's `compiled.memory_analysis()`: arguments (train state shard + batch
  shard), outputs, the part of the outputs aliased to donated arguments, temporaries
  (activations, gradients, collectives buffers) and generated code; their sum
  (arguments + outputs - aliased + temporaries + code) is the compiler's estimate of the
  peak, compared with the device's memory (HBM) from a table;
* FLOPs per step from `compiled.cost_analysis()` next to the model's analytic count
  (`transformer.flops_per_token`).

Targets (``--topology``):

* ``cpu:N`` — N fake CPU devices in this process (`jax_num_cpu_devices`, or
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts). CPU
  memory numbers are a proxy: give ``--memory_per_device=h100`` (or GiB) to compare with
  a GPU's memory; XLA:GPU's temporaries differ somewhat from XLA:CPU's.
* ``tpu:ACCELERATOR_TYPE`` (v4-8, v4-32, v5litepod-16 / v5e-16, v5p-8, v6e-8, ...) or
  ``tpu:GEN:XxY[xZ]`` (e.g. ``tpu:v4:2x2x2``) — compiled by libtpu's real TPU compiler
  for `jax.experimental.topologies.get_topology_desc`. This works on a CPU-only machine
  once libtpu is installed (``pip install 'jax[tpu]==<the pinned jax version>'``, or just
  ``pip install libtpu==0.0.42.*`` for jax 0.10.2); without it the command says so.
* ``local`` — the devices this process sees (e.g. on the GPU host itself).

`midijax compile` (midijax/cli.py) parses the flags and calls the library functions
(`parse_topology`, `target_devices`, `compile_train_step`, `format_report`), which can be
called directly.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
from jax._src import xla_bridge
from jax.experimental import topologies
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from midijax import encoding
from midijax import sharding
from midijax import train
from midijax.errors import ConfigError, MidijaxError
from midijax.models import transformer

GIB = 1024 ** 3

# Memory per JAX device (bytes). TPU v4 / v5p run in megacore mode: one device per chip.
DEVICE_MEMORY: Dict[str, int] = {
    "v4": 32 * GIB,
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v6e": 32 * GIB,
    "h100": 80 * GIB,
    "h200": 141 * GIB,
    "a100-40gb": 40 * GIB,
    "a100-80gb": 80 * GIB,
    "l4": 24 * GIB,
    "a10g": 24 * GIB,
}

# `device_kind` substrings (lower case) -> DEVICE_MEMORY key, most specific first.
_KIND_TO_MEMORY = (
    ("tpu v4", "v4"), ("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v5p", "v5p"),
    ("tpu v5", "v5p"), ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"), ("h200", "h200"),
    ("h100", "h100"), ("a100-sxm4-80gb", "a100-80gb"), ("a100 80gb", "a100-80gb"),
    ("a100-pcie-80gb", "a100-80gb"), ("a100", "a100-40gb"), ("l4", "l4"), ("a10g", "a10g"),
)

# As midijax.input_pipeline.DEFAULT_BUILDER_CONFIGS (not imported: it loads TensorFlow).
_DEFAULT_BUILDER_CONFIGS = {"groove": "drums", "piano": "performance",
                            "midi_folder": "performance"}

# Peak dense bfloat16 FLOP/s per JAX device (one chip; v4 / v5p in megacore mode), for
# the compiler-estimated MFU. Keys as DEVICE_MEMORY.
PEAK_FLOPS: Dict[str, float] = {
    "v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "h100": 989e12,
    "h200": 989e12, "a100-40gb": 312e12, "a100-80gb": 312e12,
}

# Above this fraction of device memory the verdict warns: the runtime, the input
# pipeline's device buffers and fragmentation need some room the compiler does not see.
SAFE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """How Cloud TPU names map to `get_topology_desc` arguments for one generation."""
  topology_prefix: str  # libtpu's name: "v4", "v5" (v5p), "v5e", "v6e".
  megacore: bool  # One JAX device per chip from two TensorCores; names count cores.
  dims: int  # 3 (v4, v5p: 3-D torus) or 2 (v5e, v6e).
  memory_key: str  # DEVICE_MEMORY key.


TPU_GENERATIONS: Dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", True, 3, "v4"),
    "v5p": TpuGeneration("v5", True, 3, "v5p"),
    "v5e": TpuGeneration("v5e", False, 2, "v5e"),
    "v5litepod": TpuGeneration("v5e", False, 2, "v5e"),
    "v6e": TpuGeneration("v6e", False, 2, "v6e"),
}
# libtpu topology prefixes ("v4:2x2x1") -> generation names.
_PREFIX_TO_GENERATION = {"v4": "v4", "v5": "v5p", "v5p": "v5p", "v5e": "v5e",
                         "v5litepod": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A compile target.

  Attributes:
    spec: what the user wrote, e.g. "tpu:v4-8".
    platform: "cpu", "tpu" or "local".
    num_devices: JAX devices in the target (all slices).
    num_hosts: processes (hosts) in the target (all slices).
    tpu_topology: libtpu topology name, e.g. "v4:2x2x1" (TPU only).
    chip_config: "megacore" or "default" (TPU only).
    chips_per_host_bounds: chips per host per dimension (TPU only).
    num_slices: TPU slices (multi-slice over DCN).
    memory_key: DEVICE_MEMORY key of the target's devices, "" if unknown.
  """
  spec: str
  platform: str
  num_devices: int
  num_hosts: int = 1
  tpu_topology: str = ""
  chip_config: str = ""
  chips_per_host_bounds: Tuple[int, int, int] = (1, 1, 1)
  num_slices: int = 1
  memory_key: str = ""


# ----------------------------------------------------------------------------- topology


def _grow_shape(chips: int, dims: int) -> Tuple[int, ...]:
  """Chip grid of a Cloud TPU slice with `chips` chips, as Cloud TPU lays them out.

  Starting from 2x2x1 (3-D) or 1x1 (2-D), doubles the last of the smallest
  dimensions: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; 1x2, 2x2, 2x4, 4x4, 4x8, ...
  """
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < math.prod(shape) or chips & (chips - 1):
    raise ConfigError(f"{chips} chips: not a slice size this table knows (powers of two from "
                      f"{math.prod(shape)}); give the topology as tpu:GEN:AxBxC")
  if dims == 3 and chips >= 8:
    shape[2] = 2  # 2x2x1 -> 2x2x2
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, v in enumerate(shape) if v == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_topology(spec: str, num_slices: int = 1) -> Topology:
  """Parses a --topology value.

  Args:
    spec: "cpu:N", "local", "tpu:v4-8" / "v5litepod-16" / "v5e-16" / "v6e-8" / "v5p-8",
      or "tpu:GEN:AxB[xC]" (libtpu topology name, e.g. "tpu:v4:2x2x2").
    num_slices: TPU slices joined over the data-centre network (multi-slice).

  Returns:
    The `Topology`.

  Raises:
    ConfigError: naming the value when it cannot be parsed.
  """
  text = spec.strip().lower()
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be >= 1")
  if text == "local":
    return Topology(spec=spec, platform="local", num_devices=0)
  m = re.fullmatch(r"cpu:(\d+)", text)
  if m:
    if num_slices != 1:
      raise ConfigError("--num_slices applies to TPU topologies only")
    return Topology(spec=spec, platform="cpu", num_devices=int(m.group(1)))
  if text.startswith(("gpu", "cuda")):
    raise ConfigError(
        f"--topology={spec}: XLA:GPU cannot compile without a GPU attached. Run "
        "`midijax compile --topology=local` on the GPU host, or use --topology=cpu:N "
        "--memory_per_device=h100 here as a proxy")
  text = text[len("tpu:"):] if text.startswith("tpu:") else text
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)  # Accelerator type: v4-8, v5litepod-16.
  if m:
    generation, count = m.group(1), int(m.group(2))
    if generation not in TPU_GENERATIONS:
      raise ConfigError(f"--topology={spec}: unknown TPU generation {generation!r}; known: "
                        f"{', '.join(TPU_GENERATIONS)}")
    gen = TPU_GENERATIONS[generation]
    chips = count // 2 if gen.megacore else count
    shape = _grow_shape(chips, gen.dims)
  else:
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)  # libtpu name: v4:2x2x2.
    if not m or m.group(1) not in _PREFIX_TO_GENERATION:
      raise ConfigError(
          f"--topology={spec}: expected cpu:N, local, tpu:ACCELERATOR_TYPE (v4-8, "
          "v5litepod-16, v5p-8, v6e-8, ...) or tpu:GEN:AxB[xC] (v4:2x2x2, v5e:4x4)")
    generation = _PREFIX_TO_GENERATION[m.group(1)]
    gen = TPU_GENERATIONS[generation]
    shape = tuple(int(v) for v in m.group(2).split("x"))
    if len(shape) != gen.dims:
      raise ConfigError(f"--topology={spec}: {generation} topologies have {gen.dims} dimensions")
    chips = math.prod(shape)
  if gen.dims == 3 or chips > 8:
    bounds = (2, 2, 1) if chips >= 4 else (*shape, 1)[:3]
  else:
    bounds = (*shape, 1)  # v5e / v6e slices of up to 8 chips are one host.
  bounds = tuple(min(b, s) for b, s in zip(bounds, (*shape, 1)[:3]))
  hosts_per_slice = chips // math.prod(bounds)
  return Topology(
      spec=spec, platform="tpu", num_devices=chips * num_slices,
      num_hosts=hosts_per_slice * num_slices,
      tpu_topology=f"{gen.topology_prefix}:{'x'.join(map(str, shape))}",
      chip_config="megacore" if gen.megacore else "default",
      chips_per_host_bounds=bounds, num_slices=num_slices, memory_key=gen.memory_key)


def _backends_initialized() -> bool:
  return xla_bridge.backends_are_initialized()


def target_devices(topology: Topology) -> List[Any]:
  """The devices to compile for.

  For cpu:N, asks JAX for N CPU devices if its backends have not started yet
  (`jax_num_cpu_devices`); otherwise the process must already have at least N.
  For TPU, builds the devices from libtpu's topology description (no TPU needed).

  Raises:
    MidijaxError: with the fix, when the devices cannot be had in this process.
  """
  if topology.platform == "local":
    return list(jax.devices())
  if not _backends_initialized() and not os.environ.get("JAX_PLATFORMS"):
    # Keep JAX itself on the CPU: an installed libtpu would otherwise look for a TPU.
    jax.config.update("jax_platforms", "cpu")
  if topology.platform == "cpu":
    if not _backends_initialized() and "xla_force_host_platform_device_count" not in (
        os.environ.get("XLA_FLAGS", "")):
      jax.config.update("jax_num_cpu_devices", topology.num_devices)
    devices = jax.devices("cpu")
    if len(devices) < topology.num_devices:
      raise MidijaxError(
          f"--topology={topology.spec} needs {topology.num_devices} CPU devices but this process "
          f"has {len(devices)} (JAX already started); run it in a fresh process, or set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={topology.num_devices}")
    return list(devices[:topology.num_devices])
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.tpu_topology,
        chip_config_name=topology.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices)
  except RuntimeError as e:
    if importlib.util.find_spec("libtpu") is None:
      raise MidijaxError(
          f"TPU ahead-of-time compilation needs libtpu, which is not installed ({e}). It runs on "
          f"a CPU-only machine once installed: pip install 'jax[tpu]=={jax.__version__}' "
          "(or the libtpu release that jax pins)") from None
    raise MidijaxError(f"libtpu could not describe topology {topology.tpu_topology}: {e}") from None
  return list(desc.devices)


def device_memory_bytes(devices: Sequence[Any], topology: Topology,
                        memory_per_device: str = "") -> Tuple[int, str]:
  """(bytes of memory per device, where the figure came from); (0, "") when unknown.

  `memory_per_device` (a DEVICE_MEMORY name such as "h100", or GiB such as "24")
  overrides; else the TPU generation's table entry, the device's own
  `memory_stats()["bytes_limit"]` (GPUs), or its `device_kind` in the table.
  """
  if memory_per_device:
    key = memory_per_device.strip().lower()
    if key in DEVICE_MEMORY:
      return DEVICE_MEMORY[key], f"table:{key}"
    try:
      return int(float(key) * GIB), "flag"
    except ValueError:
      raise ConfigError(f"--memory_per_device={memory_per_device}: expected GiB or one of "
                        f"{', '.join(DEVICE_MEMORY)}") from None
  if topology.memory_key:
    return DEVICE_MEMORY[topology.memory_key], f"table:{topology.memory_key}"
  device = devices[0]
  if device.platform == "gpu":
    try:
      limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
      if limit:
        return limit, "device"
    except Exception:  # pylint: disable=broad-except
      pass
  kind = getattr(device, "device_kind", "").lower()
  for needle, key in _KIND_TO_MEMORY:
    if needle in kind:
      return DEVICE_MEMORY[key], f"table:{key}"
  return 0, ""


# ----------------------------------------------------------------------------- compile


@dataclasses.dataclass
class CompileReport:
  """What `compile_train_step` found; byte and FLOP figures are per device per step."""
  topology: str
  device_kind: str
  num_devices: int
  num_hosts: int
  num_slices: int
  mesh_shape: Dict[str, int]
  global_batch: int
  seq_len: int
  vocab_size: int
  num_params: int
  param_bytes_per_device: int
  opt_state_bytes_per_device: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  memory_limit_bytes: int
  memory_limit_source: str
  compiler_flops: float
  model_flops: float
  compile_seconds: float
  fits: Optional[bool]
  # The attention backend the step was compiled with (config.model.attention_impl resolved).
  attention_impl: str = ""
  # config.train.optimizer ("adamw", "muon"): the optimizer state's size depends on it.
  optimizer: str = ""
  # The compiler's own estimate of one step's time: libtpu's cost_analysis()
  # "optimal_seconds" as given (0 where the backend gives none). See `step_estimate`.
  optimal_seconds: float = 0.0
  # Peak bfloat16 FLOP/s of one target device (PEAK_FLOPS), 0 if unknown.
  peak_flops_per_device: float = 0.0
  # Loops (lax.scan / while) in the compiled step: libtpu costs a loop body once.
  has_loops: bool = False

  def step_estimate(self) -> Tuple[float, str]:
    """(seconds per step the compiler estimates, or 0; why not, or what it leaves out).

    libtpu (0.0.42) gives -1 s for each operation it cannot cost (some collectives, some
    large fusions) and adds its estimates for the rest; a negative `optimal_seconds` is
    read as the uncosted count plus the fraction that is the rest, valid below one second
    of costed time (checked against the compiler's FLOPs at peak). It costs a loop body
    once, so programs with loops (scanned layers, the chunked attention) get no estimate.
    """
    x = self.optimal_seconds
    if x == 0:
      return 0.0, "the compiler gives no estimate"
    if self.has_loops:
      return 0.0, ("not usable: the step has loops (scanned layers or chunked attention) "
                   "whose bodies the compiler costs once")
    if x > 0:
      return x, ""
    uncosted = math.ceil(-x - 1e-9)
    known = x + uncosted
    floor = (self.compiler_flops / self.peak_flops_per_device
             if self.peak_flops_per_device else 0.0)
    if known <= 0 or known < floor:
      return 0.0, f"not usable: optimal_seconds={x:.4g} (ops the compiler cannot cost)"
    return known, f"{uncosted} operations the compiler cannot cost left out"

  @property
  def projected_tokens_per_s(self) -> float:
    """Global tokens per second at the compiler's estimated step time (0 if none)."""
    seconds = self.step_estimate()[0]
    return self.global_batch * self.seq_len / seconds if seconds > 0 else 0.0

  @property
  def projected_mfu(self) -> float:
    """Model FLOPs utilization at the compiler's estimated step time (0 if unknown)."""
    seconds = self.step_estimate()[0]
    if seconds <= 0 or self.peak_flops_per_device <= 0:
      return 0.0
    return self.model_flops / (seconds * self.peak_flops_per_device)

  def to_json(self) -> Dict[str, Any]:
    seconds, note = self.step_estimate()
    return {**dataclasses.asdict(self), "projected_step_seconds": seconds,
            "projected_note": note, "projected_tokens_per_s": self.projected_tokens_per_s,
            "projected_mfu": self.projected_mfu}


def _shard_bytes(abstract_tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def built_vocab(config) -> Optional[pathlib.Path]:
  """The vocab.json of the built dataset config.data names (its newest version), found the
  way input_pipeline.find_dataset_dir does, without importing TensorFlow:
  <data_dir>/<name>/<builder_config>/<version>/vocab.json. None if none is built."""
  data = config.data
  root = pathlib.Path(data.get("data_dir", "") or os.environ.get("TFDS_DATA_DIR") or
                      "~/tensorflow_datasets").expanduser()
  builder_config = data.get("builder_config", "") or _DEFAULT_BUILDER_CONFIGS.get(
      data.get("name", ""), "")
  found = sorted((root / data.get("name", "") / builder_config).glob("*/vocab.json"),
                 key=lambda p: tuple(int(x) if x.isdigit() else 0
                                     for x in p.parent.name.split(".")))
  return found[-1] if found and not data.get("mixture", ()) else None


def _resolve_encoding(config, fallback: Optional[encoding.Encoding]
                      ) -> Optional[encoding.Encoding]:
  """The built dataset's encoding, else `fallback` (the builder config's, from the caller),
  else the encoding config.data.builder_config starts with; None if none."""
  vocab = built_vocab(config)
  if vocab is not None:
    return encoding.load_vocab(vocab)
  if fallback is not None:
    return fallback
  name = str(config.data.get("builder_config", "")).split("_")[0]
  return encoding.get(name) if name in encoding.ENCODINGS else None


def _resolve_vocab_size(config, vocab_size: int, enc: Optional[encoding.Encoding]
                        ) -> Tuple[int, str]:
  """--vocab_size, else config.model.vocab_size, else the resolved encoding's."""
  if vocab_size:
    return int(vocab_size), "flag"
  if config.model.vocab_size:
    return int(config.model.vocab_size), "config"
  if enc is not None:
    return int(enc.vocab_size), "encoding"
  raise ConfigError("vocabulary size unknown: set --vocab_size or config.model.vocab_size "
                    "(no built dataset and config.data.builder_config names no encoding)")


def compile_train_step(config, topology: Topology, devices: Sequence[Any], *,
                       vocab_size: int = 0, memory_per_device: str = "",
                       encoding_if_unbuilt: Optional[encoding.Encoding] = None
                       ) -> CompileReport:
  """Lowers and compiles the run's train step (`train.jit_train_step`) for `devices`.

  Args:
    config: a run config (configs/*.py), already overridden.
    topology: the parsed target (for the report and host count).
    devices: from `target_devices(topology)`.
    vocab_size: overrides the vocabulary size (0: the encoding's).
    memory_per_device: see `device_memory_bytes`.
    encoding_if_unbuilt: the encoding config.data's builder config writes, used when the
      dataset is not built (its vocabulary size, and the bar clock of models with
      `bar_positions` or `time_rope_heads`); else the encoding the builder config's name
      starts with.

  Returns:
    A `CompileReport`.

  Raises:
    ConfigError: naming the config field that cannot work on this target.
  """
  num_devices = len(devices)
  num_hosts = max(topology.num_hosts, len({d.process_index for d in devices}))
  train.validate_config(config, devices=devices, num_hosts=num_hosts)
  enc = _resolve_encoding(config, encoding_if_unbuilt)
  vocab, _ = _resolve_vocab_size(config, vocab_size, enc)

  mesh = sharding.create_mesh(config.mesh, devices=devices)
  rules = sharding.get_logical_axis_rules(config.mesh)
  # The encoding gives config.model.bar_positions / time_rope_heads their bar clock.
  setup, state = train.create_train_state(config, vocab, mesh, rules, abstract=True,
                                          encoding=enc)
  rows, seq_len = config.data.batch_size, config.data.seq_len
  batch_keys = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
  if config.data.get("packing", False):
    batch_keys.update(segment_ids=jnp.int32, positions=jnp.int32)
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), dt, sharding=setup.batch_sharding)
           for k, dt in batch_keys.items()}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

  start = time.perf_counter()
  with sharding.use_mesh(mesh, rules):
    compiled = train.jit_train_step(config, setup).lower(state, batch, rng).compile()
  compile_seconds = time.perf_counter() - start

  mem = compiled.memory_analysis()
  argument = int(getattr(mem, "argument_size_in_bytes", 0) or 0)
  output = int(getattr(mem, "output_size_in_bytes", 0) or 0)
  alias = int(getattr(mem, "alias_size_in_bytes", 0) or 0)
  temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0)
  code = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
  total = argument + output - alias + temp + code
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per module.
    cost = cost[0] if cost else {}
  compiler_flops = float((cost or {}).get("flops", 0.0))
  optimal_seconds = float((cost or {}).get("optimal_seconds", 0.0) or 0.0)
  has_loops = (bool(optimal_seconds)
               and re.search(r"\bwhile\(", compiled.as_text() or "") is not None)
  model_flops = setup.flops_per_token(seq_len) * rows * seq_len / num_devices
  limit, limit_source = device_memory_bytes(devices, topology, memory_per_device)
  fits = None if not limit else total <= limit
  return CompileReport(
      topology=topology.spec, device_kind=str(getattr(devices[0], "device_kind", "")),
      num_devices=num_devices, num_hosts=num_hosts, num_slices=topology.num_slices,
      mesh_shape={str(k): int(v) for k, v in mesh.shape.items()}, global_batch=rows,
      seq_len=seq_len, vocab_size=vocab, num_params=transformer.count_params(state.params),
      param_bytes_per_device=_shard_bytes(state.params),
      opt_state_bytes_per_device=_shard_bytes(state.opt_state), argument_bytes=argument,
      output_bytes=output, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
      total_bytes=total, memory_limit_bytes=limit, memory_limit_source=limit_source,
      compiler_flops=compiler_flops, model_flops=model_flops,
      compile_seconds=compile_seconds, fits=fits,
      attention_impl=setup.model_config.attention_impl,
      optimizer=str(config.train.get("optimizer", "adamw")),
      optimal_seconds=optimal_seconds, has_loops=has_loops,
      peak_flops_per_device=PEAK_FLOPS.get(limit_source.split(":")[-1], 0.0)
      if limit_source.startswith("table:") else 0.0)


# ----------------------------------------------------------------------------- report


def _gib(n: float) -> str:
  return f"{n / GIB:,.3f} GiB" if n >= 0.01 * GIB else f"{n / 1024 ** 2:,.2f} MiB"


def format_report(r: CompileReport) -> str:
  """Human-readable lines for a `CompileReport`."""
  mesh = " x ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
  slices = f", {r.num_slices} slices" if r.num_slices > 1 else ""
  lines = [
      f"target      {r.topology}: {r.num_devices} x {r.device_kind or 'device'}, "
      f"{r.num_hosts} host(s){slices}; mesh {mesh}",
      f"step        global batch {r.global_batch} x seq {r.seq_len}, vocab {r.vocab_size}, "
      f"{r.num_params / 1e6:,.2f} M parameters; compiled in {r.compile_seconds:.1f} s",
      "memory per device (XLA memory_analysis):",
      f"  parameters        {_gib(r.param_bytes_per_device)}",
      f"  optimizer state   {_gib(r.opt_state_bytes_per_device)}"
      + (f"   ({r.optimizer})" if r.optimizer else ""),
      f"  arguments         {_gib(r.argument_bytes)}   (train state + batch shards)",
      f"  outputs           {_gib(r.output_bytes)}",
      f"  aliased (donated) {_gib(r.alias_bytes)}",
      f"  temporaries       {_gib(r.temp_bytes)}   (activations, gradients, buffers)",
      f"  generated code    {_gib(r.code_bytes)}",
      f"  total             {_gib(r.total_bytes)}   (arguments + outputs - aliased + "
      "temporaries + code)",
  ]
  if r.memory_limit_bytes:
    share = r.total_bytes / r.memory_limit_bytes
    if not r.fits:
      verdict = "DOES NOT FIT"
    elif share > SAFE_FRACTION:
      verdict = "fits, with little headroom"
    else:
      verdict = "fits"
    lines.append(f"  device memory     {_gib(r.memory_limit_bytes)} ({r.memory_limit_source}): "
                 f"{share * 100:.1f}% used -> {verdict}")
  else:
    lines.append("  device memory     unknown (give --memory_per_device=h100|v5e|GiB to compare)")
  loops = " (loop bodies counted once)" if r.has_loops else ""
  lines.append(f"FLOPs per device per step: compiler {r.compiler_flops:.4g}{loops}, model "
               f"{r.model_flops:.4g} (6N + attention, or 4N + 2N_trainable with frozen "
               "parameters: transformer.flops_per_token)")
  if r.attention_impl:
    lines.append(f"attention   {r.attention_impl} (config.model.attention_impl resolved)")
  if r.optimal_seconds:
    seconds, note = r.step_estimate()
    if seconds > 0:
      line = (f"projected   {seconds * 1e3:,.3g} ms per step, "
              f"{r.projected_tokens_per_s:,.0f} tokens/s")
      if r.projected_mfu > 0:
        line += f", MFU {r.projected_mfu * 100:.1f}%"
      lines.append(line + " (the compiler's estimate, cost_analysis optimal_seconds: a lower "
                   "bound on step time, not a measurement" + (f"; {note})" if note else ")"))
    else:
      lines.append(f"projected   none: the compiler's estimate (optimal_seconds) is {note}")
  return "\n".join(lines)
