"""`t5tpu study` / `python -m t5tpu.study`: which delta method, how fast, does it transfer.

The Ding et al. (2023) comparison for your tasks and model: every (method, task, seed) is a
t5tpu fine-tuning run (runs/finetune.gin + delta/<method>.gin) from the same base, evaluated on
validation every EVAL_PERIOD steps by the task's own metric, stopped after
EARLY_STOPPING_PATIENCE evaluations without improvement, its best checkpoint kept. Then every
method's best checkpoint for task A is evaluated zero-shot on every other task B. The analyses
(performance, convergence, transferability) go into STUDY_DIR/results.json, and
STUDY_DIR/report.md and its PNGs are written from that file alone.

  STUDY_DIR/results.json                every number: runs, curves, transfer, analyses
  STUDY_DIR/report.md, *.png            the report
  STUDY_DIR/base/                       the base model, when the study pre-trains it
  STUDY_DIR/runs/<method>/<task>-seed<n>/   each run's MODEL_DIR (logs, metrics, checkpoints)
  STUDY_DIR/transfer/<method>/<A>/      A's best checkpoint evaluated on the other tasks

Rerunning the same command resumes: finished runs and transfer evaluations are read back, an
interrupted run continues from its last checkpoint. Configured by gin/runs/study.gin (macros
STUDY_DIR, STUDY_METHODS, STUDY_TASKS, ...); the flags below set those macros.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Dict, Optional, Sequence, Tuple

import gin

from t5tpu import errors

METHODS = ('ft', 'lora', 'adapter', 'prefix', 'prompt', 'bitfit')
# method -> the gin file that makes a run that method (full fine-tuning needs none)
METHOD_GINS = {'ft': None, **{m: f'delta/{m}.gin' for m in METHODS[1:]}}
STUDY_GIN = 'runs/study.gin'
DEFAULT_MODEL_GIN = 'examples/synthetic_tiny_model.gin'


def _names(value, what: str, known: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
  """'a,b' or ['a', 'b'] -> ('a', 'b'), checked against `known`."""
  items = value.split(',') if isinstance(value, str) else list(value or ())
  items = tuple(str(i).strip() for i in items if str(i).strip())
  if not items:
    raise errors.UserError(f'no {what} given')
  unknown = [i for i in items if known is not None and i not in known]
  if unknown:
    raise errors.UserError(f'unknown {what} {", ".join(unknown)}: choose from {", ".join(known)}')
  return items


@gin.configurable(module='t5tpu.study')
@dataclasses.dataclass
class StudyConfig:
  """One study (gin/runs/study.gin binds every field to a macro)."""
  study_dir: str = 'runs/delta_study'
  methods: Sequence[str] = METHODS
  tasks: Sequence[str] = ()
  seeds: Sequence[int] = (0,)
  initial_checkpoint: Optional[str] = None  # None: pre-train a base on base_task
  base_task: Optional[str] = None
  base_steps: int = 0
  base_batch_size: Optional[int] = None  # None: batch_size
  train_steps: int = 1000
  eval_period: int = 100
  patience: Optional[int] = 3
  batch_size: int = 32
  dropout_rate: float = 0.1
  feature_lengths: Optional[Dict[str, int]] = None
  learning_rates: Optional[Dict[str, float]] = None  # method -> constant learning rate
  metrics: Optional[Dict[str, str]] = None  # task -> metric, for tasks the catalog lacks
  categories: Optional[Dict[str, str]] = None  # task -> category, likewise
  task_modules: Sequence[str] = ()  # modules to import that register the tasks
  transfer: bool = True

  def __post_init__(self):
    self.methods = _names(self.methods, 'method', METHODS)
    self.tasks = _names(self.tasks, 'task')
    self.seeds = tuple(int(s) for s in _names(
        self.seeds if not isinstance(self.seeds, int) else [self.seeds], 'seed'))
    self.task_modules = _names(self.task_modules, 'module') if self.task_modules else ()
    if self.patience is not None and self.patience < 1:
      raise errors.UserError(f'EARLY_STOPPING_PATIENCE={self.patience}: use 1 or more, or None')
    if self.eval_period < 1 or self.train_steps < self.eval_period:
      raise errors.UserError(f'EVAL_PERIOD={self.eval_period} must be at least 1 and at most '
                             f'TRAIN_STEPS={self.train_steps}')
    if self.initial_checkpoint is None and not (self.base_task and self.base_steps > 0):
      raise errors.UserError(
          'the study needs a base model: set --initial_checkpoint (a pretrained T5, e.g. '
          'hf://google/t5-v1_1-base or gs://.../checkpoint_1000000), or STUDY_BASE_TASK and '
          'STUDY_BASE_STEPS to pre-train one')
    rates = dict(self.learning_rates or {})
    missing = [m for m in self.methods if m not in rates]
    if missing:
      raise errors.UserError(f'STUDY_LEARNING_RATES has no rate for {", ".join(missing)}')

  def to_dict(self) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}


FLAGS = {  # flag -> (macro of gin/runs/study.gin, type)
    '--study_dir': ('STUDY_DIR', str),
    '--methods': ('STUDY_METHODS', str),
    '--tasks': ('STUDY_TASKS', str),
    '--seeds': ('STUDY_SEEDS', str),
    '--initial_checkpoint': ('INITIAL_CHECKPOINT_PATH', str),
    '--base_steps': ('STUDY_BASE_STEPS', int),
    '--train_steps': ('TRAIN_STEPS', int),
    '--eval_period': ('EVAL_PERIOD', int),
    '--patience': ('EARLY_STOPPING_PATIENCE', int),
    '--batch_size': ('BATCH_SIZE', int),
}


def _joined(argv: list) -> list:
  """'--gin_file X' -> '--gin_file=X' (argparse takes both; the study reads the model gins)."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] == '--gin_file' and i + 1 < len(argv):
      out.append(f'--gin_file={argv[i + 1]}')
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  from t5tpu import gin_utils
  from t5tpu.study import report, runs
  argv = _joined(list(argv))
  report_only = '--report_only' in argv
  argv = [a for a in argv if a != '--report_only']
  # The model gins (and any gin of the user's) come before runs/study.gin, whose defaults
  # override theirs; --gin.X flags override both.
  model_gins = [a.split('=', 1)[1] for a in argv if a.startswith('--gin_file=')]
  if not model_gins:  # the offline suite's tiny model
    argv.append(f'--gin_file={DEFAULT_MODEL_GIN}')
    model_gins = [DEFAULT_MODEL_GIN]
  args = gin_utils.setup([*argv, f'--gin_file={STUDY_GIN}'],
                         'Compare delta-tuning methods on tasks (runs/study.gin macros); '
                         '--report_only rewrites the report from results.json.',
                         macro_flags=FLAGS)
  config = gin.get_configurable(StudyConfig)()
  if report_only:
    path = report.write(config.study_dir)
  else:
    path = runs.Study(config, model_gins, list(args.gin_bindings),
                      args.gin_search_paths.split(',')).run()
  print(f'report: {path}', file=sys.stderr)
