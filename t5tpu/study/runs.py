"""Running a study: the base, every (method, task, seed) run, the transfer evaluations.

Each run is t5tpu's own training or evaluation entry point called in this process with a gin
configuration of its own (the user's model gins, the run gin, the method's delta gin, then the
study's bindings). After each finished piece results.json is rewritten, which is what makes a
rerun resume: pieces recorded there are not run again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from typing import Dict, List, Sequence

import gin

from t5tpu import errors
from t5tpu import storage
from t5tpu.study import StudyConfig, METHOD_GINS, analysis, report

log = logging.getLogger('t5tpu.study')
RESULTS = 'results.json'


# What a recorded run depends on: resuming with other values would mix two studies.
_RUN_SETTINGS = ('initial_checkpoint', 'base_task', 'base_steps', 'base_batch_size',
                 'train_steps', 'eval_period', 'patience', 'batch_size', 'dropout_rate',
                 'feature_lengths', 'learning_rates', 'metrics')


def _check_same_runs(saved: dict, now: dict, study_dir: str) -> None:
  if not saved:
    return
  changed = [k for k in _RUN_SETTINGS if k in saved and saved[k] != now[k]]
  rates = [m for m in now['methods'] if (saved.get('learning_rates') or {}).get(m) not in (
      None, (now['learning_rates'] or {}).get(m))]
  changed = [k for k in changed if k != 'learning_rates'] + (['learning_rates'] if rates else [])
  if changed:
    raise errors.UserError(
        f'{study_dir} holds a study made with other settings ('
        + ', '.join(f'{k}: {saved[k]!r} then, {now[k]!r} now' for k in changed)
        + '): use a new --study_dir, or the same settings to resume it')


class Interrupted(Exception):
  """A run ended before its steps or early stopping (preemption): the study stops too."""


def run_key(method: str, task: str, seed: int) -> str:
  return f'{method}/{task}/seed{seed}'


def read_results(study_dir: str) -> dict:
  path = storage.join(study_dir, RESULTS)
  if not storage.exists(path):
    return {}
  return json.loads(storage.read_text(path))


def _gin_value(value) -> str:
  return repr(value)


@contextlib.contextmanager
def _quiet():
  """The engine's INFO lines per run would bury the study's own progress lines."""
  loggers = {logging.getLogger('t5tpu'): logging.WARNING,
             logging.getLogger('absl'): logging.ERROR}  # seqio's notes on sequence lengths
  levels = {logger: logger.level for logger in loggers}
  for logger, level in loggers.items():
    logger.setLevel(level)
  try:
    yield
  finally:
    for logger, level in levels.items():
      logger.setLevel(level)


def read_curve(model_dir: str, task: str, metric: str) -> List[List[float]]:
  """[[step, value]] of the run's inference evaluations (the last row of a step wins: a
  resumed run may have evaluated a step twice)."""
  path = storage.join(model_dir, 'inference_eval', f'{task}-metrics.jsonl')
  if not storage.exists(path):
    return []
  by_step = {}
  for line in storage.read_text(path).splitlines():
    if line.strip():
      row = json.loads(line)
      if metric in row:
        by_step[int(row['step'])] = float(row[metric])
  return [[s, by_step[s]] for s in sorted(by_step)]


_COUNT = re.compile(r'^(total|trainable) parameters: ([\d,]+)', re.M)


def read_parameter_counts(model_dir: str) -> Dict[str, int]:
  """{'total', 'trainable'} from the run's model-info.txt."""
  text = storage.read_text(storage.join(model_dir, 'model-info.txt'))
  return {k: int(v.replace(',', '')) for k, v in _COUNT.findall(text)}


class Study:
  """One study's state: its config, the gin files of its runs, results.json as a dict."""

  def __init__(self, config: StudyConfig, model_gins: Sequence[str],
               user_bindings: Sequence[str] = (), search_paths: Sequence[str] = ()):
    self.cfg = config
    self.model_gins = list(model_gins)
    self.search_paths = [p for p in search_paths if p]
    # The user's --gin.X bindings apply to every run; the study's own come after them.
    self.user_bindings = list(user_bindings)
    self.dir = storage.resolve(config.study_dir)
    self.results = read_results(self.dir)
    _check_same_runs(self.results.get('config'), config.to_dict(), self.dir)
    self.results['config'] = config.to_dict()
    self.results.setdefault('runs', {})
    self.results.setdefault('transfer', {})
    self.results.setdefault('methods', {})

  # ------------------------------------------------------------------ bookkeeping
  def save(self) -> None:
    storage.makedirs(self.dir)
    storage.write_text(storage.join(self.dir, RESULTS),
                       json.dumps(self.results, indent=1, sort_keys=True) + '\n')

  def _say(self, text: str) -> None:
    print(f'[study] {text}', file=sys.stderr, flush=True)

  def _configure(self, run_gins: Sequence[str], bindings: Sequence[str]) -> None:
    from t5tpu import gin_utils
    gin.clear_config()
    try:
      gin_utils.parse_gin([*self.model_gins, *run_gins], [*self.user_bindings, *bindings],
                          self.search_paths)
    except (ValueError, IOError, TypeError, SyntaxError, ImportError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise errors.UserError(f'in the gin configuration of a study run ({", ".join(run_gins)}):'
                             f' {errors.message(e)}') from e

  # ------------------------------------------------------------------ the tasks
  def task_infos(self) -> Dict[str, dict]:
    import importlib
    from tasks import catalog
    from t5tpu import data as data_lib
    for module in self.cfg.task_modules:
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise errors.UserError(f'STUDY_TASK_MODULES: cannot import {module!r} ({e})') from None
    infos = {}
    for task in self.cfg.tasks:
      entry = catalog.lookup(task)
      if entry.module:
        importlib.import_module(entry.module)
      data_lib.get_task(task)  # an unknown name: one clear message, before any training
      metric = (self.cfg.metrics or {}).get(task) or entry.metric
      if metric is None:
        raise errors.UserError(
            f'task {task!r} is not in tasks/catalog.py: name the metric to rank it by, e.g. '
            f"--gin.STUDY_METRICS=\"{{'{task}': 'accuracy'}}\" (and its category with "
            'STUDY_CATEGORIES)')
      category = (self.cfg.categories or {}).get(task) or entry.category
      infos[task] = {'metric': metric, 'category': category}
    return infos

  # ------------------------------------------------------------------ the base
  def base_checkpoint(self) -> str:
    cfg = self.cfg
    if cfg.initial_checkpoint is not None:
      from t5tpu import early_stopping
      path = early_stopping.resolve(cfg.initial_checkpoint)  # <MODEL_DIR>/best -> its step
      self.results['base'] = {'checkpoint': path, 'pretrained_here': False}
      return path
    model_dir = storage.join(self.dir, 'base')
    from t5tpu import checkpoints
    path = checkpoints.step_dir(model_dir, cfg.base_steps)
    if not checkpoints.is_complete(path):
      self._say(f'pre-training the base on {cfg.base_task} for {cfg.base_steps} steps')
      started = time.time()
      self._configure(['runs/pretrain.gin'], [
          f'MODEL_DIR = {_gin_value(model_dir)}',
          f'MIXTURE_OR_TASK_NAME = {_gin_value(cfg.base_task)}',
          f'TRAIN_STEPS = {cfg.base_steps}', f'CHECKPOINT_PERIOD = {cfg.base_steps}',
          'EVAL_PERIOD = None', f'BATCH_SIZE = {cfg.base_batch_size or cfg.batch_size}',
          f'TASK_FEATURE_LENGTHS = {_gin_value(cfg.feature_lengths)}',
          f'RANDOM_SEED = {cfg.seeds[0]}', 'CHECKPOINTS_TO_KEEP = 1',
          'train_script.train.train_eval_dataset_cfg = None'])
      from t5tpu import train as train_lib
      with _quiet():
        gin.get_configurable(train_lib.train)()
      if not checkpoints.is_complete(path):  # SIGTERM: the engine saved an earlier step
        raise Interrupted('the base pre-training stopped before its last step (SIGTERM); rerun '
                          'the same command to continue the study')
      self.results['base'] = {'checkpoint': path, 'pretrained_here': True,
                              'task': cfg.base_task, 'steps': cfg.base_steps,
                              'seconds': round(time.time() - started, 1)}
      self.save()
    self.results.setdefault('base', {'checkpoint': path, 'pretrained_here': True,
                                     'task': cfg.base_task, 'steps': cfg.base_steps})
    return path

  # ------------------------------------------------------------------ one run
  def run_dir(self, method: str, task: str, seed: int) -> str:
    return storage.join(self.dir, 'runs', method, f'{task}-seed{seed}')

  def train_run(self, method: str, task: str, seed: int, info: dict, base: str) -> dict:
    cfg = self.cfg
    model_dir = self.run_dir(method, task, seed)
    started = time.time()
    gins = ['runs/finetune.gin'] + ([METHOD_GINS[method]] if METHOD_GINS[method] else [])
    # TRAIN_STEPS is absolute: full fine-tuning continues the base's step counter (t5x's way),
    # a delta run counts from 0. Curves and steps are reported from the run's own start.
    from t5tpu import initial_checkpoint
    start = (initial_checkpoint.checkpoint_step(base) or 0) if METHOD_GINS[method] is None else 0
    self._configure(gins, [
        f'MODEL_DIR = {_gin_value(model_dir)}', f'MIXTURE_OR_TASK_NAME = {_gin_value(task)}',
        f'INITIAL_CHECKPOINT_PATH = {_gin_value(base)}',
        f'TRAIN_STEPS = {start + cfg.train_steps}',
        f'EVAL_PERIOD = {cfg.eval_period}', f'CHECKPOINT_PERIOD = {cfg.eval_period}',
        'CHECKPOINTS_TO_KEEP = 1', f'EARLY_STOPPING_METRIC = {_gin_value(info["metric"])}',
        f'EARLY_STOPPING_PATIENCE = {cfg.patience}', f'BATCH_SIZE = {cfg.batch_size}',
        f'TASK_FEATURE_LENGTHS = {_gin_value(cfg.feature_lengths)}',
        f'RANDOM_SEED = {seed}', f'LEARNING_RATE = {cfg.learning_rates[method]}',
        f'DROPOUT_RATE = {cfg.dropout_rate}',
        # One decoding program for every task (the same lengths), and no teacher-forced
        # validation loss: the study reads the task metric only.
        'infer_eval/data.DatasetConfig.task_feature_lengths = %TASK_FEATURE_LENGTHS',
        'train_script.train.train_eval_dataset_cfg = None'])
    from t5tpu import early_stopping
    from t5tpu import train as train_lib
    with _quiet():
      state = gin.get_configurable(train_lib.train)()
    curve = [[s - start, v] for s, v in read_curve(model_dir, task, info['metric'])]
    pointer = early_stopping.best_step(model_dir)
    best_step = None if pointer is None else pointer - start
    last_step = int(state.step) - start
    evals_after_best = sum(1 for s, _ in curve if best_step is not None and s > best_step)
    stopped_early = bool(cfg.patience) and evals_after_best >= cfg.patience
    if last_step < cfg.train_steps and not stopped_early:  # SIGTERM: the engine saved and returned
      raise Interrupted(f'{method} on {task} stopped at step {last_step} (SIGTERM); rerun the '
                        'same command to continue the study')
    best = dict(map(tuple, curve)).get(best_step)
    if best is None:
      raise errors.UserError(
          f'{method} on {task}: no validation {info["metric"]!r} was recorded in '
          f'{model_dir}/inference_eval; name a metric the task reports (STUDY_METRICS)')
    return {'method': method, 'task': task, 'seed': seed, 'model_dir': model_dir,
            'metric': info['metric'], 'curve': curve, 'start_step': start,
            'best_step': best_step, 'best_score': best, 'last_step': last_step,
            'stopped_early': stopped_early,
            'seconds': round(time.time() - started, 1),
            'parameters': read_parameter_counts(model_dir)}

  # ------------------------------------------------------------------ transfer
  def transfer(self, infos: Dict[str, dict]) -> None:
    """Each method's best checkpoint of each task, scored on every task's validation split
    (the diagonal too: it must reproduce the run's own best score)."""
    seed = self.cfg.seeds[0]
    for method in self.cfg.methods:
      table = self.results['transfer'].setdefault(method, {})
      todo = {a: [b for b in self.cfg.tasks if b not in table.get(a, {})]
              for a in self.cfg.tasks}
      if not any(todo.values()):
        continue
      model, partitioner = self._eval_model(method)
      for source, targets in todo.items():
        if targets:
          started = time.time()
          row = table.setdefault(source, {})
          checkpoint = storage.join(self.run_dir(method, source, seed), 'best')
          for target, score in self._evaluate(model, partitioner, checkpoint, targets, infos,
                                              storage.join(self.dir, 'transfer', method,
                                                           source)):
            row[target] = score
            self.save()
          self._say(f'transfer {method}: {source} -> ' + ', '.join(
              f'{t} {row[t]:.1f}' for t in targets) + f' ({time.time() - started:.0f} s)')

  def _eval_model(self, method: str):
    """The model and partitioner of `t5tpu eval` for this method (runs/eval.gin + the delta)."""
    gins = ['runs/eval.gin'] + ([METHOD_GINS[method]] if METHOD_GINS[method] else [])
    self._configure(gins, [
        "CHECKPOINT_PATH = ''", "EVAL_OUTPUT_DIR = ''", "MIXTURE_OR_TASK_NAME = ''",
        't5tpu.study.runs.eval_parts.model = %MODEL',
        't5tpu.study.runs.eval_parts.partitioner = @t5tpu.partitioning.PjitPartitioner()'])
    return gin.get_configurable(eval_parts)()

  def _evaluate(self, model, partitioner, checkpoint: str, targets: Sequence[str],
                infos: Dict[str, dict], output_dir: str):
    """Yields (task, score) of `checkpoint` on each target task (t5tpu eval's code path: the
    checkpoint and its recorded base loaded once, one inference evaluator per task)."""
    from t5tpu import checkpoints as ckpt_lib
    from t5tpu import data as data_lib
    from t5tpu import early_stopping, evaluation, initial_checkpoint
    from t5tpu.delta import base as delta_base
    checkpoint = early_stopping.resolve(checkpoint)
    step = initial_checkpoint.checkpoint_step(checkpoint) or 0  # ours: checkpoint_<N>
    with _quiet():
      eval_model, layout, params = delta_base.load_for_inference(
          checkpoint, model, partitioner, ckpt_lib.RestoreCheckpointConfig(path=checkpoint))
      for task in targets:
        dataset_cfg = data_lib.DatasetConfig(
            mixture_or_task_name=task, task_feature_lengths=self.cfg.feature_lengths,
            split='validation', batch_size=self.cfg.batch_size, shuffle=False, seed=42,
            pack=False, num_epochs=1)
        evaluator = evaluation.InferenceEvaluator(eval_model, layout, dataset_cfg,
                                                  storage.join(output_dir, task))
        yield task, float(evaluator.evaluate(params, step)[task][infos[task]['metric']])


  # ------------------------------------------------------------------ the whole study
  def run(self) -> str:
    cfg = self.cfg
    enable_compilation_cache(self.dir)
    infos = self.task_infos()
    self.results['tasks'] = infos
    base = self.base_checkpoint()
    todo = [(m, t, s) for m in cfg.methods for t in cfg.tasks for s in cfg.seeds]
    for i, (method, task, seed) in enumerate(todo, 1):
      key = run_key(method, task, seed)
      done = self.results['runs'].get(key)
      if done:
        continue
      try:
        result = self.train_run(method, task, seed, infos[task], base)
      except Interrupted as e:
        self._say(str(e))
        raise SystemExit(1) from None
      self.results['runs'][key] = result
      self.results['methods'][method] = result['parameters']
      self.save()
      stopped = f' (stopped early at {result["last_step"]})' if result['stopped_early'] else ''
      self._say(f'[{i}/{len(todo)}] {method} on {task} (seed {seed}): best {result["metric"]} '
                f'{result["best_score"]:.1f} at step {result["best_step"]}{stopped}, '
                f'{result["seconds"]:.0f} s')
    if cfg.transfer:
      self.transfer(infos)
    self.results['analysis'] = analysis.analyse(self.results)
    self.save()
    return report.write(self.dir)


def enable_compilation_cache(study_dir: str) -> None:
  """Runs of one method differ only in their data: with jax's persistent cache, the second
  task reuses the first one's compiled train step and decoder instead of compiling again."""
  import jax
  if storage.is_remote(study_dir) or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', storage.join(study_dir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


@gin.configurable(module='t5tpu.study.runs')
def eval_parts(model=gin.REQUIRED, partitioner=gin.REQUIRED):
  """Hands the gin-built model and partitioner of an evaluation to the study."""
  return model, partitioner
