"""Checkpoints in MODEL_DIR/checkpoint_<step>, with t5x's restore order.

Each checkpoint is an orbax step directory with two items, as t5x's Orbax layout:
  checkpoint_<step>/state    the train state {'target': params, 'state': {'step', 'param_states'}}
  checkpoint_<step>/dataset  JSON: the input pipeline's position and seed, so a resumed run
                             continues with exactly the batches an uninterrupted one would see.
Orbax writes into a temporary directory and renames (or commits) it when complete, so a
checkpoint is either whole or absent; the latest *complete* one is what a restart restores.

Restore order (t5x's): the latest checkpoint in MODEL_DIR, else INITIAL_CHECKPOINT_PATH, else
fresh initialisation. Once MODEL_DIR holds a checkpoint, INITIAL_CHECKPOINT_PATH is ignored
(and we say so in the log, unlike t5x).
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5tpu import distributed
from t5tpu import formats
from t5tpu import layout as layout_lib
from t5tpu import storage

log = logging.getLogger(__name__)
# Reading one item (`checkpoint_N/state`) on its own, orbax warns that the item folder has no
# step metadata; that file lives one level up, so the warning says nothing wrong.
logging.getLogger('absl').addFilter(
    lambda r: not ('Metadata file does not exist' in r.getMessage()
                   and r.getMessage().rstrip().endswith('/state/_CHECKPOINT_METADATA')))
STEP_PREFIX = 'checkpoint'
_STEP_RE = re.compile(r'^checkpoint_(\d+)$')


@dataclasses.dataclass
class SaveCheckpointConfig:
  period: Optional[int] = 1000  # steps between checkpoints (the final step always saves)
  keep: Optional[int] = None  # how many to keep; None keeps all
  dtype: str = 'float32'  # dtype of the saved parameters
  async_save: bool = True


@dataclasses.dataclass
class RestoreCheckpointConfig:
  path: Optional[str] = None  # INITIAL_CHECKPOINT_PATH: a checkpoint dir or a model file
  dtype: Optional[str] = None  # cast restored parameters: None, 'float32' or 'bfloat16'
  restore_dataset: bool = True
  mode: str = 'specific'  # eval/infer: 'specific' (path is a checkpoint), 'latest' or 'all'
                          # (path is a MODEL_DIR)
  # t5x's regex (pattern, replacement) pairs over full state-dict names
  # ('target/encoder/layers_0/...', 'state/param_states/...'): a model name the pattern fully
  # matches takes the checkpoint's match.expand(replacement); replacement None leaves it at
  # its fresh initial value. A pattern that matches nothing is an error, as in t5x.
  assignment_map: Optional[Sequence[tuple]] = None
  fallback_to_scratch: bool = False  # parameters absent from the checkpoint keep init values
  strict: bool = True  # False: checkpoint parameters the model lacks are ignored


@dataclasses.dataclass
class CheckpointConfig:
  save: Optional[SaveCheckpointConfig] = None
  restore: Optional[RestoreCheckpointConfig] = None


def all_steps(model_dir: str) -> list[int]:
  """Steps of the complete checkpoints in model_dir, ascending."""
  if not model_dir or not storage.exists(model_dir):
    return []
  steps = []
  for name in storage.listdir(model_dir):
    m = _STEP_RE.match(name.rstrip('/'))
    if m and is_complete(storage.join(model_dir, name.rstrip('/'))):
      steps.append(int(m.group(1)))
  return sorted(steps)


def latest_step(model_dir: str) -> Optional[int]:
  steps = all_steps(model_dir)
  return steps[-1] if steps else None


def is_complete(step_dir: str) -> bool:
  """Whether a checkpoint_<step> directory holds a finished save.

  Locally orbax saves into `<name>.orbax-checkpoint-tmp-*` and renames it when done. On gs://
  there is no rename: orbax (0.12) writes straight into checkpoint_<step>/ and adds
  commit_success.txt last, so that file is the only completion mark there
  (_CHECKPOINT_METADATA is written when the save *starts*). `t5tpu gcs cp` copies
  commit_success.txt last for the same reason.
  """
  if '.orbax-checkpoint-tmp' in step_dir:
    return False
  if storage.is_remote(step_dir):
    return storage.exists(storage.join(step_dir, 'commit_success.txt'))
  return storage.exists(step_dir)


def step_dir(model_dir: str, step: int) -> str:
  return storage.join(model_dir, f'{STEP_PREFIX}_{step}')


class Checkpointer:
  """Saves and restores TrainStates (and input positions) under one MODEL_DIR."""

  def __init__(self, model_dir: str, save_cfg: Optional[SaveCheckpointConfig],
               protected_step: Optional[Callable[[], Optional[int]]] = None):
    """`protected_step()` names a checkpoint that `keep` must not delete (the best one)."""
    self.model_dir = model_dir
    self.save_cfg = save_cfg or SaveCheckpointConfig()
    self.protected_step = protected_step
    storage.makedirs(model_dir)
    # cleanup_tmp_directories: a save cut short (kill -9, preemption) leaves a temporary
    # directory; the run holding MODEL_DIR's lock removes them at start. (Local dirs only: on
    # gs:// orbax writes in place and an unfinished checkpoint_N is simply never listed.)
    # With a protected checkpoint, `keep` is applied here (_prune), not by orbax.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if protected_step else self.save_cfg.keep, step_prefix=STEP_PREFIX,
        create=True,
        enable_async_checkpointing=self.save_cfg.async_save,
        cleanup_tmp_directories=not storage.is_remote(model_dir))
    self.manager = ocp.CheckpointManager(
        storage.orbax_path(model_dir), options=options, item_names=('state', 'dataset'))
    self.saved_step: Optional[int] = None

  def save(self, state, dataset_state: Optional[dict] = None):
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    tree = state.state_dict()
    if self.save_cfg.dtype:  # also bfloat16 parameters (PARAM_DTYPE) saved as float32
      tree = formats.with_params(
          tree, formats.cast_floating(formats.params_of(tree), self.save_cfg.dtype))
    items = {'state': ocp.args.StandardSave(tree)}
    items['dataset'] = ocp.args.JsonSave(dataset_state or {})
    with self._save_failures(self.saved_step):  # a failed asynchronous save surfaces here
      self.manager.wait_until_finished()
    with self._save_failures(step):
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.saved_step = step
    self._prune()
    return True

  def _prune(self) -> None:
    """The newest `keep` checkpoints and the protected one stay; older ones go, once no save
    is in flight (a deletion racing an asynchronous save is not worth the risk)."""
    keep = self.save_cfg.keep
    if not (self.protected_step and keep) or self.manager.is_saving_in_progress():
      return
    steps = sorted(self.manager.all_steps())
    protected = self.protected_step()
    for step in steps[:-keep]:
      if step != protected:  # (orbax deletes from process 0 itself)
        self.manager.delete(step)

  def _save_failures(self, step: Optional[int]):
    """A storage failure of a save (disk full, GCS errors after retries, no network, no
    permission) becomes a UserError naming the checkpoint and the cause."""
    what = step_dir(self.model_dir, step) if step is not None else self.model_dir
    return storage.failures_as_user_errors(
        f'saving {what}', hint='Checkpoints saved before it are intact: fix the cause and run '
        'the same command again to resume from the latest.')

  def wait_for(self, step: int) -> None:
    """Blocks until the checkpoint of `step` is complete (it may be saving asynchronously)."""
    if step == self.saved_step:
      with self._save_failures(step):
        self.manager.wait_until_finished()

  def latest_saved(self) -> Optional[int]:
    """The newest checkpoint of MODEL_DIR, this run's own saves included."""
    steps = self.manager.all_steps()
    return max(steps) if steps else None

  def restore(self, step: int, template_state, shardings):
    """Restores checkpoint_<step> into the layout of template_state (abstract is fine)."""
    abstract_dict = layout_lib.with_shardings(template_state, shardings).state_dict()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_dict), dataset=ocp.args.JsonRestore()))
    state = template_state.restore_state_dict(restored['state'])
    state = layout_lib.unshared(state)  # orbax may share one buffer between equal arrays
    return state, dict(restored['dataset'] or {})

  def restore_latest_whole(self, template_state, shardings, check_fits=None):
    """The newest checkpoint that reads back whole: (step, state, dataset state), or None.

    A checkpoint with a missing or truncated file (a disk that filled up, a copy cut short)
    is set aside as `checkpoint_<N>.unreadable-<time>` with a warning naming it, and the
    previous one is tried: never a crash, and never a silent restart from scratch while
    readable checkpoints exist. `check_fits(step_dir, shapes)` raises when a checkpoint is
    of another model (that is the user's mistake, not damage: no fall-back then).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      path = step_dir(self.model_dir, step)
      try:
        shapes = param_shapes(path)
      except Exception as e:  # pylint: disable=broad-except
        unreadable.append(self._set_aside(path, e))
        continue
      if check_fits is not None:
        check_fits(path, shapes)
      try:
        state, dataset_state = self.restore(step, template_state, shardings)
      except Exception as e:  # pylint: disable=broad-except
        unreadable.append(self._set_aside(path, e))
        continue
      return step, state, dataset_state
    if unreadable:
      from t5tpu import errors
      raise errors.UserError(
          f'every checkpoint in MODEL_DIR {self.model_dir} is unreadable (set aside: '
          f'{", ".join(unreadable)}). Not starting from scratch over them: restore a copy, or '
          'use a new MODEL_DIR.')
    return None

  def _set_aside(self, path: str, error: Exception) -> str:
    failure = storage.describe_failure(error)
    if failure is not None:  # the storage failed (an outage, a full disk), not the checkpoint
      from t5tpu import errors
      raise errors.UserError(
          f'reading {path} failed: {failure}. The checkpoint was left as it is: fix the cause '
          'and run the same command again.') from error
    aside = f'{path}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
    log.warning('checkpoint %s is damaged (%s: %s); moving it aside to %s and resuming from '
                'the previous whole checkpoint', path, type(error).__name__, reason, aside)
    if distributed.is_primary():
      storage.move(path, aside)
    self.manager.reload()
    return aside

  def close(self):
    with self._save_failures(self.saved_step):
      self.manager.wait_until_finished()
    self._prune()
    self.manager.close()


def param_shapes(path: str) -> dict:
  """{parameter name: shape} of an orbax checkpoint dir's `target`, from its metadata only."""
  from flax import traverse_util
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(storage.orbax_path(storage.join(path, 'state')))
  finally:
    checkpointer.close()
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, dict) or formats.TARGET not in tree:
    raise ValueError(f'{path}: no parameters (target) in the checkpoint metadata')
  flat = traverse_util.flatten_dict(formats.params_of(tree), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}


def restore_params(path: str, abstract_params):
  """Only the parameters of an orbax checkpoint dir, straight into their shardings.

  `abstract_params` are ShapeDtypeStructs with shardings; the optimizer state is not read.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract_params)
  restored = checkpointer.restore(
      storage.orbax_path(storage.join(path, 'state')),
      args=ocp.args.PyTreeRestore(item={formats.TARGET: abstract_params},
                                  restore_args={formats.TARGET: restore_args},
                                  partial_restore=True))
  return formats.params_of(restored)


def read_state_dict(path: str, abstract_dict=None):
  """Reads the `state` item of an orbax checkpoint directory (t5tpu's or t5x's) as a dict.

  With `abstract_dict`, arrays come back in that layout and sharding; without, as numpy.
  """
  state_path = storage.join(path, 'state')
  checkpointer = ocp.StandardCheckpointer()
  try:
    if abstract_dict is None:
      meta = checkpointer.metadata(storage.orbax_path(state_path))
      tree = getattr(meta, 'item_metadata', meta)
      tree = getattr(tree, 'tree', tree)
      target = jax.tree.map(
          lambda m: np.empty(m.shape, m.dtype) if hasattr(m, 'shape') else m, tree)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      pytree = ocp.PyTreeCheckpointer()
      return pytree.restore(storage.orbax_path(state_path),
                            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    return checkpointer.restore(storage.orbax_path(state_path), abstract_dict)
  finally:
    checkpointer.close()
