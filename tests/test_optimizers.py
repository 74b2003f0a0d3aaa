import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from t5tpu import optimizers
from tests.test_network import fixture_path


def test_adafactor_state_shapes_match_t5x():
  opt = optimizers.Adafactor()
  params = {'wi_0': jnp.zeros((768, 2048)), 'wo': jnp.zeros((2048, 768)),
            'embedding': jnp.zeros((32128, 512)), 'rel': jnp.zeros((12, 32)),
            'scale': jnp.zeros((768,)), 'small': jnp.zeros((64, 127))}
  state = opt.make(1e-3).init(params).param_states
  shapes = {k: {s: v.shape for s, v in d.items()} for k, d in state.items()}
  assert shapes['wi_0'] == {'v_row': (768,), 'v_col': (2048,), 'v': (1,), 'm': (1,)}
  assert shapes['wo'] == {'v_row': (768,), 'v_col': (2048,), 'v': (1,), 'm': (1,)}
  assert shapes['embedding'] == {'v_row': (512,), 'v_col': (32128,), 'v': (1,), 'm': (1,)}
  assert shapes['rel'] == {'v_row': (1,), 'v_col': (1,), 'v': (12, 32), 'm': (1,)}
  assert shapes['scale'] == {'v_row': (1,), 'v_col': (1,), 'v': (768,), 'm': (1,)}
  assert shapes['small'] == {'v_row': (1,), 'v_col': (1,), 'v': (64, 127), 'm': (1,)}


def test_adafactor_state_tree_matches_fixture():
  with open(fixture_path(), 'rb') as f:
    ckpt = serialization.msgpack_restore(f.read())
  params = ckpt['optimizer']['target']
  ours = optimizers.Adafactor().make(1e-3).init(params).param_states
  flat = lambda t: {k: np.shape(v) for k, v in traverse_util.flatten_dict(t, sep='/').items()}
  assert flat(ours) == flat(ckpt['optimizer']['state']['param_states'])


def numpy_adafactor_step(p, g, v_row, v_col, step, lr, factored):
  """Adafactor written out in numpy for a [256, 130] matrix, t5x's naming: v_row drops the
  largest dimension (axis 0 here), v_col the second-largest (axis 1)."""
  decay = 1 - (step + 1.0) ** -0.8
  g2 = g * g + 1e-30
  if factored:
    v_row = decay * v_row + (1 - decay) * g2.mean(axis=0)
    v_col = decay * v_col + (1 - decay) * g2.mean(axis=1)
    approx = np.outer(v_col, v_row / v_row.mean())
    y = g / np.sqrt(approx)
  else:
    v_row = decay * v_row + (1 - decay) * g2
    y = g / np.sqrt(v_row)
  y = y / max(1.0, np.sqrt(np.mean(y * y)) / 1.0)
  scale = max(np.sqrt(np.mean(p * p)), 1e-3)
  return p - lr * scale * y, v_row, v_col


def test_adafactor_update_matches_numpy():
  rng = np.random.RandomState(0)
  p = {'big': rng.randn(256, 130).astype(np.float32),
       'small': rng.randn(3, 5).astype(np.float32)}
  tx = optimizers.Adafactor().make(0.01)
  state = tx.init(p)
  ref = {'big': (p['big'], np.zeros(130), np.zeros(256)),
         'small': (p['small'], np.zeros((3, 5)), None)}
  params = jax.tree.map(jnp.asarray, p)
  for step in range(3):
    g = {k: rng.randn(*v.shape).astype(np.float32) for k, v in p.items()}
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(lambda a, u: a + u, params, updates)
    for k in ref:
      pk, vr, vc = ref[k]
      ref[k] = numpy_adafactor_step(pk, g[k], vr, vc, step, 0.01, k == 'big')
  for k in ref:
    np.testing.assert_allclose(params[k], ref[k][0], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(state.param_states['big']['v_row'], ref['big'][1], rtol=1e-5)


def test_learning_rate_schedules():
  const = optimizers.create_learning_rate_scheduler('constant', 0.001)
  assert const(0) == const(10**6) == np.float32(0.001)
  rsqrt = optimizers.create_learning_rate_scheduler('constant * rsqrt_decay', 1.0,
                                                    warmup_steps=10000)
  np.testing.assert_allclose(rsqrt(100), 0.01, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(40000), 0.005, rtol=1e-6)
  warm = optimizers.create_learning_rate_scheduler('constant * linear_warmup', 2.0,
                                                   warmup_steps=100)
  np.testing.assert_allclose(warm(50), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(warm(jnp.int32(200))), 2.0, rtol=1e-6)


def test_adamw_state_specs_follow_params():
  from jax.sharding import PartitionSpec as P
  opt = optimizers.AdamW()
  params = {'a': jax.ShapeDtypeStruct((4, 8), jnp.float32)}
  specs = opt.state_partition_specs({'a': P(None, 'model')}, params)
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  assert P(None, 'model') in leaves and P() in leaves


def test_adamw_trains_sharded():
  from t5tpu import data, partitioning, trainer
  from tests import tiny
  from tests.test_partitioning import SHAPES, make_batch
  model = tiny.tiny_model(optimizer=optimizers.AdamW(), num_heads=4, head_dim=8)
  tr = trainer.Trainer(model, partitioning.PjitPartitioner(num_partitions=2),
                       optimizers.create_learning_rate_scheduler(base_learning_rate=1e-3),
                       None, SHAPES)
  state = tr.init_state(jax.random.PRNGKey(0))
  batch = make_batch()
  losses = []
  for _ in range(3):
    state, m = tr.train_step(state, data.make_global_batch(batch, tr.batch_shardings(batch)),
                             jax.random.PRNGKey(1))
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0]
  mu = state.opt_state[1][0].mu['encoder']['layers_0']['mlp']['wi_0']['kernel']
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, 'model')


def test_adamw_matches_optax_and_its_schedule_follows_the_global_step():
  """Fine-tuning a checkpoint at step 1000 with a fresh AdamW: the learning rate applied is
  the schedule's at step 1000 (as the log says), not at optax's own count 0."""
  import optax
  schedule = optimizers.create_learning_rate_scheduler(
      factors='constant * linear_warmup', base_learning_rate=0.1, warmup_steps=1000)
  tx = optimizers.AdamW(max_grad_norm=None).make(schedule)
  params = {'w': jnp.arange(4.0), 'b': jnp.ones((2, 3))}
  grads = jax.tree.map(lambda p: 0.5 - p, params)
  fresh = tx.init(params)
  at_0, _ = tx.update(grads, fresh, params, global_step=jnp.int32(0))
  at_1000, _ = tx.update(grads, fresh, params, global_step=jnp.int32(1000))
  reference = optax.adamw(0.1, weight_decay=0.0)  # the warm-up's value from step 1000 on
  expected, _ = reference.update(grads, reference.init(params), params)
  tiny = lambda updates: max(float(np.abs(u).max()) for u in jax.tree.leaves(updates)) < 1e-7
  assert tiny(at_0)  # the warm-up's first rate (the schedule's floor, 1e-8)
  for ours, theirs in zip(jax.tree.leaves(at_1000), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(ours, theirs)
  # The state keeps optax.adamw's tree, so checkpoints written before still restore.
  assert jax.tree.structure(fresh) == jax.tree.structure(
      optax.chain(optax.adamw(schedule)).init(params))
  # Without global_step (optax's usual call), optax's own count drives the schedule.
  plain, _ = tx.update(grads, fresh, params)
  assert tiny(plain)
