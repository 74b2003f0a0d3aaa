"""INITIAL_CHECKPOINT_PATH: read a checkpoint of any supported format into a TrainState.

Formats are told apart by what the path holds:
  <dir>/state/                 orbax (t5tpu's own, and t5x's current default)
  <dir>/checkpoint             legacy T5X msgpack (every public gs://t5-data/.../t5x/ model)
  <path>.index                 Mesh-TensorFlow / TF checkpoint (model.ckpt-N)
  <dir>/config.json            Hugging Face T5ForConditionalGeneration
Each reader returns t5x's state dict {'target': params, 'state': {'step', 'param_states'}}
(optimizer state only where the checkpoint has it). The parameters are then matched against
the configured model by name and shape, with one error that lists every mismatch and says
which model the checkpoint looks like.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5tpu import checkpoints as ckpt_lib
from t5tpu import storage

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  pass


def detect_format(path: str) -> str:
  path = path.rstrip('/')
  if storage.exists(storage.join(path, 'state')):
    return 'orbax'
  if storage.exists(storage.join(path, 'checkpoint')) and not storage.exists(
      storage.join(path, 'checkpoint.index')):
    head = storage.open_file(storage.join(path, 'checkpoint'), 'rb').read(64)
    if head.startswith(b'model_checkpoint_path'):
      return 'tf_dir'  # a TF checkpoint *directory* with a state file
    return 't5x_legacy'
  if storage.exists(path + '.index'):
    return 'mtf'
  if storage.exists(storage.join(path, 'config.json')):
    return 'hf'
  if storage.exists(path) and not storage.isdir(path):
    return 't5x_legacy_file'  # a bare msgpack file, e.g. t5x's test_t5_tiny.checkpoint_0
  raise FileNotFoundError(
      f'no checkpoint at {path}: expected an orbax checkpoint dir (with state/), a T5X '
      'checkpoint_N dir (with a `checkpoint` file), a TF/MTF prefix (model.ckpt-N, with '
      '.index beside it) or a Hugging Face model dir (with config.json)')


def read_state_dict(path: str) -> dict:
  """The checkpoint at `path` as a numpy state dict in t5x's layout."""
  kind = detect_format(path)
  path = path.rstrip('/')
  if kind == 'orbax':
    return ckpt_lib.read_state_dict(path)
  if kind in ('t5x_legacy', 't5x_legacy_file'):
    from t5tpu.formats import t5x_legacy
    return t5x_legacy.read(path)
  if kind == 'mtf':
    from t5tpu.formats import mtf
    return mtf.read(path)
  if kind == 'tf_dir':
    from t5tpu.formats import mtf
    return mtf.read(mtf.latest_in_dir(path))
  from t5tpu.formats import hf
  return hf.read(path)


# ----------------------------------------------------------------------------- matching

def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def apply_assignment_map(model_names, ckpt_flat: dict, assignment_map) -> tuple[dict, list]:
  """Model name -> checkpoint value under t5x's regex assignment map.

  Returns the mapped values and the names to leave at their initial values (replacement None).
  """
  if not assignment_map:
    return {n: ckpt_flat[n] for n in model_names if n in ckpt_flat}, []
  mapped, skipped = {}, []
  for name in model_names:
    source = name
    for pattern, replacement in assignment_map:
      if re.search(pattern, name):
        source = None if replacement is None else re.sub(pattern, replacement, name)
        break
    if source is None:
      skipped.append(name)
    elif source in ckpt_flat:
      mapped[name] = ckpt_flat[source]
  return mapped, skipped


def describe_checkpoint_model(flat_params: dict) -> str:
  """A guess at the model a parameter dict belongs to, e.g. 't5_1_1 base (...)'."""
  from t5tpu import model_shapes
  try:
    cfg = model_shapes.config_from_param_shapes(
        {k: tuple(np.shape(v)) for k, v in flat_params.items()})
  except (KeyError, ValueError, IndexError) as e:
    return f'(could not infer its shape: {e})'
  return model_shapes.describe(cfg)


def check_compatible(model_shapes_flat: dict, ckpt_flat: dict, skipped=(), strict=True,
                     fallback_to_scratch=False, path: str = '') -> list:
  """Raises one CheckpointMismatchError listing every mismatch; returns names to init fresh."""
  missing = [n for n in model_shapes_flat if n not in ckpt_flat and n not in skipped]
  unexpected = [n for n in ckpt_flat if n not in model_shapes_flat] if strict else []
  wrong = [(n, tuple(np.shape(ckpt_flat[n])), tuple(model_shapes_flat[n]))
           for n in model_shapes_flat
           if n in ckpt_flat and tuple(np.shape(ckpt_flat[n])) != tuple(model_shapes_flat[n])]
  if fallback_to_scratch:
    fresh, missing = missing, []
  else:
    fresh = []
  if not (missing or unexpected or wrong):
    return fresh + list(skipped)
  lines = [f'checkpoint {path} does not fit the configured model:']
  if wrong:
    lines.append(f'  {len(wrong)} parameter(s) with different shapes (checkpoint vs model):')
    lines += [f'    {n}: {c} vs {m}' for n, c, m in wrong[:30]]
  if missing:
    lines.append(f'  {len(missing)} model parameter(s) missing from the checkpoint:')
    lines += [f'    {n}' for n in missing[:30]]
  if unexpected:
    lines.append(f'  {len(unexpected)} checkpoint parameter(s) the model does not have:')
    lines += [f'    {n}' for n in unexpected[:30]]
  lines.append(f'  the checkpoint looks like: {describe_checkpoint_model(ckpt_flat)}')
  model_desc = describe_checkpoint_model(model_shapes_flat)
  lines.append(f'  the configured model is:   {model_desc}')
  lines.append('  fix: include the model gin that matches the checkpoint (gin/models/...), '
               'or map names with RestoreCheckpointConfig.assignment_map. If MODEL_DIR holds '
               'checkpoints of another model, use a fresh MODEL_DIR (resume takes MODEL_DIR '
               'before INITIAL_CHECKPOINT_PATH).')
  raise CheckpointMismatchError('\n'.join(lines))


def state_from_state_dict(state_dict: dict, trainer, restore_cfg=None, path: str = ''):
  """Matches a numpy state dict to the trainer's model and places it on the mesh."""
  restore_cfg = restore_cfg or ckpt_lib.RestoreCheckpointConfig()
  layout = trainer.layout
  abstract_flat = _flat(layout.abstract.params)
  model_shape_flat = {k: v.shape for k, v in abstract_flat.items()}
  ckpt_flat = _flat(state_dict['target'])
  mapped, skipped = apply_assignment_map(list(abstract_flat), ckpt_flat,
                                         restore_cfg.assignment_map)
  if restore_cfg.assignment_map:
    ckpt_view = dict(mapped)
    strict = False  # the map decides what is used
  else:
    ckpt_view, strict = ckpt_flat, restore_cfg.strict
  fresh = check_compatible(model_shape_flat, ckpt_view, skipped, strict,
                           restore_cfg.fallback_to_scratch, path)
  step = int(np.asarray(state_dict.get('state', {}).get('step', 0)))

  if fresh:
    log.info('%d parameter(s) keep their initial values: %s', len(fresh), fresh[:10])
    init_params = _flat(jax.device_get(trainer.init_state(jax.random.PRNGKey(0)).params))
  flat = {}
  for name, a in abstract_flat.items():
    value = np.asarray(ckpt_view[name]) if name in ckpt_view else init_params[name]
    if restore_cfg.dtype:
      value = np.asarray(jnp.asarray(value).astype(restore_cfg.dtype))
    flat[name] = value.astype(a.dtype)
  params = traverse_util.unflatten_dict(flat, sep='/')
  state = trainer.state_from_params(params, step=step)

  param_states = state_dict.get('state', {}).get('param_states')
  if param_states and not fresh and not restore_cfg.assignment_map:
    opt_dict = state.state_dict(trainer.optimizer_def)['state']['param_states']
    want = _flat(jax.tree.map(lambda x: x.shape, opt_dict))
    have = _flat(jax.tree.map(lambda x: np.shape(x), param_states))
    if want == have:
      restored = jax.device_put(
          jax.tree.map(lambda x, ref: np.asarray(x).astype(ref.dtype), param_states, opt_dict),
          jax.tree.map(lambda x: x.sharding, opt_dict))
      state = state.restore_state_dict(
          {'target': state.params, 'state': {'step': state.step, 'param_states': restored}},
          trainer.optimizer_def)
      log.info('restored the optimizer state from the checkpoint')
    else:
      log.info('the checkpoint optimizer state does not match this optimizer: starting a '
               'fresh optimizer state')
  return state


def load(path: str, trainer, restore_cfg=None):
  """INITIAL_CHECKPOINT_PATH -> TrainState on the trainer's mesh."""
  state = state_from_state_dict(read_state_dict(path), trainer, restore_cfg, path)
  # Equal arrays can share one device buffer here (the jitted optimizer init returns one
  # buffer for its identical [1] zero slots; restored numpy arrays may be shared too). The
  # train step donates its state, and XLA refuses to donate a buffer twice.
  return jax.tree.map(lambda x: x.copy(), state)
