"""What every benchmark sets up the same way: the model shape from the flags, and the same
shape as a transformers T5 (config.json as `t5tpu convert --to hf` writes it)."""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

# t5tpu is measured as its commands run it: on a CPU they restart with huge pages for malloc's
# large blocks (t5tpu/runtime_env.py), so this process does too, before anything is imported.
# Both systems then share that environment; T5TPU_HUGE_PAGES=0 measures without it.
from t5tpu import runtime_env  # pylint: disable=wrong-import-position

runtime_env.use_huge_pages(model_command=True)


def malloc_setting() -> str:
  """How this process's malloc was set up, for the tables' header."""
  tunables = os.environ.get('GLIBC_TUNABLES')
  return f'GLIBC_TUNABLES={tunables}' if tunables else 'default malloc'


def model_config(args):
  """(T5Config, activation dtype) of --model, --vocab and --dtype ('auto': bfloat16 on
  accelerators, float32 on CPU); dropout only where the benchmark has --dropout (each system
  then drops out where its T5 does), none otherwise, so both do the same work."""
  import jax
  from t5tpu import model_shapes
  cfg = model_shapes.named_configs()[args.model]
  on_cpu = jax.devices()[0].platform == 'cpu'
  dtype = args.dtype if args.dtype != 'auto' else ('float32' if on_cpu else 'bfloat16')
  cfg = dataclasses.replace(cfg, dtype=dtype, dropout_rate=getattr(args, 'dropout', 0.0),
                            vocab_size=args.vocab or cfg.vocab_size)
  return cfg, dtype


def hf_t5(cfg):
  """(a randomly initialised T5ForConditionalGeneration of `cfg`'s shape, its device)."""
  import torch
  import transformers
  from t5tpu.formats import hf
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  config = transformers.T5Config(**hf.config_to_hf(cfg))
  return transformers.T5ForConditionalGeneration(config).to(device), device
