"""Mesh-TensorFlow T5 checkpoints (model.ckpt-N), the format of the original T5 release.

gs://t5-data/pretrained_models/{small,base,large,3B,11B} (T5 1.0), t5.1.1.* and the closed-book
QA checkpoints are TF1 checkpoints with variable names like
`encoder/block_000/layer_000/SelfAttention/q`. TensorFlow's checkpoint reader reads them
(locally or from gs:// through TF's own filesystem) and the names map one to one onto t5x's:
MTF already stores kernels as [in, out] (q/k/v [d_model, heads*d_kv], o the reverse),
relative-attention tables as [heads, buckets], and the embedding as [vocab, d_model], so no
array is transposed or reshaped.

  shared/embedding                                  token_embedder/embedding
  {enc,dec}oder/block_NNN/layer_LLL/SelfAttention/q   .../layers_N/{attention|self_attention}/query/kernel
  decoder/block_NNN/layer_001/EncDecAttention/o       .../layers_N/encoder_decoder_attention/out/kernel
  .../DenseReluDense/{wi,wi_0,wi_1,wo}/kernel         .../layers_N/mlp/{wi,wi_0,wi_1,wo}/kernel
  .../layer_LLL/layer_norm/scale                      .../layers_N/pre_*_layer_norm/scale
  {enc,dec}oder/final_layer_norm/scale                {enc,dec}oder/{enc,dec}oder_norm/scale
  block_000/layer_000/SelfAttention/relative_attention_bias   {enc,dec}oder/relpos_bias/rel_embedding
  decoder/logits/kernel (T5 1.1)                      decoder/logits_dense/kernel
  global_step                                         state/step

Adafactor slots are the variable name plus `_slot_vr`, `_slot_vc`, `_slot_v` and become
t5x's v_row, v_col, v; the slots t5x keeps and MTF does not are zeros of shape [1], as t5x's
importer makes them. MTF T5 has a relative-attention table only in block 0 (shared by the
stack); a checkpoint with one per block keeps `layers_N/relpos_bias` names.
"""
from __future__ import annotations

import logging
import re

import numpy as np

from t5tpu import storage
from t5tpu.formats import (COPY_AGAIN, CheckpointReadError, describe_error, make_state_dict,
                           param_states_of, step_of, unflatten)

log = logging.getLogger(__name__)

_SLOTS = {'_slot_vr': 'v_row', '_slot_vc': 'v_col', '_slot_v': 'v', '_slot_m': 'm'}
_SLOT = r'(?P<slot>_slot_(?:vr|vc|v|m))?'
_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_NORMS = {'encoder': ('pre_attention_layer_norm', 'pre_mlp_layer_norm'),
          'decoder': ('pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm',
                      'pre_mlp_layer_norm')}


def _relpos(m):
  stack, block = m.group(1), int(m.group(2))
  return f'{stack}/layers_{block}/relpos_bias/rel_embedding'


def _attention(m):
  stack, block, kind, w = m.group(1), int(m.group(2)), m.group(3), m.group(4)
  if stack == 'encoder':
    module = 'attention'
  else:
    module = 'self_attention' if kind == 'SelfAttention' else 'encoder_decoder_attention'
  return f'{stack}/layers_{block}/{module}/{_ATTENTION[w]}/kernel'


def _mlp(m):
  return f'{m.group(1)}/layers_{int(m.group(2))}/mlp/{m.group(3)}/kernel'


def _norm(m):
  stack, block, sub = m.group(1), int(m.group(2)), int(m.group(3))
  return f'{stack}/layers_{block}/{_NORMS[stack][sub]}/scale'


# (regex over the MTF name without its slot suffix, t5x name builder); first match wins.
_RULES = [
    (r'shared/embedding', lambda m: 'token_embedder/embedding'),
    (r'(encoder|decoder)/block_(\d+)/layer_000/SelfAttention/relative_attention_bias',
     _relpos),
    (r'(encoder|decoder)/block_(\d+)/layer_\d+/(SelfAttention|EncDecAttention)/([qkvo])',
     _attention),
    (r'(encoder|decoder)/block_(\d+)/layer_\d+/DenseReluDense/(wi|wi_0|wi_1|wo)/kernel', _mlp),
    (r'(encoder|decoder)/block_(\d+)/layer_(\d+)/(?:layer_norm|rms_norm)/scale', _norm),
    (r'(encoder|decoder)/(?:final_layer_norm|rms_norm)/scale',
     lambda m: f'{m.group(1)}/{m.group(1)}_norm/scale'),
    (r'decoder/logits/kernel', lambda m: 'decoder/logits_dense/kernel'),
]
_COMPILED = [(re.compile(pattern + _SLOT), fn) for pattern, fn in _RULES]


def t5x_name(mtf_name: str):
  """(t5x parameter name, slot or None) for an MTF variable; None if it is not a parameter."""
  for pattern, fn in _COMPILED:
    m = pattern.fullmatch(mtf_name)
    if m:
      slot = m.group('slot')
      return fn(m), (_SLOTS[slot] if slot else None)
  return None


def translate(variables: dict) -> dict:
  """{MTF name: array} -> t5x's state dict (see the module docstring)."""
  params, slots, step, ignored = {}, {}, 0, []
  for name, value in variables.items():
    if name == 'global_step':
      step = int(np.asarray(value))
      continue
    mapped = t5x_name(name)
    if mapped is None:
      ignored.append(name)
      continue
    param, slot = mapped
    if slot is None:
      params[param] = np.asarray(value)
    else:
      slots.setdefault(param, {})[slot] = np.asarray(value)
  if ignored:
    log.warning('ignoring %d MTF variable(s) that are not T5 parameters: %s', len(ignored),
                ignored[:10])

  # One relative-attention table per stack (in block 0) is the T5 layout: drop `layers_0/`.
  for stack in ('encoder', 'decoder'):
    tables = [k for k in params if k.startswith(f'{stack}/layers_') and '/relpos_bias/' in k]
    if tables == [f'{stack}/layers_0/relpos_bias/rel_embedding']:
      shared = f'{stack}/relpos_bias/rel_embedding'
      params[shared] = params.pop(tables[0])
      if tables[0] in slots:
        slots[shared] = slots.pop(tables[0])

  param_states = {}
  if slots:
    for param in params:
      have = slots.get(param, {})
      param_states[param] = {s: have.get(s, np.zeros((1,), np.float32))
                             for s in ('m', 'v', 'v_col', 'v_row')}
    orphans = sorted(set(slots) - set(params))
    if orphans:
      raise ValueError(f'optimizer slots without their parameter: {orphans[:10]}')
  return make_state_dict(unflatten(params), step,
                         unflatten(param_states) if param_states else None)


def read_variables(prefix: str) -> dict:
  """Every variable of the TF checkpoint `prefix` (model.ckpt-N) as numpy."""
  import tensorflow as tf
  try:
    reader = tf.train.load_checkpoint(prefix)
    return {name: np.asarray(reader.get_tensor(name))
            for name in sorted(reader.get_variable_to_shape_map())}
  except (tf.errors.OpError, IndexError, ValueError) as e:
    # A cut-off .index is an OpError ('not an sstable'); a cut-off .data-* file an
    # IndexError ('Read less bytes than requested') from TF's reader.
    damage = ('some of its files are missing' if isinstance(e, tf.errors.NotFoundError) else
              'its .index or .data-* files are truncated or damaged')
    raise CheckpointReadError(f'cannot read the TF checkpoint {prefix} ({describe_error(e)}): '
                              f'{damage}: {COPY_AGAIN}') from None


def read(prefix: str) -> dict:
  """The MTF checkpoint `prefix` (local or gs://, e.g. .../model.ckpt-1000000)."""
  state = translate(read_variables(prefix))
  log.info('read MTF checkpoint %s (step %d%s)', prefix, step_of(state),
           ', with Adafactor slots' if param_states_of(state) is not None else '')
  return state


def latest_in_dir(directory: str) -> str:
  """The newest model.ckpt-N of a TF model directory, from its `checkpoint` state file.

  The state file may name the checkpoint by an absolute path where it was trained; only its
  base name is used, so a copied directory works.
  """
  text = storage.read_text(storage.join(directory, 'checkpoint'))
  m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
  if not m:
    raise CheckpointReadError(f'{directory}/checkpoint names no model_checkpoint_path: point '
                              'the path at a model.ckpt-N prefix instead')
  name = m.group(1).rstrip('/').split('/')[-1]
  return storage.join(directory, name)
