"""Inference evaluation during training writes predictions and one metrics row per step."""
import json

from t5tpu import checkpoints, data, evaluation, optimizers, partitioning, train
from tests import tiny


def test_inference_eval_during_training(tmp_path, copy_task):
  model_dir = tmp_path / 'run'
  infer_cfg = data.DatasetConfig(copy_task, None, split='validation', batch_size=8,
                                 shuffle=False, seed=42, pack=False, num_epochs=1)
  train.train(
      model=tiny.tiny_model(),
      train_dataset_cfg=data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=16),
      partitioner=partitioning.PjitPartitioner(num_partitions=2), model_dir=str(model_dir),
      total_steps=200, random_seed=0, log_period=50, eval_period=100,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.05),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=100)),
      infer_eval_dataset_cfg=infer_cfg, inference_evaluator_cls=evaluation.InferenceEvaluator,
      run_eval_before_training=True)
  out = model_dir / 'inference_eval'
  rows = [json.loads(l) for l in (out / f'{copy_task}-metrics.jsonl').read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 100, 200]
  assert rows[0]['exact_match'] < 10
  assert rows[-1]['exact_match'] > rows[0]['exact_match'] + 20, rows
  preds = [json.loads(l) for l in (out / f'{copy_task}-000200.jsonl').read_text().splitlines()]
  assert len(preds) == 32  # the whole validation split, the last batch padded
  assert preds[0]['input'].startswith('copy ') and 'prediction' in preds[0]
  hits = sum(p['prediction'] == p['target'] for p in preds)
  assert abs(100.0 * hits / 32 - rows[-1]['exact_match']) < 1e-6
  assert (out / copy_task).is_dir()  # TensorBoard events
