"""Shared pieces of the checkpoint-format tests: the t5x fixture, tiny models, trainers."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from t5tpu import model_shapes, models, network, optimizers, partitioning
from t5tpu import trainer as trainer_lib
from t5tpu.formats import flatten


def fixture_path() -> str:
  """t5x's test_t5_tiny.checkpoint_0 (a T5.1.1 tiny legacy msgpack with Adafactor state)."""
  return os.path.join(os.path.dirname(__file__), '..', 'fixtures', 't5x',
                      'test_t5_tiny.checkpoint_0')


def named(name: str, **overrides) -> network.T5Config:
  return dataclasses.replace(model_shapes.named_configs()[name], **overrides)


def small_config(v11: bool, **overrides) -> network.T5Config:
  """A small float32 model; T5 1.1's has heads x head_dim != emb_dim."""
  kw = dict(vocab_size=100, dtype='float32', emb_dim=16, num_heads=4, head_dim=6 if v11 else 4,
            num_encoder_layers=2, num_decoder_layers=3, mlp_dim=32,
            mlp_activations=('gelu', 'linear') if v11 else ('relu',), dropout_rate=0.0,
            logits_via_embedding=not v11)
  kw.update(overrides)
  return network.T5Config(**kw)


def random_params(cfg: network.T5Config, seed: int = 0) -> dict:
  ones = jnp.ones((1, 4), jnp.int32)
  params = network.Transformer(cfg).init(jax.random.PRNGKey(seed), ones, ones)['params']
  return jax.tree.map(np.asarray, nn.unbox(params))


def padded_batch(vocab: int, seed: int = 0, batch: int = 2, enc_len: int = 40,
                 dec_len: int = 24):
  """Inputs and targets with padding at the end of one row each."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab, (batch, enc_len))
  enc[0, enc_len * 2 // 3:] = 0
  targets = rng.randint(2, vocab, (batch, dec_len))
  targets[-1, dec_len // 2:] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), targets.dtype), targets[:, :-1]], axis=1)
  return enc, dec_in, targets


def logits(cfg, params, enc, dec_in, targets) -> np.ndarray:
  return np.asarray(network.Transformer(cfg).apply(
      {'params': params}, jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(targets)))


def make_trainer(cfg: network.T5Config, optimizer=None) -> trainer_lib.Trainer:
  model = models.EncoderDecoderModel(module=network.Transformer(cfg),
                                     optimizer_def=optimizer or optimizers.Adafactor())
  return trainer_lib.Trainer(model, partitioning.PjitPartitioner(num_partitions=1),
                             lambda step: 1e-3, None,
                             {'encoder_input_tokens': (2, 8), 'decoder_input_tokens': (2, 4)})


def assert_trees_equal(a, b):
  """Same names, dtypes and bits."""
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))[:10]
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype, (k, x.dtype, y.dtype)
    assert x.shape == y.shape and np.array_equal(x, y), k
