"""Builder limits: max_seconds / max_tokens skip a file with the limit named, bar windows are
found from the notes (the same windows as walking every bar), and the overrides reach the
builder config."""
import dataclasses

import numpy as np
import pytest

import hostile_files as hf
from data_pipelines import common
from midijax import midi_io


def _recipe(**kw):
  config = dataclasses.replace(common.MidiBuilderConfig(name="t"), **kw)
  return common.Recipe.from_config(config)


def _result(path, **kw):
  recipe = _recipe(**kw)
  job = common.FileJob(key=path.name, path=str(path), meta={})
  return common.tokenize_file(job, recipe, recipe.make_encoding())


def test_limits_skip_files_with_the_limit_named(tmp_path, piano_files):
  src = sorted(piano_files, key=lambda p: p.stat().st_size)[0]
  ok = _result(src)
  assert ok.error is None
  tokens = len(ok.examples[0]["tokens"])
  over = _result(src, max_tokens=tokens - 1)
  assert over.error == (f"more tokens than the max_tokens limit ({tokens} performance tokens; "
                        f"limit {tokens - 1})")
  assert _result(src, max_tokens=tokens).error is None
  seconds = midi_io.read_notes(src).total_time
  assert "music longer than the max_seconds limit" in _result(src, max_seconds=seconds / 2).error
  two = tmp_path / "two_hours_apart.mid"
  two.write_bytes(hf.midi([hf.track([(0, hf.on()), (10, hf.off()), (0x0FFFFFFF, hf.on()),
                                     (10, hf.off())])]))
  assert "max_seconds" in _result(two).error
  assert _result(two, max_seconds=1e6).error is None
  with pytest.raises(common.BuildError, match="must be positive"):
    _recipe(max_tokens=0)


def test_windowed_token_budget_covers_all_windows(groove_files):
  src = groove_files[0]
  full = _result(src, encoding="drums", drum_policy="only", window_bars=2)
  assert full.error is None and len(full.examples) > 3
  total = sum(len(e["tokens"]) for e in full.examples)
  cut = _result(src, encoding="drums", drum_policy="only", window_bars=2, max_tokens=total - 1)
  assert cut.error.startswith("more tokens than the max_tokens limit (its windows make over")


def _walk_every_bar(notes, bar, total_bars, window_bars, hop_bars):
  """The windows as the builder found them before: every window start, empty ones dropped."""
  for i in range(0, total_bars - window_bars + 1, hop_bars):
    t0, t1 = i * bar, (i + window_bars) * bar
    part = common._window_notes(notes, t0, t1)
    if len(part):
      yield i, t0, t1, part


@pytest.mark.parametrize("window_bars,hop_bars", [(1, 1), (2, 1), (4, 2), (3, 5), (8, 3)])
def test_windows_from_notes_equal_walking_every_bar(groove_files, window_bars, hop_bars):
  for path in groove_files[::200]:
    notes = midi_io.read_notes(path)
    for bar in (2.0, 0.37, 1 / 3):
      total = int(round(notes.total_time / bar))
      want = list(_walk_every_bar(notes, bar, total, window_bars, hop_bars))
      have = list(common._windows_with_notes(notes, bar, total, window_bars, hop_bars))
      assert [w[:3] for w in have] == [w[:3] for w in want]
      for (_, _, _, a), (_, _, _, b) in zip(have, want):
        assert a.tuples(12) == b.tuples(12) and np.array_equal(a.velocity, b.velocity)


def test_billions_of_bars_are_not_walked(tmp_path):
  """A tempo of 1 microsecond a quarter makes 30 M bars a minute: windows come from the
  notes, so a windowed build takes as long as the notes need."""
  path = tmp_path / "fast.mid"
  path.write_bytes(hf.midi([hf.track([(0, hf.tempo(1))] + hf.notes_track(50, gap=10**6, ch=9))]))
  result = _result(path, encoding="drums", drum_policy="only", window_bars=2)
  notes = midi_io.read_notes(path)
  bar = 4e-6  # seconds: 4 quarters of 1 microsecond
  total = int(round(notes.total_time / bar))
  assert total > 20_000
  enc = _recipe(encoding="drums").make_encoding()
  want = [i for i, _, _, part in _walk_every_bar(notes, bar, total, 2, 1) if len(enc.encode(part))]
  assert result.error is None and [e["window_index"] for e in result.examples] == want
