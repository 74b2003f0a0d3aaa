"""Cross entropy with z-loss and label smoothing, summed and normalised as t5x does.

The per-token loss is `CE + z_loss * logsumexp(logits)**2`. Token losses are weighted by
`decoder_loss_weights` and summed over the batch; the sum is divided by a loss-normalising
factor: None (keep the sum, t5x's default), a number (233472 = 2048 * 114 for fine-tuning the
public MTF-pretrained checkpoints), or one of the special factors below, which are computed
from the *whole* batch so that gradient accumulation over microbatches gives the same loss.
"""
from __future__ import annotations

import enum
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np


class SpecialLossNormalizingFactor(enum.Enum):
  NUM_REAL_TARGET_TOKENS = 1   # tokens with non-zero loss weight
  NUM_TOTAL_TARGET_TOKENS = 2  # every target position, padding included
  AVERAGE_PER_SEQUENCE = 3     # mean over sequences of each sequence's mean token loss


LossNormalizingFactor = Optional[Union[float, int, str, SpecialLossNormalizingFactor]]


@jax.custom_vjp
def cross_entropy_with_logits(logits, targets, z_loss):
  """Per-position soft-target cross entropy plus z-loss; returns (loss, z_loss_term).

  The custom gradient keeps only what the backward pass needs ([..., vocab] softmax once),
  instead of the autodiff tape of logsumexp.
  """
  loss, z_term, _ = _ce_forward(logits, targets, z_loss)
  return loss, z_term


def _ce_forward(logits, targets, z_loss):
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  log_softmax = logits - log_z
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  log_z = jnp.squeeze(log_z, axis=-1)
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term, (log_softmax, log_z)


def _ce_fwd(logits, targets, z_loss):
  loss, z_term, (log_softmax, log_z) = _ce_forward(logits, targets, z_loss)
  return (loss, z_term), (log_softmax, log_z, targets, z_loss)


def _ce_bwd(res, g):
  log_softmax, log_z, targets, z_loss = res
  g_loss = g[0]  # the z term is reported for logging; its gradient flows through g_loss
  softmax = jnp.exp(log_softmax)
  # d/dlogits [-sum(t * log_softmax) + z * log_z^2] = softmax * sum(t) - t + 2 z log_z softmax
  target_mass = jnp.sum(targets, axis=-1, keepdims=True)
  dlogits = softmax * (target_mass + 2.0 * z_loss * log_z[..., None]) - targets
  dlogits = dlogits * g_loss[..., None]
  dtargets = -log_softmax * g_loss[..., None]
  return dlogits, dtargets, jnp.zeros_like(z_loss)


cross_entropy_with_logits.defvjp(_ce_fwd, _ce_bwd)


def parse_normalizing_factor(factor: LossNormalizingFactor):
  """Accepts gin-friendly strings ('NUM_REAL_TARGET_TOKENS', '233472') and enum members."""
  if factor is None or isinstance(factor, SpecialLossNormalizingFactor):
    return factor
  if isinstance(factor, str):
    name = factor.rsplit('.', 1)[-1]
    if name in SpecialLossNormalizingFactor.__members__:
      return SpecialLossNormalizingFactor[name]
    try:
      return float(name)
    except ValueError:
      raise ValueError(
          f'loss_normalizing_factor={factor!r} is not a number or one of '
          f'{list(SpecialLossNormalizingFactor.__members__)}') from None
  return float(factor)


def sequence_weights_and_count(weights, segment_ids=None):
  """AVERAGE_PER_SEQUENCE: each token's weight divided by its sequence's token count.

  Packed rows hold several sequences, told apart by `segment_ids` (0 = padding).
  Returns the new weights and the number of sequences.
  """
  weights = weights.astype(jnp.float32)
  if segment_ids is None:
    counts = jnp.sum(weights, axis=-1, keepdims=True)
    num_sequences = jnp.sum(counts > 0)
    return jnp.where(counts > 0, weights / jnp.maximum(counts, 1e-9), 0.0), num_sequences
  max_segments = segment_ids.shape[-1] + 1
  onehot = jax.nn.one_hot(segment_ids, max_segments, dtype=jnp.float32)  # [b, l, s]
  per_segment = jnp.einsum('bl,bls->bs', weights, onehot)  # token count per segment
  per_segment = per_segment.at[:, 0].set(0.0)  # segment 0 is padding
  count_at_token = jnp.einsum('bs,bls->bl', per_segment, onehot)
  new_weights = jnp.where(count_at_token > 0, weights / jnp.maximum(count_at_token, 1e-9), 0.0)
  return new_weights, jnp.sum(per_segment > 0)


def loss_normalizer(factor: LossNormalizingFactor, weights, segment_ids=None):
  """The number the summed loss is divided by, for this (whole) batch, and the weights."""
  factor = parse_normalizing_factor(factor)
  if factor is None:
    return jnp.float32(1.0), weights
  if factor is SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights).astype(jnp.float32), 1.0), weights
  if factor is SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    return jnp.float32(np.prod(weights.shape)), weights
  if factor is SpecialLossNormalizingFactor.AVERAGE_PER_SEQUENCE:
    new_weights, num = sequence_weights_and_count(weights, segment_ids)
    return jnp.maximum(num.astype(jnp.float32), 1.0), new_weights
  return jnp.float32(factor), weights


def compute_weighted_cross_entropy(logits, targets, weights=None, label_smoothing=0.0,
                                   z_loss=0.0, normalizer=1.0):
  """Summed weighted loss over the batch, divided by `normalizer`.

  Returns (loss, z_loss_part, cross_entropy_sum, weight_sum); the last two are for logging.
  """
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  # Entropy of the smoothed target: subtracted so a perfect model reaches zero loss.
  constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab, dtype=jnp.float32) * (confidence - low) + low
  token_loss, token_z = cross_entropy_with_logits(
      logits.astype(jnp.float32), soft_targets, jnp.float32(z_loss))
  token_loss = token_loss - constant
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  loss = jnp.sum(token_loss * weights) / normalizer
  z_part = jnp.sum(token_z * weights) / normalizer
  return loss, z_part, jnp.sum((token_loss - token_z) * weights), jnp.sum(weights)
