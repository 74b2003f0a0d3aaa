"""Tiny models and an in-memory seqio task for fast end-to-end tests."""
from __future__ import annotations

import numpy as np

from t5tpu import models, network, optimizers

COPY_TASK = 't5tpu_test_copy'
LENGTHS = {'inputs': 16, 'targets': 8}


def tiny_config(**overrides) -> network.T5Config:
  kw = dict(vocab_size=264, dtype='float32', emb_dim=32, num_heads=2, head_dim=16,
            num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64,
            mlp_activations=('gelu', 'linear'), dropout_rate=0.0, logits_via_embedding=False)
  kw.update(overrides)
  return network.T5Config(**kw)


def tiny_model(optimizer=None, **overrides) -> models.EncoderDecoderModel:
  import seqio
  vocab = seqio.ByteVocabulary()
  return models.EncoderDecoderModel(
      module=network.Transformer(tiny_config(**overrides)), input_vocabulary=vocab,
      output_vocabulary=vocab, optimizer_def=optimizer or optimizers.Adafactor())


def _words(n, seed):
  rng = np.random.RandomState(seed)
  letters = np.array(list('abcdefgh'))
  return [''.join(rng.choice(letters, rng.randint(2, 6))) for _ in range(n)]


def register_copy_task(name: str = COPY_TASK, n_train: int = 512, n_valid: int = 32):
  """inputs 'copy <w>' -> targets '<w>', on byte tokens."""
  import seqio
  import tensorflow as tf
  if name in seqio.TaskRegistry.names():
    return name
  splits = {'train': _words(n_train, 0), 'validation': _words(n_valid, 1)}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    words = splits[split]
    return tf.data.Dataset.from_tensor_slices(
        {'inputs': ['copy ' + w for w in words], 'targets': words})

  vocab = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      name, seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)},
      metric_fns=[exact_match])
  return name


def exact_match(targets, predictions):
  return {'exact_match': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}
