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
  data_lib.import_task_module(cfg.module)
  task = data_lib.get_task(cfg.mixture_or_task_name)
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  results = {}
  for sub in tasks:
    if cfg.split not in sub.splits:
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
