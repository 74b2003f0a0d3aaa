"""The frozen base of a delta run: loading it, its fingerprint, and the record a run keeps.

A delta MODEL_DIR's checkpoints hold only the delta (and its optimizer state). The base comes
from INITIAL_CHECKPOINT_PATH; `MODEL_DIR/delta.json` and every checkpoint's input state record
where it came from and a fingerprint of its values, so a delta is never silently applied to
another base: resuming, evaluating or exporting with a different one is an error naming both.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5tpu import delta as delta_lib
from t5tpu import errors, storage
from t5tpu.delta import modules as delta_modules

log = logging.getLogger(__name__)
RECORD_FILE = 'delta.json'


class BaseMismatchError(errors.UserError):
  """The delta was trained on another base than the one given."""


# ----------------------------------------------------------------------------- fingerprint

@jax.jit
def _moments(tree):
  """Per leaf: the sum and the sum of squares in float32, and a position-weighted sum."""
  def one(x):
    x = x.astype(jnp.float32).reshape(-1)
    w = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.618)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * w)])
  return jax.tree.map(one, tree)


def fingerprint(frozen) -> str:
  """A short digest of the base's values (one pass over them on the devices).

  Computed from float32 moments rounded to 5 significant digits, so it is the same for a
  float32 base and its bfloat16 copy only when they agree to that precision: the record says
  which dtype it was taken in.
  """
  import hashlib
  moments = jax.device_get(_moments(frozen))
  flat = traverse_util.flatten_dict(moments, sep='/')
  text = ';'.join(f'{k}:{",".join(f"{v:.5g}" for v in np.asarray(flat[k]))}'
                  for k in sorted(flat))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class BaseRecord:
  """Where a delta's base came from."""
  path: str  # INITIAL_CHECKPOINT_PATH, or 'scratch (seed N)'
  fingerprint: str
  dtype: str
  methods: str
  config: Optional[dict] = None  # the DeltaConfig (what an export needs: LoRA's alpha, ...)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> 'BaseRecord':
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def delta_config(self) -> delta_lib.DeltaConfig:
    if not self.config:
      raise errors.UserError(f'the delta record of {self.path} has no configuration')
    return delta_lib.DeltaConfig.from_dict(self.config)


def record_for(cfg: delta_lib.DeltaConfig, path: str, frozen) -> BaseRecord:
  return BaseRecord(path=path, fingerprint=fingerprint(frozen), dtype=cfg.base_dtype,
                    methods=cfg.describe(), config=cfg.to_dict())


def write_record(model_dir: str, record: BaseRecord) -> None:
  storage.write_text(storage.join(model_dir, RECORD_FILE),
                     json.dumps(record.to_dict(), indent=2) + '\n')


def read_record(checkpoint_path: str) -> Optional[BaseRecord]:
  """The record of the MODEL_DIR holding `checkpoint_path` (or of that MODEL_DIR itself)."""
  path = checkpoint_path.rstrip('/')
  for directory in (path, path.rsplit('/', 1)[0]):
    candidate = storage.join(directory, RECORD_FILE)
    if storage.exists(candidate):
      return BaseRecord.from_dict(json.loads(storage.read_text(candidate)))
  return None


def check_same_base(saved: BaseRecord, path: str, fp: str, where: str) -> None:
  if saved.fingerprint != fp:
    raise BaseMismatchError(
        f'{where} holds a delta ({saved.methods}) trained on the base {saved.path} '
        f'(fingerprint {saved.fingerprint}), but the base given is {path} (fingerprint {fp}): '
        'a delta only works on the base it was trained on. Set INITIAL_CHECKPOINT_PATH to '
        f'{saved.path}, or start a new MODEL_DIR for this base.')


# ----------------------------------------------------------------------------- loading

def load_base(path: str, params_layout, cfg: delta_lib.DeltaConfig, restore_cfg):
  """Every parameter a plain T5 has (the frozen base and, for BitFit's layer norms, the
  trainable scales) from the checkpoint at `path`, in their shards."""
  from t5tpu import initial_checkpoint
  base_layout = params_layout.subset(lambda p: not cfg.added(p))
  return initial_checkpoint.load_params(path, base_layout, restore_cfg)


def start_from_base(trainer, base_params, rng):
  """(trainable, frozen) at step 0: fresh delta parameters (the prompt from the base's
  vocabulary), the base's values where the trainable part has them (layer norm scales)."""
  cfg = trainer.delta
  fresh = trainer.init_state(rng).params
  base_trainable, frozen = delta_lib.split(cfg, base_params)
  trainable = delta_lib.merge(base_trainable, fresh)  # the base's values win
  if cfg.lora is not None and cfg.lora.init_from:
    trainable = _with_peft_lora(trainable, cfg.lora, trainer.model.config)
  if cfg.prompt is not None:
    value = delta_modules.initialize_prompt(
        cfg.prompt, frozen['token_embedder']['embedding'], jax.random.fold_in(rng, 1),
        trainer.model.input_vocabulary)
    if value is not None:
      trainable['encoder']['prompt']['embedding'] = value
  trainable = trainer.trainable_layout.place(trainable)
  return trainable, frozen


def _with_peft_lora(trainable, lora: delta_lib.LoRA, model_cfg):
  """The trainable tree with its LoRA weights from a PEFT adapter (same rank and scale)."""
  from t5tpu.formats import peft
  adapter, weights = peft.read(lora.init_from, model_cfg)
  if (adapter.rank, adapter.scale) != (lora.rank, lora.scale):
    raise delta_lib.DeltaError(
        f'LoRA.init_from={lora.init_from}: the adapter has r={adapter.rank}, scale '
        f'{adapter.scale:g} but the run configures rank={lora.rank}, scale {lora.scale:g} '
        f'(LORA_ALPHA / LORA_RANK): set LORA_RANK = {adapter.rank} and LORA_ALPHA = '
        f'{adapter.alpha:g}')
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep='/')
  ours = {k for k in flat if k.endswith(('lora_a', 'lora_b'))}
  if set(weights) != ours:
    missing, extra = sorted(ours - set(weights)), sorted(set(weights) - ours)
    raise delta_lib.DeltaError(
        f'LoRA.init_from={lora.init_from} adapts other projections than LORA_TARGETS: '
        f'missing {missing[:6]}, extra {extra[:6]}; set LORA_TARGETS to match the adapter '
        f'(its target_modules)')
  for k, v in weights.items():
    if v.shape != flat[k].shape:
      raise delta_lib.DeltaError(f'LoRA.init_from: {k} has shape {v.shape}, the model '
                                 f'{flat[k].shape}')
    flat[k] = v
  log.info('LoRA weights from the PEFT adapter %s', lora.init_from)
  return traverse_util.unflatten_dict(flat, sep='/')


def load_for_inference(checkpoint_path: str, model, partitioner, restore_cfg,
                       base_path: Optional[str] = None):
  """(model, ParamLayout, params) to evaluate or decode a checkpoint of `model`.

  Full fine-tuning: the checkpoint's parameters. Delta: the recorded base (or `base_path`,
  checked against the record) plus the checkpoint's delta, with a reparameterised prefix
  folded into plain keys and values (the model returned then has no prefix MLP).
  """
  from t5tpu import checkpoints as ckpt_lib
  from t5tpu import initial_checkpoint
  from t5tpu import layout as layout_lib
  cfg = delta_lib.config_of(model)
  layout = layout_lib.ParamLayout.for_model(model, partitioner)
  if cfg is None:
    return model, layout, initial_checkpoint.load_params(checkpoint_path, layout, restore_cfg)
  record = read_record(checkpoint_path)
  if record is None and base_path is None:
    raise errors.UserError(
        f'{checkpoint_path} is evaluated with a delta config ({cfg.describe()}) but its '
        f'MODEL_DIR has no {RECORD_FILE} naming the base: train it with t5tpu, or set '
        'DeltaConfig.base_path to the base checkpoint')
  base_path = storage.resolve(base_path or record.path)
  trains = lambda p: cfg.trainable(p)
  frozen_layout = layout.subset(lambda p: not trains(p), dtype=cfg.base_dtype)
  base = load_base(base_path, layout, cfg, restore_cfg)
  _, frozen = delta_lib.split(cfg, base)
  frozen = frozen_layout.place(frozen)
  if record is not None:
    check_same_base(record, base_path, fingerprint(frozen), checkpoint_path)
  trainable = ckpt_lib.restore_params(checkpoint_path.rstrip('/'),
                                      layout.subset(trains).abstract_with_shardings())
  params = delta_lib.merge(trainable, frozen)
  if cfg.prefix is not None and cfg.prefix.reparameterize:
    model, params = fold_prefix(model, params)
    layout = layout_lib.ParamLayout.for_model(model, partitioner)
    params = jax.device_put(params, layout.shardings)
  return model, layout, params


# ----------------------------------------------------------------------------- merging

def merge_into_base(cfg: delta_lib.DeltaConfig, base: dict, delta_params: dict) -> dict:
  """A plain T5's parameters (flat, numpy) with the delta folded in: LoRA's A·B·scale added
  to its kernels, BitFit's layer norm scales replaced. The other methods add computation a
  plain T5 does not have, so they cannot be merged: an error says so."""
  unmergeable = [name for name, m in (('adapter', cfg.adapter), ('prefix', cfg.prefix),
                                      ('prompt', cfg.prompt)) if m is not None]
  biases = [k for k in delta_params if k.endswith('/bias')]
  if unmergeable or biases:
    why = (f'{", ".join(unmergeable)} add layers, keys or tokens' if unmergeable else
           'BitFit\'s biases have no place in T5 (its projections are bias-free)')
    raise delta_lib.DeltaError(
        f'this delta ({cfg.describe()}) cannot be merged into a plain T5: {why}. Serve it '
        'with t5tpu infer (base + delta), or export a LoRA run (merges exactly; '
        '--to_format=peft keeps it separate).')
  out = {k: np.asarray(v, np.float32) for k, v in base.items()}
  for name, value in delta_params.items():
    if name.endswith('/lora_a'):
      module = name[:-len('/lora_a')]
      b = np.asarray(delta_params[module + '/lora_b'], np.float64)
      update = np.asarray(value, np.float64) @ b * cfg.lora.scale
      out[module + '/kernel'] = (out[module + '/kernel'] + update).astype(np.float32)
    elif name.endswith('/scale'):
      out[name] = np.asarray(value, np.float32)
  return out


# ----------------------------------------------------------------------------- folding

def fold_prefix(model, params):
  """The model with a plain prefix, and params whose prefix MLPs became the keys and values
  they compute (an exact rewrite: the network computes the same MLP)."""
  cfg = model.config.delta
  prefix = cfg.prefix
  folded_cfg = dataclasses.replace(cfg, prefix=dataclasses.replace(prefix, reparameterize=False))
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if 'prefix' not in k}
  sites = {k[:k.index('prefix') + 1] for k in flat if 'prefix' in k}
  heads, head_dim = model.config.num_heads, model.config.head_dim
  for site in sites:
    emb, w_in, w_out = (flat[site + (n,)] for n in ('embedding', 'mlp_in', 'mlp_out'))
    kv = (jnp.tanh(emb @ w_in) @ w_out).reshape(prefix.length, 2, heads, head_dim)
    out[site + ('key',)], out[site + ('value',)] = kv[:, 0], kv[:, 1]
  from t5tpu import network
  module = network.Transformer(dataclasses.replace(model.config, delta=folded_cfg))
  return dataclasses.replace(model, module=module), traverse_util.unflatten_dict(out)
