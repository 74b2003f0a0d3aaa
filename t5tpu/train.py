"""`python -m t5tpu.train --gin_file=... --gin.MODEL_DIR=\\"...\\"`: the training entry point.

TRAIN_STEPS is absolute, as in t5x: a run restores the latest checkpoint of MODEL_DIR (else
INITIAL_CHECKPOINT_PATH, else starts from scratch) and trains until the step counter reaches
TRAIN_STEPS. Rerunning the same command with a larger TRAIN_STEPS continues; the same value has
nothing to do; a smaller one is an error. SIGTERM (preemption) saves a checkpoint and exits.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from t5tpu import checkpoints as ckpt_lib
from t5tpu import data as data_lib
from t5tpu import delta as delta_lib
from t5tpu import distributed
from t5tpu import early_stopping as early_stopping_lib
from t5tpu import errors
from t5tpu import initial_checkpoint
from t5tpu import layout as layout_lib
from t5tpu import model_dir_lock
from t5tpu import model_shapes
from t5tpu import models
from t5tpu import partitioning
from t5tpu import profiling
from t5tpu import storage
from t5tpu import summaries
from t5tpu import trainer as trainer_lib
from t5tpu.delta import base as delta_base

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
  """model-info.txt: every parameter's shape, logical axes and mesh sharding, plus totals
  (and, for a delta run, which parameters train and their fraction)."""
  if not distributed.is_primary():
    return
  from flax import traverse_util
  layout = trainer.params_layout
  flat_abs = traverse_util.flatten_dict(layout.abstract, sep='/')
  flat_logical = traverse_util.flatten_dict(layout.logical, sep='/')
  flat_shard = traverse_util.flatten_dict(layout.shardings, sep='/')
  trainable = set(traverse_util.flatten_dict(trainer.trainable_layout.abstract, sep='/'))
  lines = [f'mesh: {dict(trainer.partitioner.mesh.shape)}', '']
  if trainer.delta is not None:
    lines[1:1] = [f'delta: {trainer.delta.describe()} (frozen base in '
                  f'{trainer.delta.base_dtype}; * = trainable)']
  total = 0
  for name in sorted(flat_abs):
    a = flat_abs[name]
    total += int(np.prod(a.shape))
    mark = '* ' if trainer.delta is not None and name in trainable else ''
    lines.append(f'{mark}{name:<70} {str(a.dtype):<8} {str(tuple(a.shape)):<16} '
                 f'axes={tuple(flat_logical[name])} '
                 f'{partitioning.describe_sharding(flat_shard[name], a.shape)}')
  lines += ['', f'total parameters: {total:,}']
  n_train = trainer.trainable_layout.num_values()
  lines.append(f'trainable parameters: {n_train:,} ({100.0 * n_train / max(total, 1):.4g}%)')
  lines.append(f'frozen parameters: {total - n_train:,}')
  opt_leaves = jax.tree.leaves(trainer.layout.abstract.opt_state)
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


class NonFiniteError(errors.UserError):
  """The loss or an update became NaN/Inf: training stops before writing it anywhere."""


# ----------------------------------------------------------------------------- restore

@dataclasses.dataclass
class Start:
  """Where a run starts: its state, seed and input position (with the input snapshot)."""
  state: Any
  seed: int
  position: int
  snapshot: Optional[dict]
  source: str  # what it was restored from, for the log
  resumed: bool  # from MODEL_DIR's own checkpoint
  loop_state: dict  # the loop's own state saved with the input position (early stopping, ...)
  delta_base: Optional[Any] = None  # delta.base.BaseRecord of a delta run's frozen base


def _check_fits(trainer: trainer_lib.Trainer, path: str, shapes: dict) -> None:
  """The same one-message mismatch error as INITIAL_CHECKPOINT_PATH gets, from metadata."""
  from flax import traverse_util
  model = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      trainer.layout.abstract.params, sep='/').items()}  # the trainable part: a delta's
  # Shape-only stand-ins (no memory): the check reads shapes, the values are never needed.
  ckpt = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
  model_shapes.check_compatible(model, ckpt, path=path)


def restore_or_init(trainer: trainer_lib.Trainer, checkpointer: ckpt_lib.Checkpointer,
                    restore_cfg: ckpt_lib.RestoreCheckpointConfig,
                    random_seed: Optional[int]) -> Start:
  """t5x's order: the newest whole checkpoint of MODEL_DIR, else INITIAL_CHECKPOINT_PATH,
  else a fresh initialisation."""
  found = checkpointer.restore_latest_whole(
      trainer.layout.abstract, trainer.layout.shardings,
      check_fits=lambda path, shapes: _check_fits(trainer, path, shapes))
  dataset_state: dict = {}
  if found is not None:
    step, state, dataset_state = found
    source = ckpt_lib.step_dir(checkpointer.model_dir, step)
    if restore_cfg.path:
      log.warning('MODEL_DIR %s already holds checkpoint_%d: resuming from it and ignoring '
                  'INITIAL_CHECKPOINT_PATH=%s (use a new MODEL_DIR to start over)',
                  checkpointer.model_dir, step, restore_cfg.path)
  elif restore_cfg.path and trainer.delta is None:
    state = initial_checkpoint.load(restore_cfg.path, trainer, restore_cfg)
    source = restore_cfg.path
  elif restore_cfg.path:  # a delta run starts at step 0 on the base
    seed = _resolve_seed(random_seed, None)
    base = delta_base.load_base(restore_cfg.path, trainer.params_layout, trainer.delta,
                                restore_cfg)
    trainable, frozen = delta_base.start_from_base(trainer, base, jax.random.PRNGKey(seed))
    del base
    state = trainer.state_from_params(trainable)
    trainer.set_frozen(frozen)
    dataset_state = {'seed': seed, 'position': 0}
    source = f'{restore_cfg.path} (frozen base) + a fresh {trainer.delta.describe()}'
  else:
    seed = _resolve_seed(random_seed, None)
    state = trainer.init_state(jax.random.PRNGKey(seed))
    dataset_state = {'seed': seed, 'position': 0}
    source = f'scratch (seed {seed})'
  seed = _resolve_seed(random_seed, dataset_state.get('seed'))
  record = _delta_base_record(trainer, restore_cfg, seed, found is not None, dataset_state)
  keep_position = restore_cfg.restore_dataset
  return Start(state=state, seed=seed,
               position=int(dataset_state.get('position', 0)) if keep_position else 0,
               snapshot=dataset_state.get('iterator') if keep_position else None,
               source=source, resumed=found is not None, loop_state=dataset_state,
               delta_base=record)


def _delta_base_record(trainer, restore_cfg, seed: int, resumed: bool, dataset_state: dict):
  """A delta run's frozen base on the trainer (loaded again when resuming, or a random one
  from the run's seed without INITIAL_CHECKPOINT_PATH) and its record, checked against the
  one the resumed checkpoint holds."""
  if trainer.delta is None:
    return None
  path = restore_cfg.path or f'scratch (seed {seed})'
  if resumed or not trainer.frozen:
    if restore_cfg.path:
      base = delta_base.load_base(restore_cfg.path, trainer.params_layout, trainer.delta,
                                  restore_cfg)
      trainer.set_frozen(delta_lib.split(trainer.delta, base)[1])
      del base
    else:
      log.warning('delta tuning on a randomly initialised base (no INITIAL_CHECKPOINT_PATH)')
      trainer.set_frozen(trainer.init_frozen(jax.random.PRNGKey(seed)))
  record = delta_base.record_for(trainer.delta, path, trainer.frozen)
  saved = dataset_state.get('delta_base')
  if resumed and saved:
    delta_base.check_same_base(delta_base.BaseRecord.from_dict(saved), path,
                               record.fingerprint, 'MODEL_DIR')
  return record


# ----------------------------------------------------------------------------- input

class InputPipeline:
  """This host's training batches on the devices, and the input state checkpoints keep."""

  def __init__(self, cfg: data_lib.DatasetConfig, trainer: trainer_lib.Trainer, start: Start,
               snapshot_every: Optional[int]):
    self.seed = start.seed
    shard_id, num_shards = partitioning.data_shard(trainer.partitioner.mesh)
    # The shuffle seed: DatasetConfig.seed if set, else the run's seed (kept in checkpoints).
    data_seed = cfg.seed if cfg.seed is not None else start.seed
    make_ds = lambda s: data_lib.get_dataset(cfg, shard_id, num_shards, seed=s)
    iterator = data_lib.InputIterator(make_ds, data_seed, start.position, start.snapshot,
                                      data_lib.fingerprint(cfg, shard_id, num_shards))
    # orbax writes the dataset item from process 0 only: other hosts' snapshots would be lost,
    # so multi-host runs resume by replaying their shard instead.
    every = snapshot_every if jax.process_count() == 1 else None
    self._prefetch = data_lib.DevicePrefetcher(
        iterator, trainer.batch_shardings(iterator.element_spec), snapshot_every=every)

  def __next__(self):
    return next(self._prefetch)

  def state(self, position: int) -> dict:
    """What a checkpoint at this trained position stores."""
    out = {'seed': self.seed, 'position': position}
    snapshot = self._prefetch.snapshot_at(position)
    if snapshot is not None:
      out['iterator'] = snapshot
    return out

  def close(self) -> None:
    self._prefetch.close()


# ----------------------------------------------------------------------------- logging

class StepLog:
  """Per-step metrics kept on the device, fetched once per log period (the loop's only host
  sync) and written as scalars; also where non-finite steps are noticed."""

  def __init__(self, writer, learning_rate_fn, batch_size: int, lengths: dict, model_cfg,
               first_step: int, total_steps: int, skip_nonfinite: bool):
    self.writer = writer
    self.learning_rate_fn = learning_rate_fn
    self.batch_size = batch_size
    self.tokens_per_example = lengths['inputs'] + lengths['targets']
    self.flops_per_example = trainer_lib.train_flops_per_example(
        model_cfg, lengths['inputs'], lengths['targets'])
    dev = jax.devices()[0]
    self.peak = trainer_lib.peak_flops_per_device(dev.device_kind, dev.platform)
    self.skip_nonfinite = skip_nonfinite
    self.bar = _loop_progress(total_steps, first_step)
    self.pending: list = []
    self.pending_first_step = first_step + 1
    self.checked = 0  # pending entries already known to be finite
    self.skipped = 0
    self.t_last = time.perf_counter()

  def add(self, metrics) -> None:
    self.pending.append(metrics)
    if self.bar is not None:
      self.bar.update(1)

  def check_finite(self, last_good: Callable[[], Optional[int]]) -> None:
    """Raises NonFiniteError naming the first non-finite step since the last check."""
    if self.skip_nonfinite:
      return
    flags = jax.device_get([m['nonfinite_steps'] for m in self.pending[self.checked:]])
    for i, flag in enumerate(flags):
      if int(flag):
        step = self.pending_first_step + self.checked + i
        good = last_good()
        where = f'checkpoint_{good}' if good is not None else 'none yet'
        raise NonFiniteError(
            f'training stopped at step {step}: the loss or the parameter update became '
            f'non-finite (NaN/Inf). Nothing from step {step} on was saved; the last good '
            f'checkpoint in MODEL_DIR is {where}. Lower LEARNING_RATE (or add warm-up), check '
            'the data, or set ON_NONFINITE = "skip" to skip such steps instead.')
    self.checked = len(self.pending)

  def flush(self, step: int, last_good: Callable[[], Optional[int]]) -> None:
    if not self.pending:
      return
    self.check_finite(last_good)
    sums = jax.device_get(self.pending)
    elapsed = time.perf_counter() - self.t_last
    summary = models.summarize_metrics(sums[-1])
    seqs = self.batch_size * len(sums)
    skipped = sum(int(m['nonfinite_steps']) for m in sums)
    rates = {
        'learning_rate': float(self.learning_rate_fn(step - 1)),
        'seqs_per_second': seqs / elapsed,
        'tokens_per_second': seqs * self.tokens_per_example / elapsed,
        'nonpad_tokens_per_second': sum(
            float(m['input_tokens']) + float(m['target_tokens']) for m in sums) / elapsed,
    }
    if self.peak:
      rates['mfu'] = self.flops_per_example * seqs / elapsed / (self.peak * jax.device_count())
    if skipped:
      self.skipped += skipped
      rates['nonfinite_steps_skipped'] = float(self.skipped)
      log.warning('skipped %d step(s) with a non-finite loss or update (%d in all; '
                  'ON_NONFINITE = "skip")', skipped, self.skipped)
    self.writer.scalars(step, {**summary, **rates})
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{summary['cross_ent_loss_per_token']:.3f}",
                           acc=f"{summary['accuracy']:.3f}",
                           tok_s=f"{rates['tokens_per_second']:.0f}",
                           real_tok_s=f"{rates['nonpad_tokens_per_second']:.0f}",
                           **({'mfu': f"{rates['mfu']:.1%}"} if 'mfu' in rates else {}))
    self.pending, self.checked = [], 0
    self.pending_first_step = step + 1
    self.t_last = time.perf_counter()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.writer.close()


# ----------------------------------------------------------------------------- train

@dataclasses.dataclass
class Run:
  """One training run's configuration, as train() received it (paths resolved)."""
  model: models.EncoderDecoderModel
  train_dataset_cfg: data_lib.DatasetConfig
  partitioner: partitioning.PjitPartitioner
  model_dir: str
  total_steps: Optional[int]
  relative_steps: Optional[int]
  train_epochs: Optional[float]
  save_cfg: ckpt_lib.SaveCheckpointConfig
  restore_cfg: ckpt_lib.RestoreCheckpointConfig
  learning_rate_fn: Callable
  num_microbatches: Optional[int]
  train_eval_dataset_cfg: Optional[data_lib.DatasetConfig]
  infer_eval_dataset_cfg: Optional[data_lib.DatasetConfig]
  eval_period: Optional[int]
  eval_steps: int
  log_period: int
  random_seed: Optional[int]
  run_eval_before_training: bool
  inference_evaluator_cls: Optional[Callable]
  skip_nonfinite: bool
  early_stopping: early_stopping_lib.EarlyStopping
  param_dtype: Optional[str] = None
  profile_steps: int = 0

  @property
  def lengths(self) -> dict:
    return dict(self.train_dataset_cfg.task_feature_lengths)


def train(*,
          model: models.EncoderDecoderModel,
          train_dataset_cfg: data_lib.DatasetConfig,
          partitioner: partitioning.PjitPartitioner,
          model_dir: str,
          total_steps: Optional[int] = None,
          relative_steps: Optional[int] = None,
          train_epochs: Optional[float] = None,
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
          inference_evaluator_cls: Optional[Callable] = None,
          on_nonfinite: str = 'stop',
          early_stopping: Optional[early_stopping_lib.EarlyStopping] = None,
          param_dtype: Optional[str] = None,
          profile_steps: int = 0) -> Optional[Any]:
  """Trains `model` on `train_dataset_cfg` until the step counter reaches total_steps.

  Everything the user can get wrong is checked before MODEL_DIR changes. `train_epochs`
  (TRAIN_EPOCHS) instead of total_steps: that many passes over the training split after the
  step training started from. `on_nonfinite`: 'stop' (default) ends the run with an error at
  the first NaN/Inf loss or update, before it reaches a checkpoint; 'skip' leaves the
  parameters and optimizer state of such a step unchanged and goes on. `early_stopping`: stop
  when a validation metric stops improving, and keep the best checkpoint. `param_dtype`
  (PARAM_DTYPE): the trained parameters' dtype in memory, 'float32' (default) or 'bfloat16'
  (half the parameter and gradient memory; see trainer.Trainer). `profile_steps`
  (PROFILE_STEPS): trace that many steps, after two that compile and warm up, for
  TensorBoard's profile tab, and log where their time went (t5tpu/profiling.py). Returns
  the final TrainState (process-local handles; useful in tests and notebooks).
  """
  if total_steps is None and relative_steps is None and train_epochs is None:
    raise errors.UserError('set TRAIN_STEPS (absolute), TRAIN_STEPS_RELATIVE or TRAIN_EPOCHS')
  if train_epochs is not None and (total_steps is not None or relative_steps is not None):
    raise errors.UserError('TRAIN_EPOCHS counts the steps itself: set TRAIN_STEPS = None and '
                           'TRAIN_STEPS_RELATIVE = None with it')
  if on_nonfinite not in ('stop', 'skip'):
    raise errors.UserError(f'ON_NONFINITE={on_nonfinite!r}: use "stop" or "skip"')
  checkpoint_cfg = checkpoint_cfg or ckpt_lib.CheckpointConfig()
  restore_cfg = checkpoint_cfg.restore or ckpt_lib.RestoreCheckpointConfig()
  if learning_rate_fn is None:
    from t5tpu import optimizers
    learning_rate_fn = optimizers.create_learning_rate_scheduler()
  run = Run(
      model=model, train_dataset_cfg=train_dataset_cfg, partitioner=partitioner,
      model_dir=storage.resolve(model_dir), total_steps=total_steps,
      relative_steps=relative_steps, train_epochs=train_epochs,
      save_cfg=checkpoint_cfg.save or ckpt_lib.SaveCheckpointConfig(),
      restore_cfg=dataclasses.replace(restore_cfg, path=storage.resolve(restore_cfg.path)),
      learning_rate_fn=learning_rate_fn, num_microbatches=num_microbatches,
      train_eval_dataset_cfg=train_eval_dataset_cfg,
      infer_eval_dataset_cfg=infer_eval_dataset_cfg, eval_period=eval_period,
      eval_steps=eval_steps, log_period=log_period, random_seed=random_seed,
      run_eval_before_training=run_eval_before_training,
      inference_evaluator_cls=inference_evaluator_cls, skip_nonfinite=on_nonfinite == 'skip',
      early_stopping=copy.deepcopy(early_stopping or early_stopping_lib.EarlyStopping()),
      param_dtype=_check_param_dtype(param_dtype),
      profile_steps=_check_profile_steps(profile_steps))
  # Seconds, not minutes of retries: MODEL_DIR is written, INITIAL_CHECKPOINT_PATH only read.
  storage.check_reachable(run.model_dir, read_only=[run.restore_cfg.path])
  partitioner.check_batch_size(train_dataset_cfg.batch_size, run.num_microbatches)
  data_lib.check_task(train_dataset_cfg, model)
  delta_lib.check_data(delta_lib.config_of(model), [train_dataset_cfg, train_eval_dataset_cfg])
  if run.early_stopping.enabled and not (infer_eval_dataset_cfg and eval_period):
    raise errors.UserError(
        f'EARLY_STOPPING_METRIC={run.early_stopping.metric!r} needs the inference evaluation '
        '(infer_eval DatasetConfig, as runs/finetune.gin sets) and an EVAL_PERIOD')
  # Storage failures outside checkpoints too (events, config.gin): a UserError with the cause.
  with model_dir_lock.ModelDirLock(run.model_dir), storage.failures_as_user_errors(
      f'training with MODEL_DIR={run.model_dir}'):
    return _train_locked(run)


def _check_param_dtype(dtype: Optional[str]) -> Optional[str]:
  if dtype not in (None, 'float32', 'bfloat16'):
    raise errors.UserError(f'PARAM_DTYPE={dtype!r}: use "float32" or "bfloat16"')
  return dtype


def _check_profile_steps(steps) -> int:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise errors.UserError(f'PROFILE_STEPS={steps!r}: use a number of steps to trace, or 0 for '
                           'none')
  return steps


def _profiler(run: Run, start_step: int, total_steps: int):
  """The profiler of PROFILE_STEPS: its window starts after two steps of this run (they
  compile and warm up) when the run is long enough, else at its first step."""
  remaining = total_steps - start_step
  if not run.profile_steps or remaining <= 0:
    return None
  num = min(run.profile_steps, remaining)
  skip = min(2, remaining - num)
  return profiling.StepProfiler(storage.join(run.model_dir, 'train'), start_step + skip + 1, num)


def _train_locked(run: Run):
  input_shapes = layout_lib.input_shapes(run.train_dataset_cfg.batch_size, run.lengths)
  trainer = trainer_lib.Trainer(run.model, run.partitioner, run.learning_rate_fn,
                                run.num_microbatches, input_shapes,
                                skip_nonfinite_steps=run.skip_nonfinite,
                                param_dtype=run.param_dtype)
  protect = (lambda: run.early_stopping.best_step) if run.early_stopping.enabled else None
  checkpointer = ckpt_lib.Checkpointer(run.model_dir, run.save_cfg, protected_step=protect)
  try:
    start = restore_or_init(trainer, checkpointer, run.restore_cfg, run.random_seed)
    run.early_stopping.restore(start.loop_state.get('early_stopping'))
    start_step = int(jax.device_get(start.state.step))
    total_steps = _total_steps(run, start, start_step, trainer)
    log.info('%s %s (step %d)', 'resumed from' if start.resumed else 'initialised from',
             start.source, start_step)
    # The input pipeline reads (and checks) the data before anything is written.
    pipeline = InputPipeline(run.train_dataset_cfg, trainer, start,
                             snapshot_every=run.save_cfg.period)
  except BaseException:
    checkpointer.close()
    raise
  try:
    write_model_info(run.model_dir, trainer)  # only now: a run refused above changes nothing
    if start.delta_base is not None and distributed.is_primary():
      delta_base.write_record(run.model_dir, start.delta_base)
    return _loop(run, trainer, checkpointer, start, pipeline, start_step, total_steps)
  finally:
    pipeline.close()
    checkpointer.close()


def _total_steps(run: Run, start: Start, start_step: int, trainer) -> int:
  """TRAIN_STEPS, from TRAIN_STEPS_RELATIVE or TRAIN_EPOCHS where those are given."""
  total = run.total_steps
  if run.relative_steps is not None:
    total = start_step + run.relative_steps
  elif run.train_epochs is not None:
    first = int(start.loop_state.get('first_step', start_step))
    per_epoch = data_lib.steps_per_epoch(run.train_dataset_cfg, run.model_dir,
                                         *partitioning.data_shard(trainer.partitioner.mesh))
    total = first + int(round(run.train_epochs * per_epoch))
    log.info('TRAIN_EPOCHS=%s: %d steps per epoch from step %d -> TRAIN_STEPS=%d',
             run.train_epochs, per_epoch, first, total)
  if total < start_step:
    raise errors.UserError(
        f'TRAIN_STEPS={total} is below the step of the checkpoint being resumed '
        f'({start_step}). TRAIN_STEPS counts all steps, including those already done '
        f'(and pre-training steps of INITIAL_CHECKPOINT_PATH): set it above {start_step}, '
        'or use TRAIN_STEPS_RELATIVE.')
  return total


class _Actions:
  """The loop's periodic actions: evaluations (with early stopping's bookkeeping) and saves."""

  def __init__(self, run: Run, trainer, checkpointer, start: Start, pipeline: InputPipeline,
               start_step: int):
    self.run, self.trainer, self.checkpointer = run, trainer, checkpointer
    self.start, self.pipeline, self.start_step = start, pipeline, start_step
    self.tracker = run.early_stopping
    self.first_step = int(start.loop_state.get('first_step', start_step))
    self.inference_evaluator = None
    if run.infer_eval_dataset_cfg is not None and run.inference_evaluator_cls is not None:
      self.inference_evaluator = run.inference_evaluator_cls(
          model=run.model, layout=trainer.params_layout,
          dataset_cfg=run.infer_eval_dataset_cfg, log_dir=run.model_dir)

  def evaluate(self, step: int, state) -> bool:
    """Evaluates; True when this step is early stopping's new best."""
    run = self.run
    if run.train_eval_dataset_cfg is not None:
      from t5tpu import evaluation
      evaluation.run_train_eval(self.trainer, state.params, run.train_eval_dataset_cfg,
                                run.eval_steps, step, run.model_dir)
    if self.inference_evaluator is None:
      return False
    results = self.inference_evaluator.evaluate(self.trainer.full_params(state.params), step)
    tracker = self.tracker
    return tracker.enabled and _share(tracker.update(step, results) if
                                      distributed.is_primary() else False, tracker)

  def save(self, step: int, state, best: bool) -> None:
    """A checkpoint with the input position and the loop's own state; the best pointer."""
    loop_state = {'first_step': self.first_step, 'early_stopping': self.tracker.state()}
    if self.start.delta_base is not None:
      loop_state['delta_base'] = self.start.delta_base.to_dict()
    position = self.start.position + (step - self.start_step)
    self.checkpointer.save(state, {**self.pipeline.state(position), **loop_state})
    if best:
      _write_best(self.run, self.checkpointer, self.tracker)


def _loop(run: Run, trainer, checkpointer, start: Start, pipeline: InputPipeline,
          start_step: int, total_steps: int):
  state, actions = start.state, _Actions(run, trainer, checkpointer, start, pipeline, start_step)
  if total_steps == start_step:
    log.warning('nothing to do: the checkpoint is already at TRAIN_STEPS=%d. Raise '
                'TRAIN_STEPS to train further.', total_steps)
    if run.run_eval_before_training:
      actions.evaluate(start_step, state)
    return state
  if run.run_eval_before_training and not start.resumed:
    actions.evaluate(start_step, state)  # (a resumed run skips this: evaluated before)

  period, base_rng = run.save_cfg.period, jax.random.PRNGKey(start.seed)
  steplog = StepLog(summaries.SummaryWriter(storage.join(run.model_dir, 'train')),
                    run.learning_rate_fn, run.train_dataset_cfg.batch_size, run.lengths,
                    run.model.config, start_step, total_steps, run.skip_nonfinite)
  step, stop = start_step, None
  profiler = _profiler(run, start_step, total_steps)
  try:
    with _Preemption() as preemption:
      while step < total_steps and stop is None:
        try:
          batch = next(pipeline)
        except StopIteration:
          stop = 'data'
          break
        if profiler:
          profiler.before(step + 1)
        state, metrics = trainer.train_step(state, batch, base_rng)
        step += 1
        if profiler:
          profiler.after(step, (state, metrics),
                         lambda: trainer.train_step_hlo(state, batch, base_rng))
        steplog.add(metrics)
        if step == start_step + 1:
          write_operative_config(run.model_dir)
        stop = 'sigterm' if preemption.requested else None
        is_last = step == total_steps
        if step % run.log_period == 0 or is_last:
          steplog.flush(step, checkpointer.latest_saved)
        best = False
        # Evaluate before saving: the checkpoint then holds early stopping's count of it.
        if run.eval_period and (step % run.eval_period == 0 or is_last) and not stop:
          best = actions.evaluate(step, state)
          stop = 'early' if actions.tracker.should_stop() else None
        if (period and step % period == 0) or is_last or stop or best:
          steplog.check_finite(checkpointer.latest_saved)  # nothing non-finite is saved
          actions.save(step, state, best)
    if stop == 'data':
      _end_of_data(step, start_step, run.train_dataset_cfg)
      steplog.flush(step, checkpointer.latest_saved)
      steplog.check_finite(checkpointer.latest_saved)
      actions.save(step, state, bool(run.eval_period) and actions.evaluate(step, state))
  finally:
    if profiler:
      profiler.close()
    steplog.close()
  write_operative_config(run.model_dir)
  _log_end(run, actions.tracker, stop, step)
  return state


def _log_end(run: Run, tracker, stop: Optional[str], step: int) -> None:
  if stop == 'sigterm':
    log.warning('stopped by SIGTERM at step %d; rerun the same command to continue', step)
  elif stop == 'early':
    log.warning('early stopping at step %d: %s has not improved for %d evaluations; the best, '
                '%.4f at step %d, is %s', step, tracker.metric, tracker.evals_since_best,
                tracker.best_value, tracker.best_step,
                ckpt_lib.step_dir(run.model_dir, tracker.best_step))
  else:
    log.info('done: step %d, checkpoints in %s', step, run.model_dir)


def _share(improved: bool, tracker) -> bool:
  """Process 0 computes the metrics: every host takes its early-stopping decision."""
  if jax.process_count() == 1:
    return improved
  from jax.experimental import multihost_utils
  state = tracker.state()
  packed = np.array([improved, tracker.evals_since_best, tracker.best_step or -1,
                     tracker.best_value if tracker.best_value is not None else np.nan],
                    np.float64)
  packed = multihost_utils.broadcast_one_to_all(packed)
  improved, state['evals_since_best'] = bool(packed[0]), int(packed[1])
  state['best_step'] = None if packed[2] < 0 else int(packed[2])
  state['best_value'] = None if np.isnan(packed[3]) else float(packed[3])
  tracker.restore(state)
  return improved


def _write_best(run: Run, checkpointer, tracker) -> None:
  if distributed.is_primary():
    checkpointer.wait_for(tracker.best_step)  # the pointer never names a partial checkpoint
    early_stopping_lib.write_pointer(run.model_dir, tracker)


def _end_of_data(step: int, start_step: int, cfg: data_lib.DatasetConfig) -> None:
  if step == start_step:
    raise errors.UserError(
        f'the {cfg.split!r} split of {cfg.mixture_or_task_name!r} gives no batch of '
        f'BATCH_SIZE={cfg.batch_size} (num_epochs={cfg.num_epochs}; batches are full, so a '
        'split smaller than one batch gives none): use a smaller BATCH_SIZE or more data')
  log.warning('the training data ran out at step %d (%s of %r, num_epochs=%s): saving a '
              'final checkpoint and stopping. Leave num_epochs unset to cycle through the '
              'data until TRAIN_STEPS.', step, cfg.split, cfg.mixture_or_task_name,
              cfg.num_epochs)


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  from t5tpu import gin_utils
  gin_utils.run_configured(train, argv,
                           'Train or fine-tune a T5 model (t5x-compatible gin configs).')


if __name__ == '__main__':
  # Call main() of the imported t5tpu.train module: gin's dynamic registration configures the
  # functions of that module, not of this __main__ copy.
  from t5tpu import train as _train_module
  _train_module.main(sys.argv[1:])
