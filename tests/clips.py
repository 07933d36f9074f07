"""Clips with known musical answers, shared by the music statistics and report tests."""
import numpy as np

from midijax.notes import Notes

KICK, CLOSED_HH = 36, 42  # GrooVAE classes 0 and 2


def c_major_scale(qpm=120.0) -> Notes:
  pitches = [60, 62, 64, 65, 67, 69, 71]
  start = np.arange(7) * 0.5
  return Notes.from_arrays(pitches, start, start + 0.4, 90, qpm=qpm)


def sixteenth_hihat(bars=4, qpm=97.0, shift_s=0.0, velocity=80) -> Notes:
  sixteenth = 60.0 / qpm / 4
  start = np.arange(16 * bars) * sixteenth + shift_s
  return Notes.from_arrays(np.full(len(start), CLOSED_HH), start, start + 0.05, velocity,
                           is_drum=True, qpm=qpm)


def random_clip(rng, notes_per_s=4.0, seconds=8.0) -> Notes:
  n = max(2, int(rng.poisson(notes_per_s * seconds)))
  start = np.sort(rng.uniform(0, seconds, n))
  return Notes.from_arrays(rng.integers(48, 84, n), start, start + rng.uniform(0.1, 0.8, n),
                           rng.integers(30, 120, n))
