"""The README's main command exactly as README writes it: `t5tpu demo`, no flags, run from a
fresh empty folder as a subprocess; then the continue command it prints (a relative MODEL_DIR)."""
import json
import os
import re
import shutil
import subprocess
import sys

from tests import subprocess_env


def t5tpu_command() -> str:
  """The installed `t5tpu` console script (beside this Python, else on PATH)."""
  beside = os.path.join(os.path.dirname(sys.executable), 't5tpu')
  found = beside if os.path.exists(beside) else shutil.which('t5tpu')
  assert found, 'the t5tpu console script is not installed: pip install -e ".[test]"'
  return found


def test_readme_demo_command_from_an_empty_folder(tmp_path):
  env = subprocess_env.user_env()
  out = subprocess.run([t5tpu_command(), 'demo'], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  model_dir = tmp_path / 'runs' / 'knowledge_demo'
  m = re.search(r'exact match \(validation\):\s+([\d.]+) at step 0\s+->\s+([\d.]+) at step 150',
                out.stderr)
  assert m, out.stderr[-2000:]
  before, after = float(m.group(1)), float(m.group(2))
  print(f'demo exact match: {before} -> {after}')
  assert before < 5 and after >= 80
  para = re.search(r'exact match \(paraphrase\):\s+([\d.]+)', out.stderr)
  assert para and float(para.group(1)) > before
  png = model_dir / 'demo_curves.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
  rows = [json.loads(l) for l in
          (model_dir / 'inference_eval' / 'knowledge_qa-metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 25, 50, 75, 100, 125, 150]
  assert abs(rows[-1]['em'] - after) < 0.051  # printed with one decimal
  subprocess_env.assert_clean_stderr(out.stderr)

  # The continue command the demo prints, with its relative --model_dir: resumes at 150.
  cont = re.search(r'continue training: (t5tpu demo .*)', out.stderr).group(1).split()
  assert '--model_dir=runs/knowledge_demo' in cont
  cont = [a if not a.startswith('--train_steps=') else '--train_steps=155' for a in cont]
  again = subprocess.run([t5tpu_command()] + cont[1:], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from' in again.stderr and 'checkpoint_150' in again.stderr
  assert sorted(p.name for p in model_dir.glob('checkpoint_*')) == [
      'checkpoint_100', 'checkpoint_150', 'checkpoint_155', 'checkpoint_50']
