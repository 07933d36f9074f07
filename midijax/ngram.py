"""A count-based n-gram language model over token ids: the baseline the Transformer's NLL
is compared with (benchmarks/groove_quality.py)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


class NgramModel:
  """Interpolated Witten-Bell n-gram language model over token ids (a baseline for NLL).

  p(w | h) = (c(h, w) + T(h) * p(w | h')) / (c(h) + T(h)), with h' the history one token
  shorter, T(h) the number of distinct tokens seen after h, and an add-one unigram at the
  bottom, so every id of the vocabulary has nonzero probability. Contexts never cross the
  start of a sequence (shorter histories are used there).
  """

  def __init__(self, order: int, vocab_size: int):
    if order < 1:
      raise ValueError(f"order must be >= 1, got {order}")
    self.order, self.vocab_size = order, vocab_size
    # counts[k]: dict history(tuple of k ids) -> dict next id -> count
    self.counts = [dict() for _ in range(order)]

  def fit(self, sequences: Iterable[Sequence[int]]) -> "NgramModel":
    for seq in sequences:
      seq = [int(t) for t in seq]
      for i, w in enumerate(seq):
        for k in range(min(self.order - 1, i) + 1):
          h = tuple(seq[i - k:i])
          d = self.counts[k].setdefault(h, {})
          d[w] = d.get(w, 0) + 1
    self._totals = [{h: (sum(d.values()), len(d)) for h, d in ck.items()} for ck in self.counts]
    return self

  def prob(self, history: Sequence[int], w: int) -> float:
    """p(w | the last order-1 ids of history)."""
    uni_total, _ = self._totals[0].get((), (0, 0))
    p = (self.counts[0].get((), {}).get(w, 0) + 1) / (uni_total + self.vocab_size)
    history = tuple(int(t) for t in history[max(0, len(history) - self.order + 1):])
    for k in range(1, len(history) + 1):
      h = history[len(history) - k:]
      tot = self._totals[k].get(h)
      if tot is None:
        break
      c_h, types = tot
      p = (self.counts[k][h].get(w, 0) + types * p) / (c_h + types)
    return p

  def nll(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
          ) -> tuple:
    """(sum of NLL in nats, sum of weights) over batch rows, each row one sequence whose
    target t has history inputs[:t+1] (the same windows the Transformer is scored on)."""
    total, count = 0.0, 0.0
    for x, y, wts in zip(np.asarray(inputs), np.asarray(targets), np.asarray(weights)):
      for t in np.flatnonzero(wts > 0):
        total -= math.log(self.prob(x[:t + 1], int(y[t]))) * float(wts[t])
        count += float(wts[t])
    return total, count
