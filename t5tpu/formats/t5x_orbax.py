"""Orbax-format t5x checkpoints: `checkpoint_<step>/state`, what t5x's train() writes today.

t5x's OrbaxCheckpointManagerInterface saves `train_state.state_dict()` ({'target', 'state':
{'step', 'param_states'}}) as the `state` item of an orbax CheckpointManager with
step_prefix 'checkpoint' (OCDBT in current t5x, one folder per array in older releases);
t5tpu's own checkpoints are the same plus a `dataset` item. So one reader serves both, and
what we write here t5x restores and t5tpu resumes from.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from t5tpu import checkpoints as ckpt_lib
from t5tpu import storage
from t5tpu.formats import make_state_dict

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')


def read(path: str) -> dict:
  """`checkpoint_<step>` (the directory holding `state/`) as a numpy state dict."""
  tree = ckpt_lib.read_state_dict(path.rstrip('/'))
  state = tree.get('state', {}) or {}
  return make_state_dict(tree['target'], int(np.asarray(state.get('step', 0))),
                         state.get('param_states') or None)


def write(path: str, state_dict: dict) -> str:
  """Writes `state_dict` as an orbax step directory and returns its path.

  `path` is either a `.../checkpoint_<step>` directory (its step must be the state's) or a
  MODEL_DIR, which then receives `checkpoint_<step>`. The step directory holds `state`
  (t5x's item) and an empty `dataset` item, so t5tpu can also resume from it.
  """
  import orbax.checkpoint as ocp
  state = state_dict.get('state', {}) or {}
  step = int(np.asarray(state.get('step', 0)))
  path = path.rstrip('/')
  name = os.path.basename(path)
  m = _STEP_DIR.match(name)
  if m:
    if int(m.group(1)) != step:
      raise ValueError(f'{path} names step {m.group(1)} but the checkpoint is at step {step}')
    model_dir = path[:-len(name)].rstrip('/') or '.'
  else:
    model_dir = path
  tree = {'target': state_dict['target'], 'state': {'step': np.asarray(step, np.int32)}}
  if state.get('param_states'):
    tree['state']['param_states'] = state['param_states']
  storage.makedirs(model_dir)
  options = ocp.CheckpointManagerOptions(step_prefix=ckpt_lib.STEP_PREFIX, create=True,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(storage.orbax_path(model_dir), options=options,
                                  item_names=('state', 'dataset'))
  try:
    if step in manager.all_steps():
      raise FileExistsError(f'{ckpt_lib.step_dir(model_dir, step)} already exists')
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               dataset=ocp.args.JsonSave({})), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  out = ckpt_lib.step_dir(model_dir, step)
  log.info('wrote orbax checkpoint %s', out)
  return out
