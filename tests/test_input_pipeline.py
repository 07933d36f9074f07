"""midijax.input_pipeline on small datasets built from copies of the real corpus."""
import csv
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

import data_pipelines
from midijax import encoding, input_pipeline, midi_io
from midijax.errors import ConfigError

from conftest import copy_groove_subset

REPO = pathlib.Path(__file__).resolve().parents[1]


def _copy_groove(groove_dir, dest, per_split=6):
  copy_groove_subset(groove_dir, dest, {s: per_split for s in ("train", "validation", "test")})



def _copy_maestro(piano_dir, dest, per_split=2):
  with open(piano_dir / "maestro" / "metadata.csv", newline="") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  kept = []
  for split in ("train", "validation", "test"):
    kept += sorted((r for r in rows if r["split"] == split),
                   key=lambda r: float(r["duration"]))[:per_split]
  for row in kept:
    (dest / row["midi_filename"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(piano_dir / "maestro" / row["midi_filename"], dest / row["midi_filename"])
  with open(dest / "metadata.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)


@pytest.fixture(scope="module")
def data_dir(groove_dir, piano_dir, tmp_path_factory):
  """groove/drums, groove/performance and piano/performance_maestro, 2 shards per split."""
  src = tmp_path_factory.mktemp("src")
  _copy_groove(groove_dir, src / "groove")
  _copy_maestro(piano_dir, src / "maestro")
  out = tmp_path_factory.mktemp("tfds")
  for name, config, manual in (("groove", "drums", "groove"), ("groove", "performance", "groove"),
                               ("piano", "performance_maestro", "maestro")):
    data_pipelines.build(name, config, manual_dir=str(src / manual), data_dir=str(out),
                         num_shards=2, num_workers=2)
  return out


def make_config(data_dir, **data):
  fields = dict(name="groove", builder_config="drums", data_dir=str(data_dir), mixture=(),
                train_split="train", eval_split="validation", seq_len=64, batch_size=8,
                packing=False, transpose_semitones=0, time_stretch=0.0, velocity_scale=0.0,
                eval_batch_size=8,
                max_eval_batches=-1)
  fields.update(data)
  return ml_collections.ConfigDict({"seed": 0, "data": fields})


def take(it, n):
  return [next(it) for _ in range(n)]


def bodies(store):
  """Each piece's tokens after its prefix."""
  return [store.piece(i)[store.prefix_lengths[i]:] for i in range(len(store))]


# --------------------------------------------------------------------------- training
def test_padded_batches_shapes_masks_and_crops(data_dir):
  config = make_config(data_dir)
  it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  enc = it.encoding
  assert it.per_process_batch_shape == it.global_batch_shape == (8, 64)
  store = input_pipeline.load_split(it.specs[0].version_dir, "train")
  sources = [b.tobytes() for b in bodies(store)]
  padded_rows = 0
  for batch in take(it, 6):
    assert set(batch) == {"inputs", "targets", "weights"}
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 64)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for row, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
      full = np.concatenate([row, targets[-1:]])
      # Conditioning prefix first: BOS, style, tempo, type; never a loss target.
      assert full[0] == enc.bos_id and enc.is_condition(full[1:4]).all()
      np.testing.assert_array_equal(weights, (targets != 0) & (targets < enc.bos_id))
      assert weights[:3].sum() == 0
      body = full[4:][full[4:] != 0]
      padded_rows += len(body) < 61
      # The crop is a contiguous run of some piece's body.
      assert any(body.tobytes() in s and s.index(body.tobytes()) % 4 == 0 for s in sources)
  assert padded_rows > 0  # GMD fills are shorter than a row: padded, weight 0


def test_packed_batches_segments_positions_and_weights(data_dir):
  config = make_config(data_dir, packing=True, max_segments_per_row=6)
  it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  bos = it.encoding.bos_id
  multi = 0
  for batch in take(it, 4):
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    for name in ("segment_ids", "positions"):
      assert batch[name].shape == (8, 64) and batch[name].dtype == np.int32
    for inputs, targets, seg, pos, w in zip(*(batch[k] for k in (
        "inputs", "targets", "segment_ids", "positions", "weights"))):
      real = seg > 0
      pad_start = len(seg) if real.all() else int(np.argmin(real))
      assert not real[pad_start:].any() and (np.diff(seg[:pad_start]) >= 0).all()
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
      for s in starts:
        if seg[s] > 0:
          assert inputs[s] == bos and pos[s] == 0  # every piece keeps its prefix
      expected_pos = np.arange(64) - np.maximum.accumulate(
          np.where(np.diff(np.concatenate([[-1], seg])) != 0, np.arange(64), 0))
      np.testing.assert_array_equal(pos[real], expected_pos[real])
      boundary = np.concatenate([seg[1:] != seg[:-1], [False]])
      assert w[boundary].sum() == 0 and w[~real].sum() == 0
      assert (w[(targets >= bos) | (targets == 0)] == 0).all()
      multi += len(np.unique(seg[real])) > 1
  assert multi > 0


def test_same_seed_same_batches_and_resume(data_dir):
  def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  for packing, stretch in ((False, 0.0), (True, 0.05)):
    config = make_config(data_dir, packing=packing, time_stretch=stretch)
    full = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 7)
    resumed_it = input_pipeline.make_train_iterator(config, start_step=4, process_index=0,
                                                    process_count=1)
    assert resumed_it.step == 4
    resumed = take(resumed_it, 3)
    assert resumed_it.step == 7
    # A run resumed at step 4 sees exactly steps 4, 5, 6 of the uninterrupted run.
    assert all(same(a, b) for a, b in zip(full[4:], resumed))
    assert not same(full[0], full[1])
  again = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 7)
  assert all(same(a, b) for a, b in zip(full, again))
  config.seed = 1
  other = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 1)
  assert not same(other[0], full[0])


def test_epochs_visit_every_piece_once(data_dir):
  version_dir = input_pipeline.find_dataset_dir("groove", "drums", str(data_dir))
  store = input_pipeline.load_split(version_dir, "train")
  n = len(store)
  # Rows long enough for whole pieces, so each row names its piece.
  config = make_config(data_dir, seq_len=int(store.lengths.max()), batch_size=2)
  it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  order = []
  for batch in take(it, n):
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      full = np.concatenate([inputs, targets[-1:]])
      order += [i for i in range(n) if np.array_equal(full[:store.lengths[i]], store.piece(i))
                and not full[store.lengths[i]:].any()]
  # With one dataset and no packing, each epoch of N rows holds every piece once, and
  # the two epochs are ordered differently.
  assert len(order) == 2 * n
  assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
  assert order[:n] != order[n:]


@pytest.mark.parametrize("mode", ["tokens", "windows", "chunks"])
def test_token_sampling_draws_pieces_in_proportion_to_their_length(data_dir, mode):
  """data.piece_sampling='tokens': each row's piece with probability proportional to its
  scored tokens (every token as likely to be trained on), reproducible and resumable.
  'windows': at least a row's worth each; here every piece fits in a row, so all weigh
  the same."""
  from scipy import stats
  version_dir = input_pipeline.find_dataset_dir("groove", "drums", str(data_dir))
  store = input_pipeline.load_split(version_dir, "train")
  n = len(store)
  seq_len = int(store.lengths.max())
  config = make_config(data_dir, seq_len=seq_len, batch_size=4, piece_sampling=mode)
  batches = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1),
                 100)
  counts = np.zeros(n)
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      full = np.concatenate([inputs, targets[-1:]])
      (i,) = [i for i in range(n) if np.array_equal(full[:store.lengths[i]], store.piece(i))
              and not full[store.lengths[i]:].any()]
      counts[i] += 1
  scored = (store.lengths - store.prefix_lengths).astype(np.float64)
  weight = np.maximum(scored, seq_len) if mode == "windows" else scored
  expected = weight / weight.sum() * counts.sum()
  assert stats.chisquare(counts, expected).pvalue > 1e-3, (counts, expected)
  if mode != "windows":
    # The longest piece is drawn more often than the shortest (they differ 3x or more).
    assert scored.max() > 3 * scored.min()
    assert counts[np.argmax(scored)] > counts[np.argmin(scored)]
  resumed = take(input_pipeline.make_train_iterator(config, start_step=60, process_index=0,
                                                    process_count=1), 3)
  for a, b in zip(batches[60:63], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(input_pipeline.ConfigError, match="piece_sampling"):
    input_pipeline.make_train_iterator(make_config(data_dir, piece_sampling="pieces"),
                                       process_index=0, process_count=1)


@pytest.mark.parametrize("mode", ["tokens", "chunks"])
def test_chunk_sampling_trains_the_ends_of_long_pieces(data_dir, mode):
  """data.piece_sampling='chunks' draws as 'tokens' but places the row around a uniformly
  drawn token: a piece longer than the row ends in a row with probability (room + 1) /
  (2 * its scored tokens) a draw, against 1 / (spare + 1) for the uniform crop of
  'tokens'. Counted as EOS targets over 3,200 rows of 32 tokens, against that
  arithmetic."""
  from scipy import stats
  version_dir = input_pipeline.find_dataset_dir("groove", "drums", str(data_dir))
  store = input_pipeline.load_split(version_dir, "train")
  eos = encoding.get("drums").eos_id
  assert all(store.piece(i)[-1] == eos for i in range(len(store)))
  seq_len, rows = 32, 3200
  scored = (store.lengths - store.prefix_lengths).astype(np.float64)
  room = seq_len + 1 - store.prefix_lengths
  spare = np.maximum(scored - room, 0)
  assert (spare > 0).sum() >= 2  # pieces longer than the row, where the two differ

  def p_end_of(m):  # P(a draw's row holds its piece's EOS), pieces drawn by tokens
    ends = np.where(spare == 0, 1.0, (room + 1) / (2 * scored) if m == "chunks"
                    else 1.0 / (spare + 1))
    return float((scored / scored.sum() * ends).sum())

  p_end = p_end_of(mode)
  config = make_config(data_dir, seq_len=seq_len, batch_size=16, piece_sampling=mode)
  batches = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1),
                 rows // 16)
  seen = sum(int(((b["targets"] == eos) & (b["weights"] > 0)).sum()) for b in batches)
  assert stats.binomtest(seen, rows, p_end).pvalue > 1e-3, (seen, rows, p_end)
  if mode == "chunks":
    # The same count is far from what the uniform crop would give.
    tokens_p = p_end_of("tokens")
    assert stats.binomtest(seen, rows, tokens_p).pvalue < 1e-4, (seen, rows, tokens_p)
    for b in batches[:4]:  # every row is still its prefix then one slice of its body
      for inputs, targets, w in zip(b["inputs"], b["targets"], b["weights"]):
        full = np.concatenate([inputs, targets[-1:]])[:int((w > 0).sum()) + 1]
        assert any(np.array_equal(full[:k], store.piece(i)[:k]) and
                   full[k:].tobytes() in store.piece(i)[k:].tobytes()
                   for i in range(len(store)) for k in [int(store.prefix_lengths[i])])


def test_per_process_shares_and_shapes(data_dir):
  config = make_config(data_dir, batch_size=8)
  version_dir = input_pipeline.find_dataset_dir("groove", "drums", str(data_dir))
  full = input_pipeline.load_split(version_dir, "train")
  parts = [input_pipeline.load_split(version_dir, "train", p, 2) for p in range(2)]
  assert [len(p) for p in parts] == [len(full) // 2, len(full) - len(full) // 2]
  np.testing.assert_array_equal(np.concatenate([p.values for p in parts]), full.values)
  its = [input_pipeline.make_train_iterator(config, process_index=p, process_count=2)
         for p in range(2)]
  for it in its:
    assert it.per_process_batch_shape == (4, 64) and it.global_batch_shape == (8, 64)
    assert next(it)["inputs"].shape == (4, 64)
  with pytest.raises(ConfigError, match="multiple of the process count"):
    input_pipeline.make_train_iterator(make_config(data_dir, batch_size=6), process_index=0,
                                       process_count=4)


def test_eight_fake_devices_batch_sharding(data_dir):
  """The per-process batch becomes a global jax.Array split over 8 CPU devices."""
  script = textwrap.dedent(f"""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      os.environ["JAX_PLATFORMS"] = "cpu"
      import json
      import jax
      import ml_collections
      import numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec
      from midijax import input_pipeline
      config = ml_collections.ConfigDict({{"seed": 0, "data": {{
          "name": "groove", "builder_config": "drums", "data_dir": {str(data_dir)!r},
          "seq_len": 32, "batch_size": 16, "packing": True}}}})
      it = input_pipeline.make_train_iterator(config)  # process index/count from jax
      batch = next(it)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharding = NamedSharding(mesh, PartitionSpec("data"))
      arrays = {{k: jax.make_array_from_process_local_data(sharding, v)
                for k, v in batch.items()}}
      print(json.dumps({{
          "devices": jax.device_count(), "per_process": list(it.per_process_batch_shape),
          "global": {{k: list(a.shape) for k, a in arrays.items()}},
          "shards": sorted({{tuple(s.data.shape) for s in arrays["inputs"].addressable_shards}}),
          "equal": bool(np.array_equal(np.asarray(arrays["inputs"]), batch["inputs"]))}}))
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["per_process"] == [16, 32]
  assert all(shape == [16, 32] for shape in out["global"].values())
  assert out["shards"] == [[2, 32]] and out["equal"]


def test_mixture_weights_and_vocab_check(data_dir):
  config = make_config(data_dir, seq_len=32, batch_size=16,
                       mixture=("groove/performance:1", "piano/performance_maestro:3"))
  it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  enc = it.encoding
  maestro = enc.condition_id("dataset", "maestro")
  rows = np.concatenate([b["inputs"] for b in take(it, 20)])
  from_piano = rows[:, 1] == maestro
  from_groove = enc.is_condition(rows[:, 1]) & ~from_piano
  assert from_piano.sum() + from_groove.sum() == len(rows)
  assert from_piano.mean() == pytest.approx(0.75, abs=0.1)
  bad = make_config(data_dir, mixture=("groove/drums", "piano/performance_maestro"))
  with pytest.raises(ConfigError, match="one vocabulary"):
    input_pipeline.make_train_iterator(bad, process_index=0, process_count=1)


def test_missing_dataset_is_a_config_error(data_dir):
  with pytest.raises(ConfigError, match="midijax build-data piano"):
    input_pipeline.make_train_iterator(make_config(data_dir, name="piano", builder_config=""),
                                       process_index=0, process_count=1)


# --------------------------------------------------------------------------- augmentation
def test_transposition_and_stretch_on_ids(piano_files, groove_files):
  enc = encoding.get("performance")
  notes = midi_io.read_notes(piano_files[0]).sorted().select(np.arange(300))
  ids = enc.encode(notes)
  base = enc.decode_notes(ids)
  for k in (-3, 2):
    moved = enc.decode_notes(input_pipeline.transpose_ids(ids, k, enc))
    inside = (base.pitch + k >= enc.min_pitch) & (base.pitch + k <= enc.max_pitch)
    np.testing.assert_array_equal(np.sort(moved.pitch), np.sort(base.pitch[inside] + k))
  # Notes at the bottom of the range are dropped, NOTE_ON and NOTE_OFF alike.
  low = enc.encode(midi_io.Notes.from_arrays([21, 60], [0.0, 0.5], [1.0, 1.5]))
  out = enc.decode_notes(input_pipeline.transpose_ids(low, -2, enc))
  assert list(out.pitch) == [58]
  by_pitch = lambda n: n.select(np.lexsort((n.start, n.pitch)))  # order rounding can't swap
  for factor in (0.95, 1.05):
    stretched = by_pitch(enc.decode_notes(input_pipeline.stretch_ids(ids, factor, enc)))
    want = by_pitch(base)
    np.testing.assert_array_equal(stretched.pitch, want.pitch)
    # Every event moves to round(step * factor): within half a 10 ms step.
    np.testing.assert_allclose(stretched.start, want.start * factor, atol=0.0051)
    np.testing.assert_allclose(stretched.end, want.end * factor, atol=0.0051)
  drums = encoding.get("drums")
  hits = drums.encode(midi_io.read_notes(groove_files[0]))
  slow = drums.decode_notes(input_pipeline.stretch_ids(hits, 1.05, drums))
  np.testing.assert_allclose(slow.start, drums.decode_notes(hits).start * 1.05, atol=0.0051)
  np.testing.assert_array_equal(input_pipeline.stretch_ids(hits, 1.0, drums), hits)


def test_augmentation_never_transposes_drums(data_dir):
  groove = input_pipeline.load_split(
      input_pipeline.find_dataset_dir("groove", "performance", str(data_dir)), "train")
  piano = input_pipeline.load_split(
      input_pipeline.find_dataset_dir("piano", "performance_maestro", str(data_dir)), "train")
  assert not groove.transposable.any() and piano.transposable.all()
  plain = make_config(data_dir, builder_config="performance", seq_len=128)
  augmented = make_config(data_dir, builder_config="performance", seq_len=128,
                          transpose_semitones=3)
  a = take(input_pipeline.make_train_iterator(plain, process_index=0, process_count=1), 3)
  b = take(input_pipeline.make_train_iterator(augmented, process_index=0, process_count=1), 3)
  for x, y in zip(a, b):  # only transposition asked for, and groove has drums: no change
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  piano_cfg = make_config(data_dir, name="piano", builder_config="performance_maestro",
                          seq_len=128, transpose_semitones=3, time_stretch=0.05)
  piano_plain = make_config(data_dir, name="piano", builder_config="performance_maestro",
                            seq_len=128)
  c = next(input_pipeline.make_train_iterator(piano_cfg, process_index=0, process_count=1))
  d = next(input_pipeline.make_train_iterator(piano_plain, process_index=0, process_count=1))
  assert not np.array_equal(c["inputs"], d["inputs"])
  assert c["weights"].mean() > 0.95  # augmented crops still fill the rows


# --------------------------------------------------------------------------- evaluation
def test_eval_windows_cover_every_token_once(data_dir):
  for name, config_name in (("groove", "drums"), ("piano", "performance_maestro")):
    config = make_config(data_dir, name=name, builder_config=config_name, seq_len=48,
                         eval_batch_size=4)
    ev = input_pipeline.make_eval_iterator(config, process_index=0, process_count=1)
    store = input_pipeline.load_split(
        input_pipeline.find_dataset_dir(name, config_name, str(data_dir)), "validation")
    want = np.concatenate(bodies(store))
    batches = list(ev)
    assert len(batches) == ev.num_batches == -(-ev.num_windows // 4)
    got = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    np.testing.assert_array_equal(got, want)  # each event and EOS once, in order
    assert ev.num_targets == len(want)
    again = list(input_pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again))


def test_eval_context_windows_score_each_target_once_after_its_context(data_dir):
  context, seq_len = 16, 48
  config = make_config(data_dir, seq_len=seq_len, eval_batch_size=4, eval_context=context)
  ev = input_pipeline.make_eval_iterator(config, process_index=0, process_count=1)
  plain = input_pipeline.make_eval_iterator(
      make_config(data_dir, seq_len=seq_len, eval_batch_size=4),
      process_index=0, process_count=1)
  pieces = bodies(ev.store)
  want = np.concatenate(pieces)
  batches = list(ev)
  got = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(got, want)  # every event and EOS once, in order
  assert ev.num_targets == plain.num_targets == len(want)
  assert ev.num_windows > plain.num_windows
  # Each window: the piece's prefix, then the body tokens right before its first target
  # (none in a piece's first window, exactly `context` in every later one).
  scored = {}
  for b, rows in zip(batches, ev.batch_pieces()):
    for inputs, weights, piece in zip(b["inputs"], b["weights"], rows):
      if piece < 0:
        continue
      prefix, begin = int(ev.store.prefix_lengths[piece]), scored.get(piece, 0)
      fed = int(np.argmax(weights > 0)) + 1 - prefix  # body tokens before the first target
      assert fed == (context if begin else 0)
      np.testing.assert_array_equal(inputs[:prefix], ev.store.piece(piece)[:prefix])
      np.testing.assert_array_equal(inputs[prefix:prefix + fed], pieces[piece][begin - fed:begin])
      scored[piece] = begin + int((weights > 0).sum())
  assert scored == {i: len(x) for i, x in enumerate(pieces) if len(x)}
  bad = make_config(data_dir, seq_len=seq_len, eval_context=seq_len)
  with pytest.raises(input_pipeline.ConfigError, match="config.data.eval_context=48"):
    input_pipeline.make_eval_iterator(bad, process_index=0, process_count=1)


def test_eval_split_over_processes(data_dir):
  config = make_config(data_dir, seq_len=48, eval_batch_size=4)
  evs = [input_pipeline.make_eval_iterator(config, process_index=p, process_count=2)
         for p in range(2)]
  assert evs[0].num_batches == evs[1].num_batches
  total = sum(b["weights"].sum() for ev in evs for b in ev)
  assert total == evs[0].num_targets
  assert all(b["inputs"].shape == (2, 48) for b in evs[1])


# --------------------------------------------------------------------------- benchmark
def test_benchmark_prints_tokens_per_second(data_dir, capsys):
  spec = importlib.util.spec_from_file_location(
      "bench_input_pipeline", REPO / "benchmarks" / "input_pipeline.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  result = bench.main(["--data_dir", str(data_dir), "--steps", "5", "--warmup", "1",
                       "--seq_len", "64", "--batch_size", "8", "--packing"])
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["tokens_per_s"] == result["tokens_per_s"] > 0


# --------------------------------------------------------------------------- continuation pairs
@pytest.fixture(scope="module")
def pairs_dir(groove_dir, tmp_path_factory):
  """groove/drums_continuation (2 prompt bars, 2 target bars) of a small GMD copy."""
  src = tmp_path_factory.mktemp("pairs_src")
  _copy_groove(groove_dir, src)
  out = tmp_path_factory.mktemp("pairs_tfds")
  data_pipelines.build("groove", "drums_continuation", manual_dir=str(src), data_dir=str(out),
                       num_shards=2, num_workers=2)
  return out


def pairs_config(pairs_dir, **data):
  return make_config(pairs_dir, **{"builder_config": "drums_continuation", "seq_len": 256,
                                   **data})


def pair_store(pairs_dir, split="train"):
  return input_pipeline.load_split(
      input_pipeline.find_dataset_dir("groove", "drums_continuation", str(pairs_dir)), split)


def which_piece(store, full):
  """The piece whose head (prefix + prompt) starts `full` (as far as `full` goes: the last
  piece of a packed row may be cut)."""
  found = [i for i in range(len(store)) if np.array_equal(
      full[:store.head_lengths[i]], store.piece(i)[:min(store.head_lengths[i], len(full))])]
  assert found, "a row that does not start with a piece's prefix and prompt"
  return found[0]


def test_pairs_score_only_the_target_after_the_whole_prompt(pairs_dir):
  store = pair_store(pairs_dir)
  assert store.is_pair.all() and (store.head_lengths > store.prefix_lengths + 10).all()
  enc = encoding.load_vocab(input_pipeline.find_dataset_dir(
      "groove", "drums_continuation", str(pairs_dir)) / "vocab.json")
  assert not (store.values == enc.eos_id).any()  # the music goes on after the target
  it = input_pipeline.make_train_iterator(pairs_config(pairs_dir), process_index=0,
                                          process_count=1)
  for batch in take(it, 3):
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
      full = np.concatenate([inputs, targets[-1:]])
      i = which_piece(store, full)
      head, length = int(store.head_lengths[i]), int(store.lengths[i])
      # No crop: the row is the piece from its start, cut at the row's end.
      n = min(length, 257)
      np.testing.assert_array_equal(full[:n], store.piece(i)[:n])
      # Weights: 0 on the prefix and the prompt, 1 on every target token in the row.
      want = np.zeros(256, np.float32)
      want[head - 1:n - 1] = 1
      np.testing.assert_array_equal(weights, want)


def test_pairs_packing_and_seed_step_order(pairs_dir):
  store = pair_store(pairs_dir)
  config = pairs_config(pairs_dir, packing=True, max_segments_per_row=4)
  full = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 5)
  resumed = take(input_pipeline.make_train_iterator(config, start_step=3, process_index=0,
                                                    process_count=1), 2)
  for a, b in zip(full[3:], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  packed = 0
  for batch in full:
    for inputs, targets, seg, pos, w in zip(*(batch[k] for k in (
        "inputs", "targets", "segment_ids", "positions", "weights"))):
      row = np.concatenate([inputs, targets[-1:]])
      for s in np.unique(seg[seg > 0]):
        cols = np.flatnonzero(seg == s)
        i = which_piece(store, row[cols[0]:cols[-1] + 2])
        head = int(store.head_lengths[i])
        # Within a segment: nothing scored before its target, the target scored.
        scored = w[cols] > 0
        np.testing.assert_array_equal(scored[:head - 1], False)
        assert pos[cols[0]] == 0
        if len(cols) > head:
          assert scored[head - 1:len(cols) - 1].all()
      packed += len(np.unique(seg[seg > 0])) > 1
  assert packed > 0


def test_pairs_eval_scores_each_target_once_given_its_prompt(pairs_dir):
  store = pair_store(pairs_dir, "validation")
  ev = input_pipeline.make_eval_iterator(pairs_config(pairs_dir, eval_batch_size=4),
                                         process_index=0, process_count=1)
  assert ev.num_windows == len(store)
  room = 257 - store.head_lengths
  want = np.concatenate([store.piece(i)[store.head_lengths[i]:][:room[i]]
                         for i in range(len(store))])
  got = np.concatenate([b["targets"][b["weights"] > 0] for b in ev])
  np.testing.assert_array_equal(got, want)
  assert ev.num_targets == len(want)
  assert ev.num_cut_targets == int((store.lengths - store.head_lengths).sum()) - len(want)


def test_pairs_prompt_longer_than_the_window_and_augmentation_are_errors(pairs_dir):
  with pytest.raises(ConfigError, match=r"config.data.seq_len=64 is shorter than the longest "
                                        r"continuation prompt .*prompt_bars"):
    input_pipeline.make_train_iterator(pairs_config(pairs_dir, seq_len=64), process_index=0,
                                       process_count=1)
  with pytest.raises(ConfigError, match="config.data.seq_len=64 is shorter"):
    input_pipeline.make_eval_iterator(pairs_config(pairs_dir, seq_len=64), process_index=0,
                                      process_count=1)
  with pytest.raises(ConfigError,
                     match="time_stretch / velocity_scale: continuation pairs are not augmented"):
    input_pipeline.make_train_iterator(pairs_config(pairs_dir, time_stretch=0.05),
                                       process_index=0, process_count=1)


def test_velocity_scaling_on_ids(groove_files):
  drums = encoding.get("drums")
  hits = drums.encode(midi_io.read_notes(groove_files[0]))
  base = drums.decode_notes(hits)
  np.testing.assert_array_equal(input_pipeline.scale_velocity_ids(hits, 1.0, drums), hits)
  for factor in (0.8, 1.15):
    ids = input_pipeline.scale_velocity_ids(hits, factor, drums)
    out = drums.decode_notes(ids)
    # Same hits at the same times; each bin b becomes round(b * factor), clipped.
    np.testing.assert_array_equal(out.pitch, base.pitch)
    np.testing.assert_array_equal(out.start, base.start)
    b = (base.velocity - 1) // drums.velocity_bin_size + 1
    want = np.clip(np.round(b * factor), 1, drums.num_velocity_bins)
    np.testing.assert_array_equal((out.velocity - 1) // drums.velocity_bin_size + 1, want)
    # As the encoder writes them: a VELOCITY token only where the velocity changes.
    np.testing.assert_array_equal(ids, drums.encode(out))


def test_velocity_power_curve_keeps_the_top_and_bottom_bins(groove_files):
  drums = encoding.get("drums")
  hits = drums.encode(midi_io.read_notes(groove_files[0]))
  base = drums.decode_notes(hits)
  bins = drums.num_velocity_bins
  b = (base.velocity - 1) // drums.velocity_bin_size + 1
  np.testing.assert_array_equal(
      input_pipeline.scale_velocity_ids(hits, 1.0, drums, "power"), hits)
  for factor in (0.9, 1.1):
    out = drums.decode_notes(input_pipeline.scale_velocity_ids(hits, factor, drums, "power"))
    np.testing.assert_array_equal(out.pitch, base.pitch)
    np.testing.assert_array_equal(out.start, base.start)
    got = (out.velocity - 1) // drums.velocity_bin_size + 1
    np.testing.assert_array_equal(got, np.round(bins * (b / bins) ** (1 / factor)))
    # The ceiling and the floor stay; louder moves the middle up, softer down.
    assert np.array_equal(got[b == bins], b[b == bins]) and np.all(got[b == 1] == 1)
    middle = (b > 4) & (b < bins - 4)
    assert np.all(np.sign(got[middle] - b[middle]) * np.sign(factor - 1) >= 0)
    assert np.any(got[middle] != b[middle])
  with pytest.raises(ValueError, match="velocity curve"):
    input_pipeline.scale_velocity_ids(hits, 1.1, drums, "cubic")


def test_velocity_curve_in_training_batches(data_dir):
  linear = take(input_pipeline.make_train_iterator(
      make_config(data_dir, velocity_scale=0.2), process_index=0, process_count=1), 2)
  power = take(input_pipeline.make_train_iterator(
      make_config(data_dir, velocity_scale=0.2, velocity_curve="power"), process_index=0,
      process_count=1), 2)
  drums = encoding.get("drums")
  top = drums.velocity_base + drums.num_velocity_bins - 1
  top_share = lambda batches: np.mean([np.mean(x["inputs"][x["inputs"] >= drums.velocity_base]
                                               == top) for x in batches])
  assert not np.array_equal(linear[0]["inputs"], power[0]["inputs"])
  assert top_share(power) > 0
  with pytest.raises(ConfigError, match=r"config.data.velocity_curve='cubic'"):
    input_pipeline.make_train_iterator(make_config(data_dir, velocity_curve="cubic"),
                                       process_index=0, process_count=1)


def test_velocity_scaling_in_training_batches(data_dir):
  config = make_config(data_dir, velocity_scale=0.2)
  plain = take(input_pipeline.make_train_iterator(make_config(data_dir), process_index=0,
                                                  process_count=1), 2)
  scaled = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 2)
  drums = encoding.get("drums")
  vel = lambda b: b["inputs"][(b["inputs"] >= drums.velocity_base) & (b["weights"] > 0)]
  assert not np.array_equal(vel(plain[0]), vel(scaled[0]))
  hit = lambda b: np.sort(b["inputs"][(b["inputs"] < drums.shift_base) &
                                      (b["inputs"] >= drums.drum_base)])
  # Hits are the same pieces' hits (crops may shift by the dropped velocity tokens).
  assert abs(len(hit(plain[0])) - len(hit(scaled[0]))) < 0.1 * len(hit(plain[0]))
  again = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 2)
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(scaled, again) for k in a)
  with pytest.raises(ConfigError, match=r"^config\.data\.velocity_scale=1\.5 must be in \[0, 1\)$"):
    input_pipeline.make_train_iterator(make_config(data_dir, velocity_scale=1.5),
                                       process_index=0, process_count=1)


@pytest.mark.parametrize("field,value", [("seq_len", 1), ("transpose_semitones", -1),
                                         ("time_stretch", 1.0), ("velocity_scale", -0.1)])
def test_a_bad_augmentation_or_row_field_is_named_alone(data_dir, field, value):
  with pytest.raises(ConfigError) as err:
    input_pipeline.make_train_iterator(make_config(data_dir, **{field: value}),
                                       process_index=0, process_count=1)
  assert str(err.value).startswith(f"config.data.{field}={value} must be ")
  # Only the field that is wrong is named.
  others = {"seq_len", "transpose_semitones", "time_stretch", "velocity_scale"} - {field}
  assert not any(o in str(err.value) for o in others)


def test_input_noise_replaces_inputs_within_their_kind(data_dir):
  plain = take(input_pipeline.make_train_iterator(make_config(data_dir), process_index=0,
                                                  process_count=1), 2)
  config = make_config(data_dir, input_noise=0.3)
  noisy = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 2)
  drums = encoding.get("drums")
  kinds = input_pipeline.noise_kinds(drums)
  assert kinds == [(drums.drum_base, drums.shift_base),
                   (drums.velocity_base, drums.velocity_base + drums.num_velocity_bins)]
  kind_of = lambda x: sum(k * ((x >= lo) & (x < hi)) for k, (lo, hi) in enumerate(kinds, 1))
  changed = replaceable = 0
  for a, b in zip(plain, noisy):
    # The targets, weights and every other input are the batches without noise.
    for key in ("targets", "weights"):
      np.testing.assert_array_equal(a[key], b[key])
    diff = a["inputs"] != b["inputs"]
    assert np.all(kind_of(a["inputs"][diff]) > 0)
    np.testing.assert_array_equal(kind_of(a["inputs"]), kind_of(b["inputs"]))
    changed += diff.sum()
    replaceable += (kind_of(a["inputs"]) > 0).sum()
  # A replacement draws uniformly within its kind (9 drums, 32 velocities), so a few
  # draw the token they replace: about 0.3 * (1 - 1/n) of the tokens change.
  assert 0.2 < changed / replaceable < 0.32
  again = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 2)
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(noisy, again) for k in a)
  with pytest.raises(ConfigError, match=r"config.data.input_noise=1.5"):
    input_pipeline.make_train_iterator(make_config(data_dir, input_noise=1.5),
                                       process_index=0, process_count=1)
