"""Legacy T5X checkpoints: t5x's fixture reads; write -> read is bit-exact, inline and zarr."""
import os
import re

import numpy as np
import pytest
from flax import serialization

from t5tpu import errors
from t5tpu.formats import detect
from t5tpu.formats import (CheckpointReadError, cast_floating, flatten, model_param_shapes,
                           t5x_legacy)
from tests.formats import common

SLOTS = {'m', 'v', 'v_col', 'v_row'}


@pytest.fixture(scope='module')
def fixture_state():
  return t5x_legacy.read(common.fixture_path())


def test_fixture_is_t5_1_1_tiny_with_adafactor_state(fixture_state):
  assert detect.detect_format(common.fixture_path()) == 't5x_legacy_file'
  target = {k: np.shape(v) for k, v in flatten(fixture_state['target']).items()}
  assert target == model_param_shapes(common.named('t5_1_1/tiny'))
  assert fixture_state['state']['step'] == 0
  slots = flatten(fixture_state['state']['param_states'])
  assert {k.rsplit('/', 1)[0] for k in slots} == set(target)
  assert {k.rsplit('/', 1)[1] for k in slots} == SLOTS
  # t5x's factoring rule: nothing in the tiny model has two dims >= 128, so `v` is full
  assert slots['token_embedder/embedding/v'].shape == (32128, 8)
  assert slots['token_embedder/embedding/v_row'].shape == (1,)


@pytest.mark.parametrize('zarr_min_bytes', [None, 0, t5x_legacy.DEFAULT_ZARR_MIN_BYTES],
                         ids=['inline', 'all_zarr', 'default'])
def test_write_read_round_trip_is_bit_exact(tmp_path, fixture_state, zarr_min_bytes):
  path = str(tmp_path / 'checkpoint_0')
  t5x_legacy.write(path, fixture_state, zarr_min_bytes=zarr_min_bytes)
  assert detect.detect_format(path) == 't5x_legacy'
  folders = sorted(f for f in os.listdir(path) if f != 'checkpoint')
  raw = t5x_legacy.read_msgpack(path)
  assert raw['version'] == 3 and set(raw) == {'version', 'optimizer'}
  assert set(raw['optimizer']['state']) == {'step', 'param_states'}
  if zarr_min_bytes is None:
    assert folders == []
  elif zarr_min_bytes == 0:
    assert len(folders) == len(flatten(fixture_state)) - 1  # all but the step
    assert 'target.encoder.layers_0.attention.query.kernel' in folders
    assert 'state.param_states.token_embedder.embedding.v' in folders
    spec = raw['optimizer']['target']['encoder']['layers_0']['attention']['query']['kernel']
    # t5x's spec: zarr, gzip, a path relative to the checkpoint directory
    assert spec['driver'] == 'zarr' and spec['metadata']['compressor']['id'] == 'gzip'
    assert spec['kvstore'] == {'driver': 'file',
                               'path': 'target.encoder.layers_0.attention.query.kernel/'}
    assert os.path.exists(os.path.join(path, 'target.encoder.layers_0.attention.query.kernel',
                                       '.zarray'))
  else:  # by default only big arrays (here the [32128, 8] ones) go to zarr
    assert isinstance(raw['optimizer']['target']['encoder']['encoder_norm']['scale'],
                      np.ndarray)
    assert folders == ['state.param_states.decoder.logits_dense.kernel.v',
                       'state.param_states.token_embedder.embedding.v',
                       'target.decoder.logits_dense.kernel', 'target.token_embedder.embedding']
  common.assert_trees_equal(t5x_legacy.read(path), fixture_state)
  with pytest.raises(FileExistsError):
    t5x_legacy.write(path, fixture_state)


def test_bfloat16_round_trip(tmp_path, fixture_state):
  state = dict(fixture_state, target=cast_floating(fixture_state['target'], 'bfloat16'))
  for zarr_min_bytes in (None, 0):
    path = str(tmp_path / f'z{zarr_min_bytes}' / 'checkpoint_0')
    t5x_legacy.write(path, state, zarr_min_bytes=zarr_min_bytes)
    again = t5x_legacy.read(path)
    assert str(again['target']['token_embedder']['embedding'].dtype) == 'bfloat16'
    common.assert_trees_equal(again, state)


def test_checkpoint_written_on_gcs_reads_from_a_local_copy(tmp_path, fixture_state):
  """Public checkpoints name t5x's placeholder bucket (and, if old, a top-level path)."""
  path = str(tmp_path / 'checkpoint_1000000')
  state = {'target': fixture_state['target'],
           'state': {'step': 1000000, 'param_states': fixture_state['state']['param_states']}}
  t5x_legacy.write(path, state, zarr_min_bytes=0)
  raw = t5x_legacy.read_msgpack(path)

  def as_gcs(tree):
    if isinstance(tree, dict) and 'kvstore' in tree:
      folder = tree['kvstore']['path'].rstrip('/')
      return dict(tree, path=folder,
                  kvstore={'driver': 'gcs', 'bucket': t5x_legacy.DUMMY_BUCKET})
    if isinstance(tree, dict):
      return {k: as_gcs(v) for k, v in tree.items()}
    return tree
  with open(os.path.join(path, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(as_gcs(raw)))
  again = detect.read_state_dict(path)
  assert again['state']['step'] == 1000000
  common.assert_trees_equal(again, state)


def test_truncated_or_damaged_checkpoints_are_user_errors(tmp_path, fixture_state):
  """A cut-off copy (the first half of the fixture) names the file and says it is truncated."""
  with open(common.fixture_path(), 'rb') as f:
    data = f.read()
  bare = tmp_path / 'test_t5_tiny.checkpoint_0'
  bare.write_bytes(data[:len(data) // 2])
  step_dir = tmp_path / 'checkpoint_0'
  step_dir.mkdir()
  (step_dir / 'checkpoint').write_bytes(data[:len(data) // 2])
  for path, msgpack_file in ((bare, bare), (step_dir, step_dir / 'checkpoint')):
    with pytest.raises(errors.UserError) as info:
      detect.read_state_dict(str(path))
    assert isinstance(info.value, CheckpointReadError) and isinstance(info.value, ValueError)
    assert str(info.value) == (
        f'{msgpack_file} is truncated: its msgpack data ends early (after '
        f'{len(data) // 2:,} bytes), so the checkpoint copy is incomplete: copy the checkpoint '
        'again (t5tpu gcs cp, or gsutil -m cp -r) and compare its size with the source')
  bare.write_bytes(b'')
  with pytest.raises(CheckpointReadError, match=r'test_t5_tiny\.checkpoint_0 is empty \(0 bytes\)'):
    detect.read_state_dict(str(bare))
  bare.write_bytes(b'\xc1 not msgpack')
  with pytest.raises(CheckpointReadError, match='is corrupt or not a T5X checkpoint'):
    detect.read_state_dict(str(bare))
  # a zarr folder missing from a copied checkpoint names the array and its folder
  path = str(tmp_path / 'zarr' / 'checkpoint_0')
  t5x_legacy.write(path, fixture_state)
  folder = 'target.token_embedder.embedding'
  for name in os.listdir(os.path.join(path, folder)):
    os.remove(os.path.join(path, folder, name))
  os.rmdir(os.path.join(path, folder))
  with pytest.raises(CheckpointReadError, match=re.escape(
      f'{path}: cannot read the array target/token_embedder/embedding from its zarr folder '
      f'{folder}/ (ValueError: NOT_FOUND')):
    detect.read_state_dict(path)
