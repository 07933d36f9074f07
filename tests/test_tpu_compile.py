"""The TPU compiler in CI, without a TPU: libtpu compiles small programs for TPU targets.

One subprocess (JAX on CPU, libtpu's compiler for the targets) compiles, for a tiny
bfloat16 model with scanned, rematerialized layers:

* the model's forward + backward pass with `attention_impl="auto"` on a v4-8, whose HLO
  must hold the Pallas splash-attention kernel (a `tpu_custom_call`);
* the decode step over a float and an int8 cache on a v4-8;
* `midijax compile` for tpu:v4-8, a multi-host v5e-16 and two v4-8 slices over DCN, and
  for tpu:v4-8 with the Muon optimizer (Newton-Schulz on the FSDP-sharded, scanned
  matrices), each exiting 0 with "fits".

Outside CI the tests skip when libtpu is not installed (pip install "libtpu==0.0.42.*");
under CI=true they run (and fail without libtpu).
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import IN_CI

REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU and not IN_CI,
    reason="libtpu not installed: TPU compiles need pip install 'libtpu==0.0.42.*' (no TPU)")

# Small: 2 layers, width 64, sequence 128 (splash needs a multiple of 128), bfloat16.
TINY = ["--config=configs/groove_tiny.py", "--config.data.seq_len=128",
        "--config.model.max_len=128", "--config.model.num_layers=2",
        "--config.model.emb_dim=64", "--config.model.qkv_dim=64", "--config.model.mlp_dim=128",
        "--config.model.dtype=bfloat16", "--config.model.attention_dropout_rate=0.0",
        "--config.model.scan_layers=True", "--config.model.remat_policy=full"]

_SCRIPT = r'''
import contextlib, io, json, sys, time
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
from midijax import aot, cli, sharding
from midijax.models import transformer

TINY = json.loads(sys.argv[1])
t0 = time.perf_counter()
devices = aot.target_devices(aot.parse_topology("tpu:v4-8"))
cfg = transformer.TransformerConfig(
    vocab_size=205, emb_dim=64, qkv_dim=64, num_heads=2, num_layers=2, mlp_dim=128,
    max_len=128, dtype="bfloat16", scan_layers=True, remat_policy="full",
    dropout_rate=0.0, attention_dropout_rate=0.0, deterministic=True)
cfg = cfg.replace(attention_impl=transformer.resolve_attention_impl(cfg, "tpu", len(devices),
                                                                     seq_len=128))
mesh = sharding.create_mesh(ml_collections.ConfigDict(
    {"ici_parallelism": (1, -1, 1), "dcn_parallelism": (1, 1, 1)}), devices=devices)
rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(
    cfg, rngs=nnx.Rngs(0))))
params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, sharding.state_shardings(abstract, mesh, rules))
replicated = NamedSharding(mesh, PartitionSpec())
batch = sharding.batch_sharding(mesh, rules)
tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=batch)

def loss(params, tokens):
  logits = nnx.merge(graphdef, params)(tokens, segment_ids=jnp.ones_like(tokens))
  return jnp.mean(logits[..., 0])

with sharding.use_mesh(mesh, rules):
  hlo = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
print("RESULT " + json.dumps({"name": "grad", "impl": cfg.attention_impl,
                              "custom_call": "tpu_custom_call" in hlo,
                              "splash": "splash" in hlo,
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

for kind in ("float", "int8"):
  t0 = time.perf_counter()
  def step(params, token, cache, pos):
    return nnx.merge(graphdef, params).decode_step(token, cache, pos)
  with sharding.use_mesh(mesh, rules):
    cache = jax.eval_shape(lambda: nnx.merge(graphdef, abstract).init_cache(8, 128, kind))
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch
                                                        if x.ndim else replicated), cache)
    token = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)
    pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    compiled = jax.jit(step, donate_argnums=(2,)).lower(params, token, cache, pos).compile()
  print("RESULT " + json.dumps({"name": "decode_" + kind, "compiled": compiled is not None,
                                "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

for name, extra in (("v4-8", ["--topology=tpu:v4-8"]),
                    ("v5e-16", ["--topology=tpu:v5e-16", "--config.data.batch_size=16"]),
                    ("v4-8x2", ["--topology=tpu:v4-8", "--num_slices=2",
                                "--config.mesh.dcn_parallelism=(2,1,1)"]),
                    ("v4-8-muon", ["--topology=tpu:v4-8", "--config.train.optimizer=muon"]),
                    # The bar clock's inputs (bar positions, heads on the music's time, the
                    # echo of earlier bars) on drums_beats, from its builder config.
                    ("v4-8-beats", ["--topology=tpu:v4-8",
                                    "--config.data.builder_config=drums_beats",
                                    "--config.data.data_dir=/nonexistent/tfds",
                                    "--config.model.bar_positions=64",
                                    "--config.model.time_rope_heads=1",
                                    "--config.model.bar_echo=2"])):
  t0 = time.perf_counter()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = cli.main(["compile"] + TINY + extra)
  print("RESULT " + json.dumps({"name": name, "status": status, "report": out.getvalue(),
                                "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
'''


@pytest.fixture(scope="module")
def tpu_compiles():
  """{name: result} from one subprocess compiling everything for TPU targets."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real each time
  # No TPU is opened; let this compile run beside another libtpu process (its lockfile).
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(TINY)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  results = {}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
      results[result["name"]] = result
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return results


@needs_libtpu
def test_auto_attention_on_tpu_is_the_splash_kernel(tpu_compiles):
  r = tpu_compiles["grad"]
  assert r["impl"] == "splash"
  assert r["custom_call"] and r["splash"], r


@needs_libtpu
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_decode_step_compiles_for_tpu(tpu_compiles, kind):
  assert tpu_compiles[f"decode_{kind}"]["compiled"]


@needs_libtpu
@pytest.mark.parametrize("name, devices, hosts, slices", [
    ("v4-8", 4, 1, 1), ("v5e-16", 16, 4, 1), ("v4-8x2", 8, 2, 2), ("v4-8-muon", 4, 1, 1),
    ("v4-8-beats", 4, 1, 1)])
def test_midijax_compile_fits_on_tpu(tpu_compiles, name, devices, hosts, slices):
  r = tpu_compiles[name]
  report = r["report"]
  assert r["status"] == 0, report
  assert "-> fits" in report
  assert f": {devices} x TPU" in report and f"{hosts} host(s)" in report
  assert (f"{slices} slices" in report) == (slices > 1)
  assert "attention   splash" in report
  assert "projected" in report and "the compiler's estimate" in report
  assert ("(muon)" in report) == name.endswith("muon")


def test_step_estimate_reads_libtpu_optimal_seconds():
  """libtpu gives -1 s per operation it cannot cost: -3.9985 is 3 uncosted operations and
  1.5 ms of costed ones. Loops (costed once) and implausible values give no estimate."""
  from midijax import aot
  base = dict(topology="tpu:v4-8", device_kind="TPU v4", num_devices=4, num_hosts=1,
              num_slices=1, mesh_shape={"data": 4}, global_batch=64, seq_len=2048,
              vocab_size=372, num_params=1, param_bytes_per_device=1,
              opt_state_bytes_per_device=1, argument_bytes=1, output_bytes=1, alias_bytes=0,
              temp_bytes=1, code_bytes=0, total_bytes=3, memory_limit_bytes=32 * aot.GIB,
              memory_limit_source="table:v4", compiler_flops=1e11, model_flops=2e11,
              compile_seconds=1.0, fits=True, attention_impl="splash",
              peak_flops_per_device=aot.PEAK_FLOPS["v4"])
  report = aot.CompileReport(**base, optimal_seconds=-3.9985)
  seconds, note = report.step_estimate()
  assert abs(seconds - 0.0015) < 1e-9 and note.startswith("4 operations")
  assert abs(report.projected_tokens_per_s - 64 * 2048 / 0.0015) < 1
  assert abs(report.projected_mfu - 2e11 / (0.0015 * 275e12)) < 1e-9
  text = aot.format_report(report)
  assert "projected   1.5 ms per step" in text and "lower bound" in text
  assert aot.CompileReport(**base, optimal_seconds=0.002).step_estimate() == (0.002, "")
  looped = aot.CompileReport(**base, optimal_seconds=0.002, has_loops=True)
  assert looped.step_estimate()[0] == 0 and "loops" in aot.format_report(looped)
  # 1e14 FLOPs at 275 TFLOP/s take 0.36 s: a 1 ms reading cannot be right.
  implausible = aot.CompileReport(**{**base, "compiler_flops": 1e14}, optimal_seconds=-1.999)
  assert implausible.step_estimate()[0] == 0
  assert aot.CompileReport(**base).projected_tokens_per_s == 0
