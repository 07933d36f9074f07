"""midijax.evaluation without a model: prompt windows, units of the NLL, settings, errors.

(`midijax evaluate` end to end, C2ST included, is tests/test_run_evidence.py.)
"""
import ml_collections
import numpy as np
import pytest

from midijax import encoding, evaluation, input_pipeline, two_sample
from midijax.errors import MidijaxError
from midijax.notes import Notes

ENC = encoding.get("drums")


def drum_piece(bars: int, qpm: float = 100.0):
  """Kick on beats, closed hi-hat on 8ths, `bars` bars of 4/4."""
  beat = 60.0 / qpm
  hats = np.arange(8 * bars) * beat / 2
  kicks = np.arange(4 * bars) * beat
  start = np.concatenate([hats, kicks])
  pitch = np.concatenate([np.full(len(hats), 42), np.full(len(kicks), 36)])
  notes = Notes.from_arrays(pitch, start, start + 0.1, 90, is_drum=True, qpm=qpm)
  return ENC.encode(notes)


def make_store(pieces, prefix=(2, 3)):
  """A TokenStore of event-id pieces, each with BOS + `prefix` in front and EOS after."""
  bos = ENC.bos_id
  rows = [np.concatenate([[bos], prefix, p, [ENC.eos_id]]).astype(np.int32) for p in pieces]
  lengths = np.array([len(r) for r in rows], np.int64)
  return input_pipeline.TokenStore(
      values=np.concatenate(rows), starts=np.cumsum(lengths) - lengths, lengths=lengths,
      prefix_lengths=np.full(len(rows), 1 + len(prefix), np.int64),
      transposable=np.zeros(len(rows), bool), stretchable=np.ones(len(rows), bool))


def test_prompt_windows_cut_prompts_and_real_continuations():
  pieces = [drum_piece(b) for b in (2, 8, 16, 30)]
  store = make_store(pieces)
  counts = evaluation.windows_per_piece(store, ENC, 20, 40)
  np.testing.assert_array_equal(counts, [(len(p) - 20) // 40 for p in pieces])
  w = evaluation.prompt_windows(store, ENC, prompt_tokens=20, length=40, max_windows=1000,
                                seed=3, meters=[(100.0, (4, 4))] * 4)
  assert len(w) == counts.sum()
  for i in range(len(w)):
    p, s = w.pieces[i], w.offsets[i]
    events = pieces[p]
    np.testing.assert_array_equal(w.prompts[i][3:], events[s - 20:s])
    np.testing.assert_array_equal(w.prompts[i][:3], store.piece(p)[:3])  # BOS + conditions
    np.testing.assert_array_equal(w.real[i], events[s:s + 40])
    np.testing.assert_array_equal(w.contexts[i][3:], events[:s])
    assert (s - 20) % 40 == 0 and w.qpm[i] == 100.0
  # Continuations of a piece never overlap.
  for p in np.unique(w.pieces):
    starts = np.sort(w.offsets[w.pieces == p])
    assert (np.diff(starts) >= 40).all()
  # Pieces take turns: with as many windows as pieces, every piece that has one gives one.
  few = evaluation.prompt_windows(store, ENC, prompt_tokens=20, length=40,
                                  max_windows=int((counts > 0).sum()), seed=3)
  assert sorted(few.pieces) == sorted(np.flatnonzero(counts > 0))
  again = evaluation.prompt_windows(store, ENC, prompt_tokens=20, length=40, max_windows=1000,
                                    seed=3, meters=[(100.0, (4, 4))] * 4)
  np.testing.assert_array_equal(again.offsets, w.offsets)


def test_real_continuations_decode_on_the_piece_grid():
  piece = drum_piece(16, qpm=100.0)
  store = make_store([piece] * 3)
  w = evaluation.prompt_windows(store, ENC, prompt_tokens=16, length=48, max_windows=6,
                                meters=[(100.0, (4, 4))] * 3)
  clips, seconds = evaluation.continuation_clips(ENC, w, w.real, is_drum=True)
  sixteenth = 60.0 / 100.0 / 4
  for clip, dur in zip(clips, seconds):
    assert len(clip) > 10 and dur > 0
    # Every hit of the straight 8ths pattern sits on the 16th grid from the bar line.
    off = clip.start / sixteenth - np.round(clip.start / sixteenth)
    assert np.abs(off).max() < 0.05


def test_window_units_count_notes_and_seconds():
  ids = drum_piece(4, qpm=120.0)  # 4 bars of 2 s: 48 hits, last one at 7.75 s
  targets = ids[None]
  weights = np.ones_like(targets, np.float32)
  units = evaluation.window_units(ENC, [{"targets": targets, "weights": weights}])
  assert units["tokens"] == len(ids) and units["notes"] == 48
  assert units["seconds"] == pytest.approx(7.75, abs=0.011)
  half = weights.copy()
  half[0, len(ids) // 2:] = 0
  assert evaluation.window_units(ENC, [{"targets": targets, "weights": half}])["tokens"] == \
      len(ids) // 2


def test_window_units_of_beat_time_follow_each_rows_tempo():
  """Drums counted in beats: the same ids last half as long at twice the tempo, row by row."""
  enc = encoding.get("drums", time_unit="beats")
  bar = np.array([enc.vocab["DRUM_kick"], enc.vocab["TIME_SHIFT_96"],
                  enc.vocab["DRUM_snare"], enc.vocab["TIME_SHIFT_96"]], np.int32)
  targets = np.stack([bar, bar])
  weights = np.ones_like(targets, np.float32)
  units = evaluation.window_units(enc, [{"targets": targets, "weights": weights}],
                                  [np.array([60.0, 120.0])])
  assert units["notes"] == 4 and units["seconds"] == pytest.approx(4.0 + 2.0)


def test_sampling_settings_come_from_the_config_unless_given():
  config = ml_collections.ConfigDict({"sample": {"temperature": 0.9, "top_k": 0, "top_p": 0.95}})
  assert evaluation.resolve_sampling(config) == {"temperature": 0.9, "top_k": 0, "top_p": 0.95,
                                                 "guidance": 0.0}
  assert evaluation.resolve_sampling(config, temperature=1.1, top_p=1.0, guidance=0.5) == {
      "temperature": 1.1, "top_k": 0, "top_p": 1.0, "guidance": 0.5}
  assert evaluation.resolve_sampling(ml_collections.ConfigDict()) == {
      "temperature": 1.0, "top_k": 0, "top_p": 1.0, "guidance": 0.0}
  with pytest.raises(MidijaxError, match="top_p"):
    evaluation.resolve_sampling(config, top_p=1.5)


def test_c2st_checks_are_one_line_errors():
  store = make_store([drum_piece(4), drum_piece(30)])
  with pytest.raises(two_sample.TwoSampleError, match="too few prompts for 5-fold"):
    evaluation.check_c2st_windows(store, ENC, split="x", prompt_tokens=16, length=32,
                                  num_prompts=4, n_folds=5)
  with pytest.raises(two_sample.TwoSampleError, match="in 2 pieces; the C2ST needs"):
    evaluation.check_c2st_windows(store, ENC, split="x", prompt_tokens=16, length=32,
                                  num_prompts=100, n_folds=5)
  assert evaluation.feature_kind(ENC, True) == "drums"
  with pytest.raises(two_sample.TwoSampleError, match="makes no drum notes"):
    evaluation.feature_kind(encoding.get("performance"), False, "drums")
  with pytest.raises(two_sample.TwoSampleError, match="makes only drum notes"):
    evaluation.feature_kind(ENC, True, "pitched")
