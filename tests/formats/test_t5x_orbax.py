"""Orbax-format t5x checkpoints (checkpoint_N/state), as t5x's train() writes them."""
import logging
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5tpu import checkpoints, errors, initial_checkpoint
from t5tpu.formats import CheckpointReadError, t5x_legacy, t5x_orbax
from tests.formats import common


@pytest.fixture(scope='module')
def fixture_state():
  return t5x_legacy.read(common.fixture_path())


def t5x_style_save(model_dir, state, use_ocdbt):
  """What t5x's OrbaxCheckpointManagerInterface does: the state dict as item `state`."""
  tree = {'target': state['target'],
          'state': {'step': np.asarray(state['state']['step'], np.int32),
                    'param_states': state['state']['param_states']}}
  manager = ocp.CheckpointManager(
      str(model_dir),
      options=ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True,
                                           enable_async_checkpointing=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)})
  manager.save(state['state']['step'], args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
  manager.close()
  return str(model_dir / f"checkpoint_{state['state']['step']}")


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'per_array'])
def test_reads_t5x_orbax_checkpoint(tmp_path, fixture_state, use_ocdbt):
  state = dict(fixture_state, state=dict(fixture_state['state'], step=1000))
  path = t5x_style_save(tmp_path, state, use_ocdbt)
  assert initial_checkpoint.detect_format(path) == 'orbax'
  common.assert_trees_equal(initial_checkpoint.read_state_dict(path)['target'], state['target'])
  again = t5x_orbax.read(path)
  assert again['state']['step'] == 1000
  common.assert_trees_equal(again, state)


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'per_array'])
def test_initial_checkpoint_restores_in_place(tmp_path, fixture_state, use_ocdbt, monkeypatch,
                                              caplog):
  """A t5x orbax checkpoint of the model and its optimizer goes straight into its shards:
  the host state-dict reader (a full copy of the model in host memory) is never called."""
  state = dict(fixture_state, state=dict(fixture_state['state'], step=1000))
  path = t5x_style_save(tmp_path, state, use_ocdbt)
  trainer = common.make_trainer(common.named('t5_1_1/tiny', dtype='float32'))

  def no_host_copy(path):
    raise AssertionError(f'{path} was read into host memory')
  monkeypatch.setattr(initial_checkpoint, 'read_state_dict', no_host_copy)
  with caplog.at_level(logging.INFO, logger='t5tpu.initial_checkpoint'):
    restored = initial_checkpoint.load(path, trainer)
  assert 'in place' in caplog.text
  assert int(restored.step) == 1000 and int(restored.opt_state.count) == 1000
  got = jax.device_get(restored.state_dict())
  common.assert_trees_equal(got['target'], state['target'])
  common.assert_trees_equal(got['state']['param_states'], state['state']['param_states'])
  # every array in a buffer of its own: the train step donates the state
  buffers = [shard.data.unsafe_buffer_pointer() for x in jax.tree.leaves(restored)
             for shard in x.addressable_shards]
  assert len(set(buffers)) == len(buffers)


def test_initial_checkpoint_of_another_optimizer_matches_names(tmp_path, fixture_state):
  """Adafactor slots for an AdamW run: not restorable in place; the parameters still are
  (through the name-matching path), the optimizer state starts fresh at the step."""
  from t5tpu import optimizers
  path = t5x_orbax.write(str(tmp_path / 'run'), fixture_state)
  trainer = common.make_trainer(common.named('t5_1_1/tiny', dtype='float32'),
                                optimizers.AdamW())
  restored = initial_checkpoint.load(path, trainer)
  common.assert_trees_equal(jax.device_get(restored.params), fixture_state['target'])
  assert all(not np.any(np.asarray(x)) for x in
             jax.tree.leaves(restored.opt_state) if np.ndim(x) > 0)


def test_written_checkpoint_resumes_in_t5tpu(tmp_path, fixture_state):
  out = t5x_orbax.write(str(tmp_path / 'run'), fixture_state)
  assert out == str(tmp_path / 'run' / 'checkpoint_0')
  common.assert_trees_equal(t5x_orbax.read(out), fixture_state)
  # a MODEL_DIR t5tpu resumes from: state and (empty) dataset items
  trainer = common.make_trainer(common.named('t5_1_1/tiny', dtype='float32'))
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'run'),
                                  checkpoints.SaveCheckpointConfig(async_save=False))
  state, dataset = ckpt.restore(0, trainer.layout.abstract, trainer.layout.shardings)
  ckpt.close()
  assert dataset == {}
  common.assert_trees_equal(jax.device_get(state.params), fixture_state['target'])
  with pytest.raises(ValueError, match='names step 7'):
    t5x_orbax.write(str(tmp_path / 'other' / 'checkpoint_7'), fixture_state)


def test_damaged_metadata_is_a_user_error_naming_the_path(tmp_path, caplog):
  state = {'target': {'encoder': {'x': np.arange(6, dtype=np.float32).reshape(2, 3)}},
           'state': {'step': 3}}
  path = t5x_orbax.write(str(tmp_path / 'run'), state)
  metadata = tmp_path / 'run' / 'checkpoint_3' / 'state' / '_METADATA'
  good = metadata.read_text()
  for garbage in ('{"tree_metadata": {', '', '[1, 2]'):
    metadata.write_text(garbage)
    with pytest.raises(errors.UserError) as info:
      initial_checkpoint.read_state_dict(path)
    assert isinstance(info.value, CheckpointReadError)
    assert str(info.value).startswith(
        f'{metadata} is corrupt (not a JSON object), so the orbax checkpoint {path} cannot be '
        'read: it is truncated or damaged: copy the checkpoint again')
  metadata.unlink()
  with pytest.raises(CheckpointReadError,
                     match=re.escape(f'cannot read the orbax checkpoint {path} (')):
    initial_checkpoint.read_state_dict(path)
  # The step's _CHECKPOINT_METADATA is not needed to read the state: damage is only logged.
  metadata.write_text(good)
  (tmp_path / 'run' / 'checkpoint_3' / '_CHECKPOINT_METADATA').write_text('{garbage')
  with caplog.at_level(logging.WARNING, logger='t5tpu.formats.t5x_orbax'):
    again = initial_checkpoint.read_state_dict(path)
  assert np.array_equal(again['target']['encoder']['x'], state['target']['encoder']['x'])
  assert f'{path}/_CHECKPOINT_METADATA is not valid JSON' in caplog.text
