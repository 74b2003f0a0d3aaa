"""INITIAL_CHECKPOINT_PATH: read a checkpoint of any supported format into a TrainState.

formats.detect tells the formats apart by what the path holds and reads any of them; each
reader returns t5x's state dict {'target': params, 'state': {'step', 'param_states'}}
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
from t5tpu import errors
from t5tpu.formats.detect import detect_format, read_state_dict

log = logging.getLogger(__name__)


class CheckpointMismatchError(errors.UserError):  # a ValueError too
  """The checkpoint does not fit the configured model (the message lists every mismatch)."""


# ----------------------------------------------------------------------------- matching
#
# Names are t5x's full state-dict names, as in t5x's assignment maps and error messages:
# 'target/encoder/layers_0/attention/query/kernel', 'state/param_states/.../v_row', 'state/step'.

TARGET = 'target/'
PARAM_STATES = 'state/param_states/'


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


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


def describe_checkpoint_model(flat_params: dict) -> str:
  """A guess at the model a parameter dict belongs to, e.g. 't5_1_1/base (...)'."""
  from t5tpu import model_shapes
  try:
    cfg = model_shapes.config_from_param_shapes(
        {k: _shape(v) for k, v in flat_params.items()})
  except KeyError as e:
    return f'not a complete T5 (it has no {e.args[0]})'
  except (ValueError, IndexError, TypeError) as e:
    return f'(could not infer its shape: {e})'
  return model_shapes.describe(cfg)


def _shape(value) -> tuple:
  """The shape of an array, or a shape given as a tuple."""
  return tuple(value) if isinstance(value, tuple) else tuple(np.shape(value))


def _architecture_hints(model_names, ckpt_names) -> list:
  """What to change when the checkpoint is the other T5 generation (t5x #1196)."""
  model_names, ckpt_names = set(model_names), set(ckpt_names)
  logits = 'decoder/logits_dense/kernel'
  hints = []
  if logits in ckpt_names and logits not in model_names:
    hints.append('the checkpoint has a separate output layer (decoder/logits_dense: T5 1.1, '
                 'Flan-T5) but the model computes logits through the embedding (T5 1.0): '
                 'set T5Config.logits_via_embedding = False, or use a t5_1_1 model gin')
  if logits in model_names and logits not in ckpt_names:
    hints.append('the checkpoint computes logits through its embedding (T5 1.0) but the '
                 'model has decoder/logits_dense (T5 1.1): set '
                 'T5Config.logits_via_embedding = True, or use a t5_1_0 model gin')
  has = lambda names, w: any(f'/mlp/{w}/' in n for n in names)
  if has(ckpt_names, 'wi_0') and has(model_names, 'wi'):
    hints.append("the checkpoint's FFN is gated (mlp/wi_0, wi_1: T5 1.1): set "
                 "T5Config.mlp_activations = ('gelu', 'linear')")
  if has(ckpt_names, 'wi') and has(model_names, 'wi_0'):
    hints.append("the checkpoint's FFN is not gated (mlp/wi: T5 1.0): set "
                 "T5Config.mlp_activations = ('relu',)")
  return hints


def _listing(items, limit: int = 20) -> list:
  """Indented lines, shallow names first (the embedding says more than layer 7's kernel)."""
  items = sorted(items, key=lambda item: (item[0].count('/'), item[0]))
  lines = [f'    {text}' for _, text in items[:limit]]
  if len(items) > limit:
    lines.append(f'    ... and {len(items) - limit} more')
  return lines


def check_compatible(model_shapes_flat: dict, ckpt_flat: dict, skipped=(), strict=True,
                     fallback_to_scratch=False, path: str = '',
                     describe_flat: Optional[dict] = None) -> list:
  """Raises one CheckpointMismatchError listing every mismatch; returns names to init fresh.

  Both dicts are keyed by parameter name ('encoder/layers_0/...'); `describe_flat` (default:
  ckpt_flat) is what the error's "the checkpoint looks like" is inferred from.
  """
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
    lines += _listing([(n, f'{n}: {c} vs {m}') for n, c, m in wrong])
  if missing:
    lines.append(f'  {len(missing)} model parameter(s) missing from the checkpoint:')
    lines += _listing([(n, n) for n in missing])
  if unexpected:
    lines.append(f'  {len(unexpected)} checkpoint parameter(s) the model does not have:')
    lines += _listing([(n, n) for n in unexpected])
  lines.append('  the checkpoint looks like: '
               f'{describe_checkpoint_model(describe_flat or ckpt_flat)}')
  lines.append(f'  the configured model is:   {describe_checkpoint_model(model_shapes_flat)}')
  lines += [f'  hint: {h}' for h in _architecture_hints(model_shapes_flat, ckpt_flat)]
  lines.append('  fix: include the model gin that matches the checkpoint (gin/models/...), '
               'or map names with RestoreCheckpointConfig.assignment_map (strict=False '
               'ignores extra checkpoint parameters, fallback_to_scratch=True initializes '
               'missing ones). If MODEL_DIR holds checkpoints of another model, use a fresh '
               'MODEL_DIR (resume takes MODEL_DIR before INITIAL_CHECKPOINT_PATH).')
  raise CheckpointMismatchError('\n'.join(lines))


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
  abstract_flat = _flat(abstract_params)
  model_shape_flat = {k: tuple(v.shape) for k, v in abstract_flat.items()}
  model_names = [TARGET + n for n in abstract_flat]
  with_optimizer = abstract_param_states is not None
  if with_optimizer:
    abstract_opt = _flat(abstract_param_states)
    model_names += [PARAM_STATES + n for n, a in abstract_opt.items() if hasattr(a, 'shape')]
  ckpt_full = _flat(state_dict)
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
                           describe_flat=_flat(state_dict.get('target')))
  restore_dtype = jnp.dtype(restore_cfg.dtype) if restore_cfg.dtype else None
  if fresh:
    log.info('%d parameter(s) keep their initial values: %s', len(fresh), fresh[:10])
    if init_params is None:
      raise CheckpointMismatchError(f'{path}: {fresh[:10]} would need initial values here')
    initial = _flat(jax.device_get(init_params()))
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
  abstract_states = layout.abstract.state_dict(trainer.optimizer_def)['state']['param_states']
  params, values = _match_params(
      state_dict, layout.abstract.params, restore_cfg, path, abstract_states,
      init_params=lambda: trainer.init_state(jax.random.PRNGKey(0)).params)
  step = int(np.asarray(state_dict.get('state', {}).get('step', 0)))
  state = trainer.state_from_params(params, step=step)

  # Optimizer state: slot by slot, where the checkpoint has it with this optimizer's shapes.
  fresh_opt = traverse_util.flatten_dict(
      state.state_dict(trainer.optimizer_def)['state']['param_states'], sep='/',
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
      {'target': state.params,
       'state': {'step': step, 'param_states': traverse_util.unflatten_dict(merged, sep='/')}},
      trainer.optimizer_def)
  # The step counters (TrainState.step, Adafactor's count) become separate buffers on the
  # mesh: the train step donates the state, and one buffer cannot be donated twice.
  state = jax.device_put(state, layout.shardings)
  n_slots = sum(hasattr(r, 'shape') for r in fresh_opt.values())
  if restored:
    log.info('restored %d of %d optimizer state arrays from the checkpoint', restored, n_slots)
  elif state_dict.get('state', {}).get('param_states'):
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


def load_params(path: str, layout, restore_cfg=None, init_params=None):
  """Only the parameters of a checkpoint (any format), placed in `layout` (a ParamLayout).

  For evaluation, inference and a delta run's base: the optimizer state is never read or
  allocated. Orbax checkpoints are restored straight into their shards. `init_params()`
  gives the values of parameters the restore config leaves fresh.
  """
  restore_cfg = restore_cfg or ckpt_lib.RestoreCheckpointConfig()
  abstract = layout.abstract_with_shardings()
  if detect_format(path) == 'orbax' and not restore_cfg.assignment_map:
    from t5tpu.formats import t5x_orbax
    t5x_orbax.check_metadata(path)  # else orbax's bare JSONDecodeError
    try:
      params = ckpt_lib.restore_params(path.rstrip('/'), abstract)
      return ckpt_lib.cast_params(params, restore_cfg.dtype)
    except (ValueError, KeyError, OSError) as e:  # a mismatch, or damage: explained below
      log.info('direct restore failed (%s); checking names and shapes', e)
  params, _ = _match_params(read_state_dict(path), layout.abstract, restore_cfg, path,
                            init_params=init_params)
  return jax.device_put(params, layout.shardings)


def checkpoint_step(path: str) -> int:
  """The step a checkpoint path names (checkpoint_<N> or model.ckpt-<N>), else 0."""
  m = re.search(r'(?:checkpoint_|ckpt-)(\d+)/?$', path)
  return int(m.group(1)) if m else 0
