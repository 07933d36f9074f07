"""Drum pitch classes: the Groove MIDI Dataset's Roland TD-11 pitches -> GrooVAE's 9 classes.

The table is the one GrooVAE (Gillick et al. 2019) uses for GMD (Magenta's
``ROLAND_DRUM_PITCH_CLASSES``). Decoding a class writes its first (canonical) pitch.

| class | name          | TD-11 / GM pitches | written as |
|-------|---------------|--------------------|------------|
| 0     | kick          | 36                 | 36         |
| 1     | snare         | 38, 37, 40         | 38         |
| 2     | closed_hihat  | 42, 22, 44         | 42         |
| 3     | open_hihat    | 46, 26             | 46         |
| 4     | low_tom       | 43, 58             | 43         |
| 5     | mid_tom       | 47, 45             | 47         |
| 6     | high_tom      | 50, 48             | 50         |
| 7     | crash         | 49, 52, 55, 57     | 49         |
| 8     | ride          | 51, 53, 59         | 51         |
"""
import numpy as np

GROOVAE_CLASS_NAMES = ("kick", "snare", "closed_hihat", "open_hihat", "low_tom", "mid_tom",
                       "high_tom", "crash", "ride")
GROOVAE_CLASS_PITCHES = ((36,), (38, 37, 40), (42, 22, 44), (46, 26), (43, 58), (47, 45),
                         (50, 48), (49, 52, 55, 57), (51, 53, 59))
# Pitch written back for each class.
GROOVAE_CANONICAL_PITCH = np.array([p[0] for p in GROOVAE_CLASS_PITCHES], np.int32)

_PITCH_TO_CLASS = np.full(128, -1, np.int32)
for _c, _pitches in enumerate(GROOVAE_CLASS_PITCHES):
  _PITCH_TO_CLASS[list(_pitches)] = _c


def pitch_to_groovae_class(pitches) -> np.ndarray:
  """Maps MIDI drum pitches to GrooVAE class indices 0..8; -1 for pitches outside the table."""
  return _PITCH_TO_CLASS[np.asarray(pitches, np.int64)]
