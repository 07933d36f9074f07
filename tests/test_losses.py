"""midijax.losses: the weighted loss and accuracy training and evaluation share."""
import jax.numpy as jnp
import numpy as np

from midijax import losses


def test_weighted_loss_excludes_padding():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  targets = jnp.array([[0, 1]])
  s, w = losses.weighted_cross_entropy(logits, targets, jnp.array([[1.0, 0.0]]))
  assert abs(float(s) - np.log(2)) < 1e-6 and float(w) == 1.0
  correct, w = losses.weighted_accuracy(logits, targets, jnp.array([[1.0, 1.0]]))
  assert float(correct) == 1.0 and float(w) == 2.0  # argmax 0 is right, argmax 0 != 1
  summary = losses.summarize({"loss_sum": 2 * np.log(2), "weight_sum": 2.0, "correct": 1.0})
  assert summary["loss"] == np.log(2) and abs(summary["perplexity"] - 2.0) < 1e-12
  assert summary["accuracy"] == 0.5 and summary["tokens"] == 2.0
