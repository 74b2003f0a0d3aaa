"""Orbax-format t5x checkpoints: `checkpoint_<step>/state`, what t5x's train() writes today.

t5x's OrbaxCheckpointManagerInterface saves `train_state.state_dict()` ({'target', 'state':
{'step', 'param_states'}}) as the `state` item of an orbax CheckpointManager with
step_prefix 'checkpoint' (OCDBT in current t5x, one folder per array in older releases);
t5tpu's own checkpoints are the same plus a `dataset` item. So one reader serves both, and
what we write here t5x restores and t5tpu resumes from.
"""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

from t5tpu import checkpoints as ckpt_lib
from t5tpu import storage
from t5tpu.formats import (COPY_AGAIN, CheckpointReadError, OutputExistsError, describe_error,
                           make_state_dict, param_states_of, params_of, step_of)

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')


def check_metadata(path: str) -> None:
  """Raises CheckpointReadError if `state/_METADATA` (the tree orbax restores) is not JSON.

  Checked before orbax reads it: orbax fails with a bare JSONDecodeError that names no file.
  The step's own _CHECKPOINT_METADATA (timestamps, the item list) is not needed to read the
  `state` item, so a damaged one is only logged.
  """
  path = path.rstrip('/')
  for name, needed in ((storage.join(path, 'state', '_METADATA'), True),
                       (storage.join(path, '_CHECKPOINT_METADATA'), False)):
    if not storage.exists(name):
      continue  # older orbax releases wrote no _METADATA: orbax itself says what is missing
    try:
      ok = isinstance(json.loads(storage.read_text(name)), dict)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
      ok = False
    if ok:
      continue
    if needed:
      raise CheckpointReadError(
          f'{name} is corrupt (not a JSON object), so the orbax checkpoint {path} cannot be '
          f'read: it is truncated or damaged: {COPY_AGAIN}')
    log.warning('%s is not valid JSON (ignored: reading the checkpoint needs only state/)',
                name)


def read_tree(path: str) -> dict:
  """The `state` item of an orbax step directory as it is stored (numpy leaves).

  A damaged checkpoint raises CheckpointReadError naming the path, not orbax's or
  tensorstore's error alone.
  """
  path = path.rstrip('/')
  check_metadata(path)
  try:
    return ckpt_lib.read_state_dict(path)
  except (ValueError, OSError) as e:  # tensorstore's DATA_LOSS, orbax's missing structure
    raise CheckpointReadError(f'cannot read the orbax checkpoint {path} ({describe_error(e)}): '
                              f'it is incomplete or damaged: {COPY_AGAIN}') from None


def read(path: str) -> dict:
  """`checkpoint_<step>` (the directory holding `state/`) as a numpy state dict."""
  tree = read_tree(path)
  return make_state_dict(params_of(tree), int(np.asarray(step_of(tree))), param_states_of(tree))


def write(path: str, state_dict: dict) -> str:
  """Writes `state_dict` as an orbax step directory and returns its path.

  `path` is either a `.../checkpoint_<step>` directory (its step must be the state's) or a
  MODEL_DIR, which then receives `checkpoint_<step>`. The step directory holds `state`
  (t5x's item) and an empty `dataset` item, so t5tpu can also resume from it.
  """
  import orbax.checkpoint as ocp
  step = int(np.asarray(step_of(state_dict)))
  path = path.rstrip('/')
  name = os.path.basename(path)
  m = _STEP_DIR.match(name)
  if m:
    if int(m.group(1)) != step:
      raise ValueError(f'{path} names step {m.group(1)} but the checkpoint is at step {step}')
    model_dir = path[:-len(name)].rstrip('/') or '.'
  else:
    model_dir = path
  tree = make_state_dict(params_of(state_dict), np.asarray(step, np.int32),
                         param_states_of(state_dict))
  storage.makedirs(model_dir)
  options = ocp.CheckpointManagerOptions(step_prefix=ckpt_lib.STEP_PREFIX, create=True,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(storage.orbax_path(model_dir), options=options,
                                  item_names=('state', 'dataset'))
  try:
    if step in manager.all_steps():
      raise OutputExistsError(f'{ckpt_lib.step_dir(model_dir, step)} already exists')
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               dataset=ocp.args.JsonSave({})), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  out = ckpt_lib.step_dir(model_dir, step)
  log.info('wrote orbax checkpoint %s', out)
  return out
