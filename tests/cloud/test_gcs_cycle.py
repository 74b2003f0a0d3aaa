"""A full run with MODEL_DIR on gs:// (a GCS server on loopback): train, checkpoint, resume by
raising TRAIN_STEPS, evaluate; INITIAL_CHECKPOINT_PATH on gs://; TensorBoard events on gs://.

Every gs:// byte goes through the clients users run with: orbax/tensorstore for checkpoints,
gcsfs (t5tpu.storage) for model-info.txt, config.gin and TensorBoard event files.
"""
import struct

import jax
import numpy as np
import pytest

from t5tpu import checkpoints, data, optimizers, partitioning, storage, train
from tests import tiny


def _run(model_dir, total_steps, **kw):
  args = dict(
      model=tiny.tiny_model(dropout_rate=0.1),
      train_dataset_cfg=data.DatasetConfig(tiny.COPY_TASK, tiny.LENGTHS, batch_size=8),
      partitioner=partitioning.PjitPartitioner(num_partitions=2), model_dir=str(model_dir),
      total_steps=total_steps, random_seed=0, log_period=2, eval_period=None,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.01),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=1000)))
  args.update(kw)
  return train.train(**args)


def _scalars(event_dir):
  """{tag: [(step, value)]} from the TensorBoard event files under a gs:// or local dir."""
  from tensorboardX.proto import event_pb2
  out = {}
  for rel, _ in storage.walk_files(event_dir):
    if 'tfevents' not in rel:
      continue
    with storage.open_file(storage.join(event_dir, rel), 'rb') as f:
      raw = f.read()
    pos = 0
    while pos < len(raw):  # TFRecord framing: length, crc, payload, crc
      (n,) = struct.unpack('<Q', raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _same(a, b):
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                      jax.device_get(a), jax.device_get(b))
  return all(jax.tree.leaves(same))


@pytest.mark.timeout(400)
def test_train_resume_eval_on_gcs(fake_gcs, tmp_path, copy_task):
  run = f'{fake_gcs.bucket}/models/run'
  eval_cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, split='validation', batch_size=8,
                                shuffle=False, seed=42, num_epochs=1)
  _run(run, 3)
  assert checkpoints.all_steps(run) == [3]
  assert storage.exists(f'{run}/checkpoint_3/commit_success.txt')
  assert 'encoder/layers_0/attention/query/kernel' in storage.read_text(f'{run}/model-info.txt')
  assert storage.exists(f'{run}/config.gin')

  # Raising TRAIN_STEPS resumes from gs://; the result equals one straight run of 6 steps.
  resumed = _run(run, 6, train_eval_dataset_cfg=eval_cfg, eval_period=6, eval_steps=2)
  assert checkpoints.all_steps(run) == [3, 6]
  straight = _run(tmp_path / 'local', 6)
  assert _same(resumed.params, straight.params)
  assert _same(resumed.opt_state, straight.opt_state)

  train_scalars = _scalars(f'{run}/train')
  assert [s for s, _ in train_scalars['cross_ent_loss_per_token']] == [2, 3, 4, 6]
  eval_scalars = _scalars(f'{run}/training_eval/{copy_task}')
  assert [s for s, _ in eval_scalars['accuracy']] == [6]
  assert np.isfinite(eval_scalars['cross_ent_loss_per_token'][0][1])

  # INITIAL_CHECKPOINT_PATH on gs:// (an orbax checkpoint) starts a new run at its step.
  run2 = f'{fake_gcs.bucket}/models/run2'
  state = _run(run2, 6, checkpoint_cfg=checkpoints.CheckpointConfig(
      save=checkpoints.SaveCheckpointConfig(period=1000),
      restore=checkpoints.RestoreCheckpointConfig(path=f'{run}/checkpoint_3')))
  assert int(state.step) == 6 and checkpoints.all_steps(run2) == [6]


def test_profile_steps_land_in_a_gcs_model_dir(fake_gcs, copy_task):
  """PROFILE_STEPS with MODEL_DIR on gs://: the trace (written locally by the profiler) and
  its table are copied into MODEL_DIR/train, where TensorBoard reads them."""
  run = f'{fake_gcs.bucket}/models/profiled'
  _run(run, 3, profile_steps=1)
  files = [rel for rel, _ in storage.walk_files(storage.join(run, 'train'))]
  assert any(f.startswith('plugins/profile/') and f.endswith('.xplane.pb') for f in files), files
  table = storage.read_text(storage.join(run, 'train', 'profile_steps_3_3.txt'))
  assert '| matmul |' in table
