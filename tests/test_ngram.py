"""midijax.ngram: the interpolated Witten-Bell and Kneser-Ney n-gram baselines."""
import math

import numpy as np
import pytest

from midijax.ngram import KneserNeyModel, NgramModel


def test_probabilities_sum_to_one_and_follow_counts():
  seqs = [[1, 2, 3, 1, 2, 3, 1, 2], [2, 3, 1]]
  lm = NgramModel(3, vocab_size=5).fit(seqs)
  for history in ([], [1], [1, 2], [4, 4], [3, 1, 2]):
    assert sum(lm.prob(history, w) for w in range(5)) == pytest.approx(1.0, abs=1e-12)
  # After "1 2" the data always continues with 3.
  assert lm.prob([1, 2], 3) > 0.5 > lm.prob([1, 2], 1)
  # Order 1 is the add-one unigram: (count + 1) / (tokens + vocab).
  uni = NgramModel(1, vocab_size=5).fit(seqs)
  assert uni.prob([1, 2], 3) == pytest.approx((3 + 1) / (11 + 5))
  with pytest.raises(ValueError, match="order"):
    NgramModel(0, 5)


def test_nll_scores_weighted_targets_on_their_windows():
  lm = NgramModel(2, vocab_size=4).fit([[1, 2, 1, 2, 1, 2]])
  inputs = np.array([[1, 2, 1]])
  targets = np.array([[2, 1, 2]])
  total, count = lm.nll(inputs, targets, np.array([[1.0, 1.0, 0.0]]))
  assert count == 2.0
  assert total == pytest.approx(-math.log(lm.prob([1], 2)) - math.log(lm.prob([1, 2], 1)))
  per_target = lm.token_nll(inputs, targets, np.array([[1.0, 1.0, 0.0]]))
  assert per_target[0, 0] == pytest.approx(-math.log(lm.prob([1], 2)))
  assert per_target[0, 2] == 0.0 and per_target.sum() == pytest.approx(total)


def test_kneser_ney_matches_a_hand_computation():
  # Bigrams (0,1) x2, (1,0) x2, (0,2) x1: counts of counts n1=1, n2=2, so Y = 1/5,
  # D1 = 1 - 2Y*2/1 = 0.2, D2 = 2 - 3Y*0/2 = 2, D3+ = 1.5 (no n3: halfway).
  # Unigram continuation counts (distinct left neighbours, the start counting as one):
  # 0 -> {start, 1} = 2, 1 -> {0} = 1, 2 -> {0} = 1; n1=2, n2=1, Y = 1/2: D1 = 0.5, D2 = 2.
  lm = KneserNeyModel(2, vocab_size=3).fit([[0, 1, 0, 1, 0, 2]])
  assert lm.discounts[1][:2] == pytest.approx((0.2, 2.0))
  assert lm.discounts[0][:2] == pytest.approx((0.5, 2.0))
  # p(w) = (max(c' - D, 0) + gamma / V) / 4, gamma = 0.5 * 2 + 2 * 1 = 3.
  uni = {0: (0 + 3 / 3) / 4, 1: (0.5 + 3 / 3) / 4, 2: (0.5 + 3 / 3) / 4}
  for w, p in uni.items():
    assert lm.prob([], w) == pytest.approx(p)
    assert lm.prob([2], w) == pytest.approx(p)  # history 2 never continued: back off
  # After 0: c(0,1) = 2, c(0,2) = 1, c(0) = 3, gamma = 0.2 * 1 + 2 * 1 = 2.2.
  assert lm.prob([0], 1) == pytest.approx((0 + 2.2 * uni[1]) / 3)
  assert lm.prob([0], 2) == pytest.approx((1 - 0.2 + 2.2 * uni[2]) / 3)
  assert lm.prob([0], 0) == pytest.approx(2.2 * uni[0] / 3)


def test_kneser_ney_sums_to_one_and_weighs_continuations():
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(0, 6, rng.integers(3, 40))) for _ in range(30)]
  lm = KneserNeyModel(4, vocab_size=8).fit(seqs)  # ids 6, 7 never seen
  for history in ([], [1], [1, 2], [7, 7], [3, 1, 2], list(seqs[0][:9]), [5, 6, 7]):
    probs = [lm.prob(history, w) for w in range(8)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)
    assert min(probs) > 0
  # Token 9 is frequent but only ever follows 8; token 3 is rarer but follows many tokens.
  # Kneser-Ney's lower order ranks by the variety of contexts: 3 above 9 after a history
  # it never saw; Witten-Bell's raw counts rank them the other way.
  seqs = [[8, 9] * 20, [1, 3, 2, 3, 4, 3, 5, 3, 0, 3]]
  kn = KneserNeyModel(2, vocab_size=10).fit(seqs)
  wb = NgramModel(2, vocab_size=10).fit(seqs)
  assert kn.prob([6], 3) > kn.prob([6], 9)
  assert wb.prob([6], 3) < wb.prob([6], 9)
  assert kn.prob([8], 9) > 0.9
  with pytest.raises(ValueError, match="order"):
    KneserNeyModel(0, 5)
