"""Mesh-TensorFlow checkpoints, written here with TensorFlow's own Saver, read by name."""
import os
import re

import jax
import numpy as np
import pytest

from t5tpu.formats import detect
from t5tpu import errors, initial_checkpoint
from t5tpu.formats import CheckpointReadError, convert, flatten, mtf, unflatten
from tests.formats import common

tf = pytest.importorskip('tensorflow')

_ATT = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
_NORM = {'pre_attention_layer_norm': 0, 'pre_self_attention_layer_norm': 0,
         'pre_cross_attention_layer_norm': 1}


def mtf_name(t5x: str) -> str:
  """The MTF variable name of a t5x parameter (the inverse of mtf.t5x_name, spelled out)."""
  if t5x == 'token_embedder/embedding':
    return 'shared/embedding'
  if t5x == 'decoder/logits_dense/kernel':
    return 'decoder/logits/kernel'
  stack, rest = t5x.split('/', 1)
  if rest == 'relpos_bias/rel_embedding':
    return f'{stack}/block_000/layer_000/SelfAttention/relative_attention_bias'
  if rest == f'{stack}_norm/scale':
    return f'{stack}/final_layer_norm/scale'
  m = re.fullmatch(r'layers_(\d+)/(\w+)/(\w+)(?:/kernel)?', rest)
  block, module, leaf = f'block_{int(m.group(1)):03d}', m.group(2), m.group(3)
  if module == 'mlp':
    sub = 1 if stack == 'encoder' else 2
    return f'{stack}/{block}/layer_{sub:03d}/DenseReluDense/{leaf}/kernel'
  if module.endswith('layer_norm'):
    sub = _NORM.get(module, 1 if stack == 'encoder' else 2)
    return f'{stack}/{block}/layer_{sub:03d}/layer_norm/scale'
  kind, sub = ('EncDecAttention', 1) if module == 'encoder_decoder_attention' else (
      'SelfAttention', 0)
  return f'{stack}/{block}/layer_{sub:03d}/{kind}/{_ATT[leaf]}'


def write_tf1_checkpoint(directory, variables: dict, step: int) -> str:
  """A TF1 checkpoint (as MTF writes it) with exactly these variable names."""
  graph = tf.Graph()
  with graph.as_default():
    var_list = {name: tf.compat.v1.Variable(value, name=f'var_{i}')
                for i, (name, value) in enumerate(variables.items())}
    var_list['global_step'] = tf.compat.v1.Variable(np.int64(step), name='global_step')
    saver = tf.compat.v1.train.Saver(var_list=var_list)
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      return saver.save(session, os.path.join(str(directory), 'model.ckpt'), global_step=step)


def mtf_checkpoint(directory, cfg, step, with_slots, seed=0):
  """Writes a random model (and Adafactor slots as MTF keeps them); returns the expectation."""
  params = common.random_params(cfg, seed)
  variables = {mtf_name(k): v for k, v in flatten(params).items()}
  param_states = None
  if with_slots:
    rng = np.random.RandomState(seed)
    slots = {k: rng.rand(*v.shape).astype(np.float32) if v.shape != (1,) else v
             for k, v in flatten(convert.adafactor_zeros(params)).items()}
    suffix = {'v_row': '_slot_vr', 'v_col': '_slot_vc', 'v': '_slot_v'}
    for k, v in slots.items():
      param, slot = k.rsplit('/', 1)
      if v.shape != (1,):  # MTF has only the slots it uses
        variables[mtf_name(param) + suffix[slot]] = v
    param_states = unflatten(slots)
  prefix = write_tf1_checkpoint(directory, variables, step)
  return prefix, params, param_states


# d_model 128 makes the embedding and logits accumulators factored (v_row / v_col), the
# other kernels not (full v): both kinds of MTF slot appear.
V11 = dict(vocab_size=160, emb_dim=128, num_heads=2, head_dim=8, num_encoder_layers=2,
           num_decoder_layers=2, mlp_dim=32)


def test_t5_1_1_with_adafactor_slots(tmp_path):
  cfg = common.small_config(True, **V11)
  prefix, params, param_states = mtf_checkpoint(tmp_path, cfg, 1000000, with_slots=True)
  assert prefix.endswith('model.ckpt-1000000')
  assert detect.detect_format(prefix) == 'mtf'
  state = detect.read_state_dict(prefix)
  assert state['state']['step'] == 1000000
  common.assert_trees_equal(state['target'], params)
  common.assert_trees_equal(state['state']['param_states'], param_states)
  v = state['state']['param_states']['token_embedder']['embedding']
  assert v['v_row'].shape == (128,) and v['v_col'].shape == (160,) and v['v'].shape == (1,)

  # ... and INITIAL_CHECKPOINT_PATH restores those slots into t5tpu's Adafactor
  trainer = common.make_trainer(cfg)
  restored = initial_checkpoint.load(prefix, trainer)
  assert int(restored.step) == 1000000 and int(restored.opt_state.count) == 1000000
  common.assert_trees_equal(jax.device_get(restored.opt_state.param_states), param_states)


def test_t5_1_0_directory_without_slots(tmp_path):
  cfg = common.small_config(False)
  _, params, _ = mtf_checkpoint(tmp_path, cfg, 500, with_slots=False, seed=1)
  # the model directory itself: its `checkpoint` state file names the latest model.ckpt-N
  assert detect.detect_format(str(tmp_path)) == 'tf_dir'
  assert mtf.latest_in_dir(str(tmp_path)) == os.path.join(str(tmp_path), 'model.ckpt-500')
  state = detect.read_state_dict(str(tmp_path))
  assert state['state'] == {'step': 500}
  common.assert_trees_equal(state['target'], params)


def test_name_map():
  assert mtf.t5x_name('encoder/block_011/layer_000/SelfAttention/q_slot_vc') == (
      'encoder/layers_11/attention/query/kernel', 'v_col')
  assert mtf.t5x_name('decoder/block_000/layer_001/EncDecAttention/o') == (
      'decoder/layers_0/encoder_decoder_attention/out/kernel', None)
  assert mtf.t5x_name('decoder/block_003/layer_002/DenseReluDense/wi_1/kernel_slot_v') == (
      'decoder/layers_3/mlp/wi_1/kernel', 'v')
  assert mtf.t5x_name('decoder/block_001/layer_001/rms_norm/scale') == (
      'decoder/layers_1/pre_cross_attention_layer_norm/scale', None)
  assert mtf.t5x_name('decoder/logits/kernel_slot_vr') == ('decoder/logits_dense/kernel',
                                                           'v_row')
  assert mtf.t5x_name('some/other/variable') is None


@pytest.mark.parametrize('cut', ['index', 'data'])
def test_truncated_checkpoint_is_a_user_error(tmp_path, cut):
  prefix = write_tf1_checkpoint(tmp_path, {'shared/embedding': np.ones((50, 8), np.float32)}, 5)
  name = prefix + ('.index' if cut == 'index' else '.data-00000-of-00001')
  with open(name, 'rb') as f:
    data = f.read()
  with open(name, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(errors.UserError) as info:
    detect.read_state_dict(prefix)
  assert isinstance(info.value, CheckpointReadError)
  assert str(info.value).startswith(f'cannot read the TF checkpoint {prefix} (')
  assert ("its .index or .data-* files are truncated or damaged: copy the checkpoint again"
          in str(info.value))
