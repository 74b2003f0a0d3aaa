"""INITIAL_CHECKPOINT_PATH: read a checkpoint of any supported format into a TrainState.

formats.detect tells the formats apart by what the path holds and reads any of them; each
reader returns t5x's state dict (the layout t5tpu.formats defines), with the optimizer state
only where the checkpoint has it. The parameters are then matched against
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
from t5tpu import formats
from t5tpu import layout as layout_lib
from t5tpu.model_shapes import CheckpointMismatchError, check_compatible
from t5tpu.formats.detect import detect_format, read_state_dict

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- matching
#
# Names are t5x's full state-dict names, as in t5x's assignment maps and error messages:
# 'target/encoder/layers_0/attention/query/kernel', 'state/param_states/.../v_row', 'state/step'.

TARGET, PARAM_STATES = formats.TARGET_PREFIX, formats.PARAM_STATES_PREFIX


def apply_assignment_map(model_names, ckpt_flat: dict, assignment_map) -> tuple:
  """t5x's regex assignment map: which checkpoint value each model name takes.

  Each model name takes the first (pattern, replacement) whose pattern *fully* matches it:
  the checkpoint's `match.expand(replacement)` (so r'\1' groups work), or, for replacement
  None, its fresh initial value. A name no pattern matches takes the checkpoint's value of the
  same name, if any. Returns (values by model name, names left fresh, checkpoint names unused).
  As in t5x, a pattern that matches nothing, or a replacement the checkpoint lacks, is an error.
  """
  rules = [(re.compile(p), r) for p, r in (assignment_map or ())]
  values, skipped, consumed, used = {}, [], set(), set()
  for name in model_names:
    for pattern, replacement in rules:
      m = pattern.fullmatch(name)
      if m is None:
        continue
      used.add(pattern.pattern)
      if replacement is None:
        skipped.append(name)
      else:
        source = m.expand(replacement)
        if source not in ckpt_flat:
          raise CheckpointMismatchError(
              f'assignment_map: {pattern.pattern!r} assigns {source!r} to {name!r}, but the '
              f'checkpoint has no {source!r}. Names are full state-dict names such as '
              f"'target/encoder/layers_0/attention/query/kernel'.")
        values[name] = ckpt_flat[source]
        consumed.add(source)
      break
    else:
      if name in ckpt_flat:
        values[name] = ckpt_flat[name]
        consumed.add(name)
  unused = [p for p, _ in (assignment_map or ()) if p not in used]
  if unused:
    raise CheckpointMismatchError(
        f'assignment_map: pattern(s) {unused} match no parameter of the model. Patterns must '
        "match whole state-dict names, e.g. r'target/decoder/logits_dense/kernel' or "
        r"r'(.*)/layers_1/(.*)'.")
  return values, skipped, [n for n in ckpt_flat if n not in consumed]


def _as(value, dtype) -> np.ndarray:
  """numpy in `dtype`, without a host copy when it already is (device_put copies anyway)."""
  return np.asarray(value).astype(dtype, copy=False)


def _strip(flat: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _match_params(state_dict: dict, abstract_params, restore_cfg, path: str,
                  abstract_param_states=None, init_params=None):
  """Model parameters (numpy, nested) from a state dict, after the assignment map and the
  compatibility check; also the assigned values by full name (optimizer slots included when
  `abstract_param_states`, the optimizer's, is given). Parameters left fresh (assignment map
  None, fallback_to_scratch) take their values from `init_params()`."""
  abstract_flat = formats.flatten(abstract_params)
  model_shape_flat = {k: tuple(v.shape) for k, v in abstract_flat.items()}
  model_names = [TARGET + n for n in abstract_flat]
  with_optimizer = abstract_param_states is not None
  if with_optimizer:
    abstract_opt = formats.flatten(abstract_param_states)
    model_names += [PARAM_STATES + n for n, a in abstract_opt.items() if hasattr(a, 'shape')]
  ckpt_full = formats.flatten(state_dict)
  if not with_optimizer:
    ckpt_full = {k: v for k, v in ckpt_full.items() if k.startswith(TARGET)}
  values, skipped, unused = apply_assignment_map(model_names, ckpt_full,
                                                 restore_cfg.assignment_map)
  ckpt_params = _strip(values, TARGET)
  # Checkpoint parameters nothing took: "extra" unless strict=False.
  extra = {n: ckpt_full[TARGET + n] for n in _strip(dict.fromkeys(unused), TARGET)
           if n not in model_shape_flat}
  ckpt_view = {**extra, **ckpt_params}
  fresh = check_compatible(model_shape_flat, ckpt_view,
                           [n[len(TARGET):] for n in skipped if n.startswith(TARGET)],
                           restore_cfg.strict, restore_cfg.fallback_to_scratch, path,
                           describe_flat=formats.flatten(formats.params_of(state_dict)))
  restore_dtype = jnp.dtype(restore_cfg.dtype) if restore_cfg.dtype else None
  if fresh:
    log.info('%d parameter(s) keep their initial values: %s', len(fresh), fresh[:10])
    if init_params is None:
      raise CheckpointMismatchError(f'{path}: {fresh[:10]} would need initial values here')
    initial = formats.flatten(jax.device_get(init_params()))
  flat = {}
  for name, a in abstract_flat.items():
    value = ckpt_params[name] if name in ckpt_params else initial[name]
    flat[name] = _as(value, restore_dtype or a.dtype)
  return traverse_util.unflatten_dict(flat, sep='/'), values


def state_from_state_dict(state_dict: dict, trainer, restore_cfg=None, path: str = ''):
  """Matches a numpy state dict to the trainer's model and places it on the mesh.

  Parameters: by name after the assignment map; every mismatch in one error. dtype: the
  restored parameters are cast to it (t5x's restore dtype; None keeps the model's float32).
  Optimizer state: each parameter's slots are restored when the checkpoint has them in this
  optimizer's layout (t5x's Adafactor, for every public checkpoint), else start at zero; the
  optimizer's step counter is the checkpoint's step either way, as in t5x.
  """
  restore_cfg = restore_cfg or ckpt_lib.RestoreCheckpointConfig()
  layout = trainer.layout
  abstract_states = formats.param_states_of(layout.abstract.state_dict())
  params, values = _match_params(
      state_dict, layout.abstract.params, restore_cfg, path, abstract_states,
      init_params=lambda: trainer.init_state(jax.random.PRNGKey(0)).params)
  step = int(np.asarray(formats.step_of(state_dict)))
  state = trainer.state_from_params(params, step=step)

  # Optimizer state: slot by slot, where the checkpoint has it with this optimizer's shapes.
  fresh_opt = traverse_util.flatten_dict(
      formats.param_states_of(state.state_dict()), sep='/',
      keep_empty_nodes=True)
  ckpt_slots = _strip(values, PARAM_STATES)
  restored, merged = 0, {}
  for name, ref in fresh_opt.items():
    value = ckpt_slots.get(name)
    if hasattr(ref, 'shape') and value is not None and np.shape(value) == ref.shape:
      merged[name] = jax.device_put(_as(value, ref.dtype), ref.sharding)
      restored += 1
    else:
      merged[name] = ref
  state = state.restore_state_dict(
      formats.make_state_dict(state.params, step, traverse_util.unflatten_dict(merged, sep='/')))
  # The step counters (TrainState.step, Adafactor's count) become separate buffers on the
  # mesh: the train step donates the state, and one buffer cannot be donated twice.
  state = jax.device_put(state, layout.shardings)
  n_slots = sum(hasattr(r, 'shape') for r in fresh_opt.values())
  if restored:
    log.info('restored %d of %d optimizer state arrays from the checkpoint', restored, n_slots)
  elif formats.param_states_of(state_dict):
    log.info('the checkpoint optimizer state does not match this optimizer: starting a '
             'fresh optimizer state')
  return state


def load(path: str, trainer, restore_cfg=None):
  """INITIAL_CHECKPOINT_PATH -> TrainState on the trainer's mesh."""
  restore_cfg = restore_cfg or ckpt_lib.RestoreCheckpointConfig()
  state = _restore_in_place(path, trainer, restore_cfg)
  if state is None:
    state = state_from_state_dict(read_state_dict(path), trainer, restore_cfg, path)
  return layout_lib.unshared(state)


def _restorable_in_place(path: str, restore_cfg) -> bool:
  """An orbax checkpoint and no assignment map: orbax can restore it into the shards."""
  if restore_cfg.assignment_map or detect_format(path) != 'orbax':
    return False
  from t5tpu.formats import t5x_orbax
  t5x_orbax.check_metadata(path)  # else orbax's bare JSONDecodeError
  return True


def _restore_in_place(path: str, trainer, restore_cfg):
  """An orbax checkpoint with exactly the model's parameters and this optimizer's state,
  restored straight into its shards: no host copy of the model (an 11B one would not fit).
  None when names must be matched (assignment map, other parameters, another optimizer's
  state, another format): the general path does that, and explains any mismatch."""
  if not _restorable_in_place(path, restore_cfg):
    return None
  abstract = trainer.layout.abstract_with_shardings()
  model = {k: tuple(v.shape) for k, v in formats.flatten(abstract.params).items()}
  try:
    if ckpt_lib.param_shapes(path) != model:
      return None
    state_dict = ckpt_lib.read_state_dict(path, abstract.state_dict())
  except (ValueError, KeyError, TypeError, OSError) as e:  # another structure, or damage
    log.info('%s: not restored in place (%s); matching names and shapes', path, e)
    return None
  state_dict = formats.with_params(
      state_dict, formats.cast_floating(formats.params_of(state_dict), restore_cfg.dtype))
  log.info('restored %s in place: parameters and optimizer state', path)
  return trainer.layout.abstract.restore_state_dict(state_dict)


def load_params(path: str, layout, restore_cfg=None, init_params=None):
  """Only the parameters of a checkpoint (any format), placed in `layout` (a ParamLayout).

  For evaluation, inference and a delta run's base: the optimizer state is never read or
  allocated. Orbax checkpoints are restored straight into their shards. `init_params()`
  gives the values of parameters the restore config leaves fresh.
  """
  restore_cfg = restore_cfg or ckpt_lib.RestoreCheckpointConfig()
  if _restorable_in_place(path, restore_cfg):
    try:
      params = ckpt_lib.restore_params(path.rstrip('/'), layout.abstract_with_shardings())
      return formats.cast_floating(params, restore_cfg.dtype)
    except (ValueError, KeyError, OSError) as e:  # a mismatch, or damage: explained below
      log.info('direct restore failed (%s); checking names and shapes', e)
  params, _ = _match_params(read_state_dict(path), layout.abstract, restore_cfg, path,
                            init_params=init_params)
  return jax.device_put(params, layout.shardings)


def checkpoint_step(path: str) -> Optional[int]:
  """The step a checkpoint path names (checkpoint_<N> or model.ckpt-<N>), else None."""
  m = re.search(r'(?:checkpoint_|ckpt-)(\d+)/?$', path)
  return int(m.group(1)) if m else None
