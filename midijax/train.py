"""Training: `train_and_evaluate(config, workdir)`, in the shape of Flax's lm1b example.

Reads top-down: small pure helpers (schedule, optimizer, weighted loss), `train_step` and
`eval_step`, `evaluate`, then the loop. The train step is one `jax.jit` with explicit in/out
shardings over the device mesh (data / fsdp / tensor); batches arrive as per-process numpy
arrays and become global sharded arrays, so the same code runs on one CPU, 8 GPUs or a pod.
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
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from absl import logging
from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from midijax import checkpoint as ckpt_lib
from midijax import sharding
from midijax.errors import ConfigError, MidijaxError
from midijax.models import transformer


class TrainingDivergedError(MidijaxError):
  pass


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
  else:
    raise ConfigError(f"config.train.schedule={train_config.schedule!r}; "
                      "expected cosine | rsqrt | constant")
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


def create_optimizer(train_config, params) -> optax.GradientTransformation:
  """AdamW with the decay mask, global-norm clipping and optional gradient accumulation."""
  schedule = create_learning_rate_schedule(train_config)
  parts = []
  if train_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                           weight_decay=train_config.weight_decay,
                           mask=weight_decay_mask(params, train_config.decay_all)))
  tx = optax.chain(*parts)
  if train_config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=train_config.grad_accum_steps)
  return tx


def weighted_cross_entropy(logits, targets, weights, label_smoothing: float = 0.0):
  """Returns (sum of weighted token NLL in nats, sum of weights).

  logits: float32 [B, T, V]; targets: int [B, T]; weights: float [B, T] (0 for padding).
  With label smoothing the loss is against the smoothed targets, minus that distribution's
  entropy, so a perfect model still scores 0.
  """
  vocab = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    smooth = -jnp.mean(jnp.where(logp > -1e9, logp, 0.0), axis=-1) * vocab / (vocab - 1)
    normalizer = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    nll = confidence * nll + label_smoothing * smooth - normalizer
  return jnp.sum(nll * weights), jnp.sum(weights)


def weighted_accuracy(logits, targets, weights):
  """Returns (number of weighted tokens whose argmax is the target, sum of weights)."""
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def model_config_from(config, vocab_size: int, deterministic: bool = False
                      ) -> transformer.TransformerConfig:
  m = config.model
  return transformer.TransformerConfig(
      vocab_size=vocab_size, emb_dim=m.emb_dim, num_heads=m.num_heads, num_layers=m.num_layers,
      qkv_dim=m.qkv_dim, mlp_dim=m.mlp_dim, max_len=m.max_len, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate, position=m.position, norm=m.norm,
      mlp_activation=m.mlp_activation, tied_embeddings=m.tied_embeddings, dtype=m.dtype,
      # Configs saved before this field existed get the default.
      attention_block=m.get("attention_block", transformer.TransformerConfig.attention_block),
      attention_impl=m.get("attention_impl", "auto"), remat_policy=m.get("remat_policy", "none"),
      scan_layers=m.get("scan_layers", False), pallas_interpret=m.get("pallas_interpret", False),
      deterministic=deterministic)


# ----------------------------------------------------------------------------- steps
def _apply(graphdef, params, batch, deterministic, dropout_rng):
  model = nnx.merge(graphdef, params)
  return model(batch["inputs"], segment_ids=batch.get("segment_ids"),
               positions=batch.get("positions"), deterministic=deterministic,
               dropout_rng=dropout_rng)


def train_step(state: TrainState, batch: Dict[str, jax.Array], dropout_rng, *, graphdef, tx,
               label_smoothing: float, use_dropout: bool):
  """One optimizer update; returns (new state, summed metrics)."""
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits = _apply(graphdef, params, batch, not use_dropout, rng if use_dropout else None)
    loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"],
                                                  label_smoothing)
    return loss_sum / jnp.maximum(weight_sum, 1.0), (logits, loss_sum, weight_sum)

  (_, (logits, loss_sum, weight_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct, _ = weighted_accuracy(logits, batch["targets"], batch["weights"])
  metrics = {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct,
             "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Dict[str, jax.Array], *, graphdef):
  """Summed NLL (nats), correct predictions and token count of one batch (padding excluded)."""
  logits = _apply(graphdef, params, batch, True, None)
  loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
  correct, _ = weighted_accuracy(logits, batch["targets"], batch["weights"])
  return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct}


def summarize(sums: Dict[str, float]) -> Dict[str, float]:
  """Token-weighted means: loss (nats/token), perplexity, accuracy."""
  w = max(float(sums["weight_sum"]), 1.0)
  loss = float(sums["loss_sum"]) / w
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
          "accuracy": float(sums["correct"]) / w, "tokens": float(sums["weight_sum"])}


def evaluate(eval_fn: Callable, params, batches: Iterator, to_global: Callable) -> Dict[str, float]:
  """Runs `eval_fn` over every batch and returns the token-weighted summary."""
  totals = {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}
  pending = []
  for batch in batches:
    pending.append(eval_fn(params, to_global(batch)))
  for m in jax.device_get(pending):
    for k in totals:
      totals[k] += float(m[k])
  return summarize(totals)


# ----------------------------------------------------------------------------- validation
def validate_config(config, num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the field for settings that cannot work (before compiling)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  m, d, t = config.model, config.data, config.train
  if m.num_heads <= 0 or m.qkv_dim % m.num_heads:
    raise ConfigError(f"config.model.num_heads={m.num_heads} must divide "
                      f"config.model.qkv_dim={m.qkv_dim}")
  if m.position == "rope" and (m.qkv_dim // m.num_heads) % 2:
    raise ConfigError(f"config.model.qkv_dim/num_heads={m.qkv_dim // m.num_heads} must be even "
                      "for rope positions")
  for field, allowed in (("position", transformer.POSITIONS), ("norm", transformer.NORMS),
                         ("mlp_activation", transformer.ACTIVATIONS)):
    if m[field] not in allowed:
      raise ConfigError(f"config.model.{field}={m[field]!r}; expected one of {allowed}")
  if m.get("attention_block", 0) < 0:
    raise ConfigError(f"config.model.attention_block={m.attention_block} must be >= 0 "
                      "(0 = dense attention)")
  for field in ("batch_size", "seq_len", "eval_batch_size"):
    if d[field] <= 0:
      raise ConfigError(f"config.data.{field}={d[field]} must be positive")
  if d.seq_len > m.max_len:
    raise ConfigError(f"config.data.seq_len={d.seq_len} is above config.model.max_len="
                      f"{m.max_len}, the longest position the model supports")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"config.model.dtype={m.dtype!r}; expected float32 | bfloat16 | float16")
  for field in ("emb_dim", "num_layers", "mlp_dim"):
    if m[field] <= 0:
      raise ConfigError(f"config.model.{field}={m[field]} must be positive")
  if not 0 <= m.dropout_rate < 1:
    raise ConfigError(f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1)")
  if t.num_steps <= 0 or t.learning_rate <= 0:
    raise ConfigError("config.train.num_steps and config.train.learning_rate must be positive")
  for field in ("log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if t[field] <= 0:
      raise ConfigError(f"config.train.{field}={t[field]} must be positive")
  if t.schedule not in ("cosine", "rsqrt", "constant"):
    raise ConfigError(f"config.train.schedule={t.schedule!r}; expected cosine | rsqrt | constant")
  dcn_total = int(np.prod([d for d in config.mesh.dcn_parallelism if d > 0]))
  # DCN groups are TPU slices where devices report one, else processes (as create_mesh does).
  granules = len({getattr(d, "slice_index", d.process_index) for d in jax.devices()}) \
      if (dcn_total > 1 or -1 in tuple(config.mesh.dcn_parallelism)) else 1
  try:
    ici, dcn = sharding.resolve_mesh_shape(tuple(config.mesh.ici_parallelism),
                                           tuple(config.mesh.dcn_parallelism), num_devices,
                                           num_granules=granules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shape = [i * d for i, d in zip(ici, dcn)]
  batch_shards = shape[0] * shape[1]
  if d.batch_size % batch_shards:
    raise ConfigError(f"config.data.batch_size={d.batch_size} must be divisible by the "
                      f"data x fsdp mesh size {batch_shards} (mesh {tuple(shape)})")
  if d.batch_size % jax.process_count():
    raise ConfigError(f"config.data.batch_size={d.batch_size} must be divisible by the "
                      f"process count {jax.process_count()}")
  if m.num_heads % shape[2] or m.mlp_dim % shape[2]:
    raise ConfigError(f"config.mesh tensor parallelism {shape[2]} must divide "
                      f"config.model.num_heads={m.num_heads} and mlp_dim={m.mlp_dim}")


# ----------------------------------------------------------------------------- run records
def _write_json(path, obj) -> None:
  path.write_text(json.dumps(obj, indent=1, default=str))


def run_info() -> dict:
  import importlib.metadata as md
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent, timeout=5).stdout.strip()
  except Exception:  # not a git checkout
    commit = ""
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
              "note-seq", "symusic", "numpy", "midijax"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return {"git_commit": commit, "versions": versions, "python": sys.version.split()[0],
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}


class MetricWriter:
  """metrics.jsonl and TensorBoard event files (the tensorboard package's writer, which needs
  no TensorFlow). Only process 0 writes."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._remote = "://" in str(workdir)
    self._path = workdir / "metrics.jsonl"
    self._rows: list = []
    if self.active:
      from midijax.evaluation import SummaryWriter  # tensorboard's protos, no TensorFlow
      if self._remote:
        # Object stores cannot append: metrics.jsonl is rewritten whole; TensorBoard events go
        # to a local folder (sync it to the bucket, or point TensorBoard at it).
        self._rows = self._path.read_text().splitlines(True) if self._path.exists() else []
        local_tb = pathlib.Path("/tmp/midijax_tensorboard") / workdir.name
        logging.info("TensorBoard events for %s are written to %s", workdir, local_tb)
        self._tb = SummaryWriter(local_tb)
      else:
        self._jsonl = open(self._path, "a")
        self._tb = SummaryWriter(workdir / "tensorboard")

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
    if self._remote:
      self._rows.append(line)
      self._path.write_text("".join(self._rows))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def plot_losses(workdir):
  """Writes loss.png (training and validation loss per step) from metrics.jsonl."""
  path = workdir / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return None
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  if not train and not evals:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train", lw=1)
  if evals:
    ax.plot(*zip(*evals), "o-", label="validation", lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("NLL per token (nats)")
  ax.set_title(workdir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out = workdir / "loss.png"
  with out.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return out


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


def build_model_and_state(config, vocab_size: int, mesh, rules):
  """Creates the sharded model params, optimizer and their shardings."""
  model_cfg = model_config_from(config, vocab_size)
  model_cfg = model_cfg.replace(attention_impl=transformer.resolve_attention_impl(
      model_cfg, mesh.devices.flat[0].platform, mesh.size, seq_len=config.data.seq_len,
      packing=config.data.get("packing", False)))
  model = sharding.create_sharded_model(
      lambda: transformer.Transformer(model_cfg, rngs=_init_rngs(config.seed)), mesh, rules)
  graphdef, params = nnx.split(model)
  tx = create_optimizer(config.train, params)
  param_shardings = sharding.state_shardings(params, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Everything is created by jitted functions so that every array is a global array on the
  # mesh (a plain jnp array would sit on one local device, which multi-host jit rejects).
  # The optimizer state takes its parameters' shardings by propagation; scalars replicate.
  opt_shardings = optimizer_state_shardings(tx, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)()
  state = TrainState(step=step, params=params, opt_state=opt_state)
  state_sh = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  return model_cfg, graphdef, tx, state, state_sh


def optimizer_state_shardings(tx, params, param_shardings, mesh):
  """Shardings of `tx`'s state: parameter-shaped leaves (Adam's moments) follow their
  parameter's sharding; everything else (step counts) is replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                               param_shardings, transform_non_params=lambda _: replicated)


def replicated_key(seed: int, mesh) -> jax.Array:
  """A PRNG key replicated over the mesh (a global array, usable on every host)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data=None) -> Dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final
  metrics. `data` (tests) may supply a `midijax.input_pipeline` data source."""
  sharding.maybe_initialize_distributed()
  workdir = ckpt_lib.workdir_path(workdir)  # a local folder or gs://bucket/path
  workdir.mkdir(parents=True, exist_ok=True)
  validate_config(config)
  if data is None:
    from midijax import input_pipeline
    data = input_pipeline.DataSource(config)
  vocab_size = config.model.vocab_size or data.vocab_size
  if vocab_size < data.vocab_size:
    raise ConfigError(f"config.model.vocab_size={vocab_size} is smaller than the dataset's "
                      f"vocabulary ({data.vocab_size})")

  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.get_logical_axis_rules(config.mesh) or sharding.DEFAULT_LOGICAL_AXIS_RULES
  is_chief = jax.process_index() == 0
  if is_chief:
    _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    _write_json(workdir / "run_info.json", run_info())
    data.save_vocab(workdir / "vocab.json")

  # Parameters are created outside `use_mesh`: their logical names resolve through the rules.
  model_cfg, graphdef, tx, state, state_sh = build_model_and_state(config, vocab_size, mesh, rules)
  logging.info("attention backend: %s", model_cfg.attention_impl)
  if is_chief:
    print(f"attention backend: {model_cfg.attention_impl} (config.model.attention_impl="
          f"{config.model.get('attention_impl', 'auto')})", flush=True)
    _write_json(workdir / "run_info.json", {**run_info(), "attention_impl": model_cfg.attention_impl})
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
        saved = ckpt_lib.read_meta(workdir, start_step).get("config", {}).get("model", {})
        scanned = bool(saved.get("scan_layers", False))
        hint = (f" It was saved with config.model.scan_layers={scanned}: resume with "
                f"--config.model.scan_layers={scanned} (midijax.models.stack_layers / "
                "unstack_layers convert parameters between the two)."
                if scanned != bool(config.model.get("scan_layers", False)) else "")
        raise ConfigError(
            f"{workdir}: the checkpoint at step {start_step} does not fit this config's model or "
            f"optimizer (changed since it was saved?); use a new --workdir.{hint} "
            f"({str(e)[:300]})") from None
      logging.info("Resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start_step)
      if is_chief:
        print(f"resuming from step {start_step}", flush=True)

    batch_sh = sharding.batch_sharding(mesh, rules)
    to_global = functools.partial(sharding.host_local_to_global, mesh=mesh, sharding=batch_sh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    use_dropout = config.model.dropout_rate > 0 or config.model.attention_dropout_rate > 0
    p_train = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          label_smoothing=config.train.label_smoothing, use_dropout=use_dropout),
        in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated),
        donate_argnums=(0,))
    p_eval = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                     in_shardings=(state_sh.params, batch_sh), out_shardings=replicated)

    seq_len = config.data.seq_len
    fpt = transformer.flops_per_token(model_cfg, seq_len)
    peak, peak_src = peak_flops_per_device(config)
    writer = MetricWriter(workdir)
    dropout_rng = replicated_key(config.seed + 1, mesh)
    train_iter = data.train_batches(start_step)
    meta = {"config": json.loads(config.to_json_best_effort()), "vocab_size": vocab_size}
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

    def log_train(step_done, m):
      """Fetches a step's metrics; a NaN/inf loss stops the run before anything is saved."""
      summary = summarize(jax.device_get(m))
      if config.train.stop_on_nan and not np.isfinite(summary["loss"]):
        raise TrainingDivergedError(
            f"loss became {summary['loss']} at step {step_done}; stopping. The last good "
            f"checkpoint is kept in {ckpt_lib.checkpoint_dir(workdir)} (lower "
            "config.train.learning_rate or raise warmup_steps)")
      return summary

    run_start = time.perf_counter()
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
        if step % config.train.log_every == 0:
          # Stop decisions are shared at log steps, so every host stops at the same step.
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
          eval_summary = evaluate(p_eval, state.params, data.eval_batches(), to_global)
          eval_loss = eval_summary["loss"]
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
    manager.close()
    writer.close()
    if progress is not None:
      progress.close()
    plot_losses(workdir)
  return {**last, **{f"eval_{k}": v for k, v in eval_summary.items()}, "step": step}


# ----------------------------------------------------------------------------- loading runs
def load_run(workdir, step: Optional[int] = None, best: bool = False, mesh=None, rules=None):
  """Loads a trained model for sampling/evaluation: (model, encoding, config, step).

  Raises CheckpointNotFoundError / ConfigError with the workdir named.
  """
  from midijax import encoding as enc_lib
  workdir = ckpt_lib.workdir_path(workdir)
  if not (workdir / "config.json").exists():
    raise ckpt_lib.CheckpointNotFoundError(f"{workdir}: not a midijax workdir (no config.json)")
  step = ckpt_lib.resolve_step(workdir, step, best)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  enc = enc_lib.load_vocab(workdir / "vocab.json")
  meta = ckpt_lib.read_meta(workdir, step)
  vocab_size = int(meta.get("vocab_size") or enc.vocab_size)
  mesh = mesh or sharding.create_mesh(ml_collections.ConfigDict(
      {"ici_parallelism": (-1, 1, 1), "dcn_parallelism": (1, 1, 1)}))
  rules = rules or sharding.get_logical_axis_rules(config.mesh) or sharding.DEFAULT_LOGICAL_AXIS_RULES
  model_cfg = model_config_from(config, vocab_size, deterministic=True)
  abstract_model = nnx.eval_shape(lambda: transformer.Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  param_sh = sharding.state_shardings(abstract_params, mesh, rules)
  manager = ckpt_lib.make_manager(workdir, async_save=False)
  # Restore only the parameters (the optimizer state is not needed to sample).
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_params, param_sh)
  import orbax.checkpoint as ocp
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": target}, partial_restore=True,
          restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)})))
  manager.close()
  model = nnx.merge(graphdef, restored.state["params"])
  return model, enc, config, step
