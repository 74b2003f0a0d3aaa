"""Model shapes: named configs from gin/models, and the shape a parameter tree implies.

Used for clear errors ("the checkpoint looks like t5_1_1/base") and parameter counts.
"""
from __future__ import annotations

import functools
import glob
import os
import re
from typing import Dict, Mapping, Tuple

from t5tpu.network import T5Config

_BINDING = re.compile(r'^\s*(?:network\.)?T5Config\.(\w+)\s*=\s*(.+?)\s*$')
_INCLUDE = re.compile(r"^\s*include\s+['\"](.+?)['\"]")
_BLOCK_START = re.compile(r'^\s*(?:network\.)?T5Config\s*:\s*$')
_BLOCK_ITEM = re.compile(r'^\s+(\w+)\s*=\s*(.+?)\s*$')


def _parse_value(text: str):
  import ast
  text = text.split('#', 1)[0].strip()
  try:
    return ast.literal_eval(text.replace('_', '') if text.replace('_', '').isdigit() else text)
  except (ValueError, SyntaxError):
    return text


def _read_bindings(path: str, root: str) -> Dict[str, object]:
  values: Dict[str, object] = {}
  in_block = False
  with open(path) as f:
    for line in f:
      inc = _INCLUDE.match(line)
      if inc:
        values.update(_read_bindings(os.path.join(root, inc.group(1)), root))
        continue
      if _BLOCK_START.match(line):
        in_block = True
        continue
      if in_block:
        item = _BLOCK_ITEM.match(line)
        if item:
          values[item.group(1)] = _parse_value(item.group(2))
          continue
        in_block = False
      b = _BINDING.match(line)
      if b:
        values[b.group(1)] = _parse_value(b.group(2))
  return values


@functools.lru_cache(maxsize=None)
def named_configs() -> Dict[str, T5Config]:
  """{'t5_1_1/base': T5Config(...), ...} from the model gin files (text only, no gin state)."""
  from t5tpu.gin_utils import gin_config_dir
  root = gin_config_dir()
  out = {}
  for path in sorted(glob.glob(os.path.join(root, 'models', '*', '*.gin'))):
    name = os.path.relpath(path, os.path.join(root, 'models'))[:-len('.gin')]
    if os.path.basename(name).startswith('_'):
      continue
    fields = {k: v for k, v in _read_bindings(path, root).items()
              if k in T5Config.__dataclass_fields__}
    if 'mlp_activations' in fields:
      fields['mlp_activations'] = tuple(fields['mlp_activations'])
    out[name] = T5Config(**fields)
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
