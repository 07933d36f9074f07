"""train.py: the real `train_and_evaluate` on a tiny config and real Groove data.

Bad configs fail before compiling with the field named; runs resume after being killed;
a NaN stops the run keeping the last good checkpoint; SIGTERM saves and exits; the
checkpoint policy keeps the latest K plus the best.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

from midijax import checkpoint as ckpt_lib
from midijax import runs, train
from midijax.errors import ConfigError

import configs.groove_tiny as groove_tiny


@pytest.fixture(scope="module")
def tfds_dir(groove_tfds):
  return groove_tfds


def tiny(tfds_dir, **train_overrides):
  config = groove_tiny.get_config()
  config.data.data_dir = str(tfds_dir)
  config.data.batch_size = 4
  config.data.seq_len = 32
  config.model.max_len = 32
  config.train.update(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3, warmup_steps=2)
  config.train.update(**train_overrides)
  return config


@pytest.mark.parametrize("field,value,message", [
    ("model.num_heads", 3, "config.model.num_heads=3 must divide"),
    ("model.position", "alibi", "config.model.position='alibi'"),
    ("model.norm", "batchnorm", "config.model.norm"),
    ("model.mlp_activation", "relu6", "config.model.mlp_activation"),
    ("model.attention_block", -1, "config.model.attention_block"),
    ("data.seq_len", 4096, "config.data.seq_len=4096 is above config.model.max_len"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("model.num_layers", 0, "config.model.num_layers=0 must be positive"),
    ("model.dropout_rate", 1.5, "config.model.dropout_rate=1.5"),
    ("train.num_steps", 0, "config.train.num_steps"),
    ("train.schedule", "linear", "config.train.schedule='linear'"),
    ("train.log_every", 0, "config.train.log_every=0"),
    ("mesh.ici_parallelism", (3, 1, 1), "ici_parallelism"),
    ("mesh.ici_parallelism", (-1, -1, 1), "ici_parallelism"),
    ("data.batch_size", 0, "config.data.batch_size"),
    ("train.ema_decay", 1.0, "config.train.ema_decay=1.0"),
    ("train.optimizer", "sgd", "config.train.optimizer='sgd'; expected adamw | muon"),
])
def test_bad_configs_name_the_field(field, value, message):
  config = groove_tiny.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as e:
    train.validate_config(config, num_devices=1)
  assert message in str(e.value)


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = groove_tiny.get_config()
  config.data.data_dir = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match="no built dataset groove/drums.*midijax build-data"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_schedule_and_decay_mask():
  config = groove_tiny.get_config().train
  config.update(learning_rate=1.0, warmup_steps=10, num_steps=110, schedule="cosine")
  sched = train.create_learning_rate_schedule(config)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(110)) - 0.1) < 1e-6  # cosine to alpha = 10%
  params = {"embedding": np.zeros((4, 2)), "blocks": {"0": {"kernel": np.zeros((2, 2)),
                                                            "scale": np.zeros(2)}}}
  mask = train.weight_decay_mask(params)
  assert mask == {"embedding": False, "blocks": {"0": {"kernel": True, "scale": False}}}
  # Scanned blocks: leaves stacked on a leading layer axis; a stacked scale is no matrix.
  scanned = {"embedding": np.zeros((4, 2)), "blocks": {"kernel": np.zeros((3, 2, 2)),
                                                       "scale": np.zeros((3, 2))}}
  mask = train.weight_decay_mask(scanned)
  assert mask == {"embedding": False, "blocks": {"kernel": True, "scale": False}}


def test_muon_orthogonalizes_the_block_matrices_and_leaves_the_rest_to_adam():
  from midijax.models import transformer
  from flax import nnx
  import jax
  cfg = transformer.TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, qkv_dim=16,
                                      mlp_dim=32, num_layers=1, max_len=8,
                                      position="relative")
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  dims = train.muon_dimension_numbers(params)
  block = dims["blocks"][0]
  assert block["attention"]["query"] == (0, (1, 2))  # [embed, heads, head_dim]
  assert block["attention"]["out"] == ((0, 1), 2)  # [heads, head_dim, embed]
  assert block["mlp"]["wi"] == (0, 1)
  assert dims["embedding"] is None and dims["output"] is None
  assert block["attention_norm"]["scale"] is None
  assert block["attention"]["relative_embedding"] is None
  config = groove_tiny.get_config().train
  config.update(optimizer="muon", muon_learning_rate=0.1, learning_rate=0.01,
                warmup_steps=0, num_steps=10, weight_decay=0.0, grad_clip_norm=0.0)
  tx = train.create_optimizer(config, params)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # A Muon update of a matrix is close to orthogonal: its singular values are near one
  # (times the learning rate and the shape factor). The embedding gets (Nesterov) Adam's.
  wi = np.asarray(updates["blocks"][0]["mlp"]["wi"]) / -0.1
  s = np.linalg.svd(wi / np.sqrt(max(1.0, 32 / 16)), compute_uv=False)
  assert np.all((s > 0.5) & (s < 1.3)), s
  adam = optax.adamw(0.01, b1=config.b1, b2=config.b2, eps=1e-8, weight_decay=0.0,
                     nesterov=True)
  emb, _ = adam.update(grads["embedding"], adam.init(params["embedding"]), params["embedding"])
  np.testing.assert_allclose(updates["embedding"], emb, rtol=1e-5, atol=1e-8)
  # With frozen parameters (fine-tuning) Muon sees only the trainable ones.
  trainable = [("mlp" in jax.tree_util.keystr(p)) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]]
  tx = train.create_optimizer(config, params, trainable)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(np.asarray(updates["embedding"]))
  assert np.any(np.asarray(updates["blocks"][0]["mlp"]["wo"]))


def test_muon_run_trains_and_resumes(tfds_dir, tmp_path):
  out = train.train_and_evaluate(tiny(tfds_dir, optimizer="muon"), str(tmp_path / "run"))
  assert out["step"] == 6 and np.isfinite(out["eval_loss"])
  # Muon's state (momentum for the matrices, Adam's moments for the rest) round-trips
  # through the Orbax checkpoint.
  out = train.train_and_evaluate(tiny(tfds_dir, optimizer="muon", num_steps=9),
                                 str(tmp_path / "run"))
  assert out["step"] == 9 and np.isfinite(out["eval_loss"])


def test_train_resume_and_checkpoint_policy(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  out = train.train_and_evaluate(tiny(tfds_dir, keep_latest=1, keep_best=1), str(workdir))
  assert out["step"] == 6 and np.isfinite(out["eval_loss"])
  for f in ("config.json", "run_info.json", "vocab.json", "metrics.jsonl", "loss.png",
            "best.json"):
    assert (workdir / f).exists(), f
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("tokens_per_s" in r and "mfu" in r for r in rows)
  best = json.loads((workdir / "best.json").read_text())
  steps = ckpt_lib.available_steps(workdir)
  assert 6 in steps and best["step"] in steps and len(steps) <= 2
  # Resuming: a longer run in the same workdir starts at step 6, not 0.
  out2 = train.train_and_evaluate(tiny(tfds_dir, num_steps=9, keep_latest=1), str(workdir))
  assert out2["step"] == 9
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train_loss" in r].count(2) == 1


def test_resume_after_kill_matches_uninterrupted(tfds_dir, tmp_path):
  """Killing a run and restarting it gives the same parameters as never stopping."""
  import jax
  full = tmp_path / "full"
  train.train_and_evaluate(tiny(tfds_dir, num_steps=6, async_checkpointing=False), str(full))
  part = tmp_path / "part"
  train.train_and_evaluate(tiny(tfds_dir, num_steps=6, max_seconds=1e-9,
                                async_checkpointing=False), str(part))
  stopped = max(ckpt_lib.available_steps(part))
  assert stopped < 6
  train.train_and_evaluate(tiny(tfds_dir, num_steps=6, async_checkpointing=False), str(part))
  # metrics.jsonl: one training row and one eval row per logged step after the restart.
  for path in (full, part):
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train_loss", "eval_loss"):
      steps = [r["step"] for r in rows if kind in r]
      assert len(steps) == len(set(steps)), (path, kind, steps)
  a, *_ = runs.load_run(full)
  b, *_ = runs.load_run(part)
  from flax import nnx
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_ema_update_warms_up():
  import jax.numpy as jnp
  ema, params = jnp.zeros(3), jnp.ones(3)
  # Step 0: decay min(0.999, 1/10) = 0.1, so the average is mostly the new parameters.
  np.testing.assert_allclose(train.ema_update(ema, params, 0, 0.999), 0.9, rtol=1e-6)
  # Late: the configured decay.
  np.testing.assert_allclose(train.ema_update(ema, params, 10**6, 0.999), 0.001, rtol=1e-4)


def test_ema_run_is_evaluated_and_loaded_with_its_average(tfds_dir, tmp_path):
  """With train.ema_decay the checkpoint keeps both trees; evaluation, best.json and
  load_run use the average; a restart resumes both."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  workdir = tmp_path / "ema"
  out = train.train_and_evaluate(tiny(tfds_dir, ema_decay=0.9, async_checkpointing=False),
                                 str(workdir))
  assert out["step"] == 6 and np.isfinite(out["eval_loss"])
  raw = ocp.StandardCheckpointer().restore(ckpt_lib.checkpoint_dir(workdir) / "6" / "state")
  assert ckpt_lib.read_meta(workdir, 6)["inference_params"] == "ema_params"
  model, *_ = runs.load_run(workdir, step=6)
  loaded = jax.tree.leaves(nnx.state(model))
  ema, params = jax.tree.leaves(raw["ema_params"]), jax.tree.leaves(raw["params"])
  assert len(loaded) == len(ema) == len(params)
  for x, e in zip(loaded, ema):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(e))
  assert any(not np.allclose(np.asarray(e), np.asarray(p)) for e, p in zip(ema, params))
  raw_model, *_ = runs.load_run(workdir, step=6, params_tree="params")
  for x, p in zip(jax.tree.leaves(nnx.state(raw_model)), params):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(p))
  out2 = train.train_and_evaluate(tiny(tfds_dir, ema_decay=0.9, num_steps=8,
                                       async_checkpointing=False), str(workdir))
  assert out2["step"] == 8
  # Without the average, the same workdir's checkpoint no longer fits: one clear line.
  with pytest.raises(ConfigError, match="does not fit this config.*ema_decay=0.9"):
    train.train_and_evaluate(tiny(tfds_dir, num_steps=10), str(workdir))


def test_nan_stops_with_clear_message_and_keeps_last_good(tfds_dir, tmp_path):
  workdir = tmp_path / "nan"
  train.train_and_evaluate(tiny(tfds_dir, num_steps=3), str(workdir))
  good = ckpt_lib.available_steps(workdir)
  with pytest.raises(train.TrainingDivergedError, match="loss became nan"):
    train.train_and_evaluate(tiny(tfds_dir, num_steps=8, learning_rate=1e30, warmup_steps=1),
                             str(workdir))
  assert ckpt_lib.available_steps(workdir) == good


def test_sigterm_saves_and_exits(tfds_dir, tmp_path):
  workdir = tmp_path / "term"
  cmd = [sys.executable, "-m", "midijax.cli", "train", "--config=configs/groove_tiny.py",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
         "--config.data.batch_size=4", "--config.data.seq_len=32", "--config.model.max_len=32",
         "--config.train.num_steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"]
  cmd[cmd.index("--config.train.log_every=1")] = "--config.train.log_every=50"
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step") and " loss " in line and int(line.split()[1]) >= 50:
      break
    assert time.time() < deadline, "".join(lines)
  # A loaded machine (one busy process per core): the run must still stop within 30 s of
  # the signal (a preemption notice leaves ~30 s), checkpoint written.
  load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(os.cpu_count() or 2)]
  try:
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    waited = time.time() - t0
  finally:
    for p in load:
      p.kill()
  assert proc.returncode == 0, "".join(lines) + rest
  assert waited < 30, f"{waited:.1f} s from SIGTERM to exit"
  steps = ckpt_lib.available_steps(workdir)
  assert steps and 50 <= steps[-1] < 100000
