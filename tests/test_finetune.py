"""Fine-tuning and run records: init_from, trainable parameters, LoRA adapters,
continuation NLL, compare-runs, reproduce and export, on tiny runs trained on real Groove
data.

Bad input (a source run that is missing, damaged or of another architecture, a pattern
matching no parameter, a prompt longer than the window, a folder that is not a run) gets
one line and exit status 2, and nothing is written.
"""
import contextlib
import io
import json
import shutil

from flax import nnx
import jax
import numpy as np
import pytest

import configs.groove_tiny as groove_tiny
import data_pipelines
from midijax import checkpoint as ckpt_lib
from midijax import cli, encoding, experiments, finetune, input_pipeline, runs, sharding, train
from midijax.errors import ConfigError, MidijaxError
from midijax.models import transformer

from conftest import REPO, copy_groove_subset

PAIRS = "groove/drums_continuation"


@pytest.fixture(scope="module")
def data_dir(groove_tfds, groove_dir, tmp_path_factory):
  """groove_tfds (groove/drums) plus groove/drums_continuation of the same GMD files."""
  src = tmp_path_factory.mktemp("pairs_src")
  copy_groove_subset(groove_dir, src, {"train": 16, "validation": 4, "test": 4})
  data_pipelines.build("groove", "drums_continuation", manual_dir=str(src),
                       data_dir=str(groove_tfds), num_shards=2, num_workers=2)
  return groove_tfds


def tiny(data_dir, pairs: bool = False, **train_fields):
  """groove_tiny, 4 steps; on the continuation pairs with rows of 256 tokens."""
  config = groove_tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.batch_size = 4
  config.data.max_eval_batches = 2
  config.data.seq_len = 256 if pairs else 32
  config.model.max_len = 256
  if pairs:
    config.data.builder_config = "drums_continuation"
  config.train.update(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2,
                      warmup_steps=1, async_checkpointing=False)
  config.train.update(**train_fields)
  return config


def params_of(workdir, step=None):
  model, *_ = runs.load_run(workdir, step=step)
  state = nnx.state(model)
  return dict(zip(finetune.param_paths(state), (np.asarray(x) for x in jax.tree.leaves(state))))


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained") / "run"
  train.train_and_evaluate(tiny(data_dir), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def finetuned(data_dir, pretrained, tmp_path_factory):
  """Fine-tuned on the pairs from the pretrained run's best checkpoint, training only the
  output projection and the final norm."""
  workdir = tmp_path_factory.mktemp("finetuned") / "run"
  train.train_and_evaluate(tiny(data_dir, pairs=True, init_from=f"{pretrained}:best",
                                trainable="output|final_norm/scale"), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def lora_run(data_dir, pretrained, tmp_path_factory):
  """LoRA (rank 4) on the pairs from the (unscanned) pretrained run into a scanned,
  rematerialized model, training only the adapters. Returns (workdir, its stdout)."""
  workdir = tmp_path_factory.mktemp("lora") / "run"
  config = tiny(data_dir, pairs=True, init_from=f"{pretrained}:best", trainable=".*lora_[ab]",
                learning_rate=1e-2)
  config.model.update(lora_rank=4, scan_layers=True, remat_policy="save_dots")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, str(workdir))
  return workdir, out.getvalue()


def one_line_error(capsys, command: str) -> str:
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"midijax {command}: error: ") and "\n" not in err, err
  return err


# ----------------------------------------------------------------------------- init_from, trainable
def test_init_from_and_frozen_parameters_stay_bit_identical(pretrained, finetuned):
  before, after = params_of(pretrained, ckpt_lib.best_step(pretrained)), params_of(finetuned)
  assert before.keys() == after.keys()
  trained = {"output", "final_norm/scale"}
  for path in before:
    if path in trained:
      assert not np.array_equal(before[path], after[path]), path
    else:  # started from the pretrained values, and never moved by a single bit
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)
  info = json.loads((finetuned / "run_info.json").read_text())
  assert info["init_from"]["step"] == ckpt_lib.best_step(pretrained)
  assert info["init_from"]["vocabulary"] == {"copied": 205, "initialised": 0,
                                             "initialised_tokens": []}
  assert info["params"] == {"total": sum(v.size for v in before.values()),
                            "trainable": sum(before[p].size for p in trained),
                            "trainable_pattern": "output|final_norm/scale"}
  # Frozen parameters have no optimizer state: the checkpoint is smaller.
  pre_info = json.loads((pretrained / "run_info.json").read_text())
  assert 0 < info["checkpoint_bytes"] < pre_info["checkpoint_bytes"]


def test_init_from_resumes_exactly_then_ignores_the_source(data_dir, pretrained, finetuned,
                                                          tmp_path):
  """`finetuned` stopped before its 4 steps and restarted: the same parameters."""
  source = tmp_path / "source"
  shutil.copytree(pretrained, source)
  config = lambda **kw: tiny(data_dir, pairs=True, trainable="output|final_norm/scale",
                             init_from=f"{source}:{ckpt_lib.best_step(pretrained)}", **kw)
  part = tmp_path / "part"
  train.train_and_evaluate(config(max_seconds=1e-9), str(part))
  assert 0 < ckpt_lib.available_steps(part)[-1] < 4
  # The new run has checkpoints: it resumes from them, even with the source gone.
  source.rename(tmp_path / "gone")
  assert train.train_and_evaluate(config(), str(part))["step"] == 4
  a, b = params_of(finetuned), params_of(part)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  info = json.loads((part / "run_info.json").read_text())
  assert info["init_from"]["workdir"] == str(source)  # the run's history is kept


def test_bad_init_from_is_one_line_and_writes_nothing(data_dir, pretrained, tmp_path, capsys):
  damaged = tmp_path / "damaged"
  shutil.copytree(pretrained, damaged)
  (damaged / "config.json").write_text("{not json")
  no_arrays = tmp_path / "no_arrays"
  shutil.copytree(pretrained, no_arrays)
  for p in (no_arrays / "checkpoints" / "4" / "state").iterdir():  # the arrays, not the folder
    if p.is_dir():
      shutil.rmtree(p)
    else:
      p.unlink()
  cases = [
      ([f"--config.train.init_from={tmp_path / 'nothing'}"], "not a midijax run"),
      ([f"--config.train.init_from={pretrained}:999"], "no checkpoint at step 999"),
      ([f"--config.train.init_from={pretrained}", "--config.model.num_layers=2"],
       "another architecture: config.model.num_layers=2 but 1 there"),
      ([f"--config.train.init_from={pretrained}", "--config.model.position=sinusoidal"],
       "config.model.position='sinusoidal' but 'rope' there"),
      ([f"--config.train.init_from={damaged}"], "the run is damaged"),
      ([f"--config.train.init_from={no_arrays}"], "cannot load the run"),
      (["--config.train.trainable=attention/nothing"],
       "config.train.trainable='attention/nothing' matches no parameter"),
      (["--config.train.trainable=(output"], "is not a regular expression"),
      # LoRA adapters are not an architecture change; a LoRA model's layers still are.
      ([f"--config.train.init_from={pretrained}", "--config.model.lora_rank=4",
        "--config.model.num_layers=2"],
       "another architecture: config.model.num_layers=2 but 1 there"),
      (["--config.model.lora_rank=33"],
       "config.model.lora_rank=33 is above the width it adapts: config.model.emb_dim=32"),
  ]
  for i, (flags, message) in enumerate(cases):
    workdir = tmp_path / f"new{i}"
    status = cli.main(["train", f"--config={REPO / 'configs' / 'groove_tiny.py'}",
                       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                       "--config.data.seq_len=32", "--config.model.max_len=256", *flags])
    err = one_line_error(capsys, "train")
    assert status == 2 and message in err, (flags, err)
    assert not workdir.exists(), err
    if "init_from" in flags[0]:
      assert "config.train.init_from=" in err, err


def test_init_from_refuses_a_source_whose_time_shifts_mean_something_else(pretrained):
  """groove/drums counts 10 ms steps; data counted in beats has tokens of the same names."""
  source = finetune.resolve_init_from(f"{pretrained}:best")
  beats = encoding.get("drums", time_unit="beats")
  with pytest.raises(MidijaxError, match=r"init_from=.*count seconds .* count beats"):
    finetune.load_init_params(source, None, None, beats.vocab.names, runs.inference_mesh(),
                              sharding.get_logical_axis_rules(None), new_encoding=beats)


def test_trainable_pattern_lists_paths():
  config = groove_tiny.get_config()
  config.train.trainable = "blocks/7/.*"
  mesh = runs.inference_mesh()
  with pytest.raises(ConfigError, match=r"matches no parameter .* blocks/0/attention/key, "):
    train.create_train_state(config, 205, mesh, sharding.get_logical_axis_rules(None),
                             abstract=True)
  config.train.trainable = "blocks/0/mlp/w.|embedding"
  setup, _ = train.create_train_state(config, 205, mesh, sharding.get_logical_axis_rules(None),
                                      abstract=True)
  paths = finetune.param_paths(nnx.split(nnx.eval_shape(lambda: transformer.Transformer(
      setup.model_config, rngs=nnx.Rngs(0))))[1])
  assert [p for p, t in zip(paths, setup.trainable) if t] == [
      "blocks/0/mlp/wi", "blocks/0/mlp/wo", "embedding"]


def test_vocabulary_rows_are_copied_by_token_name():
  """Source: a `drums` model; target: a `performance` model. Shared tokens (time shifts,
  velocities, BOS, conditioning) keep their rows; the rest keep their fresh values."""
  drums, perf = encoding.get("drums"), encoding.get("performance")
  mesh, rules = runs.inference_mesh(), sharding.get_logical_axis_rules(None)

  def params(enc, seed):
    cfg = transformer.TransformerConfig(vocab_size=enc.vocab_size, emb_dim=16, qkv_dim=16,
                                        num_heads=2, num_layers=1, mlp_dim=32, max_len=32)
    return nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(seed)))[1]

  source, fresh = params(drums, 0), params(perf, 1)
  vocab = finetune.map_vocabulary(perf.vocab.names, drums.vocab.names)
  shared = set(perf.vocab.names) & set(drums.vocab.names)
  assert len(vocab.new_ids) == len(shared) > 100
  assert set(vocab.initialised) == set(perf.vocab.names) - shared
  out = finetune.transfer_params(fresh, source, vocab, sharding.state_shardings(fresh, mesh, rules))
  src = dict(zip(finetune.param_paths(source), map(np.asarray, jax.tree.leaves(source))))
  new = dict(zip(finetune.param_paths(fresh), map(np.asarray, jax.tree.leaves(fresh))))
  got = dict(zip(finetune.param_paths(out), map(np.asarray, jax.tree.leaves(out))))
  for name in ("TIME_SHIFT_7", "VELOCITY_3", "BOS", "STYLE_funk"):
    i, j = perf.vocab[name], drums.vocab[name]
    np.testing.assert_array_equal(got["embedding"][i], src["embedding"][j])
    np.testing.assert_array_equal(got["output"][:, i], src["output"][:, j])
  i = perf.vocab["NOTE_ON_60"]
  np.testing.assert_array_equal(got["embedding"][i], new["embedding"][i])
  np.testing.assert_array_equal(got["blocks/0/mlp/wi"], src["blocks/0/mlp/wi"])


# ----------------------------------------------------------------------------- LoRA
def test_lora_from_a_run_without_adapters_trains_only_the_adapters(pretrained, lora_run):
  workdir, stdout = lora_run
  before = params_of(pretrained, ckpt_lib.best_step(pretrained))
  after = params_of(workdir)  # scanned: blocks/attention/query is [layers, ...]
  adapters = {p for p in after if transformer.is_lora_path(p)}
  assert adapters == {f"blocks/{k}_lora_{ab}" for ab in "ab" for k in (
      "attention/query", "attention/key", "attention/value", "attention/out", "mlp/wi",
      "mlp/wo")}
  for path in adapters:  # trained away from their start (B = 0)
    assert np.abs(after[path]).max() > 0, path
  base = {p: v for p, v in after.items() if p not in adapters}
  assert len(base) == len(before)
  for path, value in base.items():  # the pretrained parameters, not a bit changed
    if path.startswith("blocks/"):  # stacked from the pretrained run's one layer
      expected = np.stack([before[path.replace("blocks/", "blocks/0/", 1)]])
    else:
      expected = before[path]
    if path == "output":  # padding columns keep their fresh values (transfer_params)
      value, expected = value[:, :205], expected[:, :205]
    np.testing.assert_array_equal(value, expected, err_msg=path)
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["params"]["trainable"] == sum(after[p].size for p in adapters) == 1792
  assert info["params"]["total"] == sum(v.size for v in after.values())
  assert info["init_from"]["lora"] == {
      "lora_rank": 4, "lora_alpha": 16.0, "initialised": 12, "initialised_params": 1792,
      "copied": 0, "source_lora_rank": 0, "source_adapters_merged": False}
  assert ("init_from: LoRA adapters (config.model.lora_rank=4, lora_alpha=16): 12 adapter "
          "matrices (1,792 parameters) freshly initialised") in stdout
  # The checkpoint holds optimizer state for the adapters only.
  pre_info = json.loads((pretrained / "run_info.json").read_text())
  assert 0 < info["checkpoint_bytes"] < pre_info["checkpoint_bytes"]


def test_export_merges_the_adapters_into_a_plain_model_that_generates(data_dir, lora_run,
                                                                     tmp_path, capsys):
  workdir, _ = lora_run
  out = tmp_path / "merged"
  assert cli.main(["export", "--workdir", str(workdir), "--best", "--out", str(out)]) == 0
  assert "LoRA adapters (rank 4, alpha 16) merged into their kernels" in capsys.readouterr().out
  config = json.loads((out / "config.json").read_text())
  assert config["model"]["lora_rank"] == 0 and config["model"]["scan_layers"]
  assert json.loads((out / "run_info.json").read_text())["exported_from"]["lora_merged"] == {
      "rank": 4, "alpha": 16.0}
  merged = params_of(out)
  assert not any(transformer.is_lora_path(p) for p in merged)
  # The same function: logits of real continuation pairs.
  store = input_pipeline.load_split(input_pipeline.find_dataset_dir(
      "groove", "drums_continuation", str(data_dir)), "test")
  rows = np.zeros((4, 256), np.int32)
  for i in range(4):
    piece = store.piece(i)[:256]
    rows[i, :len(piece)] = piece
  adapted_model, *_ = runs.load_run(workdir, best=True)
  merged_model, *_ = runs.load_run(out)
  assert adapted_model.config.lora_rank == 4 and merged_model.config.lora_rank == 0
  adapted = np.asarray(adapted_model(rows, deterministic=True))
  np.testing.assert_allclose(np.asarray(merged_model(rows, deterministic=True)), adapted,
                             atol=1e-5, rtol=0)
  # ... which the trained adapters change: the base parameters alone give other logits.
  base_model = transformer.Transformer(adapted_model.config.replace(lora_rank=0),
                                       rngs=nnx.Rngs(0))
  nnx.update(base_model, nnx.from_flat_state({
      path: var for path, var in nnx.to_flat_state(nnx.state(adapted_model))
      if not transformer.is_lora_path(str(path[-1]))}))
  assert np.abs(adapted - np.asarray(base_model(rows, deterministic=True))).max() > 1e-3
  # `generate` loads the exported run like any other.
  gen = tmp_path / "gen"
  assert cli.main(["generate", "--workdir", str(out), "--num_samples", "1", "--max_tokens",
                   "24", "--seed", "1", "--out", str(gen)]) == 0, capsys.readouterr().err
  assert json.loads((gen / "generate.json").read_text())["checkpoint_step"] == \
      ckpt_lib.best_step(workdir)
  assert (gen / "sample_00.mid").exists()


def test_reproduce_an_export_trains_its_source_and_exports_the_same(lora_run, tmp_path,
                                                                   capsys):
  """An export's config.json is the merged model's (lora_rank 0), not how it was trained:
  `reproduce` trains the source's recorded config, and exporting the new run at the same
  step gives the same parameters bit for bit."""
  workdir, _ = lora_run
  out = tmp_path / "merged"
  assert cli.main(["export", "--workdir", str(workdir), "--best", "--out", str(out)]) == 0
  step = ckpt_lib.best_step(out)
  capsys.readouterr()
  new = tmp_path / "again"
  assert cli.main(["reproduce", str(out), "--workdir", str(new)]) == 0
  assert f"is an export of {workdir} at step {step}" in capsys.readouterr().out
  assert json.loads((new / "config.json").read_text())["model"]["lora_rank"] == 4
  again = tmp_path / "again_merged"
  assert cli.main(["export", "--workdir", str(new), "--step", str(step), "--out",
                   str(again)]) == 0
  a, b = params_of(out), params_of(again)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  # An export of the export still names the run that trained (and its config).
  twice = tmp_path / "merged_twice"
  assert cli.main(["export", "--workdir", str(out), "--out", str(twice)]) == 0
  record = json.loads((twice / "run_info.json").read_text())["exported_from"]
  assert (record["workdir"], record["step"]) == (str(workdir), step)
  assert record["config"]["model"]["lora_rank"] == 4 and record["lora_merged"]["rank"] == 4
  # An export from before the record: one clear line naming the run to reproduce.
  info = json.loads((out / "run_info.json").read_text())
  del info["exported_from"]["config"]
  (out / "run_info.json").write_text(json.dumps(info))
  capsys.readouterr()
  assert cli.main(["reproduce", str(out), "--workdir", str(tmp_path / "x")]) == 2
  assert f"reproduce {workdir} instead" in one_line_error(capsys, "reproduce")


# ----------------------------------------------------------------------------- evaluate
def test_continuation_nll_is_the_target_nll_given_the_real_prompt(data_dir, pretrained,
                                                                  finetuned, tmp_path, capsys):
  results = {}
  for name, workdir in (("pretrained", pretrained), ("finetuned", finetuned)):
    out = tmp_path / name
    assert cli.main(["evaluate", "--task", "continuation", "--workdir", str(workdir),
                     "--data", PAIRS, "--seq_len", "256", "--data_dir", str(data_dir),
                     "--out", str(out)]) == 0
    results[name] = json.loads((out / "continuation_drums_continuation_test.json").read_text())
  a, b = results["pretrained"], results["finetuned"]
  assert a["tokens"] == b["tokens"] > 0 and a["pairs"] == b["pairs"] > 0  # the same windows
  # Against a direct sum: -log p(target token | BOS, conditioning, prompt, earlier targets).
  model, *_ = runs.load_run(finetuned)
  store = input_pipeline.load_split(input_pipeline.find_dataset_dir(
      "groove", "drums_continuation", str(data_dir)), "test")
  rows = np.zeros((len(store), 257), np.int32)
  for i in range(len(store)):
    piece = store.piece(i)[:257]
    rows[i, :len(piece)] = piece
  logits = np.asarray(model(rows[:, :-1], deterministic=True), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  is_note = encoding.note_token_mask(encoding.get("drums"))
  total = count = notes = 0.0
  for i in range(len(store)):
    head, end = int(store.head_lengths[i]), min(int(store.lengths[i]), 257)
    targets = rows[i, head:end]
    total -= logp[i, np.arange(head - 1, end - 1), targets].sum()
    count += len(targets)
    notes += is_note[targets].sum()
  assert b["tokens"] == count and b["notes"] == notes
  assert b["nll_per_token"] == pytest.approx(total / count, rel=1e-4)
  assert b["nll_per_note"] == pytest.approx(total / notes, rel=1e-4)
  assert cli.main(["evaluate", "--task", "continuation", "--workdir", str(finetuned),
                   "--data", PAIRS, "--seq_len", "64", "--data_dir", str(data_dir),
                   "--out", str(tmp_path / "short")]) == 2
  assert "--seq_len=64 is shorter than the longest continuation prompt" in one_line_error(
      capsys, "evaluate")
  assert not (tmp_path / "short").exists()


# ----------------------------------------------------------------------------- runs side by side, again
def test_compare_runs_table_plot_and_errors(pretrained, finetuned, tmp_path, capsys):
  png = tmp_path / "curves.png"
  assert cli.main(["compare-runs", str(pretrained), str(finetuned), "--out", str(png)]) == 0
  table = capsys.readouterr().out
  rows = [json.loads(l) for l in (pretrained / "metrics.jsonl").read_text().splitlines()]
  best = min(r["eval_loss"] for r in rows if "eval_loss" in r)
  assert f"{best:.4f}" in table and "(reference)" in table
  line = next(l for l in table.splitlines() if "train.init_from=" in l)
  assert line.startswith("finetuned0/run ")  # two runs called "run": their parents tell them apart
  assert "train.trainable=output|final_norm/scale" in line and "data.seq_len=256" in line
  assert "train.num_steps" not in line  # only the fields that differ
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Another encoding: NLL per token is not comparable, NLL per note is shown.
  other = tmp_path / "other"
  shutil.copytree(pretrained, other)
  vocab = json.loads((other / "vocab.json").read_text())
  vocab["tokens"] = vocab["tokens"] + ["EXTRA"]
  (other / "vocab.json").write_text(json.dumps(vocab))
  result = experiments.compare_runs([pretrained, other])
  assert result["metric"] == "eval_nll_per_note" and not result["comparable_per_token"]
  assert result["runs"][0]["best"] == min(r["eval_nll_per_note"] for r in rows
                                          if "eval_nll_per_note" in r)
  assert "not comparable" in experiments.format_comparison(result)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert cli.main(["compare-runs", str(pretrained), str(empty), "--out",
                   str(tmp_path / "none.png")]) == 2
  assert "not a midijax run" in one_line_error(capsys, "compare-runs")
  assert not (tmp_path / "none.png").exists()


def test_reproduce_gives_the_same_first_checkpoint_bit_for_bit(pretrained, tmp_path, capsys):
  new = tmp_path / "again"
  assert cli.main(["reproduce", str(pretrained), "--workdir", str(new)]) == 0
  first = ckpt_lib.available_steps(pretrained)[0]
  assert first == ckpt_lib.available_steps(new)[0]
  a, b = params_of(pretrained, first), params_of(new, first)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  assert json.loads((new / "run_info.json").read_text())["reproduced_from"] == str(pretrained)
  capsys.readouterr()
  assert cli.main(["reproduce", str(pretrained), "--workdir", str(new)]) == 2
  assert "already holds a run" in one_line_error(capsys, "reproduce")
  recorded = {"git_commit": "abc", "versions": {"jax": "0.4.1", "flax": "0.12.8"},
              "python": "3.10.0"}
  now = {"git_commit": "def", "git_dirty": True, "versions": {"jax": "0.10.2", "flax": "0.12.8",
                                                             "optax": "0.2.8"}, "python": "3.11.7"}
  lines = experiments.environment_differences(recorded, now)
  assert lines == ["git commit: abc when recorded, def now",
                   "the working tree has uncommitted changes now: the code may differ from its "
                   "commit", "jax: 0.4.1 when recorded, 0.10.2 now",
                   "optax: not installed when recorded, 0.2.8 now",
                   "Python: 3.10.0 when recorded, 3.11.7 now"]


def test_export_writes_a_plain_smaller_checkpoint(finetuned, tmp_path, capsys):
  out = tmp_path / "exported"
  assert cli.main(["export", "--workdir", str(finetuned), "--best", "--out", str(out)]) == 0
  assert "MiB" in capsys.readouterr().out
  a, b = params_of(finetuned, ckpt_lib.best_step(finetuned)), params_of(out)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  step = ckpt_lib.best_step(out)
  assert step == ckpt_lib.best_step(finetuned)
  assert (finetune.directory_bytes(ckpt_lib.checkpoint_dir(out) / str(step)) <
          finetune.directory_bytes(ckpt_lib.checkpoint_dir(finetuned) / str(step)))
  assert cli.main(["export", "--workdir", str(finetuned), "--out", str(out)]) == 2
  assert "already holds a run" in one_line_error(capsys, "export")


def test_continuation_configs_load_and_validate():
  path = REPO / "configs" / "groove_continuation.py"
  for arg in ("finetune", "scratch", "lora", "finetune,tiny", "scratch,tiny", "lora,tiny"):
    config = cli.load_config(f"{path}:{arg}")
    train.validate_config(config, num_devices=1)
    assert config.data.builder_config == "drums_continuation_funk"
    assert bool(config.train.init_from) == (not arg.startswith("scratch"))
    lora = arg.startswith("lora")
    assert (config.model.lora_rank, config.train.trainable) == (
        (8, ".*lora_[ab]") if lora else (0, ""))
    small = cli.load_config(str(REPO / "configs" / ("groove_tiny.py" if "tiny" in arg
                                                    else "groove_small.py")))
    for field in finetune.ARCHITECTURE_FIELDS:  # init_from the pretraining config works
      assert config.model.get(field) == small.model.get(field), field
  with pytest.raises(ConfigError, match="expected finetune | scratch | lora"):
    cli.load_config(f"{path}:other")
