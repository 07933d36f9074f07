"""midijax.ngram: the interpolated Witten-Bell n-gram baseline."""
import math

import numpy as np
import pytest

from midijax.ngram import NgramModel


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
