"""Fine-tuning: start a run from another run's parameters, train only some of them, export.

* `config.train.init_from` ("WORKDIR", "WORKDIR:best" or "WORKDIR:STEP"): the new run
  starts from that run's parameters (not its optimizer state; training starts at step
  0). `check_init_from` compares the two models before anything is loaded or compiled
  and names the config field that differs; `load_init_params` restores the source's
  parameters onto the new run's mesh and, when the vocabularies differ, copies the
  embedding and output rows of tokens with the same name (the rest keep their fresh
  initialisation).
* `config.train.trainable`: a regular expression over parameter paths
  (`param_paths`: "embedding", "blocks/0/attention/query", ...). `trainable_leaves`
  says which parameters it selects; training (`midijax.train.create_optimizer`) gives
  the others no update at all, so they stay bit-identical.
* LoRA (`config.model.lora_rank` > 0): adapter parameters ("..._lora_a", "..._lora_b",
  `transformer.is_lora_path`) may be absent from an init_from source; they keep their
  fresh initialisation (B = 0: the new model starts as the source). A source's own
  adapters are copied when this run's rank and alpha are the same, else merged into their
  kernels first, so the source's function is what the new run starts from.
* `export_run` (`midijax export`): a plain parameters-only checkpoint of a run, in a new
  workdir that `generate`, `continue` and `evaluate` load like any other. Every
  parameter transform an export applies goes through `EXPORT_TRANSFORMS`: LoRA adapters
  are merged into their kernels (`merge_lora_adapters`: W' = W + alpha / r A B, then
  config.model.lora_rank = 0).

Parameter paths are the model's attribute names joined by "/", list indices as numbers;
the logical axis "vocab" (the parameter's sharding annotation) marks the rows that
follow the vocabulary, so neither depends on the model's layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from midijax import checkpoint as ckpt_lib
from midijax import runs
from midijax.errors import ConfigError, MidijaxError
from midijax.models import transformer

# Model fields that must agree between an init_from run and the new run: they decide the
# parameters' shapes or what they mean (rope vs relative positions have the same shapes).
# Dropout, dtype, attention_block and max_len (except for relative positions, whose
# table it sizes; the shape check catches that) may change, and so may scan_layers (the
# source's layers are restacked) and lora_rank / lora_alpha (adapters are added, copied or
# merged: see `source_model_config`).
ARCHITECTURE_FIELDS = ("num_layers", "emb_dim", "qkv_dim", "num_heads", "mlp_dim", "position",
                       "norm", "mlp_activation", "tied_embeddings", "rope_max_wavelength",
                       "bar_positions", "time_rope_heads", "bar_echo", "bar_echo_bars")
# The logical axis of parameter dimensions indexed by token id (embedding rows, output
# columns).
VOCAB_AXIS = "vocab"


# ----------------------------------------------------------------------------- paths
def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _variables_with_paths(params) -> List[Tuple[str, Any]]:
  """[(path, leaf)] of a parameter tree in `jax.tree.leaves` order; a leaf is the
  nnx.Variable (its metadata names the logical axes) or the array itself."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]


def param_paths(params) -> List[str]:
  """Each parameter's path ("blocks/0/mlp/wi"), in `jax.tree.leaves(params)` order."""
  return [p for p, _ in _variables_with_paths(params)]


def _logical_axes(leaf) -> tuple:
  if isinstance(leaf, nnx.Variable):
    return tuple(leaf.get_metadata().get("out_sharding") or ())
  return ()


def _size(leaf) -> int:
  value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  return int(np.prod(value.shape))


# ----------------------------------------------------------------------------- trainable
def compile_pattern(pattern: str, field: str = "config.train.trainable") -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{field}={pattern!r} is not a regular expression ({e})") from None


def trainable_leaves(params, pattern: str) -> Optional[Tuple[bool, ...]]:
  """Which parameters `pattern` (config.train.trainable) selects.

  Args:
    params: the parameter tree (nnx.State, arrays or ShapeDtypeStructs).
    pattern: a regular expression matched against the whole of each parameter path
      (`re.fullmatch`); "" selects every parameter.

  Returns:
    None when every parameter is trainable, else a tuple of bools in
    `jax.tree.leaves(params)` order.

  Raises:
    ConfigError: the pattern is not a regular expression, or matches no parameter (the
      message lists some paths).
  """
  if not pattern:
    return None
  regex = compile_pattern(pattern)
  paths = param_paths(params)
  mask = tuple(bool(regex.fullmatch(p)) for p in paths)
  if not any(mask):
    shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
    raise ConfigError(f"config.train.trainable={pattern!r} matches no parameter (a regex "
                      f"matched against whole paths; the model has: {shown})")
  return None if all(mask) else mask


def count_params(params, mask: Optional[Sequence[bool]] = None) -> Tuple[int, int]:
  """(all parameter scalars, trainable ones) of a parameter tree and its trainable mask."""
  sizes = [_size(leaf) for _, leaf in _variables_with_paths(params)]
  total = int(sum(sizes))
  if mask is None:
    return total, total
  return total, int(sum(s for s, m in zip(sizes, mask) if m))


# Parameters whose matrices the per-token matmuls use (as `transformer.matmul_params`
# counts them): attention and MLP kernels, their LoRA adapters, the output projection.
_MATMUL_PARAM = re.compile(r"(^|/)(query|key|value|out|wi|wi_gate|wo)(_lora_[ab])?$")


def trainable_matmul_params(params, mask: Optional[Sequence[bool]], config) -> Optional[int]:
  """N_trainable of `transformer.flops_per_token`: the scalars of the trainable matmul
  weights (the output projection as D x the real vocabulary, tied or not); None when
  every parameter trains.

  Args:
    params: the parameter tree; mask: `trainable_leaves` of it; config: the model's
      TransformerConfig.
  """
  if mask is None:
    return None
  total = 0
  for (path, leaf), trains in zip(_variables_with_paths(params), mask):
    if not trains:
      continue
    if path == "output" or (path == "embedding" and config.tied_embeddings):
      total += config.emb_dim * config.vocab_size
    elif _MATMUL_PARAM.search(path):
      total += _size(leaf)
  return total


def keep_frozen(new_params, old_params, mask: Optional[Sequence[bool]]):
  """`new_params` with the leaves `mask` marks False taken from `old_params` unchanged
  (so frozen parameters stay bit-identical, whatever the optimizer adds)."""
  if mask is None:
    return new_params
  new, treedef = jax.tree.flatten(new_params)
  old = jax.tree.leaves(old_params)
  return jax.tree.unflatten(treedef, [n if m else o for n, o, m in zip(new, old, mask)])


# ----------------------------------------------------------------------------- init_from
@dataclasses.dataclass(frozen=True)
class InitSource:
  """A resolved config.train.init_from.

  Attributes:
    spec: the field's value as given.
    workdir: the source run folder.
    step: its checkpoint step to load.
    config: the source run's config (config.json).
    vocab_size: its model's vocabulary size (before padding).
  """
  spec: str
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  vocab_size: int


def parse_init_from(spec: str) -> Tuple[str, Optional[int], bool]:
  """"WORKDIR" | "WORKDIR:best" | "WORKDIR:STEP" -> (workdir, step or None, best)."""
  head, sep, tail = spec.rpartition(":")
  if sep and head and tail == "best":
    return head, None, True
  if sep and head and tail.isdigit():
    return head, int(tail), False
  return spec, None, False


def _field_error(spec: str, message: str) -> str:
  return f"config.train.init_from={spec!r}: {message}"


def resolve_init_from(spec: str) -> InitSource:
  """Finds the source run and its checkpoint step; reads its config.

  Raises:
    MidijaxError: one line naming config.train.init_from: no such run, no such
      checkpoint, or an unreadable config.json.
  """
  workdir, step, best = parse_init_from(spec)
  path = ckpt_lib.workdir_path(workdir)
  if not (path / "config.json").exists():
    raise MidijaxError(_field_error(spec, f"{path} is not a midijax run (no config.json); "
                                          "expected WORKDIR, WORKDIR:best or WORKDIR:STEP"))
  try:
    resolved = ckpt_lib.resolve_step(path, step, best)
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    meta = ckpt_lib.read_meta(path, resolved)
    vocab_size = int(meta.get("vocab_size") or 0)
    if vocab_size <= 0:
      raise ValueError(f"checkpoint {resolved} records no vocab_size")
  except MidijaxError as e:
    raise MidijaxError(_field_error(spec, str(e))) from None
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise MidijaxError(_field_error(spec, f"the run is damaged ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''})")
                       ) from None
  return InitSource(spec=spec, workdir=os.fspath(path), step=resolved, config=config,
                    vocab_size=vocab_size)


def source_model_config(old: transformer.TransformerConfig,
                        new: transformer.TransformerConfig) -> transformer.TransformerConfig:
  """The model whose parameters an init_from source gives this run: the source's, with
  its LoRA adapters merged into their kernels unless this run has adapters of the same
  rank and alpha (then they are copied), and its layers in this run's layout (scanned or
  not)."""
  if old.lora_rank and (old.lora_rank, old.lora_alpha) != (new.lora_rank, new.lora_alpha):
    old = old.replace(lora_rank=0)
  return old.replace(scan_layers=new.scan_layers)


def check_init_from(config, source: InitSource, vocab_size: int, source_vocab_size: int,
                    encoding=None) -> None:
  """Checks, before anything is loaded or compiled, that the source's parameters fit.

  Args:
    config: the new run's config; source: from `resolve_init_from`.
    vocab_size, source_vocab_size: the two models' vocabularies (they may differ).
    encoding: the new run's encoding (the bar clock of config.model.bar_positions; the
      parameters' shapes do not depend on it, so it serves both models).

  LoRA adapters of this run that the source lacks are not an architecture change: they
  keep their fresh initialisation.

  Raises:
    ConfigError: naming the config.model field(s) that differ, or the parameter whose
      shape differs when no listed field explains it.
  """
  new = runs.model_config_from(config, vocab_size, encoding=encoding)
  try:
    old = runs.model_config_from(source.config, source_vocab_size, encoding=encoding)
  except ConfigError as e:
    raise ConfigError(_field_error(source.spec, f"its config does not load: {e}")) from None
  differ = [f"config.model.{f}={getattr(new, f)!r} but {getattr(old, f)!r} there"
            for f in ARCHITECTURE_FIELDS if getattr(new, f) != getattr(old, f)]
  if differ:
    raise ConfigError(_field_error(source.spec, "another architecture: " + "; ".join(differ)))
  shapes = lambda cfg: _variables_with_paths(nnx.split(nnx.eval_shape(
      lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))))[1])
  new_leaves, old_leaves = shapes(new), shapes(source_model_config(old, new))
  old_by_path = {p: leaf for p, leaf in old_leaves}
  for path, leaf in new_leaves:
    if path not in old_by_path:
      if transformer.is_lora_path(path):
        continue  # a new adapter: fresh initialisation
      raise ConfigError(_field_error(source.spec, f"its model has no parameter {path}"))
    a, b = leaf.get_value(), old_by_path[path].get_value()
    axes = _logical_axes(leaf)
    same = [i for i, name in enumerate(axes or [None] * len(a.shape)) if name != VOCAB_AXIS]
    if len(a.shape) != len(b.shape) or any(a.shape[i] != b.shape[i] for i in same):
      fields = [f"config.model.{f.name}" for f in dataclasses.fields(new)
                if f.name not in ("vocab_size", "deterministic", "scan_layers", "lora_rank",
                                  "lora_alpha")
                and getattr(new, f.name) != getattr(old, f.name)]
      raise ConfigError(_field_error(
          source.spec, f"parameter {path} is {tuple(b.shape)} there but {tuple(a.shape)} "
                       f"here" + (f" (differing: {', '.join(fields)})" if fields else "")))


@dataclasses.dataclass(frozen=True)
class VocabularyMap:
  """Rows of the new vocabulary taken from the source's (tokens with the same name).

  Attributes:
    new_ids, source_ids: int32 arrays: new row new_ids[k] <- source row source_ids[k].
    initialised: names of the new vocabulary's tokens the source lacks.
  """
  new_ids: np.ndarray
  source_ids: np.ndarray
  initialised: Tuple[str, ...]


def map_vocabulary(new_names: Sequence[str], source_names: Sequence[str]) -> VocabularyMap:
  """Matches the two vocabularies by token name."""
  where = {name: i for i, name in enumerate(source_names)}
  pairs = [(i, where[n]) for i, n in enumerate(new_names) if n in where]
  new_ids = np.array([a for a, _ in pairs], np.int32)
  source_ids = np.array([b for _, b in pairs], np.int32)
  return VocabularyMap(new_ids, source_ids, tuple(n for n in new_names if n not in where))


def transfer_params(fresh, source, vocab: VocabularyMap, shardings):
  """The new run's parameters: `source`'s values, except along the "vocab" axis, where
  rows of tokens the source lacks (and padding rows) keep `fresh`'s initialisation, and
  for parameters the source does not have (new LoRA adapters), which keep theirs.

  Args:
    fresh: the new run's freshly initialised parameters (nnx.State of global arrays).
    source: the source run's parameters, matched by path (vocab dimensions may differ).
    vocab: `map_vocabulary(new names, source names)`.
    shardings: the new parameters' shardings (`TrainSetup.state_shardings.params`).

  Returns:
    Parameters like `fresh`, placed with `shardings` (one jitted gather/scatter, so no
    host holds the whole model).
  """
  fresh_vars = _variables_with_paths(fresh)
  vocab_dims = [(_logical_axes(v).index(VOCAB_AXIS) if VOCAB_AXIS in _logical_axes(v) else None)
                for _, v in fresh_vars]
  source_by_path = dict(_variables_with_paths(source))
  value = lambda leaf: leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  source_leaves = [value(source_by_path[p]) if p in source_by_path else None
                   for p, _ in fresh_vars]
  new_ids, source_ids = jnp.asarray(vocab.new_ids), jnp.asarray(vocab.source_ids)

  def combine(fresh_leaves, source_leaves):
    out = []
    for f, s, dim in zip(fresh_leaves, source_leaves, vocab_dims):
      if s is None:  # not in the source: the fresh initialisation
        out.append(f)
        continue
      s = s.astype(f.dtype)
      if dim is None:
        out.append(s)
      else:
        rows = jnp.take(s, source_ids, axis=dim)
        out.append(f.at[(slice(None),) * dim + (new_ids,)].set(rows))
    return out

  fresh_leaves, treedef = jax.tree.flatten(fresh)
  out_sh = jax.tree.leaves(shardings)
  combined = jax.jit(combine, out_shardings=out_sh)(fresh_leaves, source_leaves)
  return jax.tree.unflatten(treedef, combined)


def source_params_for(source_params, source_config: transformer.TransformerConfig,
                      new_config: transformer.TransformerConfig):
  """The source's parameters as `source_model_config` says this run takes them: adapters
  merged (unless copied), layers stacked or unstacked to this run's layout."""
  as_loaded = source_model_config(source_config, new_config)
  if source_config.lora_rank and not as_loaded.lora_rank:
    source_params, _ = transformer.merge_lora(source_params, source_config)
  if source_config.scan_layers != new_config.scan_layers:
    convert = transformer.stack_layers if new_config.scan_layers else transformer.unstack_layers
    source_params = convert(source_params)
  return source_params


def _adapter_record(fresh, source_params, source_config, new_config) -> Dict[str, Any]:
  """What became of the LoRA adapters (for run_info.json and the start-up line)."""
  source_paths = set(param_paths(source_params))
  adapters = [(p, _size(leaf)) for p, leaf in _variables_with_paths(fresh)
              if transformer.is_lora_path(p)]
  fresh_ones = [(p, n) for p, n in adapters if p not in source_paths]
  return {"lora_rank": new_config.lora_rank, "lora_alpha": new_config.lora_alpha,
          "initialised": len(fresh_ones), "initialised_params": sum(n for _, n in fresh_ones),
          "copied": len(adapters) - len(fresh_ones),
          "source_lora_rank": source_config.lora_rank,
          "source_adapters_merged": bool(source_config.lora_rank
                                         and not source_model_config(source_config,
                                                                     new_config).lora_rank)}


def describe_adapters(record: Dict[str, Any]) -> str:
  """One line about an init_from's LoRA adapters (`load_init_params`' record["lora"])."""
  parts = []
  if record["initialised"]:
    parts.append(f"{record['initialised']} adapter matrices ({record['initialised_params']:,} "
                 "parameters) freshly initialised (B = 0: the model starts as the source)")
  if record["copied"]:
    parts.append(f"{record['copied']} adapter matrices copied from the source")
  if record["source_adapters_merged"]:
    parts.append(f"the source's rank-{record['source_lora_rank']} adapters merged into its "
                 "kernels")
  return (f"LoRA adapters (config.model.lora_rank={record['lora_rank']}, lora_alpha="
          f"{record['lora_alpha']:g}): " + "; ".join(parts or ["none"]))


def _clock(enc) -> Optional[tuple]:
  """What an encoding's time-shift tokens mean: (unit, seconds a step at 120 qpm), or None
  for encodings without them."""
  if not hasattr(enc, "step_seconds"):
    return None
  return (getattr(enc, "time_unit", "seconds"), round(enc.step_seconds(120.0), 9))


def load_init_params(source: InitSource, fresh, shardings, new_vocab_names: Sequence[str],
                     mesh, rules, model_config: Optional[transformer.TransformerConfig] = None,
                     new_encoding=None) -> Tuple[Any, Dict[str, Any]]:
  """Restores the source run's parameters for the new run (see `transfer_params`).

  Args:
    source: from `resolve_init_from`; fresh: the new run's initialised parameters;
    shardings: theirs; new_vocab_names: the new run's vocabulary; mesh, rules: where the
    source is restored.
    model_config: the new run's TransformerConfig; None = the source's, with the
      scan_layers and lora_rank `fresh` has (lora_alpha then taken as the source's).
    new_encoding: the new run's encoding; when given, a source whose time-shift tokens
      count another unit (seconds vs beats, or another step) is refused: rows copied by
      token name would change meaning.

  Returns:
    (parameters, record): the record (for run_info.json) names the source, its step, and
    how many vocabulary rows were copied and initialised; with LoRA adapters on either
    side, record["lora"] says which were freshly initialised, copied or merged
    (`describe_adapters` prints it).

  Raises:
    MidijaxError: one line naming config.train.init_from when the run cannot be loaded.
  """
  try:
    model, enc, _, step = runs.load_run(source.workdir, step=source.step, mesh=mesh, rules=rules)
  except MidijaxError as e:
    message = str(e)
    if message.startswith(f"{source.workdir}: "):  # the field's value names it already
      message = message[len(source.workdir) + 2:]
    raise MidijaxError(_field_error(source.spec, message)) from None
  if new_encoding is not None and None not in (_clock(enc), _clock(new_encoding)) and (
      _clock(enc) != _clock(new_encoding)):
    (unit_a, step_a), (unit_b, step_b) = _clock(enc), _clock(new_encoding)
    raise MidijaxError(_field_error(
        source.spec, f"its {enc.name} time shifts count {unit_a} (a step is {step_a * 1e3:.4g} "
        f"ms at 120 qpm), the new data's count {unit_b} ({step_b * 1e3:.4g} ms); time-shift "
        "rows copied by name would change meaning. Pretrain on data of the same clock"))
  _, source_params = nnx.split(model)
  source_config = model.config
  if model_config is None:
    paths = param_paths(fresh)
    ranks = [leaf.shape[-1] for p, leaf in zip(paths, jax.tree.leaves(fresh))
             if p.endswith(transformer.LORA_A)]
    model_config = source_config.replace(
        scan_layers=bool(transformer.params_scanned(fresh)), lora_rank=ranks[0] if ranks else 0)
  source_params = source_params_for(source_params, source_config, model_config)
  vocab = map_vocabulary(new_vocab_names, enc.vocab.names)
  params = transfer_params(fresh, source_params, vocab, shardings)
  record = {"spec": source.spec, "workdir": source.workdir, "step": int(step),
            "vocabulary": {"copied": int(len(vocab.new_ids)),
                           "initialised": len(vocab.initialised),
                           "initialised_tokens": list(vocab.initialised[:50])}}
  if model_config.lora_rank or source_config.lora_rank:
    record["lora"] = _adapter_record(fresh, source_params, source_config, model_config)
  return params, record


# ----------------------------------------------------------------------------- export
def merge_lora_adapters(params, config: ml_collections.ConfigDict):
  """Export transform: LoRA adapters merged into their kernels (W' = W + alpha / r A B,
  `transformer.merge_lora`) and config.model.lora_rank = 0, so the exported run is a
  plain model computing the same function. Runs without adapters pass unchanged."""
  if not config.model.get("lora_rank", 0):
    return params, config
  # The vocabulary does not enter the merge.
  merged, _ = transformer.merge_lora(params, runs.model_config_from(config, 1))
  config.model.lora_rank = 0
  return merged, config


# Parameter transforms `export_run` applies in order: (params, config) -> (params,
# config), so that exported runs load as plain models.
EXPORT_TRANSFORMS: List[Callable[[Any, ml_collections.ConfigDict], Tuple[Any, Any]]] = [
    merge_lora_adapters]


def directory_bytes(path) -> int:
  """Bytes of the files under `path` (a local folder or gs://)."""
  path = ckpt_lib.workdir_path(path)
  if not path.exists():
    return 0
  total, stack = 0, [path]
  while stack:  # epath has no recursive glob on object stores
    for p in stack.pop().iterdir():
      if p.is_dir():
        stack.append(p)
      else:
        total += int(p.stat().length)
  return total


def export_run(workdir, out, *, step: Optional[int] = None, best: bool = False) -> Dict[str, Any]:
  """Writes a parameters-only copy of a run's checkpoint as a new run folder `out`.

  `out` gets config.json, vocab.json, run_info.json (naming the source) and
  checkpoints/<step>/ holding the parameters after `EXPORT_TRANSFORMS` (no optimizer
  state), plus best.json, so `midijax generate --workdir OUT [--best]` loads it.

  Returns:
    {"out", "step", "params", "bytes", "source_bytes"} (bytes of the checkpoint folders),
    and "lora_merged": {"rank", "alpha"} when LoRA adapters were merged (also recorded in
    run_info.json's "exported_from", with the source's folder, step and config).

  Raises:
    MidijaxError: the run cannot be loaded, or `out` already holds a run (nothing in it
      is overwritten).
  """
  out_path = ckpt_lib.workdir_path(out)
  if (out_path / "config.json").exists() or ckpt_lib.available_steps(out_path):
    raise MidijaxError(f"{out_path}: already holds a run; export to a new folder")
  model, enc, config, step = runs.load_run(workdir, step=step, best=best)
  _, params = nnx.split(model)
  source_config = config
  config = ml_collections.ConfigDict(config.to_dict())
  lora = (int(config.model.get("lora_rank", 0) or 0),
          float(config.model.get("lora_alpha", model.config.lora_alpha)))
  for transform in EXPORT_TRANSFORMS:
    params, config = transform(params, config)
  # The source's config as it trained (this folder's config.json is the exported model's):
  # `midijax reproduce` of an export trains it again.
  exported_from = {"workdir": os.fspath(ckpt_lib.workdir_path(workdir)), "step": int(step),
                   "config": json.loads(source_config.to_json_best_effort())}
  if lora[0] and not config.model.get("lora_rank", 0):
    exported_from["lora_merged"] = {"rank": lora[0], "alpha": lora[1]}
  src = ckpt_lib.workdir_path(workdir)
  info = {}
  if (src / "run_info.json").exists():
    info = json.loads((src / "run_info.json").read_text())
  earlier = info.get("exported_from") or {}
  if isinstance(earlier.get("config"), dict):
    # An export of an export: the run that trained is the first source.
    exported_from.update({k: earlier[k] for k in ("workdir", "step", "config", "lora_merged")
                          if k in earlier})
  meta = ckpt_lib.read_meta(src, step)
  out_path.mkdir(parents=True, exist_ok=True)
  manager = ckpt_lib.make_manager(out_path, keep_latest=1, keep_best=1, async_save=False)
  eval_loss = (meta.get("eval") or {}).get("loss")
  ckpt_lib.save(manager, step, {"params": params},
                {**meta, "exported_from": exported_from, "inference_params": "params"},
                eval_loss)
  manager.wait_until_finished()
  manager.close()
  if eval_loss is not None:
    ckpt_lib.write_best(out_path, step, eval_loss)
  enc.save_vocab(out_path / "vocab.json")
  info["exported_from"] = exported_from
  (out_path / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
  (out_path / "config.json").write_text(json.dumps(json.loads(config.to_json_best_effort()),
                                                   indent=1, default=str))
  result = {"out": os.fspath(out_path), "step": int(step), "params": count_params(params)[0],
            "bytes": directory_bytes(ckpt_lib.checkpoint_dir(out_path) / str(step)),
            "source_bytes": directory_bytes(ckpt_lib.checkpoint_dir(src) / str(step))}
  if "lora_merged" in exported_from:
    result["lora_merged"] = exported_from["lora_merged"]
  return result
