"""Evaluation during training and offline: teacher-forced loss on a validation split."""
from __future__ import annotations

import json
import logging
from typing import Optional

import jax

from t5tpu import data as data_lib
from t5tpu import distributed
from t5tpu import models
from t5tpu import storage
from t5tpu import summaries

log = logging.getLogger(__name__)


def run_train_eval(trainer, params, cfg: data_lib.DatasetConfig, eval_steps: Optional[int],
                   step: int, log_dir: str) -> dict:
  """Teacher-forced metrics over up to `eval_steps` batches of each task in cfg's mixture.

  Written to TensorBoard under training_eval/<task>/ and returned as {task: metrics}.
  """
  import seqio
  task = data_lib.task_of(cfg)
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  results = {}
  for sub in tasks:
    if cfg.split not in sub.splits:
      log.warning('task %s has no %r split (it has %s): not evaluated', sub.name, cfg.split,
                  sorted(sub.splits))
      continue
    sub_cfg = data_lib.DatasetConfig(**{**cfg.__dict__, 'mixture_or_task_name': sub.name,
                                        'num_epochs': 1, 'shuffle': False})
    from t5tpu import partitioning
    shard_id, num_shards = partitioning.data_shard(trainer.partitioner.mesh)
    ds = data_lib.get_dataset(sub_cfg, shard_id, num_shards, seed=cfg.seed,
                              drop_remainder=True)
    if eval_steps:
      ds = ds.take(eval_steps)
    totals = None
    shardings = None
    for batch in ds.as_numpy_iterator():
      shardings = shardings or trainer.batch_shardings(batch)
      sums = trainer.eval_step(params, data_lib.make_global_batch(batch, shardings))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
      log.warning('train-eval: %s/%s has no full batch of %d examples; skipped', sub.name,
                  cfg.split, cfg.batch_size)
      continue
    metrics = models.summarize_metrics(jax.device_get(totals))
    results[sub.name] = metrics
    writer = summaries.SummaryWriter(storage.join(log_dir, 'training_eval', sub.name))
    writer.scalars(step, metrics)
    writer.close()
    log.info('train-eval %s step %d: %s', sub.name, step,
             json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  return results


# --------------------------------------------------------------------------- inference eval

_NOT_NUMBERS = set()  # metric names already reported as not plotted


def _scalar_metrics(metrics) -> dict:
  """seqio metric values (Scalar/Text/...) or floats -> plain floats; the others (seqio.Text,
  Image, ...) are named once in the log, since only numbers are plotted and compared."""
  out = {}
  for name, value in metrics.items():
    value = getattr(value, 'value', value)
    try:
      if isinstance(value, (str, bytes)):
        raise TypeError
      out[name] = float(value)
    except (TypeError, ValueError):
      if name not in _NOT_NUMBERS:
        _NOT_NUMBERS.add(name)
        log.info('metric %r is not a number (%s): not in the scalar results',
                 name, type(value).__name__)
  return out


def _jsonable(x):
  import numpy as np
  if isinstance(x, bytes):
    return x.decode('utf-8', errors='replace')
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  return x


def _make_jsonl_logger_cls():
  import seqio

  class JsonlLogger(seqio.Logger):
    """`<task>-<step:06>.jsonl` (inputs, targets, predictions) and `<task>-metrics.jsonl`.

    seqio's JSONLogger writes through TensorFlow's filesystem; this one goes through
    t5tpu.storage, so gs:// output dirs use the same client as everything else.
    """

    def __call__(self, task_name, step, metrics, dataset, inferences, targets):
      if not distributed.is_primary():
        return
      step = -1 if step is None else step
      scalars = _scalar_metrics(metrics)
      metrics_path = storage.join(self.output_dir, f'{task_name}-metrics.jsonl')
      rows = storage.read_text(metrics_path).splitlines() if storage.exists(metrics_path) else []
      # One row per step: a re-evaluated step replaces its old row.
      rows = [r for r in rows if r.strip() and json.loads(r).get('step') != step]
      rows.append(json.dumps({'step': step, **scalars}))
      storage.write_text(metrics_path, '\n'.join(rows) + '\n')
      if not inferences or dataset is None:
        return
      predictions = inferences.get('prediction') or []
      scores = inferences.get('score')
      lines = []
      for i, example in enumerate(dataset.as_numpy_iterator()):
        if i >= len(predictions):
          break
        row = {'input': _jsonable(example.get('inputs_pretokenized', example.get('inputs'))),
               'target': _jsonable(targets[i]) if targets is not None else None,
               'prediction': _jsonable(predictions[i])}
        if scores is not None:
          row['score'] = _jsonable(scores[i])
        lines.append(json.dumps(row, ensure_ascii=False))
      storage.write_text(storage.join(self.output_dir, f'{task_name}-{step:06}.jsonl'),
                         '\n'.join(lines) + '\n')

  return JsonlLogger


def _make_tensorboard_logger_cls():
  import seqio

  class TensorBoardLogger(seqio.Logger):
    def __call__(self, task_name, step, metrics, dataset, inferences, targets):
      writer = summaries.SummaryWriter(storage.join(self.output_dir, task_name))
      writer.scalars(step or 0, _scalar_metrics(metrics))
      writer.close()

  return TensorBoardLogger


def global_batch_from_host(batch, shardings):
  """A batch every host holds in full -> a global array (each device takes its rows)."""
  import numpy as np
  return {k: jax.make_array_from_callback(np.shape(v), shardings[k],
                                          lambda idx, v=v: np.asarray(v)[idx])
          for k, v in batch.items()}


def iterate_padded_batches(ds, batch_size: int):
  """(indices, batch, n_real) from an enumerated dataset of model features, padded to a
  full batch so one compiled program serves every batch."""
  rows, indices = [], []
  for index, features in ds.as_numpy_iterator():
    rows.append(features)
    indices.append(int(index))
    if len(rows) == batch_size:
      yield indices, _stack(rows, batch_size), len(rows)
      rows, indices = [], []
  if rows:
    yield indices, _stack(rows, batch_size), len(rows)


def _stack(rows, batch_size):
  import numpy as np
  out = {}
  for key in rows[0]:
    arr = np.stack([r[key] for r in rows])
    if len(rows) < batch_size:
      pad = np.zeros((batch_size - len(rows),) + arr.shape[1:], arr.dtype)
      arr = np.concatenate([arr, pad])
    out[key] = arr
  return out


def jit_score(model, layout, batch_shardings):
  """model.score_batch(params, batch) compiled for params in `layout` and batches sharded as
  `batch_shardings`: one log-likelihood per example, replicated."""
  from jax.sharding import PartitionSpec
  return jax.jit(model.score_batch, in_shardings=(layout.shardings, batch_shardings),
                 out_shardings=layout.partitioner.sharding(PartitionSpec()))


class InferenceEvaluator:
  """Decodes an eval split, postprocesses, and computes the task's metrics (seqio.Evaluator).

  Logs to the console, TensorBoard (`<log_dir>/inference_eval/<task>/`) and JSONL
  (`<log_dir>/inference_eval/<task>-<step>.jsonl` with inputs, targets and predictions, and
  `<task>-metrics.jsonl`, one row per evaluated step).
  """

  def __init__(self, model, layout, dataset_cfg: data_lib.DatasetConfig, log_dir: str,
               num_examples: Optional[int] = None, decode_kwargs: Optional[dict] = None,
               use_memory_cache: bool = True):
    """`layout`: the layout.ParamLayout of the whole model's parameters."""
    import seqio
    data_lib.import_task_module(dataset_cfg.module)
    self.model, self.layout, self.cfg = model, layout, dataset_cfg
    self.batch_size = dataset_cfg.batch_size
    layout.partitioner.check_batch_size(self.batch_size)
    self.output_dir = storage.join(log_dir, 'inference_eval')
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name=dataset_cfg.mixture_or_task_name,
        feature_converter=data_lib.feature_converter(pack=False),
        eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached,
        seed=dataset_cfg.seed, sequence_length=dataset_cfg.task_feature_lengths,
        num_examples=num_examples, shuffle=False,
        logger_cls=[_make_jsonl_logger_cls(), _make_tensorboard_logger_cls()],
        log_dir=self.output_dir, use_memory_cache=use_memory_cache)
    self._predict = decoding_fn(model, layout, decode_kwargs or {})
    self._score = None

  def _predict_fn(self, params):
    def predict_fn(ds, *unused):
      results, shardings = [], None
      for indices, batch, n in iterate_padded_batches(ds, self.batch_size):
        shardings = shardings or self.layout.batch_shardings(batch)
        tokens, _ = self._predict(params, global_batch_from_host(batch, shardings),
                                  jax.random.PRNGKey(0))
        tokens = jax.device_get(tokens)
        results.extend(zip(indices, [t.tolist() for t in tokens[:n]]))
      return results
    return predict_fn

  def _score_fn(self, params):

    def score_fn(ds, *unused):
      results, shardings = [], None
      for indices, batch, n in iterate_padded_batches(ds, self.batch_size):
        shardings = shardings or self.layout.batch_shardings(batch)
        if self._score is None:
          self._score = jit_score(self.model, self.layout, shardings)
        with self.layout.partitioner.context():
          scores = self._score(params, global_batch_from_host(batch, shardings))
        results.extend(zip(indices, jax.device_get(scores)[:n].tolist()))
      return results
    return score_fn

  def evaluate(self, params, step: int) -> dict:
    """{task: {metric: value}}; every host decodes, process 0 writes the logs."""
    all_metrics, _ = self.evaluator.evaluate(
        compute_metrics=distributed.is_primary(), step=step,
        predict_fn=self._predict_fn(params), score_fn=self._score_fn(params))
    results = all_metrics.result() if distributed.is_primary() else {}
    results = {task: _scalar_metrics(m) for task, m in (results or {}).items()}
    for task, metrics in results.items():
      log.info('inference-eval %s step %d: %s', task, step,
               json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return results


def decoding_fn(model, layout, decode_kwargs: dict):
  from t5tpu import decoding
  return decoding.make_predict_fn(model, layout, replicate_outputs=True, **decode_kwargs)
