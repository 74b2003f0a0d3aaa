"""Model shapes: named configs from gin/models, the shape a parameter tree implies, and the
one error that lists every way a checkpoint does not fit a model.

Used for clear errors ("the checkpoint looks like t5_1_1/base") and parameter counts.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
from gin import config_parser

from t5tpu import errors
from t5tpu.network import T5Config

class _Reference:
  """A '%MACRO' or '@configurable' value as gin's parser hands it over."""

  def __init__(self, name: str, is_macro: bool):
    self.name, self.is_macro = name, is_macro


class _Delegate(config_parser.ParserDelegate):

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _Reference(scoped_configurable_name, is_macro=False)

  def macro(self, macro_name):
    return _Reference(macro_name, is_macro=True)


def _statements(path: str, root: str) -> Iterator[config_parser.BindingStatement]:
  """Every binding of a gin file and the files it includes (gin's own parser, no gin state)."""
  with open(path) as f:
    for statement in config_parser.ConfigParser(f, _Delegate()):
      if isinstance(statement, config_parser.IncludeStatement):
        included = statement.filename
        if not os.path.isabs(included):
          included = os.path.join(root, included)
        yield from _statements(included, root)
      elif isinstance(statement, config_parser.BindingStatement):
        yield statement


def t5_config_bindings(path: str, root: str) -> Dict[str, object]:
  """The network.T5Config arguments a model gin binds, macros resolved from the same files.

  A field bound to a macro the files leave unset (DROPOUT_RATE = %gin.REQUIRED, set by the run
  gin) or to a configurable is left out, so it takes T5Config's default.
  """
  macros, fields = {}, {}
  for b in _statements(path, root):
    if not b.arg_name and not b.scope:
      macros[b.selector] = b.value
    elif b.selector.split('.')[-1] == 'T5Config' and not b.scope:
      fields[b.arg_name] = b.value
  out = {}
  for name, value in fields.items():
    while isinstance(value, _Reference) and value.is_macro and value.name in macros:
      value = macros[value.name]
    if name in T5Config.__dataclass_fields__ and not isinstance(value, _Reference):
      out[name] = tuple(value) if name == 'mlp_activations' else value
  return out


def config_from_gin_file(path: str) -> T5Config:
  """The T5Config a model gin file describes (includes resolved against gin/)."""
  from t5tpu.gin_utils import gin_config_dir
  return T5Config(**t5_config_bindings(path, gin_config_dir()))


@functools.lru_cache(maxsize=None)
def named_configs() -> Dict[str, T5Config]:
  """{'t5_1_1/base': T5Config(...), ...} from the model gin files (parsed, no gin state)."""
  from t5tpu.gin_utils import gin_config_dir
  root = gin_config_dir()
  out = {}
  for path in sorted(glob.glob(os.path.join(root, 'models', '*', '*.gin'))):
    name = os.path.relpath(path, os.path.join(root, 'models'))[:-len('.gin')]
    if os.path.basename(name).startswith('_'):
      continue
    out[name] = T5Config(**t5_config_bindings(path, root))
  return out


def config_from_param_shapes(shapes: Mapping[str, Tuple[int, ...]]) -> T5Config:
  """The T5Config implied by a flat {'/'-name: shape} parameter dict (t5x names)."""
  vocab, emb = shapes['token_embedder/embedding']
  heads = shapes['encoder/relpos_bias/rel_embedding'][0]
  inner = shapes['encoder/layers_0/attention/query/kernel'][1]
  count = lambda stack: len({k.split('/')[1] for k in shapes
                             if k.startswith(f'{stack}/layers_')})
  gated = 'encoder/layers_0/mlp/wi_0/kernel' in shapes
  mlp = shapes['encoder/layers_0/mlp/' + ('wi_0' if gated else 'wi') + '/kernel'][1]
  return T5Config(vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=inner // heads,
                  num_encoder_layers=count('encoder'), num_decoder_layers=count('decoder'),
                  mlp_dim=mlp, mlp_activations=('gelu', 'linear') if gated else ('relu',),
                  logits_via_embedding='decoder/logits_dense/kernel' not in shapes)


_SHAPE_FIELDS = ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'num_encoder_layers',
                 'num_decoder_layers', 'mlp_dim', 'logits_via_embedding')


def describe(cfg: T5Config) -> str:
  act = 'gated ' + cfg.mlp_activations[0] if len(cfg.mlp_activations) > 1 else \
      cfg.mlp_activations[0]
  text = (f'emb {cfg.emb_dim}, {cfg.num_heads} heads x {cfg.head_dim}, '
          f'{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, mlp {cfg.mlp_dim} '
          f'({act}), vocab {cfg.vocab_size}, '
          f"{'tied' if cfg.logits_via_embedding else 'untied'} logits")
  key = lambda c: tuple(getattr(c, f) for f in _SHAPE_FIELDS) + (len(c.mlp_activations),)
  matches = [n for n, c in named_configs().items() if key(c) == key(cfg)]
  return (f"{' / '.join(matches)} ({text})") if matches else f'no named model ({text})'


# ----------------------------------------------------------------------------- mismatches

class CheckpointMismatchError(errors.UserError):  # a ValueError too
  """The checkpoint does not fit the configured model (the message lists every mismatch)."""


def describe_checkpoint_model(flat_params: dict) -> str:
  """A guess at the model a parameter dict belongs to, e.g. 't5_1_1/base (...)'."""
  try:
    cfg = config_from_param_shapes(
        {k: _shape(v) for k, v in flat_params.items()})
  except KeyError as e:
    return f'not a complete T5 (it has no {e.args[0]})'
  except (ValueError, IndexError, TypeError) as e:
    return f'(could not infer its shape: {e})'
  return describe(cfg)


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
