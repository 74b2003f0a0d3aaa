"""`t5tpu eval` / `python -m t5tpu.eval`: evaluate one, the latest, or every checkpoint.

With t5x's eval.gin macros: CHECKPOINT_PATH (a checkpoint, or a MODEL_DIR for mode 'latest' or
'all'), EVAL_OUTPUT_DIR, MIXTURE_OR_TASK_NAME, the split. Each checkpoint appends one row per
task to EVAL_OUTPUT_DIR/inference_eval/<task>-metrics.jsonl (next to the predictions
<task>-<step>.jsonl), so picking the best step is a glance at one file. Rerunning in mode 'all'
skips steps already evaluated.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional, Sequence


from t5tpu import checkpoints as ckpt_lib
from t5tpu import data as data_lib
from t5tpu import distributed
from t5tpu import early_stopping
from t5tpu import errors
from t5tpu import evaluation
from t5tpu import initial_checkpoint
from t5tpu import models
from t5tpu import partitioning
from t5tpu import storage
from t5tpu.delta import base as delta_base

log = logging.getLogger('t5tpu.eval')


def checkpoints_to_evaluate(path: str, mode: str) -> list[tuple[int, str]]:
  """[(step, checkpoint path)] for a restore mode: 'specific' (a checkpoint, or
  `<MODEL_DIR>/best`), or, for a MODEL_DIR, 'latest', 'all' or 'best' (early stopping's)."""
  path = storage.resolve(path)
  if mode == 'best':
    path, mode = storage.join(path, 'best'), 'specific'
  if mode == 'specific':
    path = early_stopping.resolve(path)
    step = initial_checkpoint.checkpoint_step(path)
    if step is None:
      log.warning('%s names no step (checkpoint_<N>): its results are recorded as step 0',
                  path)
    return [(step or 0, path)]
  if mode not in ('latest', 'all'):
    raise errors.UserError(f"RestoreCheckpointConfig.mode={mode!r}: use 'specific', 'latest', "
                           "'all' or 'best'")
  steps = ckpt_lib.all_steps(path)
  if not steps:
    raise errors.UserError(f'no complete checkpoint_<step> in {path} (mode {mode!r} expects '
                           'CHECKPOINT_PATH to be a MODEL_DIR)')
  if mode == 'latest':
    steps = steps[-1:]
  return [(s, ckpt_lib.step_dir(path, s)) for s in steps]


def _done_steps(output_dir: str, task_names) -> set:
  done = None
  for task in task_names:
    path = storage.join(output_dir, 'inference_eval', f'{task}-metrics.jsonl')
    steps = set()
    if storage.exists(path):
      steps = {json.loads(l)['step'] for l in storage.read_text(path).splitlines() if l}
    done = steps if done is None else done & steps
  return done or set()


def evaluate(*,
             model: models.EncoderDecoderModel,
             dataset_cfg: data_lib.DatasetConfig,
             restore_checkpoint_cfg: ckpt_lib.RestoreCheckpointConfig,
             partitioner: partitioning.PjitPartitioner,
             output_dir: str,
             num_examples: Optional[int] = None,
             decode_kwargs: Optional[dict] = None,
             skip_evaluated: bool = True) -> dict:
  """Returns {step: {task: {metric: value}}} for every checkpoint evaluated."""
  import seqio
  task = data_lib.task_of(dataset_cfg)
  task_names = [t.name for t in task.tasks] if isinstance(task, seqio.Mixture) else [task.name]
  partitioner.check_batch_size(dataset_cfg.batch_size)
  todo = checkpoints_to_evaluate(restore_checkpoint_cfg.path, restore_checkpoint_cfg.mode)
  done = _done_steps(output_dir, task_names) if skip_evaluated else set()
  results, evaluator = {}, None
  for step, path in todo:
    if step in done and restore_checkpoint_cfg.mode == 'all':
      log.info('checkpoint_%d already evaluated; skipping', step)
      continue
    # A delta checkpoint: the recorded base plus the delta (checked to belong together).
    eval_model, layout, params = delta_base.load_for_inference(
        path, model, partitioner, restore_checkpoint_cfg)
    if evaluator is None:
      evaluator = evaluation.InferenceEvaluator(eval_model, layout, dataset_cfg, output_dir,
                                                num_examples=num_examples,
                                                decode_kwargs=decode_kwargs)
    results[step] = evaluator.evaluate(params, step)
    del params
  if distributed.is_primary() and results:
    print(format_table(results), file=sys.stderr)
  return results


def format_table(results: dict) -> str:
  """One line per (step, task) with its metrics, and the best step per metric."""
  lines, best = [], {}
  for step in sorted(results):
    for task, metrics in sorted(results[step].items()):
      lines.append(f'step {step:>9}  {task:<32} ' +
                   '  '.join(f'{k}={v:.2f}' for k, v in sorted(metrics.items())))
      for k, v in metrics.items():
        if (task, k) not in best or v > best[(task, k)][1]:
          best[(task, k)] = (step, v)
  if len(results) > 1:
    lines.append('best: ' + ', '.join(f'{t} {k} {v:.2f} @ step {s}'
                                      for (t, k), (s, v) in sorted(best.items())))
  return '\n'.join(lines)


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  from t5tpu import gin_utils
  gin_utils.run_configured(evaluate, argv,
                           'Evaluate checkpoints on a task split (t5x eval.gin macros).')


if __name__ == '__main__':
  from t5tpu import eval as _eval_module
  _eval_module.main(sys.argv[1:])
