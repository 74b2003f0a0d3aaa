"""The network's parameter tree, logical axes and sizes match t5x."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import serialization, traverse_util

from t5tpu import errors, model_shapes, network

def abstract_params(cfg, enc_len=8, dec_len=4):
  model = network.Transformer(cfg)
  ones = lambda n: jnp.ones((2, n), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ones(enc_len),
                                           ones(dec_len)))['params']


def flat_shapes(boxed):
  return {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(boxed), sep='/').items()}


def fixture_path():
  """t5x's own test checkpoint, shipped in tests/fixtures/t5x (Apache 2.0, see README there)."""
  import os
  return os.path.join(os.path.dirname(__file__), 'fixtures', 't5x', 'test_t5_tiny.checkpoint_0')


def test_t5_1_1_tree_equals_t5x_fixture():
  cfg = model_shapes.named_configs()['t5_1_1/tiny']
  ours = flat_shapes(abstract_params(cfg))
  with open(fixture_path(), 'rb') as f:
    ckpt = serialization.msgpack_restore(f.read())
  theirs = {k: v.shape for k, v in
            traverse_util.flatten_dict(ckpt['optimizer']['target'], sep='/').items()}
  assert ours == theirs


def test_t5_1_0_tree():
  cfg = model_shapes.named_configs()['t5_1_0/small']
  names = set(flat_shapes(abstract_params(cfg)))
  assert 'encoder/layers_0/mlp/wi/kernel' in names
  assert 'decoder/layers_5/encoder_decoder_attention/out/kernel' in names
  assert 'decoder/logits_dense/kernel' not in names  # logits via the shared embedding
  assert not any('wi_0' in n for n in names)
  assert 'encoder/relpos_bias/rel_embedding' in names
  assert 'decoder/relpos_bias/rel_embedding' in names
  assert not any('layers_0/relpos' in n for n in names)  # one table per stack


def test_logical_axes():
  cfg = model_shapes.named_configs()['t5_1_1/tiny']
  specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract_params(cfg)), sep='/')
  expect = {
      'token_embedder/embedding': ('vocab', 'embed'),
      'encoder/layers_0/attention/query/kernel': ('embed', 'joined_kv'),
      'encoder/layers_0/attention/out/kernel': ('joined_kv', 'embed'),
      'decoder/layers_1/mlp/wi_0/kernel': ('embed', 'mlp'),
      'decoder/layers_1/mlp/wo/kernel': ('mlp', 'embed'),
      'decoder/logits_dense/kernel': ('embed', 'vocab'),
      'encoder/relpos_bias/rel_embedding': ('heads', 'relpos_buckets'),
      'encoder/encoder_norm/scale': ('embed',),
  }
  for name, axes in expect.items():
    assert tuple(specs[name]) == axes, name


# Published sizes (t5x.md): T5 1.0 and T5.1.1 parameter counts.
EXPECTED_COUNTS = {
    't5_1_0/small': 60.5e6, 't5_1_0/base': 223e6, 't5_1_0/large': 738e6,
    't5_1_0/3B': 2.85e9, 't5_1_0/11B': 11.3e9,
    't5_1_1/small': 77e6, 't5_1_1/base': 248e6, 't5_1_1/large': 783e6,
    't5_1_1/xl': 2.85e9, 't5_1_1/xxl': 11.1e9,
}


@pytest.mark.parametrize('name', sorted(EXPECTED_COUNTS))
def test_parameter_counts(name):
  cfg = model_shapes.named_configs()[name]
  count = sum(int(np.prod(s)) for s in flat_shapes(abstract_params(cfg)).values())
  print(f'{name}: {count:,} parameters')
  assert abs(count - EXPECTED_COUNTS[name]) / EXPECTED_COUNTS[name] < 0.006, count


def test_exact_counts_from_t5x():
  # t5x.md gives these exactly for T5.1.1 small and base.
  for name, exact in (('t5_1_1/small', 76_961_152), ('t5_1_1/base', 247_577_856),
                      ('t5_1_1/large', 783_150_080)):
    cfg = model_shapes.named_configs()[name]
    assert sum(int(np.prod(s)) for s in flat_shapes(abstract_params(cfg)).values()) == exact


def test_relative_position_bucket_numpy_and_jax_agree():
  rel = np.arange(-300, 300)[None, :]
  for bidirectional in (True, False):
    a = network.relative_position_bucket(rel, bidirectional, 32, 128, np)
    b = network.relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128, jnp)
    np.testing.assert_array_equal(a, np.asarray(b))
  # Encoder: 16 buckets per direction; exact for |d| < 8, capped at the last bucket.
  enc = network.relative_position_bucket(np.array([0, 1, 7, -1, 500, -500]), True, 32, 128)
  assert enc.tolist() == [0, 16 + 1, 16 + 7, 1, 31, 15]


def test_packed_segments_do_not_attend_across():
  """Two examples packed in one row give the same logits as each alone."""
  cfg = network.T5Config(vocab_size=50, dtype='float32', emb_dim=16, num_heads=2, head_dim=8,
                         num_encoder_layers=1, num_decoder_layers=1, mlp_dim=32,
                         dropout_rate=0.0)
  model = network.Transformer(cfg)
  params = model.init(jax.random.PRNGKey(1), jnp.ones((1, 8), jnp.int32),
                      jnp.ones((1, 6), jnp.int32))['params']
  e1, e2 = [5, 6, 7, 1], [8, 9, 1]
  t1, t2 = [11, 12, 1], [13, 1]
  shift = lambda t: [0] + t[:-1]
  packed = model.apply({'params': params},
                       jnp.array([e1 + e2 + [0]]), jnp.array([shift(t1) + shift(t2) + [0]]),
                       jnp.array([t1 + t2 + [0]]),
                       encoder_segment_ids=jnp.array([[1] * 4 + [2] * 3 + [0]]),
                       decoder_segment_ids=jnp.array([[1] * 3 + [2] * 2 + [0]]))
  alone = model.apply({'params': params}, jnp.array([e2]), jnp.array([shift(t2)]),
                      jnp.array([t2]))
  np.testing.assert_allclose(packed[0, 3:5], alone[0], atol=1e-5)


def _dropout_reference():
  """t5x's network run with dropout 0.1 (tests/fixtures/t5x/make_dropout_reference.py)."""
  import os
  path = os.path.join(os.path.dirname(fixture_path()), 'dropout_reference.npz')
  return dict(np.load(path))


@pytest.mark.parametrize('shape', ['t5_1_1', 't5_1_0'])
@pytest.mark.parametrize('batch_name', ['padded', 'packed'])
def test_dropout_equals_t5x(shape, batch_name):
  """With dropout on, as in every fine-tuning step, the same parameters, batch and dropout key
  give t5x's logits: the same masks (attention dropout shared across queries, the encoder's
  output dropout not shared across positions), drawn from the same streams."""
  ref = _dropout_reference()
  tied = shape == 't5_1_0'
  cfg = network.T5Config(
      vocab_size=128, dtype='float32', emb_dim=16, num_heads=4, num_encoder_layers=2,
      num_decoder_layers=2, head_dim=8, mlp_dim=32, dropout_rate=0.1,
      mlp_activations=('relu',) if tied else ('gelu', 'linear'), logits_via_embedding=tied)
  prefix = f'{shape}/params/'
  params = traverse_util.unflatten_dict(
      {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}, sep='/')
  batch = {k.split('/')[-1]: v for k, v in ref.items() if k.startswith(f'batch/{batch_name}/')}
  model = network.Transformer(cfg)
  apply = lambda **kw: np.asarray(model.apply({'params': params}, **batch, **kw))
  expected = ref[f'{shape}/{batch_name}/logits']
  ours = apply(enable_dropout=True, rngs={'dropout': ref['dropout_key']})
  # Bit-equal to t5x's network run on the same CPU; the fixture's CPU rounds float32 matmuls
  # differently (t5x's own network run again on an AMX Xeon moved these logits by up to 1.9e-6).
  # Masks drawn differently would move the logits by far more: with no dropout at all they are
  # over 0.1 away (checked below).
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
  # The reference is not dropout-free: without dropout the logits are far from it.
  assert np.abs(apply(enable_dropout=False) - expected).max() > 0.1


def _kernel_case(kernel, dropout_rate=0.0, delta=None):
  cfg = network.T5Config(vocab_size=64, dtype='float32', emb_dim=16, num_heads=2, head_dim=8,
                         num_encoder_layers=2, num_decoder_layers=2, mlp_dim=32,
                         mlp_activations=('gelu', 'linear'), logits_via_embedding=False,
                         dropout_rate=dropout_rate, attention_kernel=kernel, delta=delta)
  return network.Transformer(cfg)


def _packed_batch():
  rng = np.random.RandomState(0)
  return dict(encoder_input_tokens=jnp.asarray(rng.randint(2, 64, (2, 10)) * [[1] * 9 + [0]]),
              decoder_input_tokens=jnp.asarray(rng.randint(2, 64, (2, 6))),
              decoder_target_tokens=jnp.asarray(rng.randint(2, 64, (2, 6)) * [[1] * 5 + [0]]),
              encoder_segment_ids=jnp.asarray([[1] * 4 + [2] * 5 + [0]] * 2),
              decoder_segment_ids=jnp.asarray([[1] * 3 + [2] * 2 + [0]] * 2))


def _assert_gradients_close(got, want):
  for (path, a), b in zip(traverse_util.flatten_dict(want).items(),
                          traverse_util.flatten_dict(got).values()):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg='/'.join(path))


@pytest.mark.parametrize('method', [None, 'prefix'])
def test_fused_attention_kernel_equals_einsum(method):
  """attention_kernel='jax' (jax.nn.dot_product_attention, the call 'cudnn' makes on a GPU)
  gives the einsum path's logits and gradients, on a packed, padded batch; with prefix
  tuning's keys, values and bias too."""
  from t5tpu import delta
  cfg = {None: None, 'prefix': delta.DeltaConfig(prefix=delta.Prefix(length=3, hidden=8))}
  batch = _packed_batch()
  einsum, fused = (_kernel_case(k, delta=cfg[method]) for k in ('einsum', 'jax'))
  params = nn.unbox(einsum.init(jax.random.PRNGKey(0), **batch)['params'])

  def loss(model, p):
    return (model.apply({'params': p}, **batch) ** 2).mean()

  np.testing.assert_allclose(fused.apply({'params': params}, **batch),
                             einsum.apply({'params': params}, **batch), rtol=0, atol=1e-5)
  g_einsum, g_fused = (jax.grad(functools.partial(loss, m))(params) for m in (einsum, fused))
  _assert_gradients_close(g_fused, g_einsum)
  # The relative position biases get their gradient through the fused call's bias.
  assert np.abs(g_fused['encoder']['relpos_bias']['rel_embedding']).max() > 0


def test_fused_attention_kernel_keeps_t5x_dropout():
  """With attention dropout on, a fused kernel drops the values of the keys t5x's mask drops:
  the einsum path's logits up to rounding, and far from the logits of other masks."""
  batch = _packed_batch()
  einsum, fused = _kernel_case('einsum', 0.1), _kernel_case('jax', 0.1)
  params = einsum.init(jax.random.PRNGKey(0), **batch)['params']
  run = lambda m, seed=3: m.apply({'params': params}, **batch, enable_dropout=True,
                                  rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_allclose(run(fused), run(einsum), rtol=0, atol=1e-5)
  assert np.abs(run(fused) - run(einsum, seed=4)).max() > 1e-2


def _flash_batch(rows=2):
  """A packed, padded batch at lengths Pallas's TPU kernel tiles (inputs 128, targets 32)."""
  rng = np.random.RandomState(1)
  seg = lambda n, cut, pad: [[1] * cut + [2] * (n - cut - pad) + [0] * pad] * rows
  enc, dec = np.array(seg(128, 50, 9)), np.array(seg(32, 12, 3))
  tokens = lambda mask: jnp.asarray(rng.randint(2, 64, mask.shape) * (mask > 0))
  return dict(encoder_input_tokens=tokens(enc), decoder_input_tokens=tokens(dec),
              decoder_target_tokens=tokens(dec),
              encoder_segment_ids=jnp.asarray(enc), decoder_segment_ids=jnp.asarray(dec))


def test_tpu_flash_kernel_equals_einsum():
  """attention_kernel='tpu_flash' (the Pallas TPU kernel, run by Pallas's interpreter here):
  the einsum path's logits and gradients, dropout on (t5x's mask, applied to the values);
  the decoder's 32-key self-attention takes einsum, its cross-attention the kernel."""
  from jax.experimental.pallas import tpu as pltpu
  batch = _flash_batch()
  einsum, flash = _kernel_case('einsum', 0.1), _kernel_case('tpu_flash', 0.1)
  params = nn.unbox(einsum.init(jax.random.PRNGKey(0), **batch)['params'])

  def loss(model, p):
    out = model.apply({'params': p}, **batch, enable_dropout=True,
                      rngs={'dropout': jax.random.PRNGKey(5)})
    return (out ** 2).mean(), out

  (_, want), g_einsum = jax.value_and_grad(functools.partial(loss, einsum), has_aux=True)(params)
  with pltpu.force_tpu_interpret_mode():
    (_, got), g_flash = jax.jit(jax.value_and_grad(functools.partial(loss, flash),
                                                   has_aux=True))(params)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  _assert_gradients_close(g_flash, g_einsum)
  assert np.abs(g_flash['encoder']['relpos_bias']['rel_embedding']).max() > 0
  # The kernel ran where it should: 2 encoder self-attentions + 2 cross-attentions.
  with pltpu.force_tpu_interpret_mode():
    forward = str(jax.make_jaxpr(functools.partial(loss, flash))(params))
  assert len(re.findall(r'jit\[name=flash_attention\b', forward)) == 4


def test_tpu_flash_kernel_on_a_mesh():
  """On a (data 4, model 2) mesh the kernel runs on each device's rows and heads (a Pallas
  call is one device's program): the einsum path's logits."""
  from jax.experimental.pallas import tpu as pltpu
  from t5tpu import partitioning
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets 8 host CPU devices)')
  batch = _flash_batch(rows=4)
  einsum, flash = _kernel_case('einsum'), _kernel_case('tpu_flash')
  params = nn.unbox(einsum.init(jax.random.PRNGKey(0), **batch)['params'])
  want = einsum.apply({'params': params}, **batch)
  part = partitioning.PjitPartitioner(num_partitions=2, devices=jax.devices()[:8])
  with part.context(), pltpu.force_tpu_interpret_mode():
    forward = jax.jit(lambda p: flash.apply({'params': p}, **batch))
    assert 'shard_map' in str(forward.trace(params).jaxpr)
    got = forward(params)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_attention_kernel_errors():
  batch = _packed_batch()
  with pytest.raises(errors.UserError, match="attention_kernel='flash'; choose one of"):
    _kernel_case('flash').init(jax.random.PRNGKey(0), **batch)
  if jax.default_backend() != 'gpu':
    with pytest.raises(errors.UserError, match="needs an NVIDIA GPU.*'einsum'"):
      _kernel_case('cudnn').init(jax.random.PRNGKey(0), **batch)
  if jax.default_backend() == 'cpu':
    with pytest.raises(errors.UserError, match="'tpu_flash' runs on a TPU.*'einsum'"):
      _kernel_case('tpu_flash').init(jax.random.PRNGKey(0), **_flash_batch())
