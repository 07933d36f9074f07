"""LoRA adapters (config.model.lora_rank) on tiny models, without data: the config check,
fresh adapters that change nothing, adapters used by training, prefill and decode on every
CPU attention backend, scanned or not, with remat; the merge into a plain model; training
only the adapters; what init_from makes of adapters; their sharding on 8 CPU devices. The
runs (init_from a pretrained run, export, generate) are in test_finetune.py.
"""
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs.groove_tiny as groove_tiny
from midijax import finetune, runs, sharding, train
from midijax.errors import ConfigError
from midijax.kernels import causal_attention
from midijax.models import transformer
from midijax.models.transformer import Transformer, TransformerConfig

from conftest import REPO

VOCAB = 200  # padded to 256
BATCH, LENGTH, PROMPT = 2, 24, 7
# Merged and adapted models compute the same function in another order (W + s A B
# formed first): differences seen are ~4e-6 on logits of magnitude ~5. Decoding adds its
# own reordering (see test_models.DECODE_ATOL).
ATOL = 1e-5
# The attention kernels LoRA adapts.
ATTENTION_ADAPTERS = ("query", "key", "value", "out")


def config(**changes) -> TransformerConfig:
  base = dict(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_layers=2, qkv_dim=32,
              mlp_dim=64, max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0,
              deterministic=True, mlp_activation="swiglu")
  base.update(changes)
  return TransformerConfig(**base)


def model_of(cfg: TransformerConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")))


def by_path(model_or_state) -> dict:
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return dict(zip(finetune.param_paths(state), (np.asarray(x) for x in jax.tree.leaves(state))))


def tokens_for(batch=BATCH, length=LENGTH, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def with_trained_adapters(model: Transformer, seed: int = 1) -> Transformer:
  """`model` with every adapter B set to small random values (as after training)."""
  rng = np.random.default_rng(seed)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  for path, var in flat.items():
    if str(path[-1]).endswith(transformer.LORA_B):
      flat[path] = var.replace(jnp.asarray(0.05 * rng.standard_normal(var.shape), var.dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def decode(model: Transformer, tokens) -> jax.Array:
  """Logits of every position from a prefill of PROMPT tokens, then one decode step per
  token (as the sampler runs them)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    prompt_logits, cache = model.prefill(tokens[:, :PROMPT], LENGTH)
    steps = jnp.zeros((BATCH, LENGTH, model.config.padded_vocab_size), jnp.float32)

    def step(i, carry):
      steps, cache = carry
      logits, cache = model.decode_step(tokens[:, i], cache, i)
      return steps.at[:, i].set(logits), cache

    steps, _ = jax.lax.fori_loop(PROMPT, LENGTH, step, (steps, cache))
    return jnp.concatenate([prompt_logits, steps[:, PROMPT:]], axis=1)

  return run(state, tokens)


# ----------------------------------------------------------------------------- config
def test_rank_above_the_width_is_a_config_error_naming_the_field():
  assert config(lora_rank=32).lora_scale == 0.5  # alpha 16 / rank 32; rank = width is fine
  with pytest.raises(ConfigError, match=r"config.model.lora_rank=33 is above the width it "
                                        r"adapts: config.model.emb_dim=32"):
    config(lora_rank=33)
  with pytest.raises(ConfigError, match=r"config.model.lora_rank=20 .* config.model.qkv_dim=16"):
    config(lora_rank=20, qkv_dim=16)
  with pytest.raises(ConfigError, match=r"config.model.lora_rank=-1 must be an integer >= 0"):
    config(lora_rank=-1)
  with pytest.raises(ConfigError, match=r"config.model.lora_alpha=0.0 must be positive"):
    config(lora_rank=4, lora_alpha=0.0)
  assert config(lora_alpha=0.0).lora_rank == 0  # alpha unused without adapters


# ----------------------------------------------------------------------------- fresh adapters
@pytest.mark.parametrize("scan_layers", [False, True])
def test_fresh_adapters_leave_the_model_unchanged(scan_layers):
  """Same seed with and without LoRA: the same base parameters, and B = 0 makes the adapted
  model's output exactly the base model's, in training (dropout on) too."""
  cfg = config(scan_layers=scan_layers, dropout_rate=0.1, deterministic=False)
  base, lora = model_of(cfg), model_of(cfg.replace(lora_rank=4))
  base_params, lora_params = by_path(base), by_path(lora)
  adapters = {p for p in lora_params if transformer.is_lora_path(p)}
  assert set(lora_params) - adapters == set(base_params)
  for path, value in base_params.items():
    np.testing.assert_array_equal(lora_params[path], value, err_msg=path)
  prefix = "blocks/" if scan_layers else "blocks/1/"
  lead = (2,) if scan_layers else ()
  kernels = [f"attention/{k}" for k in ATTENTION_ADAPTERS] + ["mlp/wi", "mlp/wi_gate", "mlp/wo"]
  assert {p for p in adapters if p.startswith(prefix)} == {
      f"{prefix}{k}_lora_{ab}" for k in kernels for ab in "ab"}
  assert lora_params[prefix + "attention/query_lora_a"].shape == lead + (32, 4)
  assert lora_params[prefix + "attention/query_lora_b"].shape == lead + (4, 4, 8)
  assert lora_params[prefix + "attention/out_lora_a"].shape == lead + (4, 8, 4)
  assert lora_params[prefix + "mlp/wo_lora_b"].shape == lead + (4, 32)
  for path in adapters:
    assert (lora_params[path] == 0).all() == path.endswith("_lora_b"), path
  # Sharding annotations: the kernel's logical axes, none on the rank axis.
  axes = {"/".join(str(k) for k in path): var.get_metadata()["out_sharding"]
          for path, var in nnx.to_flat_state(nnx.state(lora))}
  layer = (None,) if scan_layers else ()
  assert axes[prefix + "attention/query_lora_a"] == layer + ("embed", None)
  assert axes[prefix + "attention/query_lora_b"] == layer + (None, "heads", "kv")
  assert axes[prefix + "attention/out_lora_a"] == layer + ("heads", "kv", None)
  assert axes[prefix + "mlp/wi_lora_b"] == layer + (None, "mlp")
  # config.train.trainable=".*lora_[ab]" selects exactly the adapters.
  mask = finetune.trainable_leaves(nnx.state(lora, nnx.Param), ".*lora_[ab]")
  assert {p for p, m in zip(finetune.param_paths(nnx.state(lora, nnx.Param)), mask) if m} == adapters
  tokens, key = tokens_for(), jax.random.key(3)
  run = nnx.jit(lambda m, t, k: m(t, dropout_rng=k))
  np.testing.assert_array_equal(run(lora, tokens, key), run(base, tokens, key))
  assert transformer.count_params(lora) - transformer.count_params(base) == (
      transformer.matmul_params(lora.config) - transformer.matmul_params(base.config))
  # Training only the adapters: their matmuls alone need weight gradients (the MFU's FLOPs).
  adapters_n = finetune.trainable_matmul_params(nnx.state(lora, nnx.Param), mask, lora.config)
  assert adapters_n == transformer.matmul_params(lora.config) - transformer.matmul_params(
      base.config)
  n, seq = transformer.matmul_params(lora.config), 16
  assert transformer.flops_per_token(lora.config, seq, adapters_n) == (
      transformer.flops_per_token(lora.config, seq) - 2 * (n - adapters_n))
  output_only = finetune.trainable_leaves(nnx.state(lora, nnx.Param), "output")
  assert finetune.trainable_matmul_params(nnx.state(lora, nnx.Param), output_only,
                                          lora.config) == lora.config.emb_dim * VOCAB


# ----------------------------------------------------------------------------- every path
def _backends():
  cases = [("xla", False, "none"), ("chunked", True, "save_dots"), ("cpu_blocked", False, "full"),
           ("cpu_kernel", True, "none"), ("auto", False, "save_qkv")]
  return [pytest.param(*c, marks=pytest.mark.skipif(
      c[0] == "cpu_kernel" and not causal_attention.available(),
      reason="the C++ attention kernel is not built here")) for c in cases]


@pytest.mark.parametrize("impl, scan_layers, remat", _backends())
def test_adapters_act_in_forward_prefill_and_decode_and_merge_exactly(impl, scan_layers, remat):
  """Trained adapters change the output; the full forward pass, prefill + decode steps and
  the merged plain model (`merge_lora`) all agree."""
  cfg = config(attention_impl=impl, scan_layers=scan_layers, remat_policy=remat,
               attention_block=8, position="rope" if scan_layers else "sinusoidal")
  lora = with_trained_adapters(model_of(cfg.replace(lora_rank=4)))
  tokens = tokens_for()
  adapted = np.asarray(forward(lora, tokens))[..., :VOCAB]
  assert np.abs(adapted - np.asarray(forward(model_of(cfg), tokens))[..., :VOCAB]).max() > 0.05
  merged_params, merged_cfg = transformer.merge_lora(nnx.state(lora), lora.config)
  assert merged_cfg == cfg
  merged = model_of(merged_cfg, seed=7)
  nnx.update(merged, merged_params)
  assert not any(transformer.is_lora_path(p) for p in by_path(merged))
  np.testing.assert_allclose(np.asarray(forward(merged, tokens))[..., :VOCAB], adapted,
                             atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(decode(lora, tokens))[..., :VOCAB], adapted,
                             atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("scan_layers, remat", [(False, "full"), (True, "save_dots")])
def test_only_adapters_train_and_the_rest_stays_bit_identical(scan_layers, remat):
  run_config = groove_tiny.get_config()
  run_config.model.update(lora_rank=4, scan_layers=scan_layers, remat_policy=remat,
                          num_layers=2, max_len=32)
  run_config.data.update(seq_len=32, batch_size=4)
  run_config.train.update(trainable=".*lora_[ab]", warmup_steps=1, learning_rate=1e-2)
  mesh, rules = runs.inference_mesh(), sharding.get_logical_axis_rules(None)
  setup, state = train.create_train_state(run_config, VOCAB, mesh, rules)
  paths = finetune.param_paths(state.params)
  assert [p for p, t in zip(paths, setup.trainable) if t] == [
      p for p in paths if transformer.is_lora_path(p)]
  total, trainable = setup.param_counts
  assert trainable == 2 * 4 * (4 * (32 + 32) + 2 * (32 + 64))  # 2 layers, 6 pairs each
  before = by_path(state.params)
  rows = np.random.default_rng(0).integers(0, VOCAB, (4, 33)).astype(np.int32)
  batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
           "weights": np.ones((4, 32), np.float32)}
  step = train.jit_train_step(run_config, setup)
  with sharding.use_mesh(mesh, rules):
    for _ in range(2):
      state, metrics = step(state, batch, train.replicated_key(0, mesh))
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  after = by_path(state.params)
  for path, value in before.items():
    if transformer.is_lora_path(path):
      assert not np.array_equal(after[path], value), path  # A and B both moved
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=path)


# ----------------------------------------------------------------------------- init_from
def _source(run_config) -> finetune.InitSource:
  return finetune.InitSource(spec="src:best", workdir="/src", step=4,
                             config=ml_collections.ConfigDict(run_config.to_dict()),
                             vocab_size=VOCAB)


def test_init_from_allows_new_adapters_and_still_refuses_architecture_changes():
  plain = groove_tiny.get_config()
  new = groove_tiny.get_config()
  new.model.update(lora_rank=8, scan_layers=True)
  finetune.check_init_from(new, _source(plain), VOCAB, VOCAB)  # adapters: fresh init
  new.model.num_layers = 2
  with pytest.raises(ConfigError, match="another architecture: config.model.num_layers=2"):
    finetune.check_init_from(new, _source(plain), VOCAB, VOCAB)
  new.model.update(num_layers=1, mlp_dim=128)
  with pytest.raises(ConfigError, match="config.model.mlp_dim=128 but 64 there"):
    finetune.check_init_from(new, _source(plain), VOCAB, VOCAB)
  assert "lora_rank" not in finetune.ARCHITECTURE_FIELDS
  # A LoRA source into a plain model (or other adapters): its adapters are merged first.
  new.model.update(mlp_dim=64, lora_rank=0)
  lora_source = groove_tiny.get_config()
  lora_source.model.lora_rank = 4
  finetune.check_init_from(new, _source(lora_source), VOCAB, VOCAB)


@pytest.mark.parametrize("new_rank", [0, 4, 2])
def test_a_lora_source_is_copied_or_merged(new_rank):
  """Same rank and alpha: adapters copied; otherwise merged into the kernels, so the new
  model starts computing what the source computes."""
  src_cfg = config(lora_rank=4)
  src = with_trained_adapters(model_of(src_cfg))
  new_cfg = config(lora_rank=new_rank, scan_layers=True)
  fresh = nnx.state(model_of(new_cfg, seed=5))
  params = finetune.source_params_for(nnx.state(src), src_cfg, new_cfg)
  vocab = finetune.map_vocabulary([str(i) for i in range(VOCAB)], [str(i) for i in range(VOCAB)])
  mesh, rules = runs.inference_mesh(), sharding.get_logical_axis_rules(None)
  out = finetune.transfer_params(fresh, params, vocab,
                                 sharding.state_shardings(fresh, mesh, rules))
  model = model_of(new_cfg, seed=5)
  nnx.update(model, out)
  tokens = tokens_for()
  np.testing.assert_allclose(np.asarray(forward(model, tokens))[..., :VOCAB],
                             np.asarray(forward(src, tokens))[..., :VOCAB], atol=ATOL, rtol=0)
  got, source = by_path(out), by_path(src)
  if new_rank == 4:  # copied (and stacked: the new model scans its layers)
    np.testing.assert_array_equal(got["blocks/mlp/wo_lora_b"],
                                  np.stack([source["blocks/0/mlp/wo_lora_b"],
                                            source["blocks/1/mlp/wo_lora_b"]]))
  elif new_rank:  # fresh adapters on merged kernels
    assert (got["blocks/mlp/wo_lora_b"] == 0).all()


# ----------------------------------------------------------------------------- sharded
_SHARDED_SCRIPT = r"""
import json
import jax
import ml_collections
import numpy as np
import configs.groove_tiny as groove_tiny
from midijax import finetune, sharding, train

config = groove_tiny.get_config()
config.model.update(emb_dim=32, qkv_dim=32, num_heads=4, mlp_dim=64, num_layers=2,
                    max_len=32, lora_rank=4, scan_layers=True, attention_impl="chunked",
                    attention_block=8)
config.data.update(seq_len=32, batch_size=8)
config.train.update(trainable=".*lora_[ab]", warmup_steps=1, learning_rate=1e-2)
rules = sharding.get_logical_axis_rules(None)
rows = np.random.default_rng(0).integers(0, 200, (8, 33)).astype(np.int32)
batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": np.ones((8, 32), np.float32)}
out = {}
for name, ici, devices in (("1x1x1", (1, 1, 1), jax.devices()[:1]),
                           ("2x2x2", (2, 2, 2), jax.devices())):
  mesh = sharding.create_mesh(ml_collections.ConfigDict(
      {"ici_parallelism": ici, "dcn_parallelism": (1, 1, 1)}), devices=devices)
  setup, state = train.create_train_state(config, 200, mesh, rules)
  step = train.jit_train_step(config, setup)
  with sharding.use_mesh(mesh, rules):
    for _ in range(2):
      state, _ = step(state, sharding.host_local_to_global(batch, mesh),
                      train.replicated_key(0, mesh))
  paths = finetune.param_paths(state.params)
  leaves = jax.tree.leaves(state.params)
  out[name] = {p: np.asarray(x).tolist() for p, x in zip(paths, leaves) if "lora" in p}
  out[name + "_specs"] = {p: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
                          for p, x in zip(paths, leaves) if "lora" in p}
print("RESULT " + json.dumps(out))
"""


def test_adapters_shard_like_their_kernels_and_train_the_same_on_8_devices():
  """On a 2x2x2 (data, fsdp, tensor) mesh of 8 CPU devices: adapters split as their
  kernels' logical axes say (the rank axis never), and two LoRA steps give the adapters
  one device gives."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip())
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  report = json.loads(lines[-1][len("RESULT "):])
  specs = report["2x2x2_specs"]
  assert specs["blocks/attention/query_lora_a"] == [None, "fsdp", None]  # [L, D, r]
  assert specs["blocks/attention/query_lora_b"] == [None, None, "tensor", None]  # [L, r, H, Dh]
  assert specs["blocks/attention/out_lora_a"] == [None, "tensor", None, None]  # [L, H, Dh, r]
  assert specs["blocks/mlp/wo_lora_b"] == [None, None, "fsdp"]  # [L, r, D]
  for path, value in report["1x1x1"].items():
    assert np.abs(np.asarray(value)).max() > 0, path
    np.testing.assert_allclose(report["2x2x2"][path], value, rtol=1e-4, atol=1e-5,
                               err_msg=path)
