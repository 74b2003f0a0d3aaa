"""End-to-end training on a tiny model: learning, exact resume, TRAIN_STEPS semantics."""
import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5tpu import checkpoints, data, optimizers, partitioning, train, trainer
from tests import tiny


def run(model_dir, total_steps, seen=None, monkeypatch=None, **kw):
  if seen is not None:
    original = trainer.Trainer.train_step

    def recording(self, state, batch, rng):
      seen.append(hashlib.sha1(np.asarray(batch['encoder_input_tokens']).tobytes()).hexdigest())
      return original(self, state, batch, rng)
    monkeypatch.setattr(trainer.Trainer, 'train_step', recording)
  args = dict(
      model=tiny.tiny_model(dropout_rate=0.1),
      train_dataset_cfg=data.DatasetConfig(tiny.COPY_TASK, tiny.LENGTHS, batch_size=8),
      partitioner=partitioning.PjitPartitioner(num_partitions=2), model_dir=str(model_dir),
      total_steps=total_steps, random_seed=0, log_period=5,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.01),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=1000)))
  args.update(kw)
  state = train.train(**args)
  if seen is not None:
    monkeypatch.undo()
  return state


def test_loss_falls(tmp_path, copy_task):
  model = tiny.tiny_model()
  tr = trainer.Trainer(model, partitioning.PjitPartitioner(num_partitions=2), None, None,
                       {'encoder_input_tokens': (8, 16), 'decoder_input_tokens': (8, 8)})
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, split='validation', batch_size=8,
                           shuffle=False, num_epochs=1)
  batch = next(data.get_dataset(cfg).as_numpy_iterator())

  def val_loss(params):
    g = data.make_global_batch(batch, tr.batch_shardings(batch))
    return float(tr.eval_step(params, g)['cross_ent_sum'] / tr.eval_step(params, g)['weight_sum'])

  init = tr.init_state(jax.random.PRNGKey(0))
  before = val_loss(init.params)
  state = run(tmp_path / 'run', 60)
  after = val_loss(state.params)
  print(f'validation loss per token: {before:.3f} -> {after:.3f}')
  assert after < 0.6 * before


def test_resume_is_bit_identical(tmp_path, copy_task, monkeypatch):
  n = 6
  seen_straight, seen_resumed = [], []
  straight = run(tmp_path / 'a', 2 * n, seen_straight, monkeypatch)
  run(tmp_path / 'b', n, seen_resumed, monkeypatch)
  assert checkpoints.all_steps(str(tmp_path / 'b')) == [n]
  resumed = run(tmp_path / 'b', 2 * n, seen_resumed, monkeypatch)
  assert seen_straight == seen_resumed
  assert len(set(seen_straight)) == 2 * n
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      jax.device_get(straight.params), jax.device_get(resumed.params))
  assert all(jax.tree.leaves(same))
  opt_same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                          jax.device_get(straight.opt_state),
                          jax.device_get(resumed.opt_state))
  assert all(jax.tree.leaves(opt_same))
  assert checkpoints.all_steps(str(tmp_path / 'b')) == [n, 2 * n]


def test_bfloat16_parameters_train_and_resume_exactly(tmp_path, copy_task, monkeypatch):
  """PARAM_DTYPE='bfloat16': the state holds bfloat16 parameters, checkpoints stay float32
  (SaveCheckpointConfig.dtype), and resuming from one continues bit for bit."""
  n = 4
  straight = run(tmp_path / 'a', 2 * n, param_dtype='bfloat16')
  run(tmp_path / 'b', n, param_dtype='bfloat16')
  resumed = run(tmp_path / 'b', 2 * n, param_dtype='bfloat16')
  leaves = jax.tree.leaves(jax.device_get(straight.params))
  assert {str(x.dtype) for x in leaves} == {'bfloat16'}
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      jax.device_get(straight.params), jax.device_get(resumed.params))
  assert all(jax.tree.leaves(same))
  saved = jax.tree.leaves(
      checkpoints.read_state_dict(checkpoints.step_dir(str(tmp_path / 'b'), n))['target'])
  assert {str(np.asarray(x).dtype) for x in saved} == {'float32'}
  # Steps n+1..2n moved most parameters: bfloat16 rounding did not swallow the updates.
  moved = [not np.array_equal(np.asarray(a).astype(b.dtype), b) for a, b in zip(saved, leaves)]
  assert sum(moved) > len(moved) // 2


def test_param_dtype_is_checked(tmp_path, copy_task):
  from t5tpu import errors
  with pytest.raises(errors.UserError, match='PARAM_DTYPE=.float16.: use "float32" or'):
    run(tmp_path / 'x', 1, param_dtype='float16')


def test_train_steps_semantics(tmp_path, copy_task, caplog):
  run(tmp_path / 'r', 3)
  with caplog.at_level('WARNING'):
    state = run(tmp_path / 'r', 3)
  assert 'nothing to do' in caplog.text
  assert int(state.step) == 3
  with pytest.raises(ValueError, match='TRAIN_STEPS=2 is below the step'):
    run(tmp_path / 'r', 2)
  state = run(tmp_path / 'r', None, relative_steps=2)
  assert int(state.step) == 5
  files = set(os.listdir(tmp_path / 'r'))
  assert {'checkpoint_3', 'checkpoint_5', 'model-info.txt', 'train'} <= files
  # keep=1 leaves only the newest checkpoint.
  run(tmp_path / 'r', 7, checkpoint_cfg=checkpoints.CheckpointConfig(
      save=checkpoints.SaveCheckpointConfig(period=1, keep=1)))
  assert checkpoints.all_steps(str(tmp_path / 'r')) == [7]
  info = (tmp_path / 'r' / 'model-info.txt').read_text()
  assert 'encoder/layers_0/attention/query/kernel' in info and "axes=('embed', 'joined_kv')" in info


USER_GIN = '''
from __gin__ import dynamic_registration
import seqio
import cli_tasks
include 'models/t5_1_1/tiny.gin'
include 'runs/pretrain.gin'
VOCABULARY = @seqio.ByteVocabulary()
'''

CLI_TASK_MODULE = '''
from tests import tiny
tiny.register_copy_task()
'''


def test_cli_sigterm_saves_a_checkpoint_and_rerun_resumes(tmp_path, copy_task):
  """python -m t5tpu.train with t5x-style flags and a user gin; SIGTERM mid-run saves a
  checkpoint and exits cleanly; the same command with a larger TRAIN_STEPS resumes."""
  import signal
  import time
  model_dir = tmp_path / 'pre'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.getcwd(), str(tmp_path)])}
  (tmp_path / 'cli_tasks.py').write_text(CLI_TASK_MODULE)
  (tmp_path / 'user.gin').write_text(USER_GIN)
  cmd = [sys.executable, '-m', 't5tpu.train', f'--gin_file={tmp_path / "user.gin"}',
         f'--gin.MODEL_DIR="{model_dir}"', f'--gin.MIXTURE_OR_TASK_NAME="{tiny.COPY_TASK}"',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", '--gin.BATCH_SIZE=8',
         '--gin.EVAL_PERIOD=None', '--gin.RANDOM_SEED=1', '--gin.CHECKPOINT_PERIOD=100000',
         '--gin.TRAIN_STEPS=1000000']
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while not (model_dir / 'config.gin').exists() and time.time() < deadline:
    time.sleep(0.5)  # config.gin appears after the first step
  time.sleep(2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'stopped by SIGTERM' in err
  steps = checkpoints.all_steps(str(model_dir))
  assert len(steps) == 1 and 0 < steps[0] < 1000000
  config = (model_dir / 'config.gin').read_text()  # the operative config
  assert 'T5Config.emb_dim = 8' in config and 'TRAIN_STEPS = 1000000' in config
  out = subprocess.run(cmd[:-1] + [f'--gin.TRAIN_STEPS={steps[0] + 2}'], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from' in out.stderr
  assert checkpoints.all_steps(str(model_dir)) == [steps[0], steps[0] + 2]
  assert f'TRAIN_STEPS = {steps[0] + 2}' in (model_dir / 'config.gin').read_text()
