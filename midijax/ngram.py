"""Count-based n-gram language models over token ids: the baselines the Transformer's NLL
is compared with (benchmarks/groove_quality.py).

`NgramModel` is interpolated Witten-Bell, `KneserNeyModel` interpolated modified
Kneser-Ney; both `fit` token sequences, give `prob(history, w)` and score the
Transformer's eval windows with `nll`.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


class _WindowScoring:
  """`nll` over the Transformer's eval windows, for any model with `prob(history, w)`."""

  def token_nll(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
                ) -> np.ndarray:
    """float64 [B, T]: each target's NLL in nats (0 where its weight is 0), target t of a
    row having history inputs[:t+1] (the same windows the Transformer is scored on)."""
    inputs, targets, weights = (np.asarray(a) for a in (inputs, targets, weights))
    out = np.zeros(targets.shape, np.float64)
    for r, (x, y, wts) in enumerate(zip(inputs, targets, weights)):
      for t in np.flatnonzero(wts > 0):
        out[r, t] = -math.log(self.prob(x[:t + 1], int(y[t])))
    return out

  def nll(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
          ) -> tuple:
    """(sum of weighted NLL in nats, sum of weights) of `token_nll`'s targets."""
    w = np.asarray(weights, np.float64)
    return float((self.token_nll(inputs, targets, weights) * w).sum()), float(w.sum())


class NgramModel(_WindowScoring):
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



class KneserNeyModel(_WindowScoring):
  """Interpolated modified Kneser-Ney n-gram language model over token ids (Chen & Goodman
  1999, the smoothing KenLM and SRILM use by default): a stronger count-based baseline.

  The top order uses raw counts; lower orders use continuation counts (the number of
  distinct tokens seen just before the n-gram, the start of a sequence counting as one),
  so a token that follows only one context gets little weight on its own. At every order

      p(w | h) = (max(c(h, w) - D(c), 0) + gamma(h) * p(w | h')) / c(h),
      gamma(h) = D1 * N1(h) + D2 * N2(h) + D3 * N3+(h),

  with h' the history one token shorter, N_k(h) the number of tokens seen k times (3 or
  more) after h, and the three discounts of each order estimated from its counts of counts
  (D_k = k - (k + 1) * Y * n_{k+1} / n_k, Y = n1 / (n1 + 2 n2)). The unigram is
  interpolated with a uniform distribution over the vocabulary, so every id has nonzero
  probability. A history never seen at some order backs off to the shorter one.

  Hand-written: no maintained Python package fits (KenLM needs its C++ build and a text
  file round trip; nltk's KneserNeyInterpolated is not installed and scores a held-out
  window thousands of times slower).
  """

  def __init__(self, order: int, vocab_size: int):
    if order < 1:
      raise ValueError(f"order must be >= 1, got {order}")
    self.order, self.vocab_size = order, vocab_size
    # counts[k]: history (k ids) -> {next id: count}; raw at the top order, continuation
    # counts below it.
    self.counts = [dict() for _ in range(order)]
    self.discounts = [(0.0, 0.0, 0.0)] * order

  def fit(self, sequences: Iterable[Sequence[int]]) -> "KneserNeyModel":
    n = self.order
    top: dict = {}  # raw counts of order-n n-grams (n-1 ids of history)
    # left[k]: (k+1)-gram -> set of the ids seen before it (-1: the sequence start).
    left = [dict() for _ in range(n - 1)]
    for seq in sequences:
      seq = [int(t) for t in seq]
      for i, w in enumerate(seq):
        if i >= n - 1:
          gram = tuple(seq[i - n + 1:i + 1])
          top[gram] = top.get(gram, 0) + 1
        for k in range(min(n - 2, i) + 1):
          gram = tuple(seq[i - k:i + 1])
          left[k].setdefault(gram, set()).add(seq[i - k - 1] if i - k > 0 else -1)
    tables = [{g: len(s) for g, s in lk.items()} for lk in left] + [top]
    for k, table in enumerate(tables):
      ck = self.counts[k]
      for gram, c in table.items():
        ck.setdefault(gram[:-1], {})[gram[-1]] = c
      self.discounts[k] = self._discounts(table.values())
    self._gammas = []
    for k, ck in enumerate(self.counts):
      d1, d2, d3 = self.discounts[k]
      g = {}
      for h, d in ck.items():
        n1 = sum(1 for c in d.values() if c == 1)
        n2 = sum(1 for c in d.values() if c == 2)
        g[h] = (sum(d.values()), d1 * n1 + d2 * n2 + d3 * (len(d) - n1 - n2))
      self._gammas.append(g)
    return self

  @staticmethod
  def _discounts(counts) -> tuple:
    """(D1, D2, D3+) from counts of counts (Chen & Goodman's estimates), each in [0, k]."""
    n = np.bincount(np.fromiter((min(c, 5) for c in counts), np.int64), minlength=6)
    if n[1] == 0 or n[2] == 0:
      return (0.5, 1.0, 1.5)  # too few counts to estimate: halfway discounts
    y = n[1] / (n[1] + 2 * n[2])
    out = []
    for k in (1, 2, 3):
      d = k - (k + 1) * y * n[k + 1] / n[k] if n[k] else k / 2
      out.append(float(np.clip(d, 0.0, k)))
    return tuple(out)

  def prob(self, history: Sequence[int], w: int) -> float:
    """p(w | the last order-1 ids of history)."""
    p = 1.0 / self.vocab_size
    history = tuple(int(t) for t in history[max(0, len(history) - self.order + 1):])
    for k in range(len(history) + 1):
      h = history[len(history) - k:]
      tot = self._gammas[k].get(h)
      if tot is None:
        break
      c_h, gamma = tot
      c = self.counts[k][h].get(w, 0)
      d = self.discounts[k][min(c, 3) - 1] if c else 0.0
      p = (max(c - d, 0.0) + gamma * p) / c_h
    return p

