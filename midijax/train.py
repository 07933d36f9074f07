"""Training: `train_and_evaluate(config, workdir)`, in the shape of Flax's lm1b example.

Reads top-down: small pure helpers (schedule, optimizer), `train_step`, the config check
(`validate_config`), run records, then the train step's construction
(`create_train_state`, `jit_train_step`: shared with `midijax compile` and
benchmarks/train_throughput.py) and the loop. The loss and the evaluation step live in
`midijax.losses`, metric files in `midijax.metric_writers`.

The train step is one `jax.jit` with explicit in/out shardings over the device mesh
(data / fsdp / tensor); batches arrive as per-process numpy arrays and become global
sharded arrays, so the same code runs on one CPU, 8 GPUs or a pod.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from midijax import checkpoint as ckpt_lib
from midijax import encoding
from midijax import finetune
from midijax import losses
from midijax import metric_writers
from midijax import runs
from midijax import sharding
from midijax.errors import ConfigError, MidijaxError
from midijax.models import transformer


class TrainingDivergedError(MidijaxError):
  pass


# Learning-rate decays after the warmup (config.train.schedule).
SCHEDULES = ("cosine", "rsqrt", "constant")


# ----------------------------------------------------------------------------- pure helpers
def create_learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps`, then cosine / rsqrt / constant."""
  lr, warmup, total = train_config.learning_rate, train_config.warmup_steps, train_config.num_steps
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if train_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=0.1)
  elif train_config.schedule == "rsqrt":
    decay = lambda s: lr * jnp.sqrt(max(warmup, 1) / (s + max(warmup, 1)))
  elif train_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:  # validate_config names the field first; this guards direct calls
    raise ConfigError(f"config.train.schedule={train_config.schedule!r}; "
                      f"expected {' | '.join(SCHEDULES)}")
  return optax.join_schedules([warm, decay], [warmup])


def weight_decay_mask(params, decay_all: bool = False):
  """True for leaves AdamW decays: weight matrices, not norm scales, biases or embeddings."""
  # Scanned layers stack each block parameter on a leading layer axis.
  scanned = bool(transformer.params_scanned(params))

  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    ndim = leaf.ndim - (1 if scanned and name.startswith("blocks") else 0)
    return decay_all or (ndim >= 2 and "embedding" not in name and "rel" not in name)
  return jax.tree_util.tree_map_with_path(keep, params)


def muon_dimension_numbers(params):
  """Which axes of each parameter Muon orthogonalizes over; None = the Adam part.

  The Transformer's matrices inside the blocks: query / key / value ([embed, heads,
  head_dim]: one embed x (heads * head_dim) matrix), out ([heads, head_dim, embed]) and
  the MLP's 2-D weights. Embeddings, the output head, norm scales, LoRA factors and
  vectors stay with Adam, as in Jordan et al.'s Muon. A scanned layer axis is a batch
  axis (each layer's matrix is orthogonalized on its own).
  """
  scanned = bool(transformer.params_scanned(params))
  dims = optax.contrib.MuonDimensionNumbers

  def rule(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    last = name.rsplit("/", 1)[-1]
    if (not name.startswith("blocks") or transformer.is_lora_path(name)
        or "embedding" in last):  # e.g. relative attention's per-distance embeddings
      return None
    n = leaf.ndim
    if n - scanned == 3 and last in ("query", "key", "value"):
      return dims(reduction_axis=n - 3, output_axis=(n - 2, n - 1))
    if n - scanned == 3 and last == "out":
      return dims(reduction_axis=(n - 3, n - 2), output_axis=n - 1)
    if n - scanned == 2:
      return dims(reduction_axis=n - 2, output_axis=n - 1)
    return None
  return jax.tree_util.tree_map_with_path(rule, params)


OPTIMIZERS = ("adamw", "muon")


def create_optimizer(train_config, params, trainable: Optional[Sequence[bool]] = None
                     ) -> optax.GradientTransformation:
  """AdamW (or Muon, `train.optimizer`) with the decay mask, global-norm clipping and
  optional gradient accumulation.

  `trainable` (bools in `jax.tree.leaves(params)` order, from
  `finetune.trainable_leaves`; None = all): the other parameters get no update and no
  optimizer state (`optax.multi_transform` with `set_to_zero`), and clipping sees only
  the trainable gradients.
  """
  schedule = create_learning_rate_schedule(train_config)
  parts = []
  if train_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  # The decay mask is a function of the parameters the transform sees: with frozen
  # parameters that is only the trainable part of the tree.
  if train_config.get("optimizer", "adamw") == "muon":
    # optax's Muon: Newton-Schulz-orthogonalized Nesterov momentum for the blocks'
    # matrices, at `muon_learning_rate` on the same warmup and decay; Adam (b1, b2, at
    # `learning_rate`, no weight decay) for embeddings, the output head and norm scales.
    ratio = train_config.muon_learning_rate / train_config.learning_rate
    parts.append(optax.contrib.muon(
        lambda step: schedule(step) * ratio, adam_learning_rate=schedule,
        weight_decay=train_config.weight_decay, adam_b1=train_config.b1,
        adam_b2=train_config.b2, muon_weight_dimension_numbers=muon_dimension_numbers))
  else:
    parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                             weight_decay=train_config.weight_decay,
                             mask=functools.partial(weight_decay_mask,
                                                    decay_all=train_config.decay_all)))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.unflatten(jax.tree.structure(params),
                                ["trainable" if t else "frozen" for t in trainable])
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  if train_config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=train_config.grad_accum_steps)
  return tx


@struct.dataclass
class TrainState:
  """step, parameters, optimizer state, and (config.train.ema_decay > 0) the parameters'
  moving average, which validation and every later use of the run read; None when off."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def inference_params(state: TrainState):
  """The parameters a run is evaluated and sampled with: the moving average when kept."""
  return state.params if state.ema_params is None else state.ema_params


def config_ema_decay(config) -> float:
  """config.train.ema_decay (0 when off or absent: configs saved before the field)."""
  return float(config.train.get("ema_decay", 0.0) or 0.0)


def ema_update(ema, params, step, decay: float):
  """One step of the parameters' moving average, with TensorFlow's warm-up of the decay
  (`min(decay, (1 + step) / (10 + step))`): the first steps follow the parameters."""
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return optax.incremental_update(params, ema, 1.0 - d)


# ----------------------------------------------------------------------------- steps
def train_step(state: TrainState, batch: Dict[str, jax.Array], dropout_rng, *, graphdef, tx,
               label_smoothing: float, use_dropout: bool,
               trainable: Optional[Tuple[bool, ...]] = None, ema_decay: float = 0.0):
  """One optimizer update; returns (new state, summed metrics). Parameters `trainable`
  marks False are passed through untouched (bit-identical). With `state.ema_params` the
  moving average takes the new parameters in at `ema_decay`."""
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits = losses.apply_model(graphdef, params, batch, not use_dropout,
                                rng if use_dropout else None)
    loss_sum, weight_sum = losses.weighted_cross_entropy(logits, batch["targets"],
                                                         batch["weights"], label_smoothing)
    return loss_sum / jnp.maximum(weight_sum, 1.0), (logits, loss_sum, weight_sum)

  (_, (logits, loss_sum, weight_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = finetune.keep_frozen(optax.apply_updates(state.params, updates), state.params,
                                trainable)
  correct, _ = losses.weighted_accuracy(logits, batch["targets"], batch["weights"])
  # The norm of the trainable gradients only: frozen ones are never used (XLA drops them).
  grad_leaves = jax.tree.leaves(grads)
  if trainable is not None:
    grad_leaves = [g for g, t in zip(grad_leaves, trainable) if t]
  metrics = {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct,
             "grad_norm": optax.tree.norm(grad_leaves)}
  ema = state.ema_params
  if ema is not None:
    # Frozen parameters (config.train.trainable) keep their exact values in the average.
    ema = finetune.keep_frozen(ema_update(ema, params, state.step, ema_decay), ema, trainable)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    ema_params=ema), metrics


# ----------------------------------------------------------------------------- validation
def validate_config(config, num_devices: Optional[int] = None, *,
                    devices: Optional[Sequence[Any]] = None,
                    num_hosts: Optional[int] = None) -> None:
  """Checks a run config before anything is compiled or loaded.

  The model's own fields are checked where the model config is built
  (`TransformerConfig.__post_init__`, reached through `runs.model_config_from`); this
  checks the data, training and mesh fields and how they fit the model and the devices.

  Args:
    config: a run config (configs/*.py, overridden).
    num_devices: devices of the mesh (default: len(devices)).
    devices: the target devices (default jax.devices()); their slices or processes are
      the DCN granules, as in `sharding.create_mesh`.
    num_hosts: processes feeding the batch (default jax.process_count()).

  Raises:
    ConfigError: naming the field that cannot work.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices) if num_devices is None else num_devices
  num_hosts = jax.process_count() if num_hosts is None else num_hosts
  m, d, t = config.model, config.data, config.train
  runs.model_config_from(config, max(int(m.get("vocab_size", 0) or 0), 1))
  for field in ("batch_size", "seq_len", "eval_batch_size"):
    if d[field] <= 0:
      raise ConfigError(f"config.data.{field}={d[field]} must be positive")
  if d.seq_len > m.max_len:
    raise ConfigError(f"config.data.seq_len={d.seq_len} is above config.model.max_len="
                      f"{m.max_len}, the longest position the model supports")
  if t.num_steps <= 0 or t.learning_rate <= 0:
    raise ConfigError("config.train.num_steps and config.train.learning_rate must be positive")
  for field in ("log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if t[field] <= 0:
      raise ConfigError(f"config.train.{field}={t[field]} must be positive")
  if not 0.0 <= config_ema_decay(config) < 1.0:
    raise ConfigError(f"config.train.ema_decay={t.get('ema_decay')} must be in [0, 1) "
                      "(0 = no moving average)")
  if t.schedule not in SCHEDULES:
    raise ConfigError(f"config.train.schedule={t.schedule!r}; expected {' | '.join(SCHEDULES)}")
  if t.get("optimizer", "adamw") not in OPTIMIZERS:
    raise ConfigError(f"config.train.optimizer={t.get('optimizer')!r}; expected "
                      f"{' | '.join(OPTIMIZERS)}")
  if t.get("optimizer", "adamw") == "muon" and not t.get("muon_learning_rate", 0) > 0:
    raise ConfigError(f"config.train.muon_learning_rate={t.get('muon_learning_rate')} "
                      "must be positive")
  for field in ("init_from", "trainable"):
    if not isinstance(t.get(field, "") or "", str):
      raise ConfigError(f"config.train.{field}={t.get(field)!r} must be a string")
  finetune.compile_pattern(t.get("trainable", "") or "")
  dcn = tuple(config.mesh.dcn_parallelism)
  granules = sharding.num_granules(devices) if (-1 in dcn or math.prod(dcn) != 1) else 1
  try:
    ici, dcn = sharding.resolve_mesh_shape(tuple(config.mesh.ici_parallelism), dcn,
                                           num_devices, num_granules=granules)
  except ValueError as e:
    raise ConfigError(f"config.mesh.{e}") from None
  shape = [i * g for i, g in zip(ici, dcn)]
  batch_shards = shape[0] * shape[1]
  if d.batch_size % batch_shards:
    raise ConfigError(f"config.data.batch_size={d.batch_size} must be divisible by the "
                      f"data x fsdp mesh size {batch_shards} (mesh {tuple(shape)})")
  if d.batch_size % num_hosts:
    raise ConfigError(f"config.data.batch_size={d.batch_size} must be divisible by the "
                      f"{num_hosts} hosts (processes) feeding it")
  if m.num_heads % shape[2] or m.mlp_dim % shape[2]:
    raise ConfigError(f"config.mesh tensor parallelism {shape[2]} must divide "
                      f"config.model.num_heads={m.num_heads} and mlp_dim={m.mlp_dim}")


# ----------------------------------------------------------------------------- run records
def _write_json(path, obj) -> None:
  path.write_text(json.dumps(obj, indent=1, default=str))


def _write_json_atomic(path, obj) -> None:
  """Writes JSON through a temporary file and a rename (local folders; gs:// writes whole)."""
  if "://" in str(path):
    _write_json(path, obj)
    return
  tmp = path.parent / (path.name + ".tmp")
  _write_json(tmp, obj)
  os.replace(tmp, path)


def run_info() -> dict:
  """What a run ran on: git commit, package versions, Python, devices, start time."""
  import importlib.metadata as md
  here = pathlib.Path(__file__).parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=here, timeout=5).stdout.strip()
    dirty = bool(commit) and bool(subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
        capture_output=True, text=True, cwd=here, timeout=5).stdout.strip())
  except Exception:  # not a git checkout
    commit, dirty = "", False
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
              "note-seq", "symusic", "numpy", "midijax"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return {"git_commit": commit, "git_dirty": dirty, "versions": versions,
          "python": sys.version.split()[0],
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def peak_flops_per_device(config) -> Tuple[float, str]:
  """(FLOP/s, source): from the config, a table of accelerators, or a matmul measured here."""
  if config.train.peak_flops_per_device > 0:
    return float(config.train.peak_flops_per_device), "config"
  kind = jax.devices()[0].device_kind.lower()
  bf16 = config.model.dtype != "float32"
  table = {"h100": (989e12, 67e12), "h200": (989e12, 67e12), "a100": (312e12, 19.5e12),
           "tpu v4": (275e12, 275e12), "tpu v5 lite": (197e12, 197e12),
           "tpu v5e": (197e12, 197e12), "tpu v5p": (459e12, 459e12), "tpu v6": (918e12, 918e12)}
  for name, (half, single) in table.items():
    if name in kind:
      return (half if bf16 else single), f"table:{name}"
  return measure_matmul_flops(), "measured"


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
  """This device's matmul FLOP/s in `dtype`: the best of a few n x n jnp.dot runs."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- the loop
class _Preemption:
  """Turns SIGTERM (preemptible TPU VMs, SLURM) into a flag the loop checks each step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _init_rngs(seed: int) -> nnx.Rngs:
  # unsafe_rbg keys compile the jitted initializer ~5x faster than threefry on CPU; the
  # parameters are still a deterministic function of the seed.
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _agree(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a no-op on one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


# ----------------------------------------------------------------------------- the train step
@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the jitted train step is built from (`create_train_state` makes it).

  Attributes:
    model_config: the model's TransformerConfig.
    graphdef: the model's NNX graph definition (its static structure).
    tx: the optimizer.
    mesh: the device mesh; rules: its logical axis rules.
    state_shardings: a TrainState of shardings: the step replicated, parameters by their
      logical axes, optimizer moments like their parameters.
    batch_sharding: batch rows split over data x fsdp.
    trainable: bools in `jax.tree.leaves(params)` order, the parameters
      config.train.trainable selects; None = all.
    param_counts: (all parameter scalars, trainable ones).
    trainable_matmul_params: scalars of the trainable matmul weights (None = all train),
      for the FLOPs per token (`transformer.flops_per_token`).
  """
  model_config: transformer.TransformerConfig
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: Any
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  trainable: Optional[Tuple[bool, ...]] = None
  param_counts: Tuple[int, int] = (0, 0)
  trainable_matmul_params: Optional[int] = None

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of this model and trainable set (MFU's numerator)."""
    return transformer.flops_per_token(self.model_config, seq_len, self.trainable_matmul_params)


def create_train_state(config, vocab_size: int, mesh, rules, *, abstract: bool = False,
                       encoding=None) -> Tuple[TrainSetup, TrainState]:
  """The model, optimizer and their shardings, and the initial train state.

  Args:
    config: a validated run config.
    vocab_size: the model's vocabulary (before padding).
    mesh, rules: the device mesh and logical axis rules.
    abstract: give the state as ShapeDtypeStructs carrying their shardings, allocating
      nothing (ahead-of-time compilation for devices this process may not have).
    encoding: the run's encoding (its bar clock, for config.model.bar_positions).

  Returns:
    (TrainSetup, TrainState): the state's parameters are global arrays sharded on `mesh`
    (created by jitted initializers, so no device holds the whole model), or abstract.

  Raises:
    ConfigError: when a parameter cannot be split as config.mesh asks, or
      config.train.trainable matches no parameter.
  """
  model_cfg = runs.model_config_from(config, vocab_size, encoding=encoding)
  # The attention backend for the platform compiled for (the mesh's devices: TPU devices
  # from libtpu's topology for `midijax compile` on a CPU host).
  model_cfg = model_cfg.replace(attention_impl=transformer.resolve_attention_impl(
      model_cfg, mesh.devices.flat[0].platform, mesh.size, seq_len=config.data.seq_len,
      packing=config.data.get("packing", False)))
  model_fn = lambda: transformer.Transformer(model_cfg, rngs=_init_rngs(config.seed))
  try:
    if abstract:
      graphdef, params = nnx.split(nnx.eval_shape(model_fn))
    else:
      graphdef, params = nnx.split(sharding.create_sharded_model(model_fn, mesh, rules))
    param_sh = sharding.state_shardings(params, mesh, rules)
  except ConfigError:
    raise  # a model field (e.g. bar_positions without bar lines) already names itself
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  trainable = finetune.trainable_leaves(params, config.train.get("trainable", ""))
  tx = create_optimizer(config.train, params, trainable)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # The optimizer state takes its parameters' shardings (Adam's moments); scalars replicate.
  # Frozen parameters (config.train.trainable) have no state: optax marks them MaskedNode.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s,
                                 jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)
  use_ema = config_ema_decay(config) > 0
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                        ema_params=param_sh if use_ema else None)
  setup = TrainSetup(model_config=model_cfg, graphdef=graphdef, tx=tx, mesh=mesh, rules=rules,
                     state_shardings=state_sh, batch_sharding=sharding.batch_sharding(mesh, rules),
                     trainable=trainable, param_counts=finetune.count_params(params, trainable),
                     trainable_matmul_params=finetune.trainable_matmul_params(params, trainable,
                                                                              model_cfg))
  if abstract:
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params),
                        ema_params=params if use_ema else None)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, state_sh)
    return setup, state
  # Every array is made by a jitted function so that it is a global array on the mesh (a
  # plain jnp array would sit on one local device, which multi-host jit rejects).
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)()
  return setup, TrainState(step=step, params=params, opt_state=opt_state,
                           ema_params=copy_params(params, param_sh) if use_ema else None)


def copy_params(params, shardings):
  """A copy of `params` in new buffers (the train step donates its state, so the moving
  average cannot share buffers with the parameters)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def jit_train_step(config, setup: TrainSetup):
  """`train_step` jitted with the run's shardings: (state, batch, dropout key) -> (state,
  metrics), the state donated. Training, `midijax compile` and the throughput benchmark
  all run this function; call (or lower) it inside `sharding.use_mesh(mesh, rules)`."""
  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  use_dropout = config.model.dropout_rate > 0 or config.model.attention_dropout_rate > 0
  return jax.jit(
      functools.partial(train_step, graphdef=setup.graphdef, tx=setup.tx,
                        label_smoothing=config.train.label_smoothing, use_dropout=use_dropout,
                        trainable=setup.trainable,
                        ema_decay=config_ema_decay(config)),
      in_shardings=(setup.state_shardings, setup.batch_sharding, replicated),
      out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def replicated_key(seed: int, mesh) -> jax.Array:
  """A PRNG key replicated over the mesh (a global array, usable on every host)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data=None) -> Dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final
  metrics. `data` (tests) may supply a `midijax.input_pipeline` data source."""
  sharding.maybe_initialize_distributed()
  session_start = time.perf_counter()
  workdir = ckpt_lib.workdir_path(workdir)  # a local folder or gs://bucket/path
  validate_config(config)
  if data is None:
    from midijax import input_pipeline
    data = input_pipeline.DataSource(config)
  vocab_size = config.model.vocab_size or data.vocab_size
  if vocab_size < data.vocab_size:
    raise ConfigError(f"config.model.vocab_size={vocab_size} is smaller than the dataset's "
                      f"vocabulary ({data.vocab_size})")
  # A run with checkpoints resumes from them: init_from is read only by a fresh run, and
  # checked before anything is written or compiled.
  resuming = bool(ckpt_lib.available_steps(workdir))
  init_source = None
  if config.train.get("init_from", "") and not resuming:
    init_source = finetune.resolve_init_from(config.train.init_from)
    finetune.check_init_from(config, init_source, vocab_size, init_source.vocab_size,
                             encoding=getattr(data, "encoding", None))

  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.get_logical_axis_rules(config.mesh)
  is_chief = jax.process_index() == 0
  old_info = {}
  if (workdir / "run_info.json").exists():
    try:
      old_info = json.loads((workdir / "run_info.json").read_text())
    except ValueError:  # damaged by an earlier crash: start a new record
      old_info = {}

  # Parameters are created outside `use_mesh`: their logical names resolve through the rules.
  setup, state = create_train_state(config, vocab_size, mesh, rules,
                                    encoding=getattr(data, "encoding", None))
  state_sh = setup.state_shardings
  info = run_info()
  info["attention_impl"] = setup.model_config.attention_impl
  total, trainable = setup.param_counts
  info["params"] = {"total": total, "trainable": trainable,
                    "trainable_pattern": config.train.get("trainable", "")}
  # What `continue` must put in a prompt's prefix to match training (runs.conditioning_kinds).
  kinds = data.conditioning_kinds() if hasattr(data, "conditioning_kinds") else None
  if kinds is not None:
    info["conditioning"] = kinds
  if resuming:
    for key in ("init_from", "wall_seconds"):  # the run's own history, kept across restarts
      if key in old_info:
        info[key] = old_info[key]
  logging.info("attention backend: %s", setup.model_config.attention_impl)
  if is_chief:
    print(f"attention backend: {setup.model_config.attention_impl} (config.model."
          f"attention_impl={config.model.get('attention_impl', 'auto')})", flush=True)
    print(f"parameters: {total:,}" + (
        f", {trainable:,} trainable ({trainable / max(total, 1):.1%}, config.train.trainable="
        f"{config.train.trainable!r})" if trainable != total else " (all trainable)"), flush=True)
  if init_source is not None:
    params, info["init_from"] = finetune.load_init_params(
        init_source, state.params, state_sh.params, data.encoding.vocab.names, mesh, rules,
        model_config=setup.model_config, new_encoding=data.encoding)
    state = state.replace(params=params, ema_params=None if state.ema_params is None else
                          copy_params(params, state_sh.params))
    vocab = info["init_from"]["vocabulary"]
    if is_chief:
      print(f"init_from {init_source.spec}: parameters of step {init_source.step} of "
            f"{init_source.workdir}; vocabulary rows: {vocab['copied']} copied by token name, "
            f"{vocab['initialised']} initialised" + (
                f" ({', '.join(vocab['initialised_tokens'][:8])}"
                f"{', ...' if vocab['initialised'] > 8 else ''})" if vocab["initialised"] else ""),
            flush=True)
      if "lora" in info["init_from"]:
        print(f"init_from: {finetune.describe_adapters(info['init_from']['lora'])}", flush=True)
  # The run's records are written once its state exists: a start that fails (a bad
  # init_from source, a parameter that cannot be split) leaves no half-made workdir.
  workdir.mkdir(parents=True, exist_ok=True)
  if is_chief:
    _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    data.save_vocab(workdir / "vocab.json")
    _write_json_atomic(workdir / "run_info.json", info)
  with sharding.use_mesh(mesh, rules):
    manager = ckpt_lib.make_manager(workdir, config.train.keep_latest, config.train.keep_best,
                                    config.train.async_checkpointing)
    start_step = 0
    if manager.latest_step() is not None:
      start_step = int(manager.latest_step())
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              state, state_sh)
      try:
        state, meta = ckpt_lib.restore(manager, start_step, abstract)
      except ValueError as e:
        saved_config = ckpt_lib.read_meta(workdir, start_step).get("config", {})
        saved = saved_config.get("model", {})
        scanned = bool(saved.get("scan_layers", False))
        hint = (f" It was saved with config.model.scan_layers={scanned}: resume with "
                f"--config.model.scan_layers={scanned} (midijax.models.stack_layers / "
                "unstack_layers convert parameters between the two)."
                if scanned != bool(config.model.get("scan_layers", False)) else "")
        saved_ema = float(saved_config.get("train", {}).get("ema_decay", 0.0) or 0.0)
        if (saved_ema > 0) != (config_ema_decay(config) > 0):
          hint += (f" It was saved {'with' if saved_ema else 'without'} a moving average of "
                   f"the parameters: resume with --config.train.ema_decay={saved_ema}.")
        raise ConfigError(
            f"{workdir}: the checkpoint at step {start_step} does not fit this config's model or "
            f"optimizer (changed since it was saved?); use a new --workdir.{hint} "
            f"({str(e)[:300]})") from None
      logging.info("Resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start_step)
      if is_chief:
        print(f"resuming from step {start_step}", flush=True)

    batch_sh = setup.batch_sharding
    to_global = functools.partial(sharding.host_local_to_global, mesh=mesh, sharding=batch_sh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_train = jit_train_step(config, setup)
    p_eval = jax.jit(functools.partial(losses.eval_step, graphdef=setup.graphdef),
                     in_shardings=(state_sh.params, batch_sh), out_shardings=replicated)

    seq_len = config.data.seq_len
    fpt = setup.flops_per_token(seq_len)
    peak, peak_src = peak_flops_per_device(config)
    writer = metric_writers.MetricWriter(workdir, active=is_chief, resume_step=start_step)
    dropout_rng = replicated_key(config.seed + 1, mesh)
    train_iter = data.train_batches(start_step)
    meta = {"config": json.loads(config.to_json_best_effort()), "vocab_size": vocab_size,
            # Which of the state's parameter trees later uses of the run load.
            "inference_params": "params" if state.ema_params is None else "ema_params"}
    best_loss = float("inf")
    best_path = workdir / "best.json"
    if best_path.exists():
      best_loss = json.loads(best_path.read_text())["eval_loss"]

    progress = None
    if is_chief and sys.stdout.isatty():
      from tqdm import tqdm
      progress = tqdm(total=config.train.num_steps, initial=start_step, unit="step")
    last = {}
    window = {"t": time.perf_counter(), "steps": 0, "tokens": 0.0}
    step = start_step
    eval_summary: Dict[str, float] = {}
    eval_notes = None  # notes among the eval targets (the same at every evaluation)

    def log_train(step_done, m):
      """Fetches a step's metrics; a NaN/inf loss stops the run before anything is saved."""
      summary = losses.summarize(jax.device_get(m))
      if config.train.stop_on_nan and not np.isfinite(summary["loss"]):
        raise TrainingDivergedError(
            f"loss became {summary['loss']} at step {step_done}; stopping. The last good "
            f"checkpoint is kept in {ckpt_lib.checkpoint_dir(workdir)} (lower "
            "config.train.learning_rate or raise warmup_steps)")
      return summary

    run_start = time.perf_counter()
    stop_check_every = 1 if jax.process_count() == 1 else config.train.log_every
    with _Preemption() as preempt:
      while step < config.train.num_steps:
        batch = next(train_iter)
        window["tokens"] += float(np.sum(batch["weights"])) * jax.process_count()
        state, metrics = p_train(state, to_global(batch), dropout_rng)
        step += 1
        window["steps"] += 1
        if progress is not None:
          progress.update(1)
        out_of_time = stop_requested = False
        if step % stop_check_every == 0:
          # Stop decisions are shared, so every host stops at the same step: every step on
          # one process (SIGTERM leaves ~30 s before SIGKILL, and a loaded CPU step can
          # take seconds), at log steps across hosts (a collective each step would cost).
          out_of_time = _agree(config.train.max_seconds > 0 and
                               time.perf_counter() - run_start > config.train.max_seconds)
          stop_requested = _agree(preempt.requested)
        last_step = step == config.train.num_steps or out_of_time or stop_requested
        do_eval = step % config.train.eval_every == 0 or (last_step and not stop_requested)
        do_ckpt = step % config.train.checkpoint_every == 0 or last_step
        if step % config.train.log_every == 0 or do_ckpt:
          summary = log_train(step, metrics)
          elapsed = time.perf_counter() - window["t"]
          tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
          mfu = tokens_per_s * fpt / (peak * jax.device_count())
          lr = float(create_learning_rate_schedule(config.train)(step))
          last = {"train_loss": summary["loss"], "train_accuracy": summary["accuracy"],
                  "grad_norm": float(jax.device_get(metrics["grad_norm"])),
                  "learning_rate": lr, "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
                  "step_time_s": elapsed / max(window["steps"], 1), "mfu": mfu}
          writer.write(step, last)
          if is_chief:
            line = (f"step {step:>6}  loss {summary['loss']:.4f}  lr {lr:.2e}  "
                    f"tok/s {tokens_per_s:,.0f}  step {last['step_time_s'] * 1e3:.0f} ms  "
                    f"MFU {mfu * 100:.1f}% ({peak_src} peak {peak / 1e9:,.0f} GFLOP/s/device)")
            (progress.write(line) if progress is not None else print(line, flush=True))
          window = {"t": time.perf_counter(), "steps": 0, "tokens": 0.0}
        eval_loss = None
        if do_eval:
          t0 = time.perf_counter()
          eval_batches = data.eval_batches()
          eval_summary = losses.evaluate(p_eval, inference_params(state), eval_batches,
                                         to_global)
          eval_loss = eval_summary["loss"]
          if eval_notes is None and hasattr(eval_batches, "count_scored"):
            eval_notes = eval_batches.count_scored(encoding.note_token_mask(data.encoding))
          if eval_notes:  # NLL per note compares runs of different encodings
            eval_summary["nll_per_note"] = eval_loss * eval_summary["tokens"] / eval_notes
          writer.write(step, {f"eval_{k}": v for k, v in eval_summary.items()})
          if is_chief:
            line = (f"step {step:>6}  eval loss {eval_loss:.4f}  ppl "
                    f"{eval_summary['perplexity']:.2f}  acc {eval_summary['accuracy']:.3f}  "
                    f"({eval_summary['tokens']:,.0f} tokens, {time.perf_counter() - t0:.1f} s)")
            (progress.write(line) if progress is not None else print(line, flush=True))
        if do_ckpt or do_eval:
          ckpt_lib.save(manager, step, state, {**meta, "step": step, "eval": eval_summary},
                        eval_loss)
          if eval_loss is not None and eval_loss < best_loss:
            best_loss = eval_loss
            manager.wait_until_finished()
            ckpt_lib.write_best(workdir, step, eval_loss)
        if do_eval or do_ckpt:
          # Evaluation and saving are not training time: restart the throughput window.
          window = {"t": time.perf_counter(), "steps": 0, "tokens": 0.0}
        if stop_requested or out_of_time:
          if is_chief and out_of_time:
            print(f"stopping at step {step}: config.train.max_seconds="
                  f"{config.train.max_seconds} reached", flush=True)
          break
    manager.wait_until_finished()
    latest = manager.latest_step()
    manager.close()
    writer.close()
    if progress is not None:
      progress.close()
    if is_chief:
      metric_writers.plot_losses(workdir)
      info["wall_seconds"] = round(float(info.get("wall_seconds", 0.0)) +
                                   time.perf_counter() - session_start, 3)
      info["steps"] = int(step)
      if latest is not None:
        size = finetune.directory_bytes(ckpt_lib.checkpoint_dir(workdir) / str(latest))
        info["checkpoint_bytes"] = size
        print(f"checkpoint at step {latest}: {size / 2**20:.2f} MiB (parameters + optimizer "
              f"state{'' if trainable == total else ' of the trainable ones'})", flush=True)
      _write_json_atomic(workdir / "run_info.json", info)
  return {**last, **{f"eval_{k}": v for k, v in eval_summary.items()}, "step": step}
