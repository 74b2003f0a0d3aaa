"""A train step on a (data=2, model=4) mesh equals the same step on one device."""
import jax
import numpy as np
import pytest

from t5tpu import data, optimizers, partitioning, trainer
from tests import tiny

SHAPES = {'encoder_input_tokens': (8, 16), 'decoder_input_tokens': (8, 8)}


def make_batch(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, 200, (8, 16)).astype(np.int32)
  enc[:, 12:] = 0
  tgt = rng.randint(2, 200, (8, 8)).astype(np.int32)
  tgt[::2, 6:] = 0
  dec_in = np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.float32)}


def run_steps(part, host_params, steps=2, num_microbatches=None, model=None):
  model = model or tiny.tiny_model(num_heads=4, head_dim=8, dropout_rate=0.1)
  tr = trainer.Trainer(model, part, optimizers.create_learning_rate_scheduler(
      base_learning_rate=0.01), num_microbatches, SHAPES)
  state = tr.state_from_params(host_params)
  rng = jax.random.PRNGKey(42)
  losses = []
  for i in range(steps):
    batch = make_batch(i)
    state, metrics = tr.train_step(state, data.make_global_batch(batch, tr.batch_shardings(batch)),
                                   rng)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), state


def initial_params():
  model = tiny.tiny_model(num_heads=4, head_dim=8)
  return jax.device_get(model.init_params(jax.random.PRNGKey(0), SHAPES))


@pytest.mark.parametrize('act_dims,param_dims', [(1, 1), (2, 2)])
def test_sharded_step_equals_single_device(act_dims, param_dims):
  assert jax.device_count() == 8
  params = initial_params()
  single = partitioning.PjitPartitioner(devices=jax.devices()[:1])
  rules = partitioning.standard_logical_axis_rules(act_dims, param_dims)
  sharded = partitioning.PjitPartitioner(num_partitions=4, logical_axis_rules=rules)
  assert dict(sharded.mesh.shape) == {'data': 2, 'model': 4}
  l1, p1, _ = run_steps(single, params)
  l8, p8, state8 = run_steps(sharded, params)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p8)
  # Parameters really are split: the query kernel's joined_kv axis over 'model'.
  q = state8.params['encoder']['layers_0']['attention']['query']['kernel']
  assert q.sharding.spec[1] == 'model'
  assert q.addressable_shards[0].data.shape == (q.shape[0] // (2 if param_dims == 2 else 1),
                                                q.shape[1] // 4)


def test_state_created_sharded_without_host_copy():
  part = partitioning.PjitPartitioner(num_partitions=4)
  tr = trainer.Trainer(tiny.tiny_model(num_heads=4, head_dim=8), part,
                       optimizers.create_learning_rate_scheduler(), None, SHAPES)
  state = tr.init_state(jax.random.PRNGKey(0))
  emb = state.params['token_embedder']['embedding']
  assert emb.sharding.spec == jax.sharding.PartitionSpec('model', None)
  v_col = state.opt_state.param_states['token_embedder']['embedding']['v']
  assert len({s.device for s in v_col.addressable_shards}) == 8


@pytest.mark.parametrize('num_partitions,num_microbatches', [(2, 2), (4, 4)])
def test_microbatches_equal_one_big_batch(num_partitions, num_microbatches):
  params = initial_params()
  part = partitioning.PjitPartitioner(num_partitions=num_partitions)
  model = tiny.tiny_model(num_heads=4, head_dim=8, dropout_rate=0.0)
  l1, p1, _ = run_steps(part, params, model=model)
  l4, p4, _ = run_steps(part, params, num_microbatches=num_microbatches, model=model)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


def test_bad_partition_count_is_a_clear_error():
  with pytest.raises(ValueError, match='must divide'):
    partitioning.PjitPartitioner(num_partitions=3)
  part = partitioning.PjitPartitioner(num_partitions=2)
  with pytest.raises(ValueError, match='BATCH_SIZE=6 must be a multiple'):
    part.check_batch_size(6)
  part.check_batch_size(8, 2)
  with pytest.raises(ValueError, match='NUM_MICROBATCHES=4 gives microbatches'):
    part.check_batch_size(8, 4)  # 2 examples per microbatch over 4 data-parallel devices
  with pytest.raises(ValueError, match='NUM_MICROBATCHES=3'):  # the trainer checks it too
    run_steps(part, initial_params(), steps=1, num_microbatches=3)
