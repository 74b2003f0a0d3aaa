"""Cached decoding agrees with the uncached network; beam search with one beam is greedy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5tpu import decoding, partitioning
from t5tpu import layout as layout_lib
from tests import tiny


@pytest.fixture(scope='module')
def setup():
  # Random weights give flat distributions: scale up the logits so decodes are not all EOS.
  model = tiny.tiny_model(vocab_size=64, num_heads=4, head_dim=8)
  params = model.init_params(jax.random.PRNGKey(3), {'encoder_input_tokens': (4, 12),
                                                     'decoder_input_tokens': (4, 10)})
  params['decoder']['logits_dense']['kernel'] *= 8.0
  rng = np.random.RandomState(0)
  enc = rng.randint(2, 64, (4, 12)).astype(np.int32)
  enc[1, 7:] = 0
  batch = {'encoder_input_tokens': jnp.asarray(enc),
           'decoder_input_tokens': jnp.zeros((4, 10), jnp.int32)}
  return model, params, batch


def shift_right(tokens):
  return jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)


def test_cached_greedy_equals_uncached_argmax(setup):
  model, params, batch = setup
  tokens = decoding.predict(model, params, batch, method='greedy')
  assert tokens.shape == (4, 10)
  assert int(jnp.sum(tokens > 1)) > 10  # a real decode, not all EOS / padding
  # Full forward pass on the decoded prefix: its argmax must reproduce every token.
  logits = model.logits(params, {'encoder_input_tokens': batch['encoder_input_tokens'],
                                 'decoder_input_tokens': shift_right(tokens)})
  argmax = np.asarray(jnp.argmax(logits, -1))
  tokens = np.asarray(tokens)
  for row in range(4):
    end = list(tokens[row]).index(1) + 1 if 1 in tokens[row] else 10
    np.testing.assert_array_equal(argmax[row, :end], tokens[row, :end])
    assert (tokens[row, end:] == 0).all()


def test_beam_of_one_is_greedy(setup):
  model, params, batch = setup
  greedy = decoding.predict(model, params, batch, method='greedy')
  beam = decoding.predict(model, params, batch, method='beam', num_decodes=1, alpha=0.0)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(beam))


def test_beam_search_scores_are_sorted_and_consistent(setup):
  model, params, batch = setup
  seqs, scores = decoding.predict(model, params, batch, method='beam', num_decodes=4,
                                  alpha=0.6, return_scores=True, return_all_decodes=True)
  assert seqs.shape == (4, 4, 10)
  scores = np.asarray(scores)
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  # The best beam's score is its log-likelihood (teacher forced) over the brevity penalty.
  best = seqs[:, 0]
  logits = model.logits(params, {'encoder_input_tokens': batch['encoder_input_tokens'],
                                 'decoder_input_tokens': shift_right(best)})
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), best[..., None], -1)[..., 0]
  mask = np.asarray(best) > 0
  lengths = mask.sum(1)
  expected = np.asarray((logp * mask).sum(1)) / ((5.0 + lengths) / 6.0) ** 0.6
  finished = (np.asarray(best) == 1).any(1)
  np.testing.assert_allclose(scores[finished, 0], expected[finished], rtol=1e-4, atol=1e-4)
  # Beam search finds a sequence at least as likely (under its score) as greedy's.
  greedy, greedy_logp = decoding.predict(model, params, batch, method='greedy',
                                         return_scores=True)
  g_len = (np.asarray(greedy) > 0).sum(1)
  greedy_score = np.asarray(greedy_logp) / ((5.0 + g_len) / 6.0) ** 0.6
  g_fin = (np.asarray(greedy) == 1).any(1)
  assert (scores[g_fin & finished, 0] >= greedy_score[g_fin & finished] - 1e-4).all()


def test_every_beam_is_scored_against_its_own_example(setup):
  """The beams of an example share its encoder output (one copy, not k): with EOS disabled
  and no length penalty, each of the k beams of every example scores exactly the
  teacher-forced log-likelihood of its sequence given that example's input."""
  model, params, batch = setup
  seqs, scores = decoding.predict(model, params, batch, method='beam', num_decodes=3,
                                  alpha=0.0, eos_id=-1, return_scores=True,
                                  return_all_decodes=True)
  b, k, length = seqs.shape
  assert (b, k, length) == (4, 3, 10)
  flat = seqs.reshape(b * k, length)
  logits = model.logits(params, {
      'encoder_input_tokens': jnp.repeat(batch['encoder_input_tokens'], k, axis=0),
      'decoder_input_tokens': shift_right(flat)})
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), flat[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), np.asarray(logp.sum(1)),
                             rtol=1e-5, atol=1e-4)
  # and the beams differ: k distinct hypotheses per example
  assert all(len({tuple(s) for s in np.asarray(seqs[i])}) == k for i in range(b))


def test_sampling_respects_topk_and_temperature(setup):
  model, params, batch = setup
  a = decoding.predict(model, params, batch, jax.random.PRNGKey(1), method='sample',
                       temperature=1.0, topk=0)
  b = decoding.predict(model, params, batch, jax.random.PRNGKey(2), method='sample',
                       temperature=1.0, topk=0)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  # topk=1 sampling is greedy whatever the temperature.
  c = decoding.predict(model, params, batch, jax.random.PRNGKey(1), method='sample',
                       temperature=5.0, topk=1)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(
      decoding.predict(model, params, batch, method='greedy')))


def test_partitioned_predict_fn_matches(setup):
  model, params, batch = setup
  layout = layout_lib.ParamLayout.for_model(model, partitioning.PjitPartitioner(num_partitions=2))
  fn = decoding.make_predict_fn(model, layout, method='greedy')
  sharded_params = layout.place(params)
  tokens, _ = fn(sharded_params, batch, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(
      decoding.predict(model, params, batch, method='greedy')))
