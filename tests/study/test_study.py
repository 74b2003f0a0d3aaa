"""`t5tpu study` end to end: two methods x two tasks, a few steps, as a user runs it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from t5tpu.study import report
from tests.study.common import table_numbers
from tests.subprocess_env import user_env

METHODS, TASKS = ['lora', 'prompt'], ['synth_movies', 'synth_nli']
# Prompt tuning at a learning rate of 0 never improves on its first evaluation: with patience 1
# it must stop at the second one and report the first as its best.
FLAGS = ['--methods=lora,prompt', '--tasks=synth_movies,synth_nli', '--train_steps=30',
         '--eval_period=10', '--patience=1', '--base_steps=10', '--batch_size=16',
         "--gin.STUDY_LEARNING_RATES={'lora': 3e-3, 'prompt': 0.0}"]


def run_study(study_dir, *flags, check=True, entry=('-m', 't5tpu.study'), **kwargs):
  cmd = [sys.executable, *entry, f'--study_dir={study_dir}', *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=user_env(),
                        timeout=900, **kwargs)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  study_dir = tmp_path_factory.mktemp('study')
  proc = run_study(study_dir, *FLAGS)
  results = json.loads((study_dir / 'results.json').read_text())
  return study_dir, results, proc


def test_writes_the_report_its_plots_and_every_run(study):
  study_dir, results, _ = study
  for name in ['report.md', 'performance.png', 'transfer.png'] + [
      f'convergence_{t}.png' for t in TASKS]:
    assert (study_dir / name).stat().st_size > 500, name
  for m in METHODS:
    for t in TASKS:
      run = results['runs'][f'{m}/{t}/seed0']
      model_dir = study_dir / 'runs' / m / f'{t}-seed0'
      assert run['model_dir'] == str(model_dir)
      assert (model_dir / 'model-info.txt').exists()
      assert (model_dir / 'best_checkpoint.json').exists()
      assert run['curve'] and run['best_score'] == max(v for _, v in run['curve'])
  assert results['base']['pretrained_here'] and results['base']['steps'] == 10


def test_every_table_number_is_in_results_json(study):
  study_dir, results, _ = study
  a = results['analysis']
  tables = table_numbers((study_dir / 'report.md').read_text())
  r1 = lambda v: None if v is None else round(v, 1)
  r0 = lambda v: None if v is None else round(v)
  perf, conv, tr = a['performance'], a['convergence'], a['transfer']
  expected = [
      [[r1(perf['scores'][t][m]) for m in METHODS] for t in TASKS] +
      [[r1(perf['mean'][m]) for m in METHODS]] +
      [[round(perf['trainable_percent'][m], 4) for m in METHODS]]]
  for f in ('90', '95'):
    expected.append([[r0(conv['steps_to'][f][t][m]) for m in METHODS] for t in TASKS] +
                    [[r0(conv['mean'][f][m]) for m in METHODS]])
  order = tr['order']
  for m in METHODS:
    expected.append([[r1(tr['relative'][m][s][d]) for d in order] for s in order])
  expected.append([[r1(tr['within_category'][m]) for m in METHODS],
                   [r1(tr['across_category'][m]) for m in METHODS]])
  assert tables == expected
  # The ranking is the order of the means, and the report says it.
  assert perf['ranking'] == sorted(METHODS, key=lambda m: -perf['mean'][m])
  text = (study_dir / 'report.md').read_text()
  assert 'Ranking by mean score: ' + ' > '.join(report.NAMES[m] for m in perf['ranking']) in text
  # Trainable fractions are the engine's own counts.
  assert results['methods']['prompt']['trainable'] < results['methods']['lora']['trainable']


def test_transfer_diagonal_is_each_tasks_own_score(study):
  _, results, _ = study
  for m in METHODS:
    for t in TASKS:
      assert results['transfer'][m][t][t] == results['runs'][f'{m}/{t}/seed0']['best_score']
      assert results['analysis']['transfer']['relative'][m][t][t] == pytest.approx(100.0) or \
          results['runs'][f'{m}/{t}/seed0']['best_score'] == 0


def test_early_stopping_stops_a_run_that_stops_improving(study):
  _, results, _ = study
  for t in TASKS:
    run = results['runs'][f'prompt/{t}/seed0']
    assert run['stopped_early'] and run['last_step'] == 20
    assert run['best_step'] == 10 and [s for s, _ in run['curve']] == [10, 20]
    assert run['curve'][0][1] == run['curve'][1][1] == run['best_score']


def test_rerunning_a_finished_study_trains_nothing(study):
  study_dir, results, _ = study
  proc = run_study(study_dir, *FLAGS)
  assert '[study] [' not in proc.stderr and 'pre-training' not in proc.stderr
  assert 'transfer' not in proc.stderr.replace('transfer.png', '')
  again = json.loads((study_dir / 'results.json').read_text())
  assert again['runs'] == results['runs'] and again['transfer'] == results['transfer']


def test_an_interrupted_study_resumes_without_rerunning_finished_runs(study, tmp_path):
  study_dir, results, _ = study
  base = results['base']['checkpoint']
  flags = ['--methods=lora', '--tasks=synth_movies,synth_nli', '--train_steps=20',
           '--eval_period=10', '--batch_size=16', f'--initial_checkpoint={base}',
           '--gin.STUDY_TRANSFER=False']
  cmd = [sys.executable, '-m', 't5tpu.study', f'--study_dir={tmp_path}', *flags]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=user_env(), start_new_session=True)
  path = tmp_path / 'results.json'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if path.exists() and json.loads(path.read_text()).get('runs'):
      break
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  first = json.loads(path.read_text())['runs']
  assert list(first) == ['lora/synth_movies/seed0'], first
  resumed = run_study(tmp_path, *flags)
  assert '[1/2]' not in resumed.stderr and '[2/2] lora on synth_nli' in resumed.stderr
  final = json.loads(path.read_text())['runs']
  assert final['lora/synth_movies/seed0'] == first['lora/synth_movies/seed0']
  assert set(final) == {'lora/synth_movies/seed0', 'lora/synth_nli/seed0'}
  assert (tmp_path / 'report.md').exists()


def test_bad_input_is_one_clear_message(tmp_path):
  proc = run_study(tmp_path, '--methods=lora,qlora', check=False,
                   entry=('-m', 't5tpu.cli', 'study'))  # `t5tpu study` is the same entry
  assert proc.returncode == 2 and 'unknown method qlora' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = run_study(tmp_path, '--tasks=no_such_task', check=False)
  assert proc.returncode == 2 and "no seqio task or mixture named 'no_such_task'" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'results.json').exists()


def test_resuming_with_other_settings_is_refused(study):
  study_dir, results, _ = study
  flags = [f for f in FLAGS if not f.startswith('--train_steps')] + ['--train_steps=40']
  proc = run_study(study_dir, *flags, check=False)
  assert proc.returncode == 2 and 'train_steps: 30 then, 40 now' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert json.loads((study_dir / 'results.json').read_text())['runs'] == results['runs']
