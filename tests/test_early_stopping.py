"""Epochs, early stopping on a validation metric, and the best checkpoint."""
import json

import pytest

from t5tpu import checkpoints, data, early_stopping, errors, eval as eval_lib, evaluation
from t5tpu import optimizers
from tests import tiny
from tests.test_train import run


def test_tracker_counts_evaluations_without_improvement():
  t = early_stopping.EarlyStopping(metric='em', patience=2)
  results = lambda em: {'task': {'em': em, 'f1': em + 1}}
  assert t.update(2, results(10.0))
  assert t.update(4, results(12.0))
  assert not t.update(6, results(12.0)) and not t.should_stop()
  assert not t.update(8, results(11.0)) and t.should_stop()
  assert (t.best_step, t.best_value, t.evals_since_best) == (4, 12.0, 2)
  again = early_stopping.EarlyStopping(metric='em', patience=2)
  again.restore(t.state())
  assert again.state() == t.state() and again.should_stop()
  losses = early_stopping.EarlyStopping(metric='task/loss')  # 'auto': lower is better
  assert losses.update(1, {'task': {'loss': 3.0}}) and losses.update(2, {'task': {'loss': 2.0}})
  with pytest.raises(errors.UserError, match="'bleu' is not among the validation metrics: "
                                             'task/em, task/f1'):
    early_stopping.EarlyStopping(metric='bleu').update(1, results(1.0))


def stopping_run(model_dir, total_steps, patience, keep=None, **kw):
  """Evaluations every 2 steps with a zero learning rate: exact match never improves after
  the first evaluation, so the run stops `patience` evaluations later."""
  valid = data.DatasetConfig(tiny.COPY_TASK, None, split='validation', batch_size=8,
                             shuffle=False, pack=False, num_epochs=1)
  return run(model_dir, total_steps, eval_period=2, infer_eval_dataset_cfg=valid,
             inference_evaluator_cls=evaluation.InferenceEvaluator,
             learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.0),
             early_stopping=early_stopping.EarlyStopping(metric='exact_match',
                                                         patience=patience),
             checkpoint_cfg=checkpoints.CheckpointConfig(
                 save=checkpoints.SaveCheckpointConfig(period=100, keep=keep)), **kw)


def test_stops_early_keeps_the_best_and_resumes_the_count(tmp_path, copy_task, caplog):
  straight = tmp_path / 'straight'
  with caplog.at_level('WARNING'):
    state = stopping_run(straight, 100, patience=3, keep=1)
  assert int(state.step) == 8  # evaluations at 2 (best), 4, 6, 8: three without improvement
  assert 'early stopping at step 8' in caplog.text
  pointer = json.loads((straight / 'best_checkpoint.json').read_text())
  assert pointer['step'] == 2 and pointer['checkpoint'] == 'checkpoint_2'
  assert checkpoints.all_steps(str(straight)) == [2, 8]  # keep=1, and the best
  assert early_stopping.resolve(f'{straight}/best') == checkpoints.step_dir(str(straight), 2)
  assert eval_lib.checkpoints_to_evaluate(str(straight), 'best') == [
      (2, checkpoints.step_dir(str(straight), 2))]

  # Interrupted at step 4 (TRAIN_STEPS=4), then resumed: stops at the same step.
  resumed = tmp_path / 'resumed'
  stopping_run(resumed, 4, patience=3)
  state = stopping_run(resumed, 100, patience=3)
  assert int(state.step) == 8
  assert json.loads((resumed / 'best_checkpoint.json').read_text())['step'] == 2


def test_best_needs_a_pointer(tmp_path):
  with pytest.raises(errors.UserError, match='has no best_checkpoint.json'):
    early_stopping.resolve(f'{tmp_path}/best')


def test_train_epochs_counts_the_split_once(tmp_path, copy_task, caplog):
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=64, pack=False)
  with caplog.at_level('INFO'):
    state = run(tmp_path / 'm', None, train_epochs=2, train_dataset_cfg=cfg)
  assert int(state.step) == 2 * (512 // 64)
  assert 'TRAIN_EPOCHS=2: 8 steps per epoch from step 0 -> TRAIN_STEPS=16' in caplog.text
  cached = json.loads((tmp_path / 'm' / data.EPOCH_CACHE).read_text())
  assert list(cached.values()) == [8]
  caplog.clear()
  with caplog.at_level('INFO'):
    state = run(tmp_path / 'm', None, train_epochs=3, train_dataset_cfg=cfg)  # raised
  assert int(state.step) == 24 and 'counting' not in caplog.text
  with pytest.raises(errors.UserError, match='TRAIN_EPOCHS counts the steps itself'):
    run(tmp_path / 'm', 30, train_epochs=3, train_dataset_cfg=cfg)
