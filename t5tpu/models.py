"""EncoderDecoderModel: loss, evaluation, scoring and prediction around the T5 network.

The model holds no training state: every method takes `params` explicitly, so the trainer can
jit, shard and donate as it likes. Batches use seqio's EncDecFeatureConverter features:
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and,
when packed, encoder/decoder_segment_ids and _positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from t5tpu import losses
from t5tpu.network import Transformer

Batch = Mapping[str, jax.Array]
_NETWORK_INPUTS = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                   'encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                   'decoder_positions')


def loss_weights(batch: Batch):
  """The batch's decoder_loss_weights; without them, 1 on every non-padding target token."""
  weights = batch.get('decoder_loss_weights')
  if weights is None:
    weights = (batch['decoder_target_tokens'] > 0).astype(jnp.float32)
  return weights


@dataclasses.dataclass
class EncoderDecoderModel:
  module: Transformer
  input_vocabulary: Any = None
  output_vocabulary: Any = None
  optimizer_def: Any = None
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: losses.LossNormalizingFactor = None
  # Decoding defaults (t5x's EncoderDecoderModel): beam search with one beam = greedy.
  decode_fn: Optional[Any] = None
  num_decodes: int = 1
  length_penalty_alpha: float = 0.6

  @property
  def config(self):
    return self.module.config

  # ----------------------------------------------------------------------- variables
  def get_initial_variables(self, rng, input_shapes: Mapping[str, tuple]):
    """Boxed (logically partitioned) variables for batches of these shapes."""
    enc = jnp.ones(input_shapes['encoder_input_tokens'], jnp.int32)
    dec = jnp.ones(input_shapes['decoder_input_tokens'], jnp.int32)
    return self.module.init({'params': rng, 'dropout': rng}, enc, dec, dec)

  def init_params(self, rng, input_shapes):
    return nn.unbox(self.get_initial_variables(rng, input_shapes)['params'])

  def abstract_variables(self, input_shapes):
    return jax.eval_shape(lambda: self.get_initial_variables(jax.random.PRNGKey(0),
                                                            input_shapes))

  # ----------------------------------------------------------------------- forward
  def logits(self, params, batch: Batch, dropout_rng=None):
    inputs = {k: batch[k] for k in _NETWORK_INPUTS if k in batch}
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply({'params': params}, **inputs,
                             enable_dropout=dropout_rng is not None, rngs=rngs)

  def loss_normalizer(self, batch: Batch):
    """(normalizer, loss weights) from the whole batch, before any microbatch split."""
    weights = loss_weights(batch)
    return losses.loss_normalizer(self.loss_normalizing_factor, weights,
                                  batch.get('decoder_segment_ids'))

  def loss_fn(self, params, batch: Batch, dropout_rng=None, normalizer=None):
    """Returns (loss, metric sums). `batch['decoder_loss_weights']` must already be final."""
    if normalizer is None:
      normalizer, weights = self.loss_normalizer(batch)
      batch = {**batch, 'decoder_loss_weights': weights}
    logits = self.logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = loss_weights(batch)
    loss, z_part, ce_sum, weight_sum = losses.compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, normalizer)
    real = targets > 0
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) & real)
    metrics = {
        'loss': loss,
        'z_loss': z_part,
        'cross_ent_sum': ce_sum,
        'weight_sum': weight_sum,
        'correct': correct.astype(jnp.float32),
        'target_tokens': jnp.sum(real).astype(jnp.float32),
        'input_tokens': jnp.sum(batch['encoder_input_tokens'] > 0).astype(jnp.float32),
    }
    return loss, metrics

  def eval_fn(self, params, batch: Batch):
    """Teacher-forced loss and metric sums without dropout."""
    _, metrics = self.loss_fn(params, batch)
    return metrics

  def score_batch(self, params, batch: Batch):
    """Log-likelihood of each target sequence (sum over tokens), no z-loss."""
    logits = self.logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = loss_weights(batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_ll * weights, axis=-1)

  # ----------------------------------------------------------------------- prediction
  def predict_batch(self, params, batch: Batch, rng=None, **decode_kwargs):
    """Decoded token ids [batch, max_decode_length] (see decoding.py)."""
    from t5tpu import decoding  # decoding imports this module's siblings only
    return decoding.predict(self, params, batch, rng=rng, **decode_kwargs)


def summarize_metrics(sums: Mapping[str, Any]) -> dict:
  """Metric sums -> per-token means for logging (accuracy and losses)."""
  sums = {k: float(np.asarray(v)) for k, v in sums.items()}
  tokens = max(sums.get('target_tokens', 0.0), 1.0)
  out = {'loss': sums['loss'], 'z_loss': sums['z_loss'],
         'cross_ent_loss_per_token': sums['cross_ent_sum'] / max(sums['weight_sum'], 1e-9),
         'accuracy': sums['correct'] / tokens,
         'target_tokens': sums['target_tokens'], 'input_tokens': sums['input_tokens']}
  return out
