"""INITIAL_CHECKPOINT_PATH: the fixture restores with its Adafactor state and training goes on;
dtype and assignment maps; one clear error for each way a checkpoint can misfit the model."""

import re

import jax
import numpy as np
import pytest

from t5tpu import checkpoints, data, errors, initial_checkpoint, optimizers, partitioning, train
from t5tpu.formats import detect
from t5tpu.formats import (CheckpointNotFoundError, CheckpointReadError, flatten,
                           model_param_shapes, t5x_legacy, t5x_orbax, unflatten)
from tests import tiny
from tests.formats import common

Mismatch = initial_checkpoint.CheckpointMismatchError
RestoreCfg = checkpoints.RestoreCheckpointConfig


@pytest.fixture(scope='module')
def fixture_state():
  return t5x_legacy.read(common.fixture_path())


@pytest.fixture(scope='module')
def tiny_trainer():
  return common.make_trainer(common.named('t5_1_1/tiny', dtype='float32'))


def test_fixture_restores_params_step_and_adafactor_state(fixture_state, tiny_trainer):
  state = initial_checkpoint.load(common.fixture_path(), tiny_trainer)
  assert int(state.step) == 0 and int(state.opt_state.count) == 0
  restored = jax.device_get(state.state_dict())
  common.assert_trees_equal(restored['target'], fixture_state['target'])
  common.assert_trees_equal(restored['state']['param_states'],
                            fixture_state['state']['param_states'])


def test_training_continues_from_the_fixture(tmp_path, fixture_state, copy_task):
  """The fixture at step 1000 with a non-zero Adafactor state (zarr-stored) fine-tunes on."""
  slots = {k: (np.full_like(v, 4.0) if k.endswith('/v') else v)
           for k, v in flatten(fixture_state['state']['param_states']).items()}
  path = t5x_legacy.write(
      str(tmp_path / 'pretrained' / 'checkpoint_1000'),
      {'target': fixture_state['target'],
       'state': {'step': 1000, 'param_states': unflatten(slots)}})
  model = tiny.tiny_model(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16)
  state = train.train(
      model=model, model_dir=str(tmp_path / 'run'), total_steps=1002, random_seed=0,
      train_dataset_cfg=data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=8),
      partitioner=partitioning.PjitPartitioner(num_partitions=1), log_period=2,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.01),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=1000),
          restore=RestoreCfg(path=path)))
  assert int(state.step) == 1002
  assert checkpoints.all_steps(str(tmp_path / 'run')) == [1002]
  # The restored accumulators (4.0) decayed by beta2 = 1 - t^-0.8 ~ 0.996 per step; a
  # fresh state would be ~1e-30 + (1 - beta2) g^2 instead.
  v = jax.device_get(state.opt_state.param_states)['encoder']['relpos_bias']['rel_embedding']
  assert np.all(v['v'] > 3.9) and np.all(v['v'] < 4.0)
  params = flatten(jax.device_get(state.params))
  moved = [k for k, p in flatten(fixture_state['target']).items()
           if not np.array_equal(params[k], p)]
  assert len(moved) > 40  # it trained


def test_restore_dtype(fixture_state, tiny_trainer):
  state = initial_checkpoint.load(common.fixture_path(), tiny_trainer,
                                  RestoreCfg(dtype='bfloat16'))
  params = flatten(jax.device_get(state.params))
  for k, p in flatten(fixture_state['target']).items():
    assert str(params[k].dtype) == 'bfloat16'
    assert np.array_equal(params[k], p.astype(params[k].dtype))
  v = jax.device_get(state.opt_state.param_states)['token_embedder']['embedding']['v']
  assert v.dtype == np.float32


# ----------------------------------------------------------------------------- mismatches

def zeros_like_model(cfg) -> dict:
  """A checkpoint of the right names and shapes that costs no memory."""
  return {'target': unflatten({k: np.broadcast_to(np.float32(0), s)
                               for k, s in model_param_shapes(cfg).items()}),
          'state': {'step': 1000000}}


def mismatch_message(state_dict, trainer, **restore) -> str:
  with pytest.raises(Mismatch) as e:
    initial_checkpoint.state_from_state_dict(state_dict, trainer, RestoreCfg(**restore),
                                             path='gs://bucket/ckpt')
  print(e.value)
  return str(e.value)


def test_base_checkpoint_for_small_model():
  """t5x #1067: the wrong size (a base checkpoint restored into a small model)."""
  small = common.make_trainer(common.named('t5_1_1/small'))
  msg = mismatch_message(zeros_like_model(common.named('t5_1_1/base')), small)
  assert msg.startswith('checkpoint gs://bucket/ckpt does not fit the configured model:')
  assert 'token_embedder/embedding: (32128, 768) vs (32128, 512)' in msg
  assert '    decoder/relpos_bias/rel_embedding: (12, 32) vs (6, 32)' in msg
  assert '92 checkpoint parameter(s) the model does not have:' in msg  # 12 layers, not 8
  assert '    encoder/layers_8/pre_mlp_layer_norm/scale' in msg and '... and 170 more' in msg
  assert 'the checkpoint looks like: t5_1_1/base (emb 768' in msg
  assert 'the configured model is:   t5_1_1/small (emb 512' in msg
  assert 'fresh MODEL_DIR' in msg


def test_t5_1_1_checkpoint_for_t5_1_0_model(fixture_state):
  """t5x #1196: logits_via_embedding=True with T5.1.1 weights."""
  msg = mismatch_message(fixture_state, common.make_trainer(common.named('t5_1_0/tiny')))
  assert 'decoder/logits_dense/kernel' in msg and 'encoder/layers_0/mlp/wi/kernel' in msg
  assert 'the checkpoint looks like: t5_1_1/tiny' in msg
  assert 'the configured model is:   t5_1_0/tiny' in msg
  assert 'set T5Config.logits_via_embedding = False' in msg
  assert "mlp_activations = ('gelu', 'linear')" in msg


def test_t5_1_0_checkpoint_for_t5_1_1_model(tiny_trainer):
  msg = mismatch_message(zeros_like_model(common.named('t5_1_0/tiny')), tiny_trainer)
  assert 'the checkpoint looks like: t5_1_0/tiny' in msg
  assert 'set T5Config.logits_via_embedding = True' in msg
  assert "mlp_activations = ('relu',)" in msg


def test_missing_and_extra_parameters(fixture_state, tiny_trainer):
  flat = flatten(fixture_state['target'])
  del flat['decoder/decoder_norm/scale']
  flat['encoder/adapter/kernel'] = np.ones((8, 2), np.float32)
  state = {'target': unflatten(flat), 'state': {'step': 0}}
  msg = mismatch_message(state, tiny_trainer)
  assert ('1 model parameter(s) missing from the checkpoint:\n'
          '    decoder/decoder_norm/scale') in msg
  assert ('1 checkpoint parameter(s) the model does not have:\n'
          '    encoder/adapter/kernel') in msg
  assert 'the checkpoint looks like: t5_1_1/tiny' in msg
  # each half alone, and both controls that accept them
  msg = mismatch_message(state, tiny_trainer, strict=False)
  assert 'missing from the checkpoint' in msg and 'does not have:' not in msg
  msg = mismatch_message(state, tiny_trainer, fallback_to_scratch=True)
  assert 'missing from the checkpoint' not in msg and 'does not have:' in msg
  restored = initial_checkpoint.state_from_state_dict(
      state, tiny_trainer, RestoreCfg(strict=False, fallback_to_scratch=True))
  params = jax.device_get(restored.params)
  assert np.array_equal(params['decoder']['decoder_norm']['scale'], np.ones(8))  # its init
  assert np.array_equal(params['encoder']['encoder_norm']['scale'],
                        fixture_state['target']['encoder']['encoder_norm']['scale'])


def test_not_a_t5_at_all(tiny_trainer):
  state = {'target': {'dense': {'kernel': np.ones((3, 3), np.float32)}}, 'state': {}}
  msg = mismatch_message(state, tiny_trainer)
  assert 'the checkpoint looks like: not a complete T5' in msg


# ----------------------------------------------------------------------------- assignment maps

def test_assignment_map(fixture_state, tiny_trainer):
  fx = fixture_state['target']
  amap = [(r'target/decoder/layers_1/(.*)', r'target/decoder/layers_0/\1'),
          (r'target/decoder/logits_dense/kernel', None)]
  state = initial_checkpoint.state_from_state_dict(fixture_state, tiny_trainer,
                                                   RestoreCfg(assignment_map=amap))
  params = jax.device_get(state.params)
  common.assert_trees_equal(params['decoder']['layers_1'], fx['decoder']['layers_0'])
  common.assert_trees_equal(params['decoder']['layers_0'], fx['decoder']['layers_0'])
  common.assert_trees_equal(params['encoder'], fx['encoder'])
  fresh = params['decoder']['logits_dense']['kernel']  # initialized, not the checkpoint's
  assert not np.array_equal(fresh, fx['decoder']['logits_dense']['kernel'])
  assert 0.2 < fresh.std() < 0.5  # fan-in init over emb 8: about 1/sqrt(8)
  with pytest.raises(Mismatch, match=r"match no parameter"):
    initial_checkpoint.state_from_state_dict(
        fixture_state, tiny_trainer, RestoreCfg(assignment_map=[('decoder/.*', None)]))
  with pytest.raises(Mismatch, match=r"checkpoint has no 'target/decoder/layers_7/"):
    initial_checkpoint.state_from_state_dict(
        fixture_state, tiny_trainer,
        RestoreCfg(assignment_map=[(r'target/decoder/layers_1/(.*)',
                                    r'target/decoder/layers_7/\1')]))


def test_missing_and_damaged_checkpoints_are_user_errors(tmp_path, fixture_state, tiny_trainer):
  assert issubclass(Mismatch, errors.UserError) and issubclass(Mismatch, ValueError)
  expected = ('expected an orbax checkpoint dir (with state/), a T5X checkpoint_N dir (with a '
              '`checkpoint` file) or msgpack file, a TF/MTF prefix (model.ckpt-N, with .index '
              'beside it) or a Hugging Face model dir (with config.json)')
  missing = tmp_path / 'checkpoint_1000'
  with pytest.raises(errors.UserError) as info:
    initial_checkpoint.load(str(missing), tiny_trainer)
  assert isinstance(info.value, CheckpointNotFoundError)
  assert isinstance(info.value, FileNotFoundError)  # what callers caught before
  assert str(info.value) == f'no checkpoint at {missing} (it does not exist): {expected}'
  missing.mkdir()
  with pytest.raises(CheckpointNotFoundError, match=r'\(the directory holds none of these\)'):
    detect.detect_format(str(missing))
  # eval / infer read parameters only (load_params): a damaged orbax _METADATA names the file
  path = t5x_orbax.write(str(tmp_path / 'run'), fixture_state)
  (tmp_path / 'run' / 'checkpoint_0' / 'state' / '_METADATA').write_text('{"tree_meta')
  with pytest.raises(CheckpointReadError, match=re.escape(f'{path}/state/_METADATA is corrupt')):
    initial_checkpoint.load_params(path, tiny_trainer.params_layout)
