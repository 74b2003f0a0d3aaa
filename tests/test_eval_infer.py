"""Offline evaluation of every checkpoint, and inference from files and task splits."""
import json
import os
import subprocess
import sys

import pytest

from t5tpu import checkpoints, data, eval as eval_lib, infer, optimizers, partitioning, train
from tests import tiny


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory, copy_task):
  model_dir = tmp_path_factory.mktemp('trained') / 'run'
  train.train(
      model=tiny.tiny_model(),
      train_dataset_cfg=data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=16),
      partitioner=partitioning.PjitPartitioner(num_partitions=2), model_dir=str(model_dir),
      total_steps=90, random_seed=0, log_period=30, eval_period=None,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.05),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=30)))
  return model_dir


def eval_cfg(task):
  return data.DatasetConfig(task, None, split='validation', batch_size=8, shuffle=False,
                            pack=False, num_epochs=1)


def test_eval_every_checkpoint_writes_one_row_each(trained_dir, tmp_path, copy_task):
  out = tmp_path / 'eval'
  kwargs = dict(model=tiny.tiny_model(), dataset_cfg=eval_cfg(copy_task),
                partitioner=partitioning.PjitPartitioner(num_partitions=2),
                output_dir=str(out))
  results = eval_lib.evaluate(
      restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(
          path=str(trained_dir), mode='all'), **kwargs)
  assert sorted(results) == [30, 60, 90]
  rows = [json.loads(l) for l in
          (out / 'inference_eval' / f'{copy_task}-metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [30, 60, 90]
  assert all('exact_match' in r for r in rows)
  for step in (30, 60, 90):
    assert (out / 'inference_eval' / f'{copy_task}-{step:06d}.jsonl').exists()
  # A rerun skips what is done; 'latest' evaluates only the newest (again, on request).
  again = eval_lib.evaluate(restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(
      path=str(trained_dir), mode='all'), **kwargs)
  assert again == {}
  latest = eval_lib.evaluate(restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(
      path=str(trained_dir), mode='latest'), **kwargs)
  assert list(latest) == [90]
  assert latest[90] == results[90]


def test_infer_from_jsonl_file_with_scores_and_resume(trained_dir, tmp_path):
  src = tmp_path / 'in.jsonl'
  words = ['abc', 'hgf', 'dd', 'cab', 'bead', 'fa', 'gg', 'ace', 'ha', 'bb', 'cde']
  src.write_text(''.join(json.dumps({'input': f'copy {w}', 'target': w}) + '\n'
                         for w in words))
  out = tmp_path / 'pred.jsonl'
  kwargs = dict(model=tiny.tiny_model(),
                restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(
                    path=checkpoints.step_dir(str(trained_dir), 90)),
                partitioner=partitioning.PjitPartitioner(num_partitions=2),
                output_file=str(out), input_file=str(src), batch_size=4,
                max_decode_length=8, score=True, chunk_size=4)
  infer.infer(**kwargs)
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r['input'] for r in rows] == [f'copy {w}' for w in words]
  assert all(r['score'] <= 0 and r['target_score'] <= 0 for r in rows)
  # Where the prediction equals the target, both scores are the same log-likelihood.
  for r in rows:
    if r['prediction'] == r['target']:
      assert abs(r['score'] - r['target_score']) < 1e-3
  # Resume: parts already written are reused, not recomputed.
  first = out.read_text()
  (tmp_path / 'pred.jsonl.part-00000').write_text(
      json.dumps({'input': 'copy abc', 'prediction': 'SENTINEL'}) + '\n' * 1 +
      '\n'.join(json.dumps({'input': f'copy {w}', 'prediction': 'x'}) for w in words[1:4]) +
      '\n')
  infer.infer(**kwargs)
  again = [json.loads(l) for l in out.read_text().splitlines()]
  assert again[0]['prediction'] == 'SENTINEL'
  assert out.read_text().splitlines()[4:] == first.splitlines()[4:]
  assert not list(tmp_path.glob('pred.jsonl.part-*'))


def test_cli_eval_and_infer(trained_dir, tmp_path, copy_task):
  gin_file = tmp_path / 'model.gin'
  gin_file.write_text(
      "from __gin__ import dynamic_registration\nimport seqio\nimport cli_tasks\n"
      "from t5tpu import network\n"
      "include 'models/t5_1_1/tiny.gin'\nVOCABULARY = @seqio.ByteVocabulary()\n"
      "network.T5Config:\n  vocab_size = 264\n  emb_dim = 32\n  num_heads = 2\n"
      "  head_dim = 16\n  mlp_dim = 64\n  dtype = 'float32'\n")
  (tmp_path / 'cli_tasks.py').write_text('from tests import tiny\ntiny.register_copy_task()\n')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.getcwd(), str(tmp_path)])}
  out = subprocess.run(
      [sys.executable, '-m', 't5tpu.cli', 'eval', f'--gin_file={gin_file}',
       '--gin_file=runs/eval.gin', f'--gin.CHECKPOINT_PATH="{trained_dir}"',
       "--gin.CHECKPOINT_MODE='all'", f'--gin.EVAL_OUTPUT_DIR="{tmp_path / "ev"}"',
       f'--gin.MIXTURE_OR_TASK_NAME="{copy_task}"', "--gin.EVAL_SPLIT='validation'",
       '--gin.BATCH_SIZE=8'], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'best:' in out.stderr
  lines = (tmp_path / 'ev' / 'inference_eval' / f'{copy_task}-metrics.jsonl').read_text()
  assert len(lines.splitlines()) == 3
  (tmp_path / 'q.txt').write_text('copy abc\ncopy dd\n')
  out = subprocess.run(
      [sys.executable, '-m', 't5tpu.cli', 'infer', f'--gin_file={gin_file}',
       '--gin_file=runs/infer.gin', f'--checkpoint_path={trained_dir}/checkpoint_90',
       f'--input_file={tmp_path / "q.txt"}', f'--output_file={tmp_path / "p.jsonl"}',
       '--max_decode_length=8', '--batch_size=8', '--score'],
      env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'p.jsonl').read_text().splitlines()]
  assert [r['input'] for r in rows] == ['copy abc', 'copy dd'] and 'score' in rows[0]
