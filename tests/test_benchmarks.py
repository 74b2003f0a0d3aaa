"""The benchmark commands run end to end (tiny shapes, CPU): benchmarks/gpu_suite.sh with
TINY=1 runs train_throughput.py, max_batch.py and decode_throughput.py against transformers,
as the GPU run will. Their numbers are not checked here (speed belongs to the benchmarks);
that each table has both systems and a ratio is."""
import json
import math
import os
import subprocess
import sys

from tests import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_runs_every_benchmark_with_tiny_shapes(tmp_path):
  env = subprocess_env.user_env(TINY='1', OUT=str(tmp_path), PYTHON=sys.executable,
                                JAX_PLATFORMS='cpu')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_suite.sh')], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  variants = {'train_base': {'t5tpu attention_kernel=jax', 't5tpu float32_attention_logits=False'},
              'train_large': set()}
  for name in ('train_base', 'train_large'):
    rows = json.loads((tmp_path / f'{name}.json').read_text())['results']
    systems = {r['system'] for r in rows}
    assert systems == {'t5tpu (jax)', 'transformers (eager)'} | variants[name], systems
    assert all(r['tokens_per_second'] > 0 and math.isfinite(r['first_loss']) for r in rows)
    assert all(r['t5tpu_over_this'] > 0 for r in rows)

  packed = json.loads((tmp_path / 'train_base.json').read_text())['packed']
  assert [r['system'] for r in packed] == ['t5tpu (jax), packed', 'transformers, padded']
  assert all(r['real_tokens_per_second'] > 0 for r in packed)
  assert packed[0]['examples_per_step'] > 4  # several examples share each packed row

  decode = json.loads((tmp_path / 'decode_base.json').read_text())['results']
  assert [r['decoding'] for r in decode] == ['greedy', 'beam 4']
  assert all(r['t5tpu_tokens_per_second'] > 0 and r['ratio'] > 0 for r in decode)

  search = json.loads((tmp_path / 'max_batch_xl.json').read_text())
  assert search['largest_batch'] and search['largest_batch'] % 8 == 0
  assert search['trials'][-1]['ran']
  assert 'ratio' in proc.stdout

  assert 'where the t5tpu step (adamw) spends its time' in proc.stdout, proc.stdout[-3000:]
  assert '| matmul |' in proc.stdout
  assert list((tmp_path / 'profile_base' / 'adamw').glob('plugins/profile/*/*.xplane.pb'))
  assert 'where t5tpu decoding (beam4) spends its time' in proc.stdout


def test_gpu_suite_runs_only_the_steps_named(tmp_path):
  """STEPS splits the suite over short device sessions; a step name it does not know is
  refused before anything runs."""
  suite = os.path.join(ROOT, 'benchmarks', 'gpu_suite.sh')
  env = lambda steps: subprocess_env.user_env(TINY='1', OUT=str(tmp_path), STEPS=steps,
                                              PYTHON=sys.executable, JAX_PLATFORMS='cpu')
  proc = subprocess.run(['bash', suite], env=env('decode xll'), capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2
  assert "STEPS has 'xll'; choose among: base large decode xl" in proc.stderr
  assert not list(tmp_path.iterdir())

  proc = subprocess.run(['bash', suite], env=env('xl'), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['max_batch_xl.json']
  assert proc.stdout.count('left out (STEPS="xl")') == 3


def test_eval_vs_infer_decodes_the_same_and_prints_both_rows(tmp_path):
  out = tmp_path / 'eval_vs_infer.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'eval_vs_infer.py'), '--model',
       't5_1_1/tiny', '--batch', '4', '--examples', '8', '--inputs', '32', '--targets', '8',
       '--repeats', '1', '--json', str(out)],
      env=subprocess_env.user_env(JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'same predictions: True' in proc.stdout
  rows = json.loads(out.read_text())['results']
  assert [r['system'] for r in rows] == ['inference eval (training)', 't5tpu infer']
  assert all(r['seconds_2n'] > 0 and r['seconds_n'] > 0 for r in rows)


def test_train_throughput_with_dropout_and_variant_rows(tmp_path):
  """--dropout on both sides; --variant adds t5tpu rows with a network field changed, and a
  variant that cannot run here (cuDNN on a CPU) is reported while the rest of the table stands."""
  out = tmp_path / 'train.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'train_throughput.py'), '--model',
       't5_1_1/tiny', '--vocab', '128', '--batch', '2', '--inputs', '16', '--targets', '8',
       '--steps', '1', '--warmup', '1', '--optimizer', 'adamw', '--dropout', '0.1',
       '--variant', 'float32_attention_logits=False',
       '--variant', 'attention_kernel=cudnn', '--json', str(out)],
      env=subprocess_env.user_env(JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'dropout 0.1)' in proc.stdout
  assert 'adamw t5tpu attention_kernel=cudnn: failed (UserError: ' in proc.stdout
  rows = json.loads(out.read_text())['results']
  assert [r['system'] for r in rows] == [
      't5tpu (jax)', 't5tpu float32_attention_logits=False', 'transformers (eager)']
  assert all(math.isfinite(r['first_loss']) for r in rows)
