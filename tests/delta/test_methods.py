"""Each delta method: where it starts, what trains, what stays frozen, that it learns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5tpu import data, decoding, delta, errors, layout as layout_lib, partitioning, trainer
from t5tpu.delta import base as delta_base
from tests import tiny
from tests.delta import common

SHAPES = layout_lib.input_shapes(8, tiny.LENGTHS)
EXACT_AT_INIT = ('lora', 'adapter', 'pfeiffer', 'bitfit', 'bitfit_ln')


def batch(seed=0, n=8):
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, 200, (n, 16)).astype(np.int32)
  enc[:, 11:] = 0
  enc[1, 5:] = 0
  tgt = rng.randint(3, 200, (n, 8)).astype(np.int32)
  tgt[::2, 6:] = 0
  dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.float32)}


@pytest.fixture(scope='module')
def base_params():
  return jax.device_get(tiny.tiny_model().init_params(jax.random.PRNGKey(0), SHAPES))


def make_trainer(cfg, lr=0.02, part=None, **model_kw):
  return trainer.Trainer(common.model(cfg, **model_kw), part or partitioning.PjitPartitioner(),
                         lambda step: lr, None, SHAPES)


def start(tr, base_params, seed=3):
  full = delta.merge(delta.split(tr.delta, tr.init_params(jax.random.PRNGKey(seed)))[0],
                     base_params)  # the base's values; bitfit_ln's scales from the base too
  base = {k: v for k, v in traverse_util.flatten_dict(full).items() if not tr.delta.added(k)}
  trainable, frozen = delta_base.start_from_base(
      tr, traverse_util.unflatten_dict(base), jax.random.PRNGKey(seed))
  tr.set_frozen(frozen)
  return tr.state_from_params(trainable)


@pytest.mark.parametrize('name', sorted(common.METHODS))
def test_start_count_and_frozen_base(name, base_params):
  cfg = common.METHODS[name]
  tr = make_trainer(cfg)
  state = start(tr, base_params)
  # The trainable count is docs/delta-tuning.md's formula; nothing else trains.
  assert tr.trainable_layout.num_values() == common.trainable_count(cfg, tr.model.config)
  n_base = sum(x.size for x in jax.tree.leaves(base_params))
  assert tr.params_layout.num_values() == n_base + sum(
      a.size for k, a in traverse_util.flatten_dict(tr.params_layout.abstract).items()
      if cfg.added(k))
  # Step 0: LoRA, adapters and BitFit are exactly the base model; prefix and prompt are not.
  b = batch()
  ref = tiny.tiny_model().logits(base_params, b)
  out = tr.model.logits(tr.full_params(state.params), b)
  if name in EXACT_AT_INIT:
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  else:
    assert not np.allclose(np.asarray(out), np.asarray(ref))
  frozen_before = jax.device_get(tr.frozen)
  rng = jax.random.PRNGKey(0)
  losses = []
  for i in range(12):
    gb = data.make_global_batch(batch(i % 2), tr.batch_shardings(batch()))
    state, metrics = tr.train_step(state, gb, rng)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.05, losses  # it learns (two batches, memorised)
  # Every base parameter is bit-identical after training; every delta parameter moved.
  assert common.tree_equal(tr.frozen, frozen_before)
  assert common.tree_equal(delta.split(cfg, tr.full_params(state.params))[1], frozen_before)
  assert set(traverse_util.flatten_dict(jax.device_get(tr.frozen))).isdisjoint(
      traverse_util.flatten_dict(jax.device_get(state.params)))


def test_bfloat16_base_is_half_the_memory(base_params):
  cfg = delta.DeltaConfig(lora=delta.LoRA(rank=4), base_dtype='bfloat16')
  tr = make_trainer(cfg)
  state = start(tr, base_params)
  assert {x.dtype for x in jax.tree.leaves(tr.frozen)} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  gb = data.make_global_batch(batch(), tr.batch_shardings(batch()))
  state, metrics = tr.train_step(state, gb, jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics['loss']))


@pytest.mark.parametrize('name', ['lora', 'prefix'])
def test_sharded_delta_step_equals_one_device(name, base_params):
  assert jax.device_count() == 8
  kw = dict(num_heads=4, head_dim=8, dropout_rate=0.1)
  base = jax.device_get(tiny.tiny_model(**kw).init_params(jax.random.PRNGKey(0), SHAPES))
  results = []
  for part in (partitioning.PjitPartitioner(devices=jax.devices()[:1]),
               partitioning.PjitPartitioner(num_partitions=4)):
    tr = make_trainer(common.METHODS[name], part=part, **kw)
    state = start(tr, base)
    losses = []
    for i in range(3):
      gb = data.make_global_batch(batch(i), tr.batch_shardings(batch()))
      state, metrics = tr.train_step(state, gb, jax.random.PRNGKey(42))
      losses.append(float(metrics['loss']))
    results.append((losses, jax.device_get(state.params), tr, state))
  (l1, p1, _, _), (l8, p8, tr8, state8) = results
  assert dict(tr8.partitioner.mesh.shape) == {'data': 2, 'model': 4}
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p1, p8)
  flat = traverse_util.flatten_dict(state8.params)
  if name == 'lora':  # A follows `embed` (replicated), B follows `joined_kv` (over model)
    a = flat[('encoder', 'layers_0', 'attention', 'query', 'lora_a')]
    b = flat[('encoder', 'layers_0', 'attention', 'query', 'lora_b')]
    assert tuple(a.sharding.spec) in ((None, None), ())
    assert b.sharding.spec[1] == 'model'
  else:
    out = flat[('encoder', 'layers_0', 'attention', 'prefix', 'mlp_out')]
    assert out.sharding.spec[1] == 'model'


def test_prefix_on_t5_1_1_shape_with_padding_in_greedy_decoding():
  # heads x head_dim (3 x 16 = 48) != d_model (32), gated GELU, untied logits.
  cfg = delta.DeltaConfig(prefix=delta.Prefix(length=5, reparameterize=False, init_scale=1.0))
  m = common.model(cfg, num_heads=3, head_dim=16)
  params = m.init_params(jax.random.PRNGKey(0), SHAPES)
  b = batch(4, n=4)
  tokens = decoding.predict(m, params, b, method='greedy', max_decode_length=8)
  # Cached one-token decoding agrees with the full forward pass over the same tokens.
  dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), tokens[:, :-1]], axis=1)
  full = m.logits(params, {'encoder_input_tokens': b['encoder_input_tokens'],
                           'decoder_input_tokens': dec_in})
  np.testing.assert_array_equal(np.asarray(jnp.argmax(full, -1)), np.asarray(tokens))
  # More padding changes nothing: the prefix is never masked, padding always is.
  wider = np.zeros((4, 24), np.int32)
  wider[:, :16] = b['encoder_input_tokens']
  again = decoding.predict(m, params, {**b, 'encoder_input_tokens': wider}, method='greedy',
                           max_decode_length=8)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(tokens))


def test_prompt_decoding_equals_forward_pass():
  m = common.model(common.METHODS['prompt'])
  params = m.init_params(jax.random.PRNGKey(0), SHAPES)
  b = batch(5, n=4)
  tokens = decoding.predict(m, params, b, method='greedy', max_decode_length=8)
  dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), tokens[:, :-1]], axis=1)
  full = m.logits(params, {'encoder_input_tokens': b['encoder_input_tokens'],
                           'decoder_input_tokens': dec_in})
  np.testing.assert_array_equal(np.asarray(jnp.argmax(full, -1)), np.asarray(tokens))
  beams = decoding.predict(m, params, b, method='beam', num_decodes=2, max_decode_length=8)
  assert beams.shape == tokens.shape


def test_fold_prefix_is_exact():
  m = common.model(common.METHODS['prefix'])
  params = m.init_params(jax.random.PRNGKey(0), SHAPES)
  folded_model, folded = delta_base.fold_prefix(m, params)
  assert not folded_model.config.delta.prefix.reparameterize
  assert not any('mlp_in' in k for k in traverse_util.flatten_dict(folded))
  b = batch()
  np.testing.assert_allclose(np.asarray(folded_model.logits(folded, b)),
                             np.asarray(m.logits(params, b)), rtol=1e-5, atol=1e-5)


def test_prompt_starts_from_vocabulary_embeddings(base_params):
  tr = make_trainer(common.METHODS['prompt'])
  state = start(tr, base_params)
  prompt = np.asarray(state.params['encoder']['prompt']['embedding'])
  table = base_params['token_embedder']['embedding']
  for row in prompt:
    assert np.any(np.all(table == row, axis=1))


def test_unknown_lora_target_lists_the_modules():
  cfg = delta.DeltaConfig(lora=delta.LoRA(targets=('query', 'qkv')))
  with pytest.raises(errors.UserError, match=r"'qkv' matches no projection.*'wi_0'"):
    make_trainer(cfg)
  make_trainer(delta.DeltaConfig(lora=delta.LoRA(targets=('q', 'v', 'wi.*', r'decoder/.*/out'))))
