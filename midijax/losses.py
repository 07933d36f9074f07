"""Token losses and the evaluation step, shared by training and evaluation.

`weighted_cross_entropy` and `weighted_accuracy` return sums and their weights, so
batches and devices combine exactly; `eval_step` scores one batch and `evaluate` a whole
split, token-weighted (padding excluded).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits, targets):
  """float32 [B, T]: each target's NLL in nats under logits [B, T, V] (no weighting)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def weighted_cross_entropy(logits, targets, weights, label_smoothing: float = 0.0):
  """Returns (sum of weighted token NLL in nats, sum of weights).

  logits: float32 [B, T, V]; targets: int [B, T]; weights: float [B, T] (0 for padding).
  With label smoothing the loss is against the smoothed targets, minus that distribution's
  entropy, so a perfect model still scores 0.
  """
  vocab = logits.shape[-1]
  nll = token_nll(logits, targets)
  if label_smoothing > 0:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    smooth = -jnp.mean(jnp.where(logp > -1e9, logp, 0.0), axis=-1) * vocab / (vocab - 1)
    normalizer = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    nll = confidence * nll + label_smoothing * smooth - normalizer
  return jnp.sum(nll * weights), jnp.sum(weights)


def weighted_accuracy(logits, targets, weights):
  """Returns (number of weighted tokens whose argmax is the target, sum of weights)."""
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


def apply_model(graphdef, params, batch, deterministic: bool, dropout_rng):
  """Logits float32 [B, T, V] of the model `nnx.merge(graphdef, params)` on a batch
  (dict with "inputs" and optional "segment_ids" / "positions", int [B, T])."""
  model = nnx.merge(graphdef, params)
  return model(batch["inputs"], segment_ids=batch.get("segment_ids"),
               positions=batch.get("positions"), deterministic=deterministic,
               dropout_rng=dropout_rng)


def eval_step(params, batch: Dict[str, jax.Array], *, graphdef):
  """Summed NLL (nats), correct predictions and token count of one batch (padding excluded)."""
  logits = apply_model(graphdef, params, batch, True, None)
  loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
  correct, _ = weighted_accuracy(logits, batch["targets"], batch["weights"])
  return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct}


def summarize(sums: Dict[str, float]) -> Dict[str, float]:
  """Token-weighted means: loss (nats/token), perplexity, accuracy."""
  w = max(float(sums["weight_sum"]), 1.0)
  loss = float(sums["loss_sum"]) / w
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
          "accuracy": float(sums["correct"]) / w, "tokens": float(sums["weight_sum"])}


def evaluate(eval_fn: Callable, params, batches: Iterator, to_global: Callable) -> Dict[str, float]:
  """Runs `eval_fn` (a jitted `eval_step`) over every batch; returns the token-weighted
  summary. `to_global` turns a host batch into the arrays `eval_fn` takes."""
  totals = {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}
  pending = []
  for batch in batches:
    pending.append(eval_fn(params, to_global(batch)))
  for m in jax.device_get(pending):
    for k in totals:
      totals[k] += float(m[k])
  return summarize(totals)


def score_batches(model, batches) -> Dict[str, float]:
  """`evaluate` of an NNX model on host batches, on this process's default device."""
  graphdef, params = nnx.split(model)
  eval_fn = jax.jit(lambda p, b: eval_step(p, b, graphdef=graphdef))
  return evaluate(eval_fn, params, iter(batches), lambda b: b)
