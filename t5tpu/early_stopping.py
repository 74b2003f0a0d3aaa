"""Early stopping on a validation metric, and the best checkpoint it keeps.

EARLY_STOPPING_METRIC names a metric of the inference evaluation ('em', or 'task/em' in a
mixture); every evaluation either improves on the best value so far (a checkpoint is saved at
that step if there is none, and `MODEL_DIR/best_checkpoint.json` points at it) or counts
against EARLY_STOPPING_PATIENCE; after that many evaluations without improvement the run stops.
The tracker's state (best value and step, evaluations since) is saved in every checkpoint, so a
resumed run continues the count exactly. The best checkpoint survives CHECKPOINTS_TO_KEEP.

`MODEL_DIR/best` (or RestoreCheckpointConfig.mode = 'best') names it for eval, infer and
convert.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Mapping, Optional

from t5tpu import errors
from t5tpu import storage

log = logging.getLogger(__name__)

POINTER = 'best_checkpoint.json'


@dataclasses.dataclass
class EarlyStopping:
  """Configured from gin (EARLY_STOPPING_METRIC, EARLY_STOPPING_PATIENCE)."""
  metric: Optional[str] = None  # None: no early stopping, no best checkpoint
  patience: Optional[int] = None  # evaluations without improvement; None: never stop
  mode: str = 'auto'  # 'max', 'min', or 'auto' (min for names containing 'loss')
  min_delta: float = 0.0
  best_value: Optional[float] = None
  best_step: Optional[int] = None
  evals_since_best: int = 0

  @property
  def enabled(self) -> bool:
    return bool(self.metric)

  def _maximize(self) -> bool:
    if self.mode not in ('auto', 'max', 'min'):
      raise errors.UserError(f"EarlyStopping.mode={self.mode!r}: use 'max', 'min' or 'auto'")
    return self.mode == 'max' or (self.mode == 'auto' and 'loss' not in self.metric)

  def value_of(self, results: Mapping[str, Mapping[str, float]]) -> float:
    """The metric in {task: {metric: value}}: 'task/name', or 'name' (the mean over the tasks
    that report it, one value for a single task)."""
    task, _, name = self.metric.rpartition('/')
    if task:
      values = [results.get(task, {}).get(name)]
    else:
      values = [m[name] for m in results.values() if name in m]
    values = [v for v in values if v is not None]
    if not values:
      available = sorted(f'{t}/{n}' for t, m in results.items() for n in m)
      raise errors.UserError(
          f'EARLY_STOPPING_METRIC={self.metric!r} is not among the validation metrics: '
          f'{", ".join(available) or "(none: is there an inference evaluation?)"}')
    return float(sum(values) / len(values))

  def update(self, step: int, results) -> bool:
    """Records an evaluation; True when it is the new best."""
    value = self.value_of(results)
    sign = 1.0 if self._maximize() else -1.0
    better = self.best_value is None or sign * (value - self.best_value) > self.min_delta
    if better:
      self.best_value, self.best_step, self.evals_since_best = value, step, 0
    else:
      self.evals_since_best += 1
    log.info('early stopping: %s = %.4f at step %d (best %.4f at step %d; %d evaluation(s) '
             'without improvement%s)', self.metric, value, step, self.best_value,
             self.best_step, self.evals_since_best,
             f' of {self.patience}' if self.patience else '')
    return better

  def should_stop(self) -> bool:
    return bool(self.patience) and self.evals_since_best >= self.patience

  def state(self) -> dict:
    return {'metric': self.metric, 'best_value': self.best_value, 'best_step': self.best_step,
            'evals_since_best': self.evals_since_best}

  def restore(self, state: Optional[Mapping]) -> None:
    if not state or state.get('metric') != self.metric:
      return  # another metric: its history says nothing about this one
    self.best_value = state.get('best_value')
    self.best_step = state.get('best_step')
    self.evals_since_best = int(state.get('evals_since_best', 0))


# ----------------------------------------------------------------------------- the pointer

def write_pointer(model_dir: str, tracker: EarlyStopping) -> None:
  from t5tpu import checkpoints
  storage.write_text(storage.join(model_dir, POINTER), json.dumps({
      'step': tracker.best_step, 'metric': tracker.metric, 'value': tracker.best_value,
      'checkpoint': f'{checkpoints.STEP_PREFIX}_{tracker.best_step}'}) + '\n')


def best_step(model_dir: str) -> Optional[int]:
  path = storage.join(model_dir, POINTER)
  if not storage.exists(path):
    return None
  return int(json.loads(storage.read_text(path))['step'])


def resolve(path: Optional[str]) -> Optional[str]:
  """`<MODEL_DIR>/best` -> `<MODEL_DIR>/checkpoint_<best step>`; other paths unchanged."""
  if not path or storage.exists(path):
    return path
  model_dir, name = path.rstrip('/').rsplit('/', 1) if '/' in path.rstrip('/') else ('.', path)
  if name != 'best':
    return path
  step = best_step(model_dir)
  if step is None:
    raise errors.UserError(
        f'{path}: {model_dir} has no {POINTER} (a run with EARLY_STOPPING_METRIC set writes '
        'it at its best evaluation)')
  from t5tpu import checkpoints
  return checkpoints.step_dir(model_dir, step)
