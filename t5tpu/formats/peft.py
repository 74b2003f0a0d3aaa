"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) for T5.

PEFT names a LoRA weight by the Hugging Face module it adapts:
`base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` [rank, in] and
`...lora_B.weight` [out, rank], scaled by lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). t5tpu's are `encoder/layers_0/attention/query/lora_a` [in, rank] and `lora_b`
[rank, out]: the same numbers, transposed, under t5x's module names (formats.hf.name_pairs).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Optional

import numpy as np

from t5tpu import errors, network, storage
from t5tpu.formats import flatten

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'


class AdapterError(errors.UserError):
  """A PEFT adapter t5tpu cannot read or write (the message says why)."""


def is_adapter(path: str) -> bool:
  return storage.exists(storage.join(path.rstrip('/'), CONFIG_NAME))


def _module_pairs(cfg: network.T5Config) -> dict:
  """{HF module path (…SelfAttention.q): t5x module path (…/attention/query)}."""
  from t5tpu.formats import hf
  return {hf_name[:-len('.weight')]: t5x_name[:-len('/kernel')]
          for hf_name, t5x_name, transpose in hf.name_pairs(cfg) if transpose
          and t5x_name.endswith('/kernel')}


def read(path: str, cfg: network.T5Config):
  """(delta.LoRA, {t5x name: array}) of the PEFT LoRA adapter directory at `path`."""
  from safetensors.numpy import load
  from t5tpu import delta
  path = path.rstrip('/')
  config = json.loads(storage.read_text(storage.join(path, CONFIG_NAME)))
  if config.get('peft_type', 'LORA').upper() != 'LORA':
    raise AdapterError(f'{path}: a {config.get("peft_type")} adapter; t5tpu reads PEFT LoRA '
                       'adapters only')
  for key, ok in (('use_dora', False), ('fan_in_fan_out', False)):
    if bool(config.get(key, ok)) != ok:
      raise AdapterError(f'{path}: {key}={config[key]} is not supported (plain LoRA only)')
  if config.get('bias', 'none') != 'none':
    raise AdapterError(f'{path}: bias={config["bias"]!r}: t5tpu reads LoRA weights only '
                       "(bias='none')")
  local = storage.join(path, WEIGHTS_NAME)
  with storage.open_file(local, 'rb') as f:
    tensors = load(f.read())
  modules = _module_pairs(cfg)
  out, rank = {}, int(config['r'])
  pattern = re.compile(r'^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$')
  for name, value in tensors.items():
    m = pattern.match(name)
    if m is None or m.group(1) not in modules:
      raise AdapterError(f'{path}: weight {name!r} is not a LoRA weight of a T5 projection '
                         f'this model has (e.g. {_PREFIX}encoder.block.0.layer.0.'
                         'SelfAttention.q.lora_A.weight)')
    t5x = modules[m.group(1)] + ('/lora_a' if m.group(2) == 'A' else '/lora_b')
    out[t5x] = np.ascontiguousarray(np.asarray(value, np.float32).T)
  alpha = float(config.get('lora_alpha', rank))
  if config.get('use_rslora'):  # scale alpha / sqrt(r): the same as (alpha sqrt(r)) / r
    alpha = alpha * math.sqrt(rank)
  targets = tuple(sorted({re.escape(k.rsplit('/', 1)[0]) for k in out}))
  lora = delta.LoRA(rank=rank, alpha=alpha, dropout=float(config.get('lora_dropout', 0.0)),
                    targets=targets)
  return lora, out


def write(path: str, lora, params: dict, cfg: network.T5Config,
          base_model_name_or_path: Optional[str] = None) -> str:
  """Writes the LoRA parameters (t5x-named, in `params`) as a PEFT adapter directory."""
  from safetensors.numpy import save_file
  flat = flatten(params)
  hf_of = {v: k for k, v in _module_pairs(cfg).items()}
  tensors, modules = {}, set()
  for name, value in flat.items():
    module, leaf = name.rsplit('/', 1)
    if leaf not in ('lora_a', 'lora_b'):
      raise AdapterError(f'{name}: a PEFT LoRA adapter holds LoRA weights only')
    modules.add(hf_of[module])
    tensors[f'{_PREFIX}{hf_of[module]}.lora_{"A" if leaf == "lora_a" else "B"}.weight'] = \
        np.ascontiguousarray(np.asarray(value, np.float32).T)
  config = {
      'peft_type': 'LORA', 'task_type': 'SEQ_2_SEQ_LM', 'r': lora.rank,
      'lora_alpha': lora.alpha, 'lora_dropout': lora.dropout, 'bias': 'none',
      'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
      'init_lora_weights': True, 'inference_mode': True,
      'base_model_name_or_path': base_model_name_or_path,
      # A regex over HF module names: exactly the projections that have weights here.
      'target_modules': '^(' + '|'.join(re.escape(m) for m in sorted(modules)) + ')$',
      'modules_to_save': None,
  }
  remote = storage.is_remote(path)
  local = tempfile.mkdtemp(prefix='t5tpu-peft-') if remote else path
  os.makedirs(local, exist_ok=True)
  save_file(tensors, os.path.join(local, WEIGHTS_NAME), metadata={'format': 'pt'})
  with open(os.path.join(local, CONFIG_NAME), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if remote:
    storage.filesystem(path).put(local.rstrip('/') + '/', path.rstrip('/') + '/',
                                 recursive=True)
  return path
