"""Trained runs for inference: the model config of a run config, and `load_run`.

A run folder (workdir) holds config.json, vocab.json and checkpoints/ (see
`midijax.checkpoint`). Sampling, evaluation, export and the CLI load runs through here,
never through training.
"""
from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

from flax import nnx
import jax
import ml_collections

from midijax import checkpoint as ckpt_lib
from midijax import sharding
from midijax.errors import MidijaxError
from midijax.models import transformer

# TransformerConfig fields that do not come from config.model.
_DERIVED_FIELDS = ("vocab_size", "deterministic", "bar_clock", "echo_classes",
                   "echo_velocities", "echo_cell")


def model_config_from(config, vocab_size: int, deterministic: bool = False, encoding=None
                      ) -> transformer.TransformerConfig:
  """The `TransformerConfig` of a run config.

  Every TransformerConfig field present in `config.model` is taken from it; fields it lacks
  (configs saved before the field existed) keep the dataclass default. `vocab_size` and
  `deterministic` are the arguments; `bar_clock` comes from `encoding` (the run's) when
  config.model.bar_positions, time_rope_heads or bar_echo is set, and the echo tables
  (`Encoding.echo_tables`) when bar_echo is (without them the model refuses to build).

  Raises:
    ConfigError: naming the config.model field that cannot work.
  """
  model = config.model
  fields = {f.name: model[f.name] for f in dataclasses.fields(transformer.TransformerConfig)
            if f.name not in _DERIVED_FIELDS and f.name in model}
  uses_clock = (fields.get("bar_positions") or fields.get("time_rope_heads")
                or fields.get("bar_echo"))
  clock = encoding.bar_clock() if encoding is not None and uses_clock else None
  echo = (encoding.echo_tables() if encoding is not None and fields.get("bar_echo")
          else None) or {"classes": (), "velocities": (), "cell": 0}
  return transformer.TransformerConfig(vocab_size=int(vocab_size), deterministic=deterministic,
                                       bar_clock=() if clock is None else tuple(clock),
                                       echo_classes=tuple(echo["classes"]),
                                       echo_velocities=tuple(echo["velocities"]),
                                       echo_cell=int(echo["cell"]), **fields)


def inference_mesh() -> jax.sharding.Mesh:
  """A mesh over this process's devices for sampling: data parallel over all of them."""
  return sharding.create_mesh(ml_collections.ConfigDict(
      {"ici_parallelism": (-1, 1, 1), "dcn_parallelism": (1, 1, 1)}))


def load_run(workdir, step: Optional[int] = None, best: bool = False, mesh=None, rules=None,
             params_tree: Optional[str] = None):
  """Loads a trained model for sampling or evaluation.

  Args:
    workdir: the run folder (local path or gs://).
    step: checkpoint step (default: the latest); `best`: the best by validation loss.
    mesh: where the parameters go (default `inference_mesh()`).
    rules: logical axis rules (default the run's config.mesh rules).
    params_tree: "params" (the raw parameters) or "ema_params" (their moving average, for
      runs with config.train.ema_decay); default what the run is used with (the average
      when kept).

  Returns:
    (model with deterministic=True, encoding, config as saved, checkpoint step).

  Raises:
    CheckpointNotFoundError / ConfigError / MidijaxError: one line naming the workdir (a
    missing, incompatible or damaged run).
  """
  from midijax import encoding as enc_lib  # pylint: disable=g-import-not-at-top
  workdir = ckpt_lib.workdir_path(workdir)
  if not (workdir / "config.json").exists():
    raise ckpt_lib.CheckpointNotFoundError(f"{workdir}: not a midijax workdir (no config.json)")
  step = ckpt_lib.resolve_step(workdir, step, best)
  try:
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    enc = enc_lib.load_vocab(workdir / "vocab.json")
    meta = ckpt_lib.read_meta(workdir, step)
    vocab_size = int(meta.get("vocab_size") or enc.vocab_size)
    mesh = mesh or inference_mesh()
    rules = rules or sharding.get_logical_axis_rules(config.get("mesh"))
    model_cfg = model_config_from(config, vocab_size, deterministic=True, encoding=enc)
    abstract_model = nnx.eval_shape(lambda: transformer.Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_sh = sharding.state_shardings(abstract_params, mesh, rules)
    # Restore only the parameters (the optimizer state is not needed to sample).
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params, param_sh)
    params = ckpt_lib.restore_params(workdir, step, target, params_tree)
  except MidijaxError:
    raise
  except Exception as e:  # Orbax / JSON errors of a damaged workdir: one line, no traceback.
    first = str(e).splitlines()[0] if str(e) else ""
    raise MidijaxError(f"{workdir}: cannot load the run ({type(e).__name__}: {first})") from None
  return nnx.merge(graphdef, params), enc, config, step


def conditioning_kinds(workdir, config=None) -> Optional[List[str]]:
  """The conditioning kinds in the prefixes of the run's training data (e.g. style, tempo,
  type, meter), which `continue` gives a MIDI prompt.

  From run_info.json (training records them; exports keep the record), else from the
  metadata of the dataset the run's `config` names when it is built on this machine;
  None when neither says.
  """
  workdir = ckpt_lib.workdir_path(workdir)
  try:
    kinds = json.loads((workdir / "run_info.json").read_text()).get("conditioning")
  except (OSError, ValueError, AttributeError):
    kinds = None
  if isinstance(kinds, list):
    return [str(k) for k in kinds]
  if config is None:
    return None
  from midijax import input_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow
  try:
    return input_pipeline.conditioning_kinds(config)
  except MidijaxError:  # the dataset is not built here
    return None
