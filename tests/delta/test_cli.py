"""The delta-tuning commands as users type them: train a tiny base, LoRA on top, evaluate."""
import json
import subprocess
import sys

import pytest

from tests import subprocess_env

LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}"


def _run(args, cwd):
  proc = subprocess.run([sys.executable, '-m'] + args, cwd=cwd, capture_output=True, text=True,
                        env=subprocess_env.user_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _em(path) -> list:
  return [json.loads(l)['em'] for l in open(path).read().splitlines()]


@pytest.mark.timeout(900)
def test_lora_on_a_briefly_trained_base_raises_exact_match(tmp_path):
  # The base: the offline demo's tiny model, trained briefly (40 steps).
  _run(['t5tpu.train', '--gin_file=examples/knowledge_tiny.gin', '--gin.MODEL_DIR="base"',
        '--gin.TRAIN_STEPS=40', '--gin.EVAL_PERIOD=40', '--gin.CHECKPOINT_PERIOD=40'], tmp_path)
  base_em = _em(tmp_path / 'base' / 'inference_eval' / 'knowledge_qa-metrics.jsonl')[-1]
  # LoRA on it: the model gin, finetune.gin and delta/lora.gin, as docs/delta-tuning.md says.
  lora = ['--gin_file=examples/knowledge_tiny_model.gin', '--gin_file=runs/finetune.gin',
          '--gin_file=delta/lora.gin']
  _run(['t5tpu.train'] + lora + [
      '--gin.MODEL_DIR="lora"', '--gin.INITIAL_CHECKPOINT_PATH="base/checkpoint_40"',
      '--gin.MIXTURE_OR_TASK_NAME="knowledge_qa"', LENGTHS, '--gin.TRAIN_STEPS=50',
      '--gin.EVAL_PERIOD=50', '--gin.CHECKPOINT_PERIOD=50', '--gin.BATCH_SIZE=64',
      '--gin.LEARNING_RATE=0.003', '--gin.DROPOUT_RATE=0.0', '--gin.RANDOM_SEED=0',
      '--gin.EVAL_STEPS=2'], tmp_path)
  lora_em = _em(tmp_path / 'lora' / 'inference_eval' / 'knowledge_qa-metrics.jsonl')[-1]
  print(f'knowledge_qa validation EM: base (40 steps) {base_em:.1f} -> + LoRA (50 steps) '
        f'{lora_em:.1f}')
  assert lora_em > base_em + 5
  info = (tmp_path / 'lora' / 'model-info.txt').read_text()
  assert 'trainable parameters: 24,576 (2.604%)' in info
  # `t5tpu eval` with the same gins reads the recorded base plus the delta.
  proc = _run(['t5tpu.eval', '--gin_file=examples/knowledge_tiny_model.gin',
               '--gin_file=runs/eval.gin', '--gin_file=delta/lora.gin',
               '--gin.CHECKPOINT_PATH="lora/checkpoint_50"', '--gin.EVAL_OUTPUT_DIR="ev"',
               '--gin.MIXTURE_OR_TASK_NAME="knowledge_qa"', '--gin.EVAL_SPLIT="validation"'],
              tmp_path)
  assert _em(tmp_path / 'ev' / 'inference_eval' / 'knowledge_qa-metrics.jsonl') == [lora_em]
  subprocess_env.assert_clean_stderr(proc.stderr)
