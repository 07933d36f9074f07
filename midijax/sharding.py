"""Device meshes and logical-axis sharding for midijax (MaxText / Flax lm1b style).

Sharding is declared, not hand-placed:

* Every model parameter carries logical axis names (e.g. ``("embed", "mlp")``) in its
  NNX ``out_sharding`` metadata, and the model marks its main activations with
  `with_logical_constraint` (e.g. ``("batch", "length", "embed")``).
* Logical axis rules map those names onto the axes of a device mesh
  (``data``, ``fsdp``, ``tensor``); the defaults are `DEFAULT_LOGICAL_AXIS_RULES`
  and a config may override them with ``config.logical_axis_rules``.
* The mesh shape comes from ``config.ici_parallelism`` (devices inside a slice /
  host, fast interconnect) and ``config.dcn_parallelism`` (slices or hosts, slow
  data-centre network), one entry per mesh axis, where -1 means "the rest".

Typical use::

  maybe_initialize_distributed()
  mesh = create_mesh(config)
  rules = get_logical_axis_rules(config)
  with use_mesh(mesh, rules):
    model = create_sharded_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    batch = host_local_to_global(local_batch_np, mesh)
    ...  # jit the train step while the context is active
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from flax import nnx
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

# Mesh axes, ordered from least to most communication-hungry (the order
# `mesh_utils.create_device_mesh` expects): data parallel, fully-sharded data
# parallel (parameters split over the axis, gathered per layer), tensor parallel.
MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, tuple[str, ...]]
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Logical axis name -> mesh axes. A name may appear more than once: the first rule
# whose mesh axes are still free in the array's spec wins (so "embed" is split over
# "fsdp" in weights, but stays whole in activations whose "batch" already took
# "fsdp"). Every logical name the model uses must appear here.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("relpos", None),
)

_ENV_COORDINATOR = "MIDIJAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "MIDIJAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "MIDIJAX_PROCESS_ID"


# ----------------------------------------------------------------------------- multi-host


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
  """Starts JAX's multi-process runtime when arguments or environment ask for it.

  Must run before any other JAX call touches the devices. Arguments left as None
  are read from MIDIJAX_COORDINATOR_ADDRESS ("host:port"), MIDIJAX_NUM_PROCESSES
  and MIDIJAX_PROCESS_ID. If none of the three is set anywhere, or the runtime is
  already initialized, nothing happens (single-host runs need no set-up).

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: total number of processes (hosts) in the job.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if this call initialized the distributed runtime, else False.
  """
  if coordinator_address is None:
    coordinator_address = os.environ.get(_ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(_ENV_NUM_PROCESSES):
    num_processes = int(os.environ[_ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(_ENV_PROCESS_ID):
    process_id = int(os.environ[_ENV_PROCESS_ID])
  if coordinator_address is None and num_processes is None and process_id is None:
    return False
  if jax.distributed.is_initialized():
    return False
  # Missing values are auto-detected by JAX on clusters it knows (SLURM, TPU pods).
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
  )
  return True


# ----------------------------------------------------------------------------- mesh


def _config_get(config: Any, name: str, default: Any) -> Any:
  """Reads `name` from a ConfigDict, dict or plain object.

  Returns `default` when the field is absent, None or an empty sequence: configs write
  `()` for "the default" (e.g. `mesh.logical_axis_rules = ()`).
  """
  if config is None:
    return default
  if isinstance(config, dict) or hasattr(config, "get"):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  if value is None or (isinstance(value, (tuple, list)) and not value):
    return default
  return value


def _resolve_parallelism(values: Sequence[int], total: int, field: str) -> tuple[int, ...]:
  """Replaces a single -1 in `values` so that their product equals `total`.

  Raises:
    ValueError: naming `field` if an entry is invalid, there is more than one -1,
      or the product cannot equal `total`.
  """
  values = [int(v) for v in values]
  if any(v == 0 or v < -1 for v in values):
    raise ValueError(f"{field}={values}: entries must be positive or -1 (the rest).")
  if values.count(-1) > 1:
    raise ValueError(f"{field}={values}: at most one entry may be -1.")
  known = math.prod(v for v in values if v != -1)
  if -1 in values:
    if total % known:
      raise ValueError(
          f"{field}={values}: cannot fill the -1, {total} is not divisible by {known}.")
    values[values.index(-1)] = total // known
  elif known != total:
    raise ValueError(f"{field}={values}: product is {known}, but it must be {total}.")
  return tuple(values)


def resolve_mesh_shape(
    ici_parallelism: Sequence[int],
    dcn_parallelism: Sequence[int],
    num_devices: int,
    num_granules: int = 1,
    num_axes: int = len(MESH_AXES),
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves -1 entries of the ICI and DCN parallelism lists.

  Args:
    ici_parallelism: devices per mesh axis inside one granule (slice or host).
    dcn_parallelism: granules per mesh axis. All ones means one granule spanning
      every device (then `ici_parallelism` covers all `num_devices`).
    num_devices: total number of devices in the mesh.
    num_granules: number of slices (TPU multi-slice) or else processes.
    num_axes: number of mesh axes (length both lists must have).

  Returns:
    (ici, dcn) tuples of positive ints; the mesh shape is their elementwise product.

  Raises:
    ValueError: naming `ici_parallelism` or `dcn_parallelism` when invalid.
  """
  for field, values in (("ici_parallelism", ici_parallelism),
                        ("dcn_parallelism", dcn_parallelism)):
    if len(values) != num_axes:
      raise ValueError(
          f"{field}={list(values)} has {len(values)} entries, but the mesh has "
          f"{num_axes} axes {MESH_AXES[:num_axes] if num_axes <= 3 else ''}.")
  if -1 in list(dcn_parallelism) or math.prod(dcn_parallelism) != 1:
    dcn = _resolve_parallelism(dcn_parallelism, num_granules, "dcn_parallelism")
  else:
    dcn = tuple(int(v) for v in dcn_parallelism)
  num_dcn = math.prod(dcn)
  if num_devices % num_dcn:
    raise ValueError(
        f"dcn_parallelism={list(dcn)}: {num_devices} devices do not split into "
        f"{num_dcn} equal granules.")
  ici = _resolve_parallelism(ici_parallelism, num_devices // num_dcn, "ici_parallelism")
  return ici, dcn


def num_granules(devices: Sequence[Any]) -> int:
  """DCN granules of `devices`: TPU slices where devices report several, else processes."""
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  return num_slices if num_slices > 1 else len({d.process_index for d in devices})


def create_mesh(mesh_config: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds the device mesh described by a config.

  Args:
    mesh_config: ConfigDict (or dict / object) with `ici_parallelism` and
      optionally `dcn_parallelism` (default all ones) and `mesh_axes` (default
      `MESH_AXES`).
    devices: devices to use; defaults to all of `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh` with Auto axis types (so logical-rule sharding and
    `with_sharding_constraint` apply), of shape ici * dcn per axis.

  Raises:
    ValueError: naming the config field that is inconsistent with the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(_config_get(mesh_config, "mesh_axes", MESH_AXES))
  ici_config = _config_get(mesh_config, "ici_parallelism", None)
  if ici_config is None:
    raise ValueError("ici_parallelism is missing from the mesh config.")
  dcn_config = _config_get(mesh_config, "dcn_parallelism", [1] * len(axes))
  ici, dcn = resolve_mesh_shape(
      ici_config, dcn_config, len(devices), num_granules(devices), num_axes=len(axes))
  return Mesh(device_array(ici, dcn, devices), axes,
              axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def device_array(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Arranges `devices` into an array of shape ici * dcn (elementwise).

  With one granule this is `mesh_utils.create_device_mesh(ici)`, which follows the
  physical topology on TPU. With several, `create_hybrid_device_mesh` puts each
  slice (or, where devices have no slice index, each process) in one block so
  only the axes with dcn > 1 cross the slow network.
  """
  if math.prod(dcn) == 1:
    return mesh_utils.create_device_mesh(tuple(ici), devices)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  return mesh_utils.create_hybrid_device_mesh(
      tuple(ici), tuple(dcn), devices, process_is_granule=num_slices <= 1)


# ----------------------------------------------------------------------------- logical axes


def get_logical_axis_rules(config: Any = None) -> tuple[tuple[str, MeshAxes], ...]:
  """Returns `config.logical_axis_rules` if set, else `DEFAULT_LOGICAL_AXIS_RULES`.

  Rules are (logical name, mesh axes) pairs; mesh axes is None, a mesh axis name,
  or a tuple of names. Lists from a config are turned into tuples.
  """
  rules = _config_get(config, "logical_axis_rules", DEFAULT_LOGICAL_AXIS_RULES)
  return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in rules)


def logical_to_mesh_axes(
    logical_axes: Sequence[Optional[str]],
    rules: Optional[LogicalRules] = None,
    mesh_axis_names: Optional[Sequence[str]] = None,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec over mesh axes.

  Each logical name takes the first rule for it whose mesh axes are not already
  used by an earlier dimension of the same array; if every rule's axes are taken,
  the dimension is replicated. Mesh axes missing from `mesh_axis_names` are
  dropped, so the same rules serve meshes without e.g. a "tensor" axis.

  Args:
    logical_axes: one logical name (or None: replicated) per array dimension.
    rules: (logical name, mesh axes) pairs; defaults to DEFAULT_LOGICAL_AXIS_RULES.
    mesh_axis_names: axes of the target mesh; None keeps every mesh axis named.

  Returns:
    PartitionSpec with one entry (None, axis name or tuple of names) per dimension.

  Raises:
    ValueError: if a logical name has no rule.
  """
  rules = DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    candidates = [axes for rule_name, axes in rules if rule_name == name]
    if not candidates:
      raise ValueError(
          f"Logical axis {name!r} has no rule; known: {sorted({n for n, _ in rules})}.")
    chosen = None
    for axes in candidates:
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      if mesh_axis_names is not None:
        axes = tuple(a for a in axes if a in mesh_axis_names)
      if not used.intersection(axes):
        chosen = axes
        break
    chosen = chosen or ()
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*spec)


def _is_logical_spec(x: Any) -> bool:
  """True for a non-empty plain tuple of logical names, e.g. ("embed", None).

  Named tuples (optax states) and empty tuples are containers, not specs; give a
  scalar's spec as PartitionSpec().
  """
  return type(x) is tuple and len(x) > 0 and all(
      a is None or isinstance(a, str) or
      (type(a) is tuple and all(isinstance(b, str) for b in a)) for a in x)


def _is_spec_leaf(x: Any) -> bool:
  return isinstance(x, (nnx.Variable, PartitionSpec)) or _is_logical_spec(x)


def _logical_axes_of(leaf: Any) -> tuple:
  """Logical names of a leaf: a Variable's `out_sharding`, a spec, or () (replicated)."""
  if isinstance(leaf, nnx.Variable):
    return tuple(leaf.get_metadata().get("out_sharding") or ())
  if isinstance(leaf, PartitionSpec) or _is_logical_spec(leaf):
    return tuple(leaf)
  return ()


def logical_to_mesh_sharding(tree: Any, mesh: Mesh, rules: Optional[LogicalRules] = None) -> Any:
  """Turns a tree of logical specs (or an NNX state) into NamedShardings.

  Args:
    tree: pytree whose leaves are tuples / PartitionSpecs of logical names, or an
      `nnx.State` / module state whose Variables carry `out_sharding` metadata.
      Arrays without metadata become replicated.
    mesh: target mesh.
    rules: logical axis rules; defaults to DEFAULT_LOGICAL_AXIS_RULES.

  Returns:
    A tree of the same structure; Variables keep their type (their value becomes
    the NamedSharding) so the result can be given to `jax.jit` as in/out shardings
    of the matching state.
  """
  def to_sharding(leaf):
    spec = logical_to_mesh_axes(_logical_axes_of(leaf), rules, mesh.axis_names)
    sharding = NamedSharding(mesh, spec)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  return jax.tree.map(to_sharding, tree, is_leaf=_is_spec_leaf)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Optional[LogicalRules] = None) -> Any:
  """NamedSharding for every leaf of an (abstract) NNX state, checked against shapes.

  Args:
    abstract_state: `nnx.State` (e.g. from `nnx.split(nnx.eval_shape(model_fn))`)
      with array or ShapeDtypeStruct values.
    mesh: target mesh.
    rules: logical axis rules; defaults to DEFAULT_LOGICAL_AXIS_RULES.

  Returns:
    Same structure as `abstract_state`, Variables holding NamedShardings.

  Raises:
    ValueError: naming the parameter if a dimension is not divisible by the
      product of the mesh axes it is split over.
  """
  shardings = logical_to_mesh_sharding(abstract_state, mesh, rules)
  values = jax.tree.leaves_with_path(abstract_state)
  for (path, value), sharding in zip(values, jax.tree.leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(value.shape, sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ValueError(
            f"Parameter {jax.tree_util.keystr(path)} of shape {value.shape}: dim {dim} "
            f"(size {size}) is split over mesh axes {axes} ({ways} ways) and is not "
            f"divisible; change the model size or the logical_axis_rules.")
  return shardings


def batch_sharding(mesh: Mesh, rules: Optional[LogicalRules] = None) -> NamedSharding:
  """Sharding for input batches: dim 0 ("batch") split over data and fsdp, rest whole."""
  return NamedSharding(mesh, logical_to_mesh_axes(("batch",), rules, mesh.axis_names))


def shard_model(model_or_state: Any, mesh: Mesh, rules: Optional[LogicalRules] = None) -> Any:
  """Places an initialized model's (or state's) arrays on `mesh` per the rules.

  Args:
    model_or_state: an `nnx.Module` (updated in place and returned) or an
      `nnx.State` / pytree of Variables (a placed copy is returned).
    mesh: target mesh.
    rules: logical axis rules; defaults to DEFAULT_LOGICAL_AXIS_RULES.

  Returns:
    The placed module or state.
  """
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state)
    nnx.update(model_or_state, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model_or_state
  return jax.device_put(model_or_state, state_shardings(model_or_state, mesh, rules))


def create_sharded_model(
    model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Optional[LogicalRules] = None
) -> nnx.Module:
  """Initializes a model directly into its sharded layout.

  The initializer runs under `jax.jit` with the parameter shardings as
  out_shardings, so no device (or host) ever holds the whole unsharded model.

  Args:
    model_fn: builds the model, e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))`.
    mesh: target mesh.
    rules: logical axis rules; defaults to DEFAULT_LOGICAL_AXIS_RULES.

  Returns:
    The model with every parameter a sharded global jax.Array.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(model_fn))
  shardings = state_shardings(abstract_state, mesh, rules)
  init = jax.jit(lambda: nnx.split(model_fn())[1], out_shardings=shardings)
  return nnx.merge(graphdef, init())


# ----------------------------------------------------------------------------- activations


@dataclasses.dataclass
class _ActivationContext(threading.local):
  mesh: Optional[Mesh] = None
  rules: Optional[LogicalRules] = None


_ACTIVATIONS = _ActivationContext()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Optional[LogicalRules] = None) -> Iterator[Mesh]:
  """Makes `with_logical_constraint` resolve against `mesh` and `rules`.

  Functions must be traced (first jitted call) inside the context for their
  activation constraints to take effect. The context also enters
  `jax.set_mesh(mesh)`, which keys jit's cache on the mesh so a function traced
  outside the context is re-traced inside it.

  Yields:
    The mesh.
  """
  previous = (_ACTIVATIONS.mesh, _ACTIVATIONS.rules)
  _ACTIVATIONS.mesh = mesh
  _ACTIVATIONS.rules = DEFAULT_LOGICAL_AXIS_RULES if rules is None else tuple(rules)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVATIONS.mesh, _ACTIVATIONS.rules = previous


def on_single_cpu_device(mesh: Optional[Mesh] = None) -> bool:
  """True if computations run on one CPU device: `mesh`'s, the active mesh's, or JAX's."""
  mesh = mesh if mesh is not None else _ACTIVATIONS.mesh
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
  return len(devices) == 1 and devices[0].platform == "cpu"


def active_mesh() -> Optional[Mesh]:
  """The mesh of the innermost `use_mesh` context, or None outside one."""
  return _ACTIVATIONS.mesh


def activation_spec(logical_axes: Sequence[Optional[str]]) -> Optional[PartitionSpec]:
  """The PartitionSpec `with_logical_constraint` gives these logical axes under the active
  mesh and rules (e.g. for a `jax.shard_map` around a kernel); None outside `use_mesh`."""
  mesh = _ACTIVATIONS.mesh
  if mesh is None:
    return None
  return logical_to_mesh_axes(logical_axes, _ACTIVATIONS.rules, mesh.axis_names)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`.

  Args:
    x: array with one dimension per entry of `logical_axes`.
    logical_axes: e.g. ("batch", "length", "embed").

  Returns:
    `x`, with a sharding constraint when a mesh and rules are active.
  """
  mesh = _ACTIVATIONS.mesh
  if mesh is None:
    return x
  spec = logical_to_mesh_axes(logical_axes, _ACTIVATIONS.rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- input batches


def host_local_to_global(batch: Any, mesh: Mesh, sharding: Optional[NamedSharding] = None) -> Any:
  """Assembles per-host numpy batches into global, sharded jax.Arrays.

  Each process passes the rows it loaded; the global batch is their
  concatenation along dim 0 (in process order), split per `sharding`.
  On one host this is a `device_put`.

  Args:
    batch: pytree of numpy arrays, leading dim = this host's batch rows.
    mesh: the mesh (used for the default sharding).
    sharding: defaults to `batch_sharding(mesh)`.

  Returns:
    Pytree of global jax.Arrays with leading dim = global batch size.
  """
  sharding = batch_sharding(mesh) if sharding is None else sharding
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
