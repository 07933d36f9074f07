"""Orbax checkpoints of a run: the latest K steps plus the best by validation loss.

Layout of a workdir::

    WORKDIR/checkpoints/<step>/state     params + optimizer state (+ ema_params: their
                                         moving average) (Orbax, sharded arrays)
    WORKDIR/checkpoints/<step>/meta      JSON: step, config, data position, eval metrics
    WORKDIR/best.json                    {"step": s, "eval_loss": x} of the best checkpoint

Restores place every array with the sharding the caller asks for, so a checkpoint written by
a 2-process run restores on one process, on a different mesh, or on CPU.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp

from midijax.errors import MidijaxError


class CheckpointNotFoundError(MidijaxError):
  pass


def workdir_path(workdir) -> epath.Path:
  """The run folder as an epath (local paths made absolute; gs:// kept as it is)."""
  p = epath.Path(workdir)
  return p if "://" in str(workdir) else epath.Path(os.path.abspath(workdir))


def checkpoint_dir(workdir) -> epath.Path:
  return workdir_path(workdir) / "checkpoints"


def make_manager(workdir, keep_latest: int = 3, keep_best: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the `keep_latest` newest steps and the `keep_best` lowest
  `eval_loss` (orbax 0.12: `max_to_keep` with `best_fn` would keep only the best)."""
  policies = ocp.checkpoint_managers
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep_latest),
      policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         eval_loss: Optional[float] = None) -> None:
  metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)),
               metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) at `step`; `abstract_state` leaves are ShapeDtypeStructs with the
  target shardings."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out.state, out.meta


PARAM_TREES = ("params", "ema_params")


def restore_params(workdir, step: int, target: Any, tree: Optional[str] = None) -> Any:
  """Restores only the parameters of the checkpoint at `step` (not the optimizer state):
  the moving average (`ema_params`) when the run kept one, as its meta records.

  `target`: the parameter tree as ShapeDtypeStructs with the shardings to restore into.
  `tree`: "params" or "ema_params" to choose (e.g. to compare the two); default the meta's.
  """
  key = tree or read_meta(workdir, step).get("inference_params", "params")
  if key not in PARAM_TREES:
    raise ValueError(f"parameter tree {key!r}; expected one of {PARAM_TREES}")
  manager = make_manager(workdir, async_save=False)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={key: target}, partial_restore=True,
            restore_args={key: ocp.checkpoint_utils.construct_restore_args(target)})))
  finally:
    manager.close()
  return restored.state[key]


def read_meta(workdir, step: int) -> dict:
  path = checkpoint_dir(workdir) / str(step) / "meta" / "metadata"
  if not path.exists():
    raise CheckpointNotFoundError(f"{path.parent}: checkpoint metadata not found")
  return json.loads(path.read_text())


def available_steps(workdir) -> list:
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def best_step(workdir) -> Optional[int]:
  p = workdir_path(workdir) / "best.json"
  if not p.exists():
    return None
  return int(json.loads(p.read_text())["step"])


def write_best(workdir, step: int, eval_loss: float) -> None:
  if jax.process_index() != 0:
    return
  p = workdir_path(workdir) / "best.json"
  p.write_text(json.dumps({"step": int(step), "eval_loss": float(eval_loss)}))


def resolve_step(workdir, step: Optional[int] = None, best: bool = False) -> int:
  """The checkpoint step to load: `step`, the best one, or the latest; clear errors if absent."""
  steps = available_steps(workdir)
  if not steps:
    raise CheckpointNotFoundError(
        f"{workdir}: no checkpoint found (expected {checkpoint_dir(workdir)}/<step>/); "
        "train first with `midijax train --config=... --workdir=...`")
  if best:
    b = best_step(workdir)
    if b is None or b not in steps:
      raise CheckpointNotFoundError(f"{workdir}: no best checkpoint recorded (best.json); "
                                    f"available steps: {steps}")
    return b
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointNotFoundError(f"{workdir}: no checkpoint at step {step}; available: {steps}")
  return step
