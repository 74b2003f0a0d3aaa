"""kill -9 at random moments, again and again: nothing is lost and the result is exact.

A chain of training processes on one MODEL_DIR, each SIGKILLed at a random moment (during
start-up, restore, compilation, training, and — every other trial — the moment an
asynchronous checkpoint write is seen in progress), each rerun resuming where the newest whole
checkpoint left it. At the end one run completes; its parameters and optimizer state, and
every checkpoint both runs saved, equal an uninterrupted run's bit for bit.

T5TPU_KILL_TRIALS sets the number of kills (default 4, to keep the suite short; the
row in docs/reliability.md was measured with 20).
"""
import glob
import os
import random
import subprocess
import sys
import time

import numpy as np

from t5tpu import checkpoints
from t5tpu.formats import flatten
from tests import subprocess_env

TRIALS = int(os.environ.get('T5TPU_KILL_TRIALS', '4'))
STEPS_PER_TRIAL = 8


def command(model_dir: str, train_steps: int) -> list:
  return [sys.executable, '-m', 't5tpu.train', '--gin_file=examples/knowledge_tiny.gin',
          f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={train_steps}',
          '--gin.CHECKPOINT_PERIOD=2', '--gin.EVAL_PERIOD=None', '--gin.BATCH_SIZE=16',
          '--gin.LOG_PERIOD=2']


def newest(model_dir: str) -> int:
  return checkpoints.latest_step(model_dir) or 0


def writes(model_dir: str) -> set:
  """Checkpoint saves in progress (or cut short by an earlier kill)."""
  return set(glob.glob(os.path.join(model_dir, '*.orbax-checkpoint-tmp*')))


def kill_once(model_dir: str, rng: random.Random, during_write: bool, env) -> dict:
  target = newest(model_dir) + STEPS_PER_TRIAL
  leftovers = writes(model_dir)
  proc = subprocess.Popen(command(model_dir, target), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  t0 = time.time()
  if during_write:  # the moment this run's own save is seen in progress
    while (time.time() - t0 < 40 and proc.poll() is None
           and not writes(model_dir) - leftovers):
      time.sleep(0.005)
  else:
    time.sleep(rng.uniform(1.0, 20.0))  # start-up alone can take 15 s on a loaded machine
  writing = bool(writes(model_dir) - leftovers)
  proc.kill()
  proc.wait(timeout=60)
  return {'after_s': round(time.time() - t0, 2), 'writing': writing,
          'finished_first': proc.returncode == 0, 'newest': newest(model_dir)}


def state_of(step_dir: str) -> dict:
  return flatten(checkpoints.read_state_dict(step_dir))


def assert_same(a: str, b: str) -> None:
  x, y = state_of(a), state_of(b)
  assert sorted(x) == sorted(y)
  differ = [k for k in x if not np.array_equal(np.asarray(x[k]), np.asarray(y[k]))]
  assert not differ, f'{a} vs {b}: {differ[:5]}'


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
  env = subprocess_env.user_env()
  rng = random.Random(1234)
  chained = str(tmp_path / 'killed')
  trials = [kill_once(chained, rng, during_write=i % 2 == 1, env=env) for i in range(TRIALS)]
  for i, t in enumerate(trials):
    print(f'kill {i:2d}: after {t["after_s"]:5.2f} s, write in progress: {t["writing"]}, '
          f'newest whole checkpoint: {t["newest"]}')
  steps = [t['newest'] for t in trials]
  assert steps == sorted(steps), 'a kill lost a whole checkpoint'
  assert sum(t['writing'] for t in trials) >= TRIALS // 4, 'too few kills hit a write'
  final = newest(chained) + 4
  done = subprocess.run(command(chained, final), env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  straight = str(tmp_path / 'straight')
  ref = subprocess.run(command(straight, final), env=env, capture_output=True, text=True,
                       timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert not writes(chained), 'saves cut short are cleaned up by the next run'
  assert_same(checkpoints.step_dir(chained, final), checkpoints.step_dir(straight, final))
  common = set(checkpoints.all_steps(chained)) & set(checkpoints.all_steps(straight))
  assert len(common) >= 2
  for step in sorted(common):  # re-saved after a kill, or saved once: the same bits
    assert_same(checkpoints.step_dir(chained, step), checkpoints.step_dir(straight, step))
  print(f'{TRIALS} kills ({sum(t["writing"] for t in trials)} during a checkpoint write): '
        f'final step {final} and {len(common)} common checkpoints bit-identical')
