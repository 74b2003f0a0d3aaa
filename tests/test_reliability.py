"""The bad-input catalogue and fault handling of docs/reliability.md, one test per row.

Every refusal is one message (UserError; the entry points print it without a traceback and
exit 2) that names the problem and the fix, and leaves MODEL_DIR as it was.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5tpu import checkpoints, data, errors, initial_checkpoint, model_dir_lock, optimizers
from t5tpu import train
from tests import subprocess_env, tiny
from tests.test_train import run

KNOWLEDGE = ['--gin_file=examples/knowledge_tiny.gin']


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def tree_listing(path) -> dict:
  """Every file under path with its size and modification time: 'nothing changed' checks."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def refused_by_main(argv, capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  assert exit_info.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.startswith('t5tpu: error: ') and 'Traceback' not in err
  return err


def params_equal(a, b) -> bool:
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                      jax.device_get(a), jax.device_get(b))
  return all(jax.tree.leaves(same))


def every_two(**kw):
  return checkpoints.CheckpointConfig(save=checkpoints.SaveCheckpointConfig(period=2, **kw))


# ----------------------------------------------------------------------------- configuration

def test_typo_in_a_gin_macro_is_refused(tmp_path, clean_gin, capsys):
  model_dir = tmp_path / 'm'
  err = refused_by_main(KNOWLEDGE + [f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_STEPZ=40'],
                        capsys)
  assert 'no gin file uses a macro named TRAIN_STEPZ' in err
  assert 'Did you mean TRAIN_STEPS' in err
  assert not model_dir.exists()


def test_unknown_task_is_one_message(tmp_path, clean_gin, capsys):
  model_dir = tmp_path / 'm'
  err = refused_by_main(KNOWLEDGE + [f'--gin.MODEL_DIR="{model_dir}"',
                                     '--gin.MIXTURE_OR_TASK_NAME="knowledge_qaa"'], capsys)
  assert "no seqio task or mixture named 'knowledge_qaa'" in err
  assert 'Did you mean knowledge_qa' in err and 'MIXTURE_OR_TASK_MODULE' in err
  assert '_metrics_executor' not in err
  assert not model_dir.exists()


def test_feature_lengths_must_be_positive(tmp_path, clean_gin, capsys):
  model_dir = tmp_path / 'm'
  err = refused_by_main(KNOWLEDGE + [f'--gin.MODEL_DIR="{model_dir}"',
                                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}"],
                        capsys)
  assert "'inputs' must be a positive number of tokens" in err
  assert not model_dir.exists()


def test_task_vocabulary_must_be_the_models(tmp_path):
  import tasks.knowledge  # noqa: F401  (registers knowledge_qa, tokenised with its own SPM)
  cfg = data.DatasetConfig('knowledge_qa', {'inputs': 24, 'targets': 8}, batch_size=8)
  with pytest.raises(errors.UserError, match="tokenises 'inputs' with SentencePieceVocabulary"):
    run(tmp_path / 'm', 2, train_dataset_cfg=cfg)  # the tiny model reads bytes
  assert not (tmp_path / 'm').exists()


def test_batch_not_divisible_by_the_data_parallel_size(tmp_path, copy_task):
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=6)  # data-parallel size 4
  with pytest.raises(errors.UserError, match='BATCH_SIZE=6 must be a multiple'):
    run(tmp_path / 'm', 2, train_dataset_cfg=cfg)
  assert not (tmp_path / 'm').exists()


def test_microbatches_smaller_than_the_data_parallel_size(tmp_path, copy_task):
  # 8 examples in 4 microbatches: 2 per microbatch over 4 data-parallel devices.
  with pytest.raises(errors.UserError, match='NUM_MICROBATCHES=4 gives microbatches .* '
                     'multiple of 4 x 4 = 16; use fewer microbatches'):
    run(tmp_path / 'm', 2, num_microbatches=4)
  assert not (tmp_path / 'm').exists()


def test_model_gin_unlike_the_checkpoint_in_model_dir(tmp_path, copy_task, caplog):
  model_dir = tmp_path / 'm'
  run(model_dir, 2)
  before = tree_listing(model_dir)
  info = (model_dir / 'model-info.txt').read_text()
  with pytest.raises(initial_checkpoint.CheckpointMismatchError) as e:
    run(model_dir, 4, model=tiny.tiny_model(emb_dim=16, dropout_rate=0.1))
  message = str(e.value)
  assert 'does not fit the configured model' in message and 'checkpoint_2' in message
  assert 'token_embedder/embedding: (264, 32) vs (264, 16)' in message
  assert 'use a fresh MODEL_DIR' in message
  assert 'strict=False' not in message.split('fix:')[0]  # orbax's advice is not ours
  assert 'Event loop is closed' not in caplog.text
  assert tree_listing(model_dir) == before
  assert (model_dir / 'model-info.txt').read_text() == info


def test_relative_model_dir_trains_and_resumes(tmp_path, copy_task, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run('rel/run', 3)
  state = run('rel/run', 5)
  assert int(state.step) == 5
  assert checkpoints.all_steps(str(tmp_path / 'rel' / 'run')) == [3, 5]
  assert not glob.glob(str(tmp_path / 'rel' / 'run' / '*tmp*'))


# ----------------------------------------------------------------------------- data

def test_finite_training_data_ends_with_a_checkpoint(tmp_path, copy_task, caplog):
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=64, num_epochs=1, pack=False)
  with caplog.at_level('WARNING'):
    state = run(tmp_path / 'm', 1000, train_dataset_cfg=cfg)
  assert int(state.step) == 512 // 64
  assert 'the training data ran out at step 8' in caplog.text
  assert checkpoints.all_steps(str(tmp_path / 'm')) == [8]


def test_split_smaller_than_one_batch(tmp_path, copy_task):
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, split='validation', batch_size=64,
                           num_epochs=1, pack=False)  # 32 examples
  with pytest.raises(errors.UserError, match='gives no batch of BATCH_SIZE=64'):
    run(tmp_path / 'm', 10, train_dataset_cfg=cfg)


# ----------------------------------------------------------------------------- NaN / Inf

def lr_breaking_at(bad_step):
  """A schedule that turns NaN from `bad_step` on (the step the update uses, 0-based)."""
  return lambda step: jnp.where(jnp.asarray(step) < bad_step, 0.01, jnp.nan)


def test_nan_learning_rate_stops_before_any_checkpoint(tmp_path, copy_task):
  model_dir = tmp_path / 'm'
  lr = optimizers.create_learning_rate_scheduler(base_learning_rate=float('nan'))
  with pytest.raises(train.NonFiniteError, match='training stopped at step 1: .*none yet'):
    run(model_dir, 20, learning_rate_fn=lr, checkpoint_cfg=every_two())
  assert checkpoints.all_steps(str(model_dir)) == []


def test_nonfinite_update_stops_naming_step_and_last_good_checkpoint(tmp_path, copy_task):
  model_dir = tmp_path / 'm'
  with pytest.raises(train.NonFiniteError) as e:
    run(model_dir, 20, learning_rate_fn=lr_breaking_at(3), checkpoint_cfg=every_two())
  assert 'training stopped at step 4' in str(e.value)
  assert 'last good checkpoint in MODEL_DIR is checkpoint_2' in str(e.value)
  assert 'ON_NONFINITE' in str(e.value)
  assert checkpoints.all_steps(str(model_dir)) == [2]  # no checkpoint_4 (NaN)


def test_skip_mode_drops_nonfinite_steps(tmp_path, copy_task):
  skipped = run(tmp_path / 'skip', 7, learning_rate_fn=lr_breaking_at(3),
                on_nonfinite='skip', log_period=7)
  three = run(tmp_path / 'three', 3,
              learning_rate_fn=optimizers.create_learning_rate_scheduler(
                  base_learning_rate=0.01))
  assert int(skipped.step) == 7
  assert params_equal(skipped.params, three.params)  # steps 4-7 changed nothing
  rows = [json.loads(l) for l in
          (tmp_path / 'skip' / 'train' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['nonfinite_steps_skipped'] == 4


# ----------------------------------------------------------------------------- checkpoints

def _damage(step_dir: str, how: str) -> None:
  # Every array-data file (OCDBT's d/ folders), truncated to half or deleted. Not just one: an
  # OCDBT checkpoint keeps data files that its final manifest no longer needs (superseded
  # copies from earlier commits, some nearly as large as the live ones), so a checkpoint
  # without one chosen file, even the largest, may still restore whole.
  victims = [p for p in glob.glob(f'{step_dir}/state/**/d/*', recursive=True)
             if os.path.isfile(p)]
  assert victims, f'no array-data files under {step_dir}/state'
  for victim in victims:
    if how == 'truncate':
      os.truncate(victim, os.path.getsize(victim) // 2)
    else:
      os.remove(victim)


@pytest.fixture(scope='module')
def runs_to_4_and_6(tmp_path_factory):
  """A MODEL_DIR trained to step 4 (checkpoints 2 and 4), and an uninterrupted run to 6: the
  same for each way of damaging, so made once."""
  from tests.test_kill9 import command
  env = subprocess_env.user_env()
  root = tmp_path_factory.mktemp('damaged')
  for name, steps in (('to_4', 4), ('straight', 6)):
    done = subprocess.run(command(str(root / name), steps), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
  return str(root / 'to_4'), str(root / 'straight')


@pytest.mark.parametrize('how', ['truncate', 'delete'])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, how, runs_to_4_and_6):
  """As after a crash: each run is a new process (an in-process rerun could be served from
  the caches of the run that wrote the checkpoint)."""
  from tests.test_kill9 import assert_same, command
  to_4, straight = runs_to_4_and_6
  model_dir = str(tmp_path / 'm')
  shutil.copytree(to_4, model_dir)
  assert checkpoints.all_steps(model_dir) == [2, 4]
  _damage(os.path.join(model_dir, 'checkpoint_4'), how)
  again = subprocess.run(command(model_dir, 6), env=subprocess_env.user_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f'checkpoint {model_dir}/checkpoint_4 is damaged' in again.stderr
  assert 'resumed from' in again.stderr and 'checkpoint_2 (step 2)' in again.stderr
  assert len(glob.glob(f'{model_dir}/checkpoint_4.unreadable-*')) == 1  # kept, aside
  assert checkpoints.all_steps(model_dir) == [2, 4, 6]
  assert_same(checkpoints.step_dir(model_dir, 6), checkpoints.step_dir(straight, 6))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, copy_task):
  model_dir = tmp_path / 'm'
  run(model_dir, 2)
  _damage(str(model_dir / 'checkpoint_2'), 'delete')
  with pytest.raises(errors.UserError, match='every checkpoint in MODEL_DIR .* is unreadable'):
    run(model_dir, 4)


# ----------------------------------------------------------------------------- one writer

def test_second_run_on_a_model_dir_is_refused(tmp_path, copy_task):
  model_dir = tmp_path / 'm'
  with model_dir_lock.ModelDirLock(str(model_dir)):
    with pytest.raises(model_dir_lock.ModelDirInUseError, match=f'pid {os.getpid()} on host'):
      run(model_dir, 2)
  state = run(model_dir, 2)  # released: the next run goes ahead
  assert int(state.step) == 2
  assert not (model_dir / model_dir_lock.LOCK_NAME).exists()


HOLD_LOCK = '''
import sys, time
from t5tpu import model_dir_lock
with model_dir_lock.ModelDirLock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
'''


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
  model_dir = str(tmp_path / 'm')
  proc = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, model_dir], stdout=subprocess.PIPE,
                          text=True, env=subprocess_env.user_env(JAX_PLATFORMS='cpu'))
  try:
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(model_dir_lock.ModelDirInUseError, match=f'pid {proc.pid}'):
      with model_dir_lock.ModelDirLock(model_dir):
        pass
  finally:
    proc.kill()  # SIGKILL: no chance to release
    proc.wait(timeout=30)
  with model_dir_lock.ModelDirLock(model_dir):  # the kernel dropped the dead run's lock
    pass


# ----------------------------------------------------------------------------- as a user runs it

def test_cli_run_is_clean_and_refusals_are_one_message(tmp_path):
  """`python -m t5tpu.train` from a folder that holds a `runs/` folder (which `python -m`
  could take for a package): gin includes resolve as from anywhere, stderr holds nothing that
  reads as an error, and a typo'd macro is one message with exit status 2."""
  (tmp_path / 'runs' / 'old').mkdir(parents=True)
  env = subprocess_env.user_env()
  cmd = [sys.executable, '-m', 't5tpu.train', *KNOWLEDGE, '--gin.MODEL_DIR="out"',
         '--gin.TRAIN_STEPS=3', '--gin.EVAL_PERIOD=3']
  ok = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
  assert ok.returncode == 0, ok.stderr[-3000:]
  subprocess_env.assert_clean_stderr(ok.stderr)
  assert checkpoints.all_steps(str(tmp_path / 'out')) == [3]
  typo = subprocess.run(cmd + ['--gin.TRAIN_STEPZ=40'], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=env)
  assert typo.returncode == 2
  assert 'Traceback' not in typo.stderr and 'Did you mean TRAIN_STEPS' in typo.stderr
  assert checkpoints.all_steps(str(tmp_path / 'out')) == [3]
