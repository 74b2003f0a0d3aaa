"""`t5tpu convert`: checkpoints from any supported format to Hugging Face, legacy T5X or orbax.

  t5tpu convert --from=/runs/qa --to=/export/qa-hf --to_format=hf \
      --vocab=gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model
  t5tpu convert --from=gs://t5-data/pretrained_models/t5.1.1.small/model.ckpt-1000000 \\
      --to=/ckpts/t5_1_1_small --to_format=orbax
  t5tpu convert --from=/export/flan-t5-base --to=/ckpts/flan --to_format=t5x_legacy

--from is anything INITIAL_CHECKPOINT_PATH accepts (T5X checkpoint_N dir or msgpack file,
orbax checkpoint_N, MTF model.ckpt-N or its directory, HF model dir, hub name such as
hf://google/flan-t5-base), or a MODEL_DIR, whose latest checkpoint is taken. The model's
shape comes from the HF config.json, else from --model_gin (a gin file or a name such as
t5_1_1/base), else from the parameter shapes (gated FFN => T5 1.1's gated GELU, else ReLU;
relative attention max distance 128).

For --to_format=hf, --vocab (the run's SentencePiece model; --vocab_extra_ids as in its
seqio.SentencePieceVocabulary) also writes the T5Tokenizer files, so the export serves text.

Delta tuning: --from a delta MODEL_DIR (or one of its checkpoints) writes the base with the
delta merged in (LoRA; BitFit's layer norm scales), or, with --to_format=peft, the LoRA
weights as a PEFT adapter (adapter_config.json + adapter_model.safetensors) for the base
exported on its own. --from a PEFT LoRA adapter directory with --base=<its base model> writes
the merged model. The base is the one the delta run recorded, unless --base names it.

--to for t5x_legacy and orbax is either a checkpoint_<step> directory or a MODEL_DIR that
receives checkpoint_<step>. Writing them keeps the Adafactor state when the source has one
and otherwise adds t5x's zero Adafactor state, so t5x restores the result as it restores a
public checkpoint (--params_only leaves the optimizer state out).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

from t5tpu import errors, model_shapes, network, storage
from t5tpu.formats import detect
from t5tpu.formats import (CheckpointNotFoundError, OutputExistsError, cast_floating, flatten,
                           infer_config, make_state_dict, model_param_shapes,
                           param_states_of, params_of, step_of, unflatten)

log = logging.getLogger('t5tpu.convert')
FORMATS = ('hf', 't5x_legacy', 'orbax', 'peft')
_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')


class ModelGinNotFoundError(errors.UserError, FileNotFoundError):
  """--model_gin names neither a gin file nor a known model."""


class StepMismatchError(errors.UserError, ValueError):
  """--to names a checkpoint_<step> of another step than the checkpoint's."""


# ----------------------------------------------------------------------------- inputs

def resolve_source(path: str) -> str:
  """A checkpoint path; for a MODEL_DIR holding checkpoint_<N> dirs, the newest readable one;
  `<MODEL_DIR>/best`, the best one early stopping kept."""
  from t5tpu import early_stopping
  path = early_stopping.resolve(path.rstrip('/'))
  try:
    detect.detect_format(path)
    return path
  except FileNotFoundError:
    if not storage.isdir(path):
      raise
  steps = sorted((int(m.group(1)), name) for name in storage.listdir(path)
                 for m in [_STEP_DIR.match(name.rstrip('/'))] if m)
  for _, name in reversed(steps):
    candidate = storage.join(path, name.rstrip('/'))
    try:
      detect.detect_format(candidate)
    except FileNotFoundError:
      continue  # an unfinished save
    log.info('%s is a model directory: using its latest checkpoint, %s', path, name)
    return candidate
  raise CheckpointNotFoundError(
      f'no checkpoint at {path}: the directory holds none, nor a checkpoint_<step> directory '
      f'with one; {detect.EXPECTED_LAYOUTS}, or a MODEL_DIR of such '
      'checkpoint_<step> directories')


def config_from_gin(spec: str) -> network.T5Config:
  """T5Config of a model gin: a name ('t5_1_1/base'), a gin/ path or any gin file."""
  named = model_shapes.named_configs()
  key = spec[:-len('.gin')] if spec.endswith('.gin') else spec
  key = key.split('models/', 1)[-1]
  if key in named:
    return named[key]
  if not os.path.exists(spec):
    raise ModelGinNotFoundError(f'--model_gin={spec}: neither a file nor one of '
                                f'{sorted(named)}')
  return model_shapes.config_from_gin_file(spec)


def read(path: str, model_gin: Optional[str] = None):
  """(state dict, T5Config, source path) of any supported checkpoint."""
  src = resolve_source(path)
  kind = detect.detect_format(src)
  cfg = None
  if kind == 'hf':
    from t5tpu.formats import hf
    state, cfg = hf.read_with_config(src)
  else:
    state = detect.read_state_dict(src)
  if model_gin:
    cfg = config_from_gin(model_gin)
  elif cfg is None:
    cfg = infer_config({k: np.shape(v) for k, v in flatten(params_of(state)).items()})
  # The one mismatch error of INITIAL_CHECKPOINT_PATH, if the gin does not fit.
  model_shapes.check_compatible(model_param_shapes(cfg), flatten(params_of(state)),
                                path=src)
  return state, cfg, src


@dataclasses.dataclass
class Delta:
  """A delta to export or merge: its config and its parameters (flat, t5x names)."""
  config: object  # delta.DeltaConfig
  params: dict
  source: str


def read_delta(path: str, base: Optional[str]) -> tuple:
  """(base path, Delta) when `path` is a PEFT adapter or a delta run's checkpoint, else
  (base, None). A delta run's base is its recorded one unless `base` is given."""
  from t5tpu.delta import base as delta_base
  from t5tpu.formats import peft
  if peft.is_adapter(path):
    if not base:
      raise errors.UserError(f'{path} is a PEFT adapter: give the model it adapts with '
                             '--base=<HF model dir, hub name or checkpoint>')
    return base, Delta(None, {}, path)  # read once the base's config is known
  src = resolve_source(path)
  record = delta_base.read_record(src)
  if record is None:
    return base, None
  from t5tpu import checkpoints
  params = flatten(params_of(checkpoints.read_state_dict(src)))
  return base or record.path, Delta(record.delta_config(), params, src)


def merge_delta(state: dict, cfg: network.T5Config, d: 'Delta') -> dict:
  """The base state dict with the delta merged into its parameters (no optimizer state)."""
  from t5tpu.delta import base as delta_base
  merged = delta_base.merge_into_base(d.config, flatten(params_of(state)), d.params)
  return make_state_dict(unflatten(merged))


# ----------------------------------------------------------------------------- outputs

def adafactor_zeros(params: dict) -> dict:
  """t5x's initial Adafactor state (default factoring) for `params`, as numpy zeros."""
  from t5tpu import optimizers
  opt = optimizers.Adafactor()

  def one(p):
    shape = np.shape(p)
    slots = {k: np.zeros((1,), np.float32) for k in ('m', 'v', 'v_col', 'v_row')}
    dims = opt.factored_dims(shape)
    if dims is None:
      slots['v'] = np.zeros(shape, np.float32)
    else:
      d_row, d_col = dims
      slots['v_row'] = np.zeros(np.delete(shape, d_col), np.float32)
      slots['v_col'] = np.zeros(np.delete(shape, d_row), np.float32)
    return slots
  return unflatten({k: one(v) for k, v in flatten(params).items()})


def _step_dir(path: str, step: int) -> str:
  path = path.rstrip('/')
  m = _STEP_DIR.match(os.path.basename(path))
  if m:
    if int(m.group(1)) != step:
      raise StepMismatchError(f'--to={path} names step {m.group(1)}, but the checkpoint is at '
                              f'step {step}: name it checkpoint_{step}, or give its MODEL_DIR')
    return path
  return storage.join(path, f'checkpoint_{step}')


def write(state: dict, cfg: network.T5Config, to: str, to_format: str, *,
          dtype: Optional[str] = None, params_only: bool = False,
          zarr_min_bytes: Optional[int] = None, overwrite: bool = False) -> str:
  """Writes a state dict in `to_format`; returns the path written."""
  if to_format not in FORMATS:
    raise ValueError(f'to_format={to_format!r}: choose one of {FORMATS}')
  target = cast_floating(params_of(state), dtype)  # like t5x's save dtype: parameters only
  if to_format == 'hf':
    from t5tpu.formats import hf
    if storage.exists(storage.join(to, hf.CONFIG_NAME)) and not overwrite:
      raise OutputExistsError(f'{to} already holds a Hugging Face model (--overwrite replaces '
                              'it)')
    return hf.write(to, target, cfg)
  step = int(np.asarray(step_of(state)))
  param_states = None if params_only else param_states_of(state)
  if param_states is None and not params_only:
    log.info('the source has no optimizer state: adding the zero Adafactor state t5x starts '
             'from (use --params_only to leave it out)')
    param_states = adafactor_zeros(target)
  out = make_state_dict(target, step, param_states)
  if to_format == 't5x_legacy':
    from t5tpu.formats import t5x_legacy
    kwargs = {} if zarr_min_bytes is None else {'zarr_min_bytes': zarr_min_bytes}
    return t5x_legacy.write(_step_dir(to, step), out, overwrite=overwrite, **kwargs)
  from t5tpu.formats import t5x_orbax
  return t5x_orbax.write(to, out)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='t5tpu convert', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  p.add_argument('--from', dest='source', required=True,
                 help='checkpoint or MODEL_DIR (local or gs://), or a Hugging Face '
                      'hub name (hf://google/flan-t5-base[@revision])')
  p.add_argument('--to', required=True, help='output directory (local or gs://)')
  p.add_argument('--to_format', required=True, choices=FORMATS)
  p.add_argument('--base', default=None,
                 help='delta: the base model (needed for a PEFT adapter; default for a '
                      'delta MODEL_DIR: the base its run recorded)')
  p.add_argument('--model_gin', default=None,
                 help="model shape: a gin file or name (e.g. t5_1_1/base); default: from "
                      'config.json (HF) or the parameter shapes')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                 help='cast the parameters (optimizer state is kept as is)')
  p.add_argument('--params_only', action='store_true',
                 help='T5X/orbax output without optimizer state')
  p.add_argument('--zarr_min_bytes', type=int, default=None,
                 help='t5x_legacy: arrays at least this big go to zarr folders '
                      '(0: all; default 64 KiB)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing output')
  p.add_argument('--vocab', default=None,
                 help="hf: the model's SentencePiece model file (local or gs://); writes the "
                      'T5Tokenizer files beside the weights')
  p.add_argument('--vocab_extra_ids', type=int, default=0,
                 help='hf: extra_ids of the vocabulary (0 for cc_all.32000.100extra, the '
                      "model gins' default; 100 for the t5 library's cc_all.32000)")
  return p


@errors.report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = build_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
  # Relative local paths mean the current folder: made absolute once, here, because orbax
  # refuses relative paths and tensorstore resolves them later, in its own threads.
  args.source, args.to = storage.resolve(args.source), storage.resolve(args.to)
  if args.vocab and args.to_format != 'hf':
    parser.error('--vocab writes a Hugging Face tokenizer: use it with --to_format=hf')
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  from t5tpu.formats import hf
  spm = None
  if args.vocab:  # checked before anything is written
    try:
      spm = hf.load_sentencepiece(args.vocab)
    except ValueError as e:
      parser.error(f'--vocab: {e}')
  base_path, delta = read_delta(args.source, storage.resolve(args.base))
  if delta is None and args.to_format == 'peft':
    parser.error(f'--to_format=peft writes a LoRA delta, but {args.source} is a whole model '
                 '(give a delta MODEL_DIR trained with gin/delta/lora.gin)')
  state, cfg, src = read(base_path if delta is not None else args.source, args.model_gin)
  if delta is not None and delta.config is None:  # a PEFT adapter, read for this config
    from t5tpu import delta as delta_lib
    from t5tpu.formats import peft
    lora, params = peft.read(delta.source, cfg)
    delta = Delta(delta_lib.DeltaConfig(lora=lora), params, delta.source)
  if delta is not None:
    log.info('%s: a %s delta on the base %s', delta.source, delta.config.describe(), src)
    src = f'{delta.source} (on {src})'
  if args.to_format == 'peft':
    out = _write_peft(delta, cfg, args.to, base_path)
  else:
    if delta is not None:
      state = merge_delta(state, cfg, delta)
    out = write(state, cfg, args.to, args.to_format, dtype=args.dtype,
                params_only=args.params_only, zarr_min_bytes=args.zarr_min_bytes,
                overwrite=args.overwrite)
  if args.to_format == 'hf':
    if spm:
      hf.write_tokenizer(out, spm, args.vocab_extra_ids)
    else:
      log.warning('no tokenizer written (weights only): add --vocab=<the SentencePiece model '
                  'the run trained with> to serve text with AutoTokenizer')
  step = int(np.asarray(step_of(state)))
  print(f'{src} -> {out} ({args.to_format}, step {step}): {model_shapes.describe(cfg)}')


def _write_peft(delta: Delta, cfg: network.T5Config, to: str, base_path: str) -> str:
  from t5tpu.formats import peft
  others = [m for m in delta.config.methods if m != 'lora']
  if others:
    raise errors.UserError(f'--to_format=peft: PEFT adapters here are LoRA only; this delta '
                           f'also has {others}')
  if peft.is_adapter(to):
    raise OutputExistsError(f'{to} already holds a PEFT adapter')
  return peft.write(to, delta.config.lora, unflatten(delta.params), cfg, base_path)


if __name__ == '__main__':
  main()
