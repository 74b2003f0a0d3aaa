import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5tpu import losses


def reference_loss(logits, targets, z_loss):
  log_z = jax.nn.logsumexp(logits, -1)
  return -jnp.sum(targets * jax.nn.log_softmax(logits), -1) + z_loss * log_z ** 2


def test_custom_vjp_matches_autodiff():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 5, 11) * 3, jnp.float32)
  targets = jax.nn.one_hot(rng.randint(0, 11, (3, 5)), 11) * 0.9 + 0.1 / 11
  for z in (0.0, 1e-4, 0.1):
    ours = lambda l: jnp.sum(losses.cross_entropy_with_logits(l, targets, jnp.float32(z))[0])
    ref = lambda l: jnp.sum(reference_loss(l, targets, z))
    np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)


def test_label_smoothing_perfect_prediction_is_near_zero():
  vocab, ls = 7, 0.1
  targets = jnp.array([[1, 2, 3]])
  conf, low = 1 - ls, ls / (vocab - 1)
  probs = jax.nn.one_hot(targets, vocab) * (conf - low) + low
  loss, *_ = losses.compute_weighted_cross_entropy(jnp.log(probs), targets, None, ls, 0.0)
  assert abs(float(loss)) < 1e-5


def test_normalizing_factors():
  weights = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
  n, _ = losses.loss_normalizer(None, weights)
  assert float(n) == 1.0
  n, _ = losses.loss_normalizer('NUM_REAL_TARGET_TOKENS', weights)
  assert float(n) == 4.0
  n, _ = losses.loss_normalizer('NUM_TOTAL_TARGET_TOKENS', weights)
  assert float(n) == 8.0
  n, _ = losses.loss_normalizer(233472, weights)
  assert float(n) == 233472.0
  n, w = losses.loss_normalizer('AVERAGE_PER_SEQUENCE', weights)
  assert float(n) == 2.0
  np.testing.assert_allclose(w, [[1 / 3, 1 / 3, 1 / 3, 0], [1, 0, 0, 0]], rtol=1e-6)
  # Packed: row 0 holds two sequences of 2 and 1 tokens.
  seg = jnp.array([[1, 1, 2, 0], [1, 0, 0, 0]])
  n, w = losses.loss_normalizer('AVERAGE_PER_SEQUENCE', weights, seg)
  assert float(n) == 3.0
  np.testing.assert_allclose(w, [[0.5, 0.5, 1, 0], [1, 0, 0, 0]], rtol=1e-6)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    losses.parse_normalizing_factor('NUM_TOKENS')
