"""The TFDS builders (data_pipelines/) on small copies of the real corpus in tmp_path.

Every build writes into its own temporary TFDS data dir; the real corpus is only read.
"""
import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_pipelines
from data_pipelines import common
from midijax import encoding, midi_io
from midijax.encoding import drum_map
from midijax.errors import MidijaxError
from midijax.notes import Notes

from conftest import IN_CI
from conftest import copy_groove_subset as _copy_groove_subset

REPO = pathlib.Path(__file__).resolve().parents[1]
GROOVE_SPLITS = {"train": 857, "validation": 114, "test": 119}


# --------------------------------------------------------------------------- helpers
def copy_groove_subset(groove_dir: pathlib.Path, dest: pathlib.Path, per_split: int = 4):
  """`per_split` files of each split (half beats, half fills); returns the info.csv rows."""
  return _copy_groove_subset(groove_dir, dest, {s: per_split for s in GROOVE_SPLITS})



def copy_piano_subset(piano_dir: pathlib.Path, dest: pathlib.Path, per_split: int = 2,
                      giantmidi: int = 3):
  """The shortest MAESTRO pieces of each split, and a few GiantMIDI files, with CSVs."""
  with open(piano_dir / "maestro" / "metadata.csv", newline="") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  kept = []
  for split in ("train", "validation", "test"):
    kept += sorted((r for r in rows if r["split"] == split),
                   key=lambda r: float(r["duration"]))[:per_split]
  for row in kept:
    target = dest / "maestro" / row["midi_filename"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(piano_dir / "maestro" / row["midi_filename"], target)
  with open(dest / "maestro" / "metadata.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
  with open(piano_dir / "giantmidi" / "metadata.csv", newline="") as f:
    reader = csv.DictReader(f)
    g_fields = reader.fieldnames
    g_rows = sorted(reader, key=lambda r: (piano_dir / "giantmidi" / r["midi_filename"]
                                           ).stat().st_size)[:giantmidi]
  (dest / "giantmidi").mkdir(parents=True, exist_ok=True)
  for row in g_rows:
    shutil.copyfile(piano_dir / "giantmidi" / row["midi_filename"],
                    dest / "giantmidi" / row["midi_filename"])
  with open(dest / "giantmidi" / "metadata.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=g_fields)
    writer.writeheader()
    writer.writerows(g_rows)
  return kept, g_rows


def read_split(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def shard_bytes(version_dir: pathlib.Path):
  return {p.name: p.read_bytes() for p in sorted(version_dir.glob("*.tfrecord-*"))}


def write_bad_files(folder: pathlib.Path, good_source: pathlib.Path):
  """Random bytes, random bytes behind a MIDI header, a truncated file, an empty file and a
  valid file without notes. Returns their names."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  (folder / "random.mid").write_bytes(rng.bytes(3000))
  (folder / "random_header.mid").write_bytes(b"MThd" + rng.bytes(3000))
  data = good_source.read_bytes()
  (folder / "truncated.mid").write_bytes(data[:len(data) * 6 // 10])
  (folder / "empty.midi").write_bytes(b"")
  midi_io.write_midi(Notes.empty(), folder / "no_notes.mid")
  return {"random.mid", "random_header.mid", "truncated.mid", "empty.midi", "no_notes.mid"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def groove_subset(groove_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("groove_src") / "groove"
  rows = copy_groove_subset(groove_dir, root)
  return root, rows


@pytest.fixture(scope="module")
def groove_built(groove_subset, tmp_path_factory):
  root, rows = groove_subset
  data_dir = tmp_path_factory.mktemp("tfds_groove")
  builder = data_pipelines.build("groove", manual_dir=str(root), data_dir=str(data_dir),
                                 num_workers=2)
  return builder, root, rows


# --------------------------------------------------------------------------- groove
def test_groove_subset_splits_files_and_metadata(groove_built):
  builder, _, rows = groove_built
  version_dir = pathlib.Path(builder.data_dir)
  assert version_dir.name == "1.0.0" and version_dir.parent.name == "drums"
  expected = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
  assert {s: builder.info.splits[s].num_examples for s in expected} == expected
  # Several shards per split even for 4 examples (multi-host reading is testable).
  assert all(builder.info.splits[s].num_shards == 4 for s in expected)
  assert len(list(version_dir.glob("groove-train.tfrecord-*-of-00004"))) == 4
  info = json.loads((version_dir / "dataset_info.json").read_text())
  assert "Gillick" in info["citation"] and info["fileFormat"] == "tfrecord"
  assert {s["name"]: int(s["shardLengths"][0]) > 0 for s in info["splits"]}
  features = builder.info.features
  for name in ("tokens", "num_condition_tokens", "id", "drummer", "session", "style",
               "style_full", "bpm", "beat_type", "time_signature", "duration"):
    assert name in features, name
  enc = encoding.load_vocab(version_dir / "vocab.json")
  assert enc.name == "drums" and enc.vocab_size == builder.encoding.vocab_size
  meta = json.loads((version_dir / "metadata.json").read_text())
  assert meta["conditioning"] == ["style", "tempo", "type"]
  assert meta["condition_ids"]["style"]["funk"] == enc.condition_id("style", "funk")
  report = json.loads((version_dir / "build_report.json").read_text())
  assert report["files"] == len(rows) and report["ok"] == len(rows) and report["skipped"] == 0
  assert report["files_per_second"] > 0


def test_groove_tokens_decode_to_source_hits(groove_built):
  builder, root, rows = groove_built
  enc = builder.encoding
  by_id = {r["id"]: r for r in rows}
  seen = 0
  for split in ("train", "validation", "test"):
    for ex in read_split(builder, split):
      row = by_id[ex["id"].decode()]
      assert row["split"] == split
      tokens = ex["tokens"]
      # BOS, STYLE_<primary>, TEMPO_<bin of the CSV bpm>, TYPE_<beat|fill>, ..., EOS.
      assert tokens[0] == enc.bos_id and tokens[-1] == enc.eos_id
      assert list(tokens[1:4]) == [enc.condition_id("style", row["style"].split("/")[0]),
                                   enc.condition_id("tempo", row["bpm"]),
                                   enc.condition_id("type", row["beat_type"])]
      assert ex["num_condition_tokens"] == 3 and ex["has_drums"]
      assert ex["style_full"].decode() == row["style"] and ex["bpm"] == int(row["bpm"])
      got = enc.decode_notes(tokens)
      src = midi_io.read_notes(root / row["midi_filename"])
      src = src.select(src.is_drum & (drum_map.pitch_to_groovae_class(src.pitch) >= 0))
      want = sorted(zip(src.start, drum_map.pitch_to_groovae_class(src.pitch)))
      have = sorted(zip(got.start, drum_map.pitch_to_groovae_class(got.pitch)))
      assert len(want) == len(have) == ex["num_notes"]
      # Same classes in time order, each hit within 10 ms (one 10 ms step, rounding).
      np.testing.assert_allclose([t for t, _ in have], [t for t, _ in want], atol=0.0101)
      assert sorted(c for _, c in have) == sorted(c for _, c in want)
      seen += 1
  assert seen == len(rows)


def _assert_decodes_onto_the_file(enc, ex, row, root):
  """An example of a beat-clock drums encoding decodes, at the CSV's bpm, onto its file's
  classed hits, each within a 1/48 quarter note."""
  bpm = float(row["bpm"])
  got = enc.decode_notes(ex["tokens"], qpm=bpm)
  src = midi_io.read_notes(root / row["midi_filename"])
  src = src.select(src.is_drum & (drum_map.pitch_to_groovae_class(src.pitch) >= 0))
  assert len(got) == len(src) == ex["num_notes"]
  np.testing.assert_allclose(np.sort(got.start), np.sort(src.start), atol=60.0 / bpm / 48)


@pytest.mark.parametrize("name", ["drums_beats", "drums_beats_dv"])
def test_groove_drums_in_beats(groove_subset, tmp_path, name):
  """drums_beats: the meter joins the prefix; ids decode at the CSV's bpm onto the file's
  hits, each within a step (1/48 quarter note: half a step of rounding, plus the CSV's
  whole-number bpm against the file's tempo, e.g. 94 for 93.99998). drums_beats_dv: the
  same, each drum followed by its velocity."""
  root, rows = groove_subset
  builder = data_pipelines.build("groove", name, manual_dir=str(root),
                                 data_dir=str(tmp_path), num_workers=1)
  enc = builder.encoding
  assert enc.time_unit == "beats" and enc.config["steps_per_quarter"] == 48 and enc.bar_tokens
  assert enc.velocity_after == (name == "drums_beats_dv")
  by_id = {r["id"]: r for r in rows}
  seen = 0
  for split in ("train", "validation", "test"):
    for ex in read_split(builder, split):
      row = by_id[ex["id"].decode()]
      tokens = ex["tokens"]
      assert ex["num_condition_tokens"] == 4
      assert tokens[4] == enc.condition_id("meter", row["time_signature"])
      assert tokens[5] == enc.bar_id  # every piece starts on a bar line
      num, den = (int(x) for x in row["time_signature"].split("-"))
      steps = np.where((tokens >= enc.shift_base) & (tokens < enc.velocity_base),
                       tokens - enc.shift_base + 1, 0)
      assert set(np.diff(np.cumsum(steps)[tokens == enc.bar_id])) <= {num * 4 * 48 // den}
      if enc.velocity_after:
        drums = np.flatnonzero((tokens >= enc.drum_base) & (tokens < enc.shift_base))
        after = tokens[drums + 1]
        assert np.all((after >= enc.velocity_base) & (after < enc.offset_base))
      _assert_decodes_onto_the_file(enc, ex, row, root)
      seen += 1
  assert seen == len(rows)
  # Its training config trains on it; time stretching is refused (the tokens do not
  # change with tempo).
  from configs import groove_beats
  from midijax import input_pipeline
  config = groove_beats.get_config()
  config.data.update(data_dir=str(tmp_path), batch_size=2, seq_len=64, builder_config=name)
  batch = next(iter(input_pipeline.make_train_iterator(config)))
  assert batch["inputs"].shape == (2, 64)
  config.data.time_stretch = 0.05
  with pytest.raises(MidijaxError, match="time_stretch: .* in beats"):
    input_pipeline.make_train_iterator(config)


def test_groove_drums_on_a_grid_with_offsets(groove_subset, tmp_path):
  """drums_grid: 16th-note time shifts plus OFFSET tokens; the meter joins the prefix, no
  shift is longer than 16 16ths, and ids decode at the CSV's bpm onto the file's hits, each
  within a 1/48 quarter note (grid point + offset is the same fine step as drums_beats)."""
  root, rows = groove_subset
  builder = data_pipelines.build("groove", "drums_grid", manual_dir=str(root),
                                 data_dir=str(tmp_path), num_workers=1)
  enc = builder.encoding
  assert enc.time_unit == "grid" and enc.num_offsets == 12 and enc.max_shift_steps == 16
  by_id = {r["id"]: r for r in rows}
  seen, offsets = 0, 0
  for split in ("train", "validation", "test"):
    for ex in read_split(builder, split):
      row = by_id[ex["id"].decode()]
      tokens = ex["tokens"]
      assert ex["num_condition_tokens"] == 4
      assert tokens[4] == enc.condition_id("meter", row["time_signature"])
      offsets += int(np.sum((tokens >= enc.offset_base) &
                            (tokens < enc.offset_base + enc.num_offsets)))
      _assert_decodes_onto_the_file(enc, ex, row, root)
      seen += 1
  assert seen == len(rows) and offsets > seen  # drummers play off the grid


def test_groove_bar_windows(groove_subset, tmp_path):
  root, rows = groove_subset
  builder = data_pipelines.build("groove", "drums_2bar", manual_dir=str(root),
                                 data_dir=str(tmp_path), num_workers=1)
  enc = builder.encoding
  examples = [ex for s in builder.info.splits for ex in read_split(builder, s)]
  report = json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())
  by_id = {r["id"]: r for r in rows}
  expected = 0
  for r in rows:
    notes = midi_io.read_notes(root / r["midi_filename"])
    bar = 60.0 / float(r["bpm"]) * 4  # all subset files are 4-4
    expected += max(0, int(round(notes.total_time / bar)) - 1)
  assert len(examples) == expected > 0
  # GMD's 1-bar fills are too short for 2-bar windows: counted apart, not as failures.
  assert report["skipped"] == 0 and report["too_short"] > 0
  for ex in examples:
    bar = 60.0 / float(by_id[ex["id"].decode()]["bpm"]) * 4
    assert ex["duration"] == pytest.approx(2 * bar, rel=1e-5)
    assert ex["start_seconds"] == pytest.approx(ex["window_index"] * bar, rel=1e-5)
    hits = enc.decode_notes(ex["tokens"])
    assert len(hits) == ex["num_notes"] > 0 and hits.start.max() < 2 * bar + 0.01


def test_groove_continuation_pairs_and_style_filter(groove_subset, tmp_path, capsys):
  """drums_continuation narrowed to one style with `build-data --set`: each example is the
  prompt `midijax continue` would feed (2 bars, ending on the bar line), then the next 2
  bars."""
  from midijax import cli  # pylint: disable=g-import-not-at-top
  root, rows = groove_subset
  style = next(r["style"].split("/")[0] for r in rows if r["beat_type"] == "beat")
  assert cli.main(["build-data", "groove", "--config", "drums_continuation", "--set",
                   f"styles={style}", "--name", f"pairs_{style}", "--manual_dir", str(root),
                   "--data_dir", str(tmp_path), "--num_workers", "1"]) == 0
  builder = data_pipelines.builder_class("groove")(
      data_dir=str(tmp_path), config=common.config_with_overrides(
          {c.name: c for c in data_pipelines.builder_class("groove").BUILDER_CONFIGS}[
              "drums_continuation"], name=f"pairs_{style}", styles=(style,)))
  enc = builder.encoding
  examples = [ex for s in builder.info.splits for ex in read_split(builder, s)]
  assert examples and builder.info.metadata["prompt_bars"] == 2
  by_id = {r["id"]: r for r in rows}
  for ex in examples:
    row = by_id[ex["id"].decode()]
    assert row["style"].split("/")[0] == style and ex["style"].decode() == style
    bar = 60.0 / float(row["bpm"]) * 4 * 4.0 / 4  # 4-4, as the builder computes it
    assert ex["duration"] == pytest.approx(4 * bar, rel=1e-5)
    assert ex["window_index"] % 2 == 0  # windows 2 bars apart: each bar a target once
    k = 1 + int(ex["num_condition_tokens"])
    tokens, n_prompt = ex["tokens"], int(ex["num_prompt_tokens"])
    assert tokens[-1] != enc.eos_id and n_prompt > 0 and len(tokens) > k + n_prompt
    notes = midi_io.read_notes(root / row["midi_filename"])
    t0 = int(ex["window_index"]) * bar
    window = notes.select(notes.is_drum & (notes.start >= t0) & (notes.start < t0 + 4 * bar))
    window = dataclasses.replace(window, start=window.start - t0,
                                 end=np.minimum(window.end, t0 + 4 * bar) - t0)
    np.testing.assert_array_equal(tokens[k:k + n_prompt],
                                  encoding.encode_prompt(enc, window, 2 * bar))
    prompt, target = encoding.continuation_pair(enc, window, 2 * bar, 4 * bar)
    np.testing.assert_array_equal(tokens[k:], np.concatenate([prompt, target]))
    # Joined, the two parts decode to the window's hits, in time order, within 10 ms.
    hits = enc.decode_notes(tokens[k:])
    np.testing.assert_allclose(hits.start, np.sort(window.start), atol=0.0101)
  with pytest.raises(MidijaxError, match="styles=\\['nosuchstyle'\\]: not in"):
    data_pipelines.build("groove", "drums_continuation", manual_dir=str(root),
                         data_dir=str(tmp_path), styles=("nosuchstyle",))
  assert cli.main(["build-data", "groove", "--set", "colour=red", "--manual_dir",
                   str(root), "--data_dir", str(tmp_path)]) == 2
  assert "--set 'colour=red': expected FIELD=VALUE" in capsys.readouterr().err
  with pytest.raises(MidijaxError, match="continuation pairs need an encoding with time"):
    data_pipelines.build("groove", "triples", manual_dir=str(root), data_dir=str(tmp_path),
                         prompt_bars=2, target_bars=2)


def test_builds_are_byte_identical(groove_subset, tmp_path):
  root, _ = groove_subset
  dirs = []
  for i, workers in enumerate((1, 2)):  # the worker count must not change a byte
    b = data_pipelines.build("groove", manual_dir=str(root), data_dir=str(tmp_path / str(i)),
                             num_shards=3, num_workers=workers)
    dirs.append(pathlib.Path(b.data_dir))
  first, second = shard_bytes(dirs[0]), shard_bytes(dirs[1])
  assert len(first) == 9 and first == second
  for name in ("vocab.json", "metadata.json", "features.json"):
    assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes()


def test_custom_config_overrides(groove_subset, tmp_path):
  root, rows = groove_subset
  b = data_pipelines.build("groove", manual_dir=str(root), data_dir=str(tmp_path),
                           conditioning=("tempo",), num_shards=1)
  assert b.builder_config.name.startswith("drums_") and b.builder_config.name != "drums"
  ex = read_split(b, "test")[0]
  assert ex["num_condition_tokens"] == 1 and b.encoding.is_condition(ex["tokens"][1])
  with pytest.raises(MidijaxError, match="unknown config field"):
    data_pipelines.build("groove", manual_dir=str(root), data_dir=str(tmp_path), colour=1)
  with pytest.raises(MidijaxError, match="unknown config"):
    data_pipelines.build("groove", "drums_3bar", manual_dir=str(root), data_dir=str(tmp_path))


def test_groove_download_is_registered_and_parent_folder_works(groove_subset, tmp_path):
  from data_pipelines.groove import groove  # pylint: disable=g-import-not-at-top
  info = groove.Groove.url_infos[groove.URL]
  assert int(info.size) == 3260318
  assert info.checksum == "651cbc524ffb891be1a3e46d89dc82a1cecb09a57c748c7b45b844c4841dcc1e"
  root, rows = groove_subset
  # --manual_dir may also be the folder that holds groove/ (as the zip extracts).
  b = data_pipelines.build("groove", "triples", manual_dir=str(root.parent),
                           data_dir=str(tmp_path), num_shards=1)
  assert sum(s.num_examples for s in b.info.splits.values()) == len(rows)


def test_tfds_build_command(groove_subset, tmp_path):
  """TFDS's own `build` command builds the builder from its folder path."""
  root, rows = groove_subset
  cmd = [sys.executable, "-c",
         "from data_pipelines.common import tfds_build_cli; tfds_build_cli()",
         str(REPO / "data_pipelines" / "groove"), "--config", "drums", "--manual_dir",
         str(root), "--data_dir", str(tmp_path), "--num_shards", "2"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  version_dir = tmp_path / "groove" / "drums" / "1.0.0"
  assert len(list(version_dir.glob("groove-train.tfrecord-*-of-00002"))) == 2
  assert (version_dir / "vocab.json").is_file() and (version_dir / "build_report.json").is_file()


# --------------------------------------------------------------------------- Apache Beam
def _needs_beam():
  if importlib.util.find_spec("apache_beam") is None:
    if IN_CI:
      pytest.fail("CI=true but apache_beam is missing (launch/setup.sh installs .[beam,test])")
    pytest.skip("apache-beam not installed (pip install -e '.[beam]')")


def _examples(builder, split):
  """The split's examples as {(id, window_index): features}, independent of shard order."""
  return {(ex["id"].decode(), int(ex["window_index"])): ex for ex in read_split(builder, split)}


def _summary(stderr: str, name: str) -> tuple:
  """(files, counts) of the build summary line '<name>: N files in ... (timing): counts'."""
  line = next(l for l in stderr.splitlines() if l.startswith(f"{name}: "))
  files, rest = line.split(" in ", 1)
  return files, rest.split("): ", 1)[1]


def test_beam_build_equals_local_build(groove_dir, tmp_path, capsys):
  """README's `tfds build ... --beam_pipeline_options=...` (DirectRunner, 2 worker processes)
  on 16 real GMD files and 3 bad ones: the examples, the counts and the skipped files with
  their reasons in build_report.json and in the summary line are those of the local build."""
  _needs_beam()
  root = tmp_path / "groove"
  rows = _copy_groove_subset(groove_dir, root, {"train": 8, "validation": 4, "test": 4})
  good = (root / rows[0]["midi_filename"]).read_bytes()
  bad = {"drummer9/bad/random_header.mid": (b"MThd" + bytes(range(256)) * 4, "train"),
         "drummer9/bad/truncated.mid": (good[:len(good) * 6 // 10], "validation"),
         "drummer9/bad/empty.mid": (b"", "train")}
  with open(root / "info.csv", "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    for i, (name, (data, split)) in enumerate(sorted(bad.items())):
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(data)
      writer.writerow({**rows[0], "id": f"drummer9/bad/{i}", "midi_filename": name,
                       "split": split})
  config = "drums_2bar"  # 2-bar windows: GMD's 1-bar fills are counted as too short.
  local = data_pipelines.build("groove", config, manual_dir=str(root),
                               data_dir=str(tmp_path / "local"), num_workers=2)
  local_stderr = capsys.readouterr().err
  tfds_cli = pathlib.Path(sys.executable).with_name("tfds")
  proc = subprocess.run(
      [str(tfds_cli), "build", "data_pipelines/groove", "--config", config,
       "--manual_dir", str(root), "--data_dir", str(tmp_path / "beam"),
       "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,"
       "direct_running_mode=multi_processing"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          [str(REPO), os.environ.get("PYTHONPATH", "")])})
  assert proc.returncode == 0, proc.stderr[-3000:]
  beam_dir = tmp_path / "beam" / "groove" / config / "1.0.0"
  beam = tfds.builder_from_directory(str(beam_dir))

  for split in ("train", "validation", "test"):
    want, got = _examples(local, split), _examples(beam, split)
    assert len(want) > 0 and sorted(want) == sorted(got), split
    for key, ex in want.items():
      for feature, value in ex.items():
        np.testing.assert_array_equal(got[key][feature], value, err_msg=f"{key} {feature}")

  local_report = common.read_json(local.data_dir, common.REPORT_FILE)
  beam_report = common.read_json(beam_dir, common.REPORT_FILE)
  assert beam_report["runner"] == "DirectRunner (multi_processing)"
  assert local_report["runner"] == "local" and local_report["num_workers"] == 2
  timing = ("runner", "num_workers", "seconds", "files_per_second")
  for field in local_report:
    if field == "splits":
      assert beam_report["splits"] == {
          s: {k: v for k, v in counts.items() if k != "seconds"}
          for s, counts in local_report["splits"].items()}
    elif field not in timing:
      assert beam_report[field] == local_report[field], field
  assert beam_report["files"] == len(rows) + len(bad)
  assert beam_report["too_short"] > 0 and beam_report["examples"] > 0
  skipped = {pathlib.Path(s["file"]).relative_to(root).as_posix(): (s["split"], s["reason"])
             for s in beam_report["skipped_files"]}
  assert {k: split for k, (split, _) in skipped.items()} == {
      k: split for k, (_, split) in bad.items()}
  assert "empty file" in skipped["drummer9/bad/empty.mid"][1]
  assert "cannot parse" in skipped["drummer9/bad/truncated.mid"][1]
  # The summary line (stderr) carries the same counts and reasons.
  name = f"groove/{config}"
  assert _summary(proc.stderr, name) == _summary(local_stderr, name)
  assert "3 skipped" in _summary(proc.stderr, name)[1]


def test_sources_are_read_through_epath(groove_files, tmp_path):
  """Local paths go straight to the MIDI reader; URLs (gs://, s3://) are copied first.

  Only the local side runs here: no bucket is reachable from the tests.
  """
  assert common.is_local("/data/groove/a.mid") and common.is_local(tmp_path)
  assert not common.is_local("gs://bucket/groove/a.mid")
  assert not common.is_local(epath.Path("s3://bucket/a.mid"))
  with common.local_copy(str(groove_files[0]), max_bytes=1 << 20) as path:
    assert path == str(groove_files[0])
  folder = tmp_path / "Mixed Case"
  (folder / "deep").mkdir(parents=True)
  for name in ("a.MID", "deep/b.midi", "deep/c.txt"):
    shutil.copyfile(groove_files[0], folder / name)
  found = common.find_midi_files(epath.Path(folder))
  assert [p.relative_to(folder).as_posix() for p in found] == ["a.MID", "deep/b.midi"]
  assert all(isinstance(p, epath.Path) for p in found)


# --------------------------------------------------------------------------- midi_folder
def _mixed_file(piano_file: pathlib.Path, drum_file: pathlib.Path, path: pathlib.Path):
  """A file with the first 200 piano notes and the first 200 drum hits of two sources."""
  piano = midi_io.read_notes(piano_file).sorted().select(np.arange(200))
  drums = midi_io.read_notes(drum_file).sorted().select(np.arange(200))
  both = Notes(**{f: np.concatenate([getattr(piano, f), getattr(drums, f)])
                  for f in ("pitch", "velocity", "start", "end", "program", "is_drum")},
               instrument=np.concatenate([np.zeros(200, np.int32), np.ones(200, np.int32)]))
  midi_io.write_midi(both, path)


def test_midi_folder_reports_bad_files_and_keeps_good_ones(groove_files, piano_files, tmp_path):
  folder = tmp_path / "my_midi"
  (folder / "piano" / "deep").mkdir(parents=True)
  good = {}
  for i, f in enumerate(piano_files[-3:]):  # giantmidi files (short)
    target = folder / "piano" / ("deep" if i == 0 else "") / f.name
    shutil.copyfile(f, target)
    good[target.relative_to(folder).as_posix()] = f
  drum_source = groove_files[0]
  shutil.copyfile(drum_source, folder / "drums_only.MID")  # upper-case suffix is found too
  _mixed_file(piano_files[-1], drum_source, folder / "mixed.mid")
  bad = write_bad_files(folder / "broken", drum_source)
  builder = data_pipelines.build("midi_folder", manual_dir=str(folder),
                                 data_dir=str(tmp_path / "d"), split_ratios=(1, 0, 0),
                                 num_workers=2)
  examples = {ex["id"].decode(): ex for ex in read_split(builder, "train")}
  assert set(builder.info.splits) == {"train"}
  # Pitched files and the mixed file are kept (its drums dropped); drums only is skipped.
  assert set(examples) == set(good) | {"mixed.mid"}
  assert not examples["mixed.mid"]["has_drums"] and examples["mixed.mid"]["num_notes"] == 200
  assert examples["piano/deep/" + piano_files[-3].name]["folder"].decode() == "piano/deep"
  enc = builder.encoding
  for rel, src in good.items():
    tokens = examples[rel]["tokens"]
    prefix = 1 + examples[rel]["num_condition_tokens"]
    np.testing.assert_array_equal(tokens[prefix:-1], enc.encode(midi_io.read_notes(src)))
  report = json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())
  skipped = {pathlib.Path(s["file"]).name: s["reason"] for s in report["skipped_files"]}
  assert set(skipped) == bad | {"drums_only.MID"}
  assert "no 'MThd' header" in skipped["random.mid"]
  assert "cannot parse" in skipped["truncated.mid"]
  assert "cannot parse" in skipped["random_header.mid"]
  assert "empty" in skipped["empty.midi"] and "no notes" in skipped["no_notes.mid"]
  assert "no pitched notes" in skipped["drums_only.MID"]
  assert report["ok"] == len(good) + 1 and report["skipped"] == len(bad) + 1
  # The drums config keeps the drum notes of the same files instead.
  drums = data_pipelines.build("midi_folder", "drums", manual_dir=str(folder),
                               data_dir=str(tmp_path / "d"), split_ratios=(1, 0, 0))
  kept = {ex["id"].decode(): ex for ex in read_split(drums, "train")}
  assert set(kept) == {"drums_only.MID", "mixed.mid"} and kept["mixed.mid"]["has_drums"]


def test_every_file_failing_is_a_clear_error(groove_files, tmp_path):
  folder = tmp_path / "all_bad"
  bad = write_bad_files(folder, groove_files[0])
  with pytest.raises(common.NoUsableFilesError, match=r"every file failed.*\(5 of 5\)"):
    data_pipelines.build("midi_folder", manual_dir=str(folder), data_dir=str(tmp_path / "d"))
  failed = list((tmp_path / "d" / "midi_folder" / "performance").glob("*failed_build_report.json"))
  assert len(failed) == 1
  report = json.loads(failed[0].read_text())
  listed = {pathlib.Path(s["file"]).name for s in report["skipped_files"]}
  assert listed == bad
  assert not (tmp_path / "d" / "midi_folder" / "performance" / "1.0.0").exists()
  assert issubclass(common.NoUsableFilesError, MidijaxError)


def test_hash_split_is_stable_and_follows_ratios():
  paths = [f"folder{i % 7}/piece_{i}.mid" for i in range(4000)]
  splits = [common.hash_split(p, (0.8, 0.1, 0.1)) for p in paths]
  assert splits == [common.hash_split(p, (0.8, 0.1, 0.1)) for p in paths]
  counts = {s: splits.count(s) / len(paths) for s in common.SPLITS}
  assert counts["train"] == pytest.approx(0.8, abs=0.03)
  assert counts["validation"] == pytest.approx(0.1, abs=0.02)
  # A known value pins the rule itself (sha256 of the POSIX relative path).
  assert common.hash_split("a/b.mid") == common.hash_split("a/b.mid", (8, 1, 1))
  assert {common.hash_split(p, (0, 0, 1)) for p in paths[:50]} == {"test"}


# --------------------------------------------------------------------------- piano
def test_piano_subset_with_sustain(piano_dir, tmp_path):
  src = tmp_path / "piano"
  maestro_rows, giant_rows = copy_piano_subset(piano_dir, src)
  builder = data_pipelines.build("piano", manual_dir=str(src), data_dir=str(tmp_path / "d"))
  enc = builder.encoding
  assert enc.name == "performance"
  expected = {s: 2 for s in ("train", "validation", "test")}
  for row in giant_rows:
    expected[common.hash_split("giantmidi/" + row["midi_filename"])] += 1
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == expected
  by_id = {f"maestro/{r['midi_filename']}": r for r in maestro_rows}
  sustain_changed = 0
  for split in builder.info.splits:
    for ex in read_split(builder, split):
      ident = ex["id"].decode()
      source = ex["source"].decode()
      path = src / source / ex["midi_filename"].decode()
      tokens = ex["tokens"]
      assert tokens[1] == enc.condition_id("dataset", source)
      with_pedal = enc.encode(midi_io.read_notes(path, sustain=True))
      np.testing.assert_array_equal(tokens[2:-1], with_pedal)
      without = enc.encode(midi_io.read_notes(path, sustain=False))
      sustain_changed += not np.array_equal(with_pedal, without)
      if source == "maestro":
        row = by_id[ident]
        assert split == row["split"] and ex["year"] == int(row["year"])
        assert ex["composer"].decode() == row["canonical_composer"]
        assert ex["title"].decode() == row["canonical_title"]
        assert ex["duration"] == pytest.approx(float(row["duration"]), rel=1e-5)
      else:
        assert ex["year"] == 0 and ex["composer"].decode()
  assert sustain_changed > 0  # the pedal really was applied


def test_piano_finds_a_v3_style_folder(piano_dir, tmp_path):
  """An extracted MAESTRO (CSV one folder down, named like v3's) and maestro-only config."""
  src = tmp_path / "extract"
  copy_piano_subset(piano_dir, tmp_path / "tmp", per_split=1, giantmidi=0)
  shutil.copytree(tmp_path / "tmp" / "maestro", src / "maestro-v3.0.0")
  (src / "maestro-v3.0.0" / "metadata.csv").rename(src / "maestro-v3.0.0" / "maestro-v3.0.0.csv")
  builder = data_pipelines.build("piano", "performance_maestro", manual_dir=str(src),
                                 data_dir=str(tmp_path / "d"))
  assert sum(s.num_examples for s in builder.info.splits.values()) == 3


# --------------------------------------------------------------------------- full corpus
@pytest.mark.slow
def test_full_groove_build(groove_dir, tmp_path):
  start = time.perf_counter()
  builder = data_pipelines.build("groove", manual_dir=str(groove_dir), data_dir=str(tmp_path))
  seconds = time.perf_counter() - start
  report = json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())
  skipped = {s: 0 for s in GROOVE_SPLITS}
  for item in report["skipped_files"]:
    skipped[item["split"]] += 1
  for split, n in GROOVE_SPLITS.items():
    assert builder.info.splits[split].num_examples == n - skipped[split]
    assert builder.info.splits[split].num_shards == common.DEFAULT_NUM_SHARDS
  print(f"full groove build: {seconds:.1f} s, {report['files_per_second']} files/s")
  assert seconds < 60
