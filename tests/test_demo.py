"""The README's main command, end to end: `t5tpu demo` learns the knowledge task and resumes."""
import json
import os
import subprocess
import sys


def test_demo_learns_and_resumes(tmp_path):
  model_dir = tmp_path / 'demo'
  cmd = [sys.executable, '-m', 't5tpu.cli', 'demo', f'--model_dir={model_dir}',
         '--train_steps=60', '--gin.EVAL_PERIOD=30', '--gin.CHECKPOINT_PERIOD=30']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in
          (model_dir / 'inference_eval' / 'knowledge_qa-metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 30, 60]
  assert rows[0]['em'] < 5  # an untrained model knows nothing
  assert rows[-1]['em'] >= 80, rows
  assert 'exact match (validation)' in out.stderr and 'paraphrase' in out.stderr
  assert (model_dir / 'demo_curves.png').stat().st_size > 10_000
  assert sorted(os.listdir(model_dir / 'paraphrase_eval' / 'inference_eval'))
  # Rerun with more steps: resumes from checkpoint_60 instead of starting over.
  out = subprocess.run(cmd[:-3] + ['--train_steps=64', '--gin.EVAL_PERIOD=30',
                                   '--gin.CHECKPOINT_PERIOD=30'],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from' in out.stderr
  rows = [json.loads(l) for l in
          (model_dir / 'inference_eval' / 'knowledge_qa-metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 30, 60, 64]
