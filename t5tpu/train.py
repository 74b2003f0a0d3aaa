"""`python -m t5tpu.train --gin_file=... --gin.MODEL_DIR=\\"...\\"`: the training entry point.

TRAIN_STEPS is absolute, as in t5x: a run restores the latest checkpoint of MODEL_DIR (else
INITIAL_CHECKPOINT_PATH, else starts from scratch) and trains until the step counter reaches
TRAIN_STEPS. Rerunning the same command with a larger TRAIN_STEPS continues; the same value has
nothing to do; a smaller one is an error. SIGTERM (preemption) saves a checkpoint and exits.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from t5tpu import checkpoints as ckpt_lib
from t5tpu import data as data_lib
from t5tpu import distributed
from t5tpu import initial_checkpoint
from t5tpu import models
from t5tpu import partitioning
from t5tpu import storage
from t5tpu import summaries
from t5tpu import trainer as trainer_lib

log = logging.getLogger('t5tpu.train')


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM: saving a checkpoint after this step, then exiting')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _resolve_seed(random_seed: Optional[int], saved: Optional[int]) -> int:
  if saved is not None:
    return int(saved)
  if random_seed is not None:
    return int(random_seed)
  # Time-based, as t5x, but shared by all hosts and then stored in every checkpoint.
  seed = np.int64(time.time_ns() % (2**31 - 1))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    seed = multihost_utils.broadcast_one_to_all(seed)
  return int(seed)


def write_model_info(path: str, trainer: trainer_lib.Trainer) -> None:
  """model-info.txt: every parameter's shape, logical axes and mesh sharding, plus totals."""
  if not distributed.is_primary():
    return
  from flax import traverse_util
  layout = trainer.layout
  flat_abs = traverse_util.flatten_dict(layout.abstract.params, sep='/')
  flat_logical = traverse_util.flatten_dict(layout.logical_specs.params, sep='/')
  flat_shard = traverse_util.flatten_dict(layout.shardings.params, sep='/')
  lines = [f'mesh: {dict(trainer.partitioner.mesh.shape)}', '']
  total = 0
  for name in sorted(flat_abs):
    a = flat_abs[name]
    total += int(np.prod(a.shape))
    lines.append(f'{name:<70} {str(a.dtype):<8} {str(tuple(a.shape)):<16} '
                 f'axes={tuple(flat_logical[name])} '
                 f'{partitioning.describe_sharding(flat_shard[name], a.shape)}')
  lines += ['', f'total parameters: {total:,}']
  opt_leaves = jax.tree.leaves(layout.abstract.opt_state)
  lines.append(f'optimizer state values: {sum(int(np.prod(x.shape)) for x in opt_leaves):,}')
  storage.write_text(storage.join(path, 'model-info.txt'), '\n'.join(lines) + '\n')


def write_operative_config(model_dir: str) -> None:
  if not distributed.is_primary():
    return
  import gin
  storage.write_text(storage.join(model_dir, 'config.gin'), gin.operative_config_str())


def _loop_progress(total: int, start: int):
  if not distributed.is_primary():
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total - start, initial=0, desc='train', unit='step', dynamic_ncols=True,
              file=sys.stderr)


def train(*,
          model: models.EncoderDecoderModel,
          train_dataset_cfg: data_lib.DatasetConfig,
          partitioner: partitioning.PjitPartitioner,
          model_dir: str,
          total_steps: Optional[int] = None,
          relative_steps: Optional[int] = None,
          checkpoint_cfg: Optional[ckpt_lib.CheckpointConfig] = None,
          learning_rate_fn: Optional[Callable] = None,
          num_microbatches: Optional[int] = None,
          train_eval_dataset_cfg: Optional[data_lib.DatasetConfig] = None,
          infer_eval_dataset_cfg: Optional[data_lib.DatasetConfig] = None,
          eval_period: Optional[int] = 1000,
          eval_steps: int = 20,
          log_period: int = 10,
          random_seed: Optional[int] = None,
          run_eval_before_training: bool = False,
          inference_evaluator_cls: Optional[Callable] = None) -> Optional[Any]:
  """Trains `model` on `train_dataset_cfg` until the step counter reaches total_steps.

  Returns the final TrainState (process-local handles; useful in tests and notebooks).
  """
  if total_steps is None and relative_steps is None:
    raise ValueError('set TRAIN_STEPS (absolute) or TRAIN_STEPS_RELATIVE')
  checkpoint_cfg = checkpoint_cfg or ckpt_lib.CheckpointConfig()
  save_cfg = checkpoint_cfg.save or ckpt_lib.SaveCheckpointConfig()
  restore_cfg = checkpoint_cfg.restore or ckpt_lib.RestoreCheckpointConfig()
  if learning_rate_fn is None:
    from t5tpu import optimizers
    learning_rate_fn = optimizers.create_learning_rate_scheduler()

  batch_size = train_dataset_cfg.batch_size
  partitioner.check_batch_size(batch_size)
  lengths = dict(train_dataset_cfg.task_feature_lengths)
  input_shapes = {'encoder_input_tokens': (batch_size, lengths['inputs']),
                  'decoder_input_tokens': (batch_size, lengths['targets'])}
  trainer = trainer_lib.Trainer(model, partitioner, learning_rate_fn, num_microbatches,
                                input_shapes)
  storage.makedirs(model_dir)
  write_model_info(model_dir, trainer)
  checkpointer = ckpt_lib.Checkpointer(model_dir, model.optimizer_def, save_cfg)

  # ---- restore: MODEL_DIR, else INITIAL_CHECKPOINT_PATH, else scratch (t5x's order)
  dataset_state: dict = {}
  latest = ckpt_lib.latest_step(model_dir)
  template = trainer.layout.abstract
  if latest is not None:
    if restore_cfg.path:
      log.warning('MODEL_DIR %s already holds checkpoint_%d: resuming from it and ignoring '
                  'INITIAL_CHECKPOINT_PATH=%s (use a new MODEL_DIR to start over)',
                  model_dir, latest, restore_cfg.path)
    state, dataset_state = checkpointer.restore(latest, template, trainer.layout.shardings)
    log.info('resumed from %s', ckpt_lib.step_dir(model_dir, latest))
  elif restore_cfg.path:
    state = initial_checkpoint.load(restore_cfg.path, trainer, restore_cfg)
    log.info('initialised from %s', restore_cfg.path)
  else:
    seed = _resolve_seed(random_seed, None)
    state = trainer.init_state(jax.random.PRNGKey(seed))
    dataset_state = {'seed': seed, 'position': 0}
    log.info('initialised from scratch (seed %d)', seed)

  start_step = int(jax.device_get(state.step))
  if relative_steps is not None:
    total_steps = start_step + relative_steps
  if total_steps < start_step:
    raise ValueError(
        f'TRAIN_STEPS={total_steps} is below the step of the checkpoint being resumed '
        f'({start_step}). TRAIN_STEPS counts all steps, including those already done '
        f'(and pre-training steps of INITIAL_CHECKPOINT_PATH): set it above {start_step}, '
        'or use TRAIN_STEPS_RELATIVE.')

  seed = _resolve_seed(random_seed, dataset_state.get('seed'))
  position = int(dataset_state.get('position', 0)) if restore_cfg.restore_dataset else 0
  base_rng = jax.random.PRNGKey(seed)

  inference_evaluator = None
  if infer_eval_dataset_cfg is not None and inference_evaluator_cls is not None:
    inference_evaluator = inference_evaluator_cls(
        model=model, trainer=trainer, dataset_cfg=infer_eval_dataset_cfg,
        log_dir=model_dir)
  writer = summaries.SummaryWriter(storage.join(model_dir, 'train'))

  def run_evals(step):
    if train_eval_dataset_cfg is not None:
      from t5tpu import evaluation
      evaluation.run_train_eval(trainer, state.params, train_eval_dataset_cfg, eval_steps,
                                step, model_dir)
    if inference_evaluator is not None:
      inference_evaluator.evaluate(state.params, step)

  if total_steps == start_step:
    log.warning('nothing to do: the checkpoint is already at TRAIN_STEPS=%d. Raise '
                'TRAIN_STEPS to train further.', total_steps)
    if run_eval_before_training:
      run_evals(start_step)
    writer.close()
    checkpointer.close()
    return state

  if run_eval_before_training and latest is None:
    # (A resumed run skips this: its step was evaluated when the previous run ended.)
    run_evals(start_step)

  shard_id, num_shards = partitioning.data_shard(partitioner.mesh)
  # The shuffle seed: DatasetConfig.seed if set, else the run's seed (kept in checkpoints).
  data_seed = train_dataset_cfg.seed if train_dataset_cfg.seed is not None else seed
  make_ds = lambda s: data_lib.get_dataset(train_dataset_cfg, shard_id, num_shards, seed=s)
  iterator = data_lib.InputIterator(make_ds, data_seed, position)
  first = next(iterator)
  batch_shardings = trainer.batch_shardings(first)

  def batches():
    yield first
    yield from iterator

  prefetch = data_lib.DevicePrefetcher(batches(), batch_shardings)
  flops_per_example = trainer_lib.train_flops_per_example(
      model.config, lengths['inputs'], lengths['targets'])
  dev = jax.devices()[0]
  peak = trainer_lib.peak_flops_per_device(dev.device_kind, dev.platform)

  period = save_cfg.period
  pending = []
  bar = _loop_progress(total_steps, start_step)
  t_last, steps_since = time.perf_counter(), 0
  step = start_step
  config_written = False
  preempted = False
  with _Preemption() as preemption:
    while step < total_steps:
      batch = next(prefetch)
      state, metrics = trainer.train_step(state, batch, base_rng)
      step += 1
      steps_since += 1
      pending.append(metrics)
      if bar is not None:
        bar.update(1)
      if not config_written:
        write_operative_config(model_dir)
        config_written = True
      is_last = step == total_steps
      if step % log_period == 0 or is_last:
        sums = jax.device_get(pending)  # the loop's only host sync, once per log period
        elapsed = time.perf_counter() - t_last
        summary = models.summarize_metrics(sums[-1])
        seqs = batch_size * steps_since
        rates = {
            'learning_rate': float(learning_rate_fn(step - 1)),
            'seqs_per_second': seqs / elapsed,
            'tokens_per_second': seqs * (lengths['inputs'] + lengths['targets']) / elapsed,
            'nonpad_tokens_per_second': sum(
                float(m['input_tokens']) + float(m['target_tokens']) for m in sums) / elapsed,
        }
        if peak:
          rates['mfu'] = flops_per_example * seqs / elapsed / (peak * jax.device_count())
        writer.scalars(step, {**summary, **rates})
        if bar is not None:
          bar.set_postfix(loss=f"{summary['cross_ent_loss_per_token']:.3f}",
                          acc=f"{summary['accuracy']:.3f}",
                          tok_s=f"{rates['tokens_per_second']:.0f}",
                          **({'mfu': f"{rates['mfu']:.1%}"} if 'mfu' in rates else {}))
        pending, t_last, steps_since = [], time.perf_counter(), 0
      preempted = preemption.requested
      data_state = {'seed': seed, 'position': position + (step - start_step)}
      if (period and step % period == 0) or is_last or preempted:
        checkpointer.save(state, data_state)
      if eval_period and (step % eval_period == 0 or is_last):
        run_evals(step)
      if preempted:
        break
  if bar is not None:
    bar.close()
  writer.close()
  checkpointer.close()
  write_operative_config(model_dir)
  if preempted:
    log.warning('stopped by SIGTERM at step %d; rerun the same command to continue', step)
  else:
    log.info('done: step %d, checkpoints in %s', step, model_dir)
  return state


def main(argv: Sequence[str]) -> None:
  import gin
  from t5tpu import gin_utils
  gin_utils.setup(argv, 'Train or fine-tune a T5 model (t5x-compatible gin configs).')
  gin.get_configurable(train)()


if __name__ == '__main__':
  # Call main() of the imported t5tpu.train module: gin's dynamic registration configures the
  # functions of that module, not of this __main__ copy.
  from t5tpu import train as _train_module
  _train_module.main(sys.argv[1:])
