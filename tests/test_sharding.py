"""Tests for midijax.sharding.

Multi-device checks run in one subprocess that sees 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts,
so it cannot share this process); it prints a JSON report that the tests below
read. Run this file directly (`python tests/test_sharding.py`) to get the report.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from midijax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
# Loss of the same model, batch and 3 Adam steps on different meshes: float32
# sums reduced in a different order; observed relative differences are ~1e-7.
LOSS_RTOL = 1e-5
MESHES = {"8x1x1": [8, 1, 1], "2x4x1": [2, 4, 1], "2x2x2": [2, 2, 2], "1x1x1": [1, 1, 1]}
RESULT_MARKER = "SHARDING_REPORT_JSON="


# ----------------------------------------------------------------------------- in-process


def test_resolve_mesh_shape_fills_the_rest():
  assert sharding.resolve_mesh_shape([-1, 1, 1], [1, 1, 1], 8) == ((8, 1, 1), (1, 1, 1))
  assert sharding.resolve_mesh_shape([2, -1, 1], [1, 1, 1], 8) == ((2, 4, 1), (1, 1, 1))
  assert sharding.resolve_mesh_shape([1, 1, -1], [1, 1, 1], 1) == ((1, 1, 1), (1, 1, 1))
  # 2 slices of 4 devices: dcn fills the slices, ici the devices inside one.
  assert sharding.resolve_mesh_shape([1, -1, 2], [-1, 1, 1], 8, num_granules=2) == (
      (1, 2, 2), (2, 1, 1))


@pytest.mark.parametrize("ici, dcn, granules, field", [
    ([3, 1, 1], [1, 1, 1], 1, "ici_parallelism"),       # product != devices
    ([-1, -1, 1], [1, 1, 1], 1, "ici_parallelism"),     # two -1
    ([-1, 3, 1], [1, 1, 1], 1, "ici_parallelism"),      # 8 not divisible by 3
    ([8, 1], [1, 1, 1], 1, "ici_parallelism"),          # wrong length
    ([0, 8, 1], [1, 1, 1], 1, "ici_parallelism"),       # zero
    ([-1, 1, 1], [2, 1, 1], 1, "dcn_parallelism"),      # 2 granules asked, 1 exists
    ([-1, 1, 1], [1, 1], 1, "dcn_parallelism"),         # wrong length
])
def test_bad_mesh_config_names_the_field(ici, dcn, granules, field):
  with pytest.raises(ValueError, match=field):
    sharding.resolve_mesh_shape(ici, dcn, 8, num_granules=granules)


def test_create_mesh_on_one_device_and_missing_field():
  config = ml_collections.ConfigDict({"ici_parallelism": [1, 1, -1]})
  mesh = sharding.create_mesh(config, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="ici_parallelism"):
    sharding.create_mesh(ml_collections.ConfigDict({"dcn_parallelism": [1, 1, 1]}))


def test_logical_to_mesh_axes():
  to_spec = sharding.logical_to_mesh_axes
  assert to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert to_spec(("embed", "heads", "kv")) == P("fsdp", "tensor", None)
  # "batch" takes data+fsdp first, so "embed" (fsdp) stays whole in activations.
  assert to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert to_spec(("batch", "length", "vocab")) == P(("data", "fsdp"), None, "tensor")
  # Mesh axes absent from the mesh are dropped.
  assert to_spec(("batch", "mlp"), mesh_axis_names=("data",)) == P("data", None)
  # A later rule for the same name is the fallback when the first one's axes are taken.
  rules = (("batch", "data"), ("embed", "data"), ("embed", "tensor"))
  assert to_spec(("batch", "embed"), rules) == P("data", "tensor")
  with pytest.raises(ValueError, match="no rule"):
    to_spec(("embedding",))


def test_rules_from_config():
  config = ml_collections.ConfigDict(
      {"logical_axis_rules": [["batch", ["data", "fsdp"]], ["embed", None]]})
  assert sharding.get_logical_axis_rules(config) == (
      ("batch", ("data", "fsdp")), ("embed", None))
  assert sharding.get_logical_axis_rules(ml_collections.ConfigDict()) == (
      sharding.DEFAULT_LOGICAL_AXIS_RULES)
  # configs/default.py writes () for "the default rules".
  from configs import default
  assert sharding.get_logical_axis_rules(default.get_config().mesh) == (
      sharding.DEFAULT_LOGICAL_AXIS_RULES)


def _fake_devices(num, per_granule, with_slices):
  """CPU-like device stand-ins spread over slices (or, without, over processes)."""
  devices = []
  for i in range(num):
    device = types.SimpleNamespace(id=i, platform="cpu", device_kind="cpu",
                                   process_index=i // per_granule)
    if with_slices:
      device.slice_index = i // per_granule
    devices.append(device)
  return devices


@pytest.mark.parametrize("with_slices", [True, False], ids=["slices", "processes"])
def test_hybrid_device_array_keeps_granules_on_dcn_axis(with_slices):
  devices = _fake_devices(8, 4, with_slices)
  array = sharding.device_array((1, 2, 2), (2, 1, 1), devices)
  assert array.shape == (2, 2, 2)
  granule = np.vectorize(lambda d: d.process_index)(array)
  # Only the "data" axis (dcn=2) crosses granules.
  np.testing.assert_array_equal(granule[0], 0)
  np.testing.assert_array_equal(granule[1], 1)


def test_maybe_initialize_distributed_is_a_noop_when_not_asked(monkeypatch):
  for name in ("MIDIJAX_COORDINATOR_ADDRESS", "MIDIJAX_NUM_PROCESSES", "MIDIJAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.maybe_initialize_distributed() is False


def test_with_logical_constraint_is_a_noop_without_mesh():
  x = jnp.ones((2, 3, 4))
  assert sharding.with_logical_constraint(x, ("batch", "length", "embed")) is x


# ----------------------------------------------------------------------------- 8 devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def report():
  """Runs this file as a script on 8 simulated CPU devices; returns its JSON report."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
  if proc.returncode or not lines:
    pytest.fail(f"sharding subprocess failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(lines[-1][len(RESULT_MARKER):])


def test_maybe_initialize_distributed_from_env():
  """A one-process "cluster" in a subprocess: initializes once, then is a no-op."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MIDIJAX_NUM_PROCESSES="1", MIDIJAX_PROCESS_ID="0",
             MIDIJAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  script = ("from midijax import sharding; import jax; "
            "print(sharding.maybe_initialize_distributed(), "
            "sharding.maybe_initialize_distributed(), jax.process_count())")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["True", "False", "1"]


def test_mesh_shapes(report):
  assert report["device_count"] == NUM_DEVICES
  for name, ici in MESHES.items():
    assert report["mesh_shapes"][name] == ici, name
  assert report["mesh_shapes"]["ici=[-1,1,1]"] == [8, 1, 1]
  assert report["mesh_shapes"]["ici=[2,-1,1]"] == [2, 4, 1]
  assert report["mesh_shapes"]["ici=[1,2,-1]"] == [1, 2, 4]


def test_bad_mesh_configs_raise_naming_the_field(report):
  for case, message in report["errors"].items():
    field = case.split("=")[0]
    assert message is not None and field in message, (case, message)


def test_parameters_split_per_rules_on_2x2x2(report):
  specs, shards = report["param_specs"], report["param_shard_shapes"]
  # Spec -> per-device shard: D=32 split 2 ways over fsdp, mlp=64 / vocab=256 /
  # heads=4 split 2 ways over tensor.
  expected = {
      "['embedding']": (["tensor", "fsdp"], [128, 16]),
      "['blocks'][0]['mlp']['wi']": (["fsdp", "tensor"], [16, 32]),
      "['blocks'][0]['mlp']['wo']": (["tensor", "fsdp"], [32, 16]),
      "['blocks'][0]['attention']['query']": (["fsdp", "tensor", None], [16, 2, 8]),
      "['blocks'][0]['attention']['out']": (["tensor", None, "fsdp"], [2, 8, 16]),
      "['blocks'][0]['attention']['relative_embedding']": (["tensor", None, None], [2, 32, 8]),
      "['final_norm']['scale']": (["fsdp"], [16]),
  }
  for name, (spec, shard_shape) in expected.items():
    assert specs[name] == spec, name
    assert shards[name] == shard_shape, name
  # create_sharded_model and shard_model(module) give the same layout.
  assert report["create_sharded_model_specs_match"]
  assert report["shard_model_module_specs_match"]


def test_batch_sharding_and_host_local_to_global(report):
  assert report["batch_spec"] == [["data", "fsdp"]]
  assert report["batch_shard_shape"] == [2, 16]  # 8 rows over data x fsdp = 4
  assert report["host_local_to_global_equal"]


def test_activation_constraints_only_inside_use_mesh(report):
  assert report["constraints_inside_use_mesh"] > 0
  assert report["constraints_outside_use_mesh"] == 0


def test_same_losses_on_every_mesh(report):
  losses = report["losses"]
  reference = np.array(losses["1x1x1"])
  assert len(reference) == 4 and np.all(np.isfinite(reference))
  assert reference[-1] < reference[0]  # 3 Adam steps reduce the loss
  for name in MESHES:
    np.testing.assert_allclose(losses[name], reference, rtol=LOSS_RTOL, err_msg=name)


# ----------------------------------------------------------------------------- subprocess


def _child_report() -> dict:
  """The checks that need 8 devices; returns JSON-able results."""
  from flax import nnx
  import ml_collections
  import optax
  from midijax.models.transformer import Transformer, TransformerConfig

  out = {"device_count": jax.device_count()}
  mesh_config = lambda ici, **kw: ml_collections.ConfigDict(dict(ici_parallelism=ici, **kw))
  meshes = {name: sharding.create_mesh(mesh_config(ici),
                                       devices=jax.devices()[:1] if name == "1x1x1" else None)
            for name, ici in MESHES.items()}
  out["mesh_shapes"] = {name: list(mesh.devices.shape) for name, mesh in meshes.items()}
  for ici in ([-1, 1, 1], [2, -1, 1], [1, 2, -1]):
    name = "ici=" + json.dumps(ici).replace(" ", "")
    out["mesh_shapes"][name] = list(sharding.create_mesh(mesh_config(ici)).devices.shape)

  out["errors"] = {}
  for case, config in {
      "ici_parallelism=[3,1,1]": mesh_config([3, 1, 1]),
      "ici_parallelism=[-1,-1,1]": mesh_config([-1, -1, 1]),
      "ici_parallelism=[4,1,1]": mesh_config([4, 1, 1]),
      "dcn_parallelism=[2,1,1]": mesh_config([-1, 1, 1], dcn_parallelism=[2, 1, 1]),
  }.items():
    try:
      sharding.create_mesh(config)
      out["errors"][case] = None
    except ValueError as e:
      out["errors"][case] = str(e)

  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  config = TransformerConfig(vocab_size=200, emb_dim=32, num_heads=4, num_layers=1, qkv_dim=32,
                             mlp_dim=64, max_len=32, position="relative",
                             dropout_rate=0.0, attention_dropout_rate=0.0, deterministic=True)
  model_fn = lambda: Transformer(config, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
  base_model = model_fn()
  graphdef, base_state = nnx.split(base_model)
  mesh = meshes["2x2x2"]

  def param_info(state):
    specs, shapes = {}, {}
    for path, leaf in jax.tree.leaves_with_path(state):
      name = jax.tree_util.keystr(path).removesuffix(".value")
      specs[name] = [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec]
      specs[name] += [None] * (leaf.ndim - len(specs[name]))
      shapes[name] = list(leaf.addressable_shards[0].data.shape)
    return specs, shapes

  placed = sharding.shard_model(base_state, mesh, rules)
  out["param_specs"], out["param_shard_shapes"] = param_info(placed)
  created = sharding.create_sharded_model(model_fn, mesh, rules)
  out["create_sharded_model_specs_match"] = param_info(nnx.state(created))[0] == out["param_specs"]
  moved = sharding.shard_model(model_fn(), mesh, rules)
  out["shard_model_module_specs_match"] = param_info(nnx.state(moved))[0] == out["param_specs"]

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.repeat([[1] * 6 + [2] * 10], 8, axis=0).astype(np.int32)}
  global_batch = sharding.host_local_to_global(batch, mesh)
  out["batch_spec"] = [list(a) if isinstance(a, tuple) else a
                       for a in global_batch["inputs"].sharding.spec]
  out["batch_shard_shape"] = list(global_batch["inputs"].addressable_shards[0].data.shape)
  out["host_local_to_global_equal"] = all(
      np.array_equal(np.asarray(global_batch[k]), batch[k]) for k in batch)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1))

  tx = optax.adam(1e-2)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def count_constraints(inside):
    fn = jax.jit(loss_fn)
    if inside:
      with sharding.use_mesh(mesh, rules):
        text = fn.lower(placed, global_batch).as_text()
    else:
      text = fn.lower(placed, global_batch).as_text()
    return text.count("sharding_constraint")

  out["constraints_inside_use_mesh"] = count_constraints(True)
  out["constraints_outside_use_mesh"] = count_constraints(False)

  out["losses"] = {}
  for name, mesh in meshes.items():
    with sharding.use_mesh(mesh, rules):
      params = sharding.shard_model(base_state, mesh, rules)
      param_shardings = sharding.state_shardings(params, mesh, rules)
      # Adam's moments are States of Params with the same metadata: one call
      # shards them like the parameters (and the step count replicated).
      opt_state = tx.init(base_state)
      opt_shardings = sharding.logical_to_mesh_sharding(opt_state, mesh, rules)
      opt_state = jax.device_put(opt_state, opt_shardings)
      data_sharding = sharding.batch_sharding(mesh, rules)
      replicated = jax.sharding.NamedSharding(mesh, P())
      step = jax.jit(train_step,
                     in_shardings=(param_shardings, opt_shardings, data_sharding),
                     out_shardings=(param_shardings, opt_shardings, replicated))
      batch_on_mesh = sharding.host_local_to_global(batch, mesh, data_sharding)
      # Losses before each of 3 steps, then after them (the 4th call's loss).
      losses = []
      for _ in range(4):
        params, opt_state, loss = step(params, opt_state, batch_on_mesh)
        losses.append(float(loss))
      out["losses"][name] = losses
  return out


if __name__ == "__main__":
  print(RESULT_MARKER + json.dumps(_child_report()), flush=True)
