"""Tiny delta models, a saved base to tune, and counts the docs give as formulas."""
from __future__ import annotations

import jax
import numpy as np

from t5tpu import checkpoints, data, delta, optimizers, partitioning, train
from tests import tiny

# One config per method (sizes small enough for a CPU test); `name -> DeltaConfig`.
METHODS = {
    'lora': delta.DeltaConfig(lora=delta.LoRA(rank=4, alpha=8)),
    'adapter': delta.DeltaConfig(adapter=delta.Adapter(dim=8)),
    'pfeiffer': delta.DeltaConfig(adapter=delta.Adapter(dim=8, placement='pfeiffer')),
    'prefix': delta.DeltaConfig(prefix=delta.Prefix(length=3, hidden=16)),
    'prefix_plain': delta.DeltaConfig(prefix=delta.Prefix(length=3, reparameterize=False)),
    'prompt': delta.DeltaConfig(prompt=delta.Prompt(length=4)),
    'bitfit': delta.DeltaConfig(bitfit=delta.BitFit()),
    'bitfit_ln': delta.DeltaConfig(bitfit=delta.BitFit(layer_norms=True)),
    'lora+prompt': delta.DeltaConfig(lora=delta.LoRA(rank=4), prompt=delta.Prompt(length=4)),
}


def model(cfg=None, **kw):
  return tiny.tiny_model(optimizer=kw.pop('optimizer', optimizers.Adafactor(
      multiply_by_parameter_scale=False)), delta=cfg, **kw)


def trainable_count(cfg: delta.DeltaConfig, c) -> int:
  """docs/delta-tuning.md's formulas, for T5Config `c` (L_e encoder, L_d decoder layers,
  d = emb_dim, n = heads x head_dim, f = mlp_dim, g = 1 or 2 input projections of the MLP)."""
  le, ld, d, n, f = c.num_encoder_layers, c.num_decoder_layers, c.emb_dim, \
      c.num_heads * c.head_dim, c.mlp_dim
  g = len(c.mlp_activations)
  attentions = le + 2 * ld
  total = 0
  if cfg.lora:  # q and v: A [d, r] + B [r, n] each
    total += attentions * 2 * cfg.lora.rank * (d + n)
  if cfg.adapter:
    per_layer = (1, 1) if cfg.adapter.placement == 'pfeiffer' else (2, 3)
    total += (le * per_layer[0] + ld * per_layer[1]) * 2 * d * cfg.adapter.dim
  if cfg.prefix:
    p = cfg.prefix
    if p.reparameterize:
      total += attentions * (p.length * p.hidden + p.hidden ** 2 + p.hidden * 2 * n)
    else:
      total += attentions * 2 * p.length * n
  if cfg.prompt:
    total += cfg.prompt.length * d
  if cfg.bitfit:  # q, k, v (n each), out (d); wi.. (f each), wo (d)
    total += attentions * (3 * n + d) + (le + ld) * (g * f + d)
    if cfg.bitfit.layer_norms:
      total += (2 * le + 3 * ld + 2) * d
  return total


def train_base(model_dir, task, steps=60):
  """A briefly trained tiny base (full fine-tuning of a fresh model), its MODEL_DIR."""
  train.train(model=tiny.tiny_model(), train_dataset_cfg=data.DatasetConfig(
      task, tiny.LENGTHS, batch_size=16), partitioner=partitioning.PjitPartitioner(),
      model_dir=str(model_dir), total_steps=steps, random_seed=0, log_period=steps,
      eval_period=None,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.05),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=steps)))
  return checkpoints.step_dir(str(model_dir), steps)


def run_delta(cfg, base_path, model_dir, task, steps, lr=0.02, pack=True, **kw):
  return train.train(
      model=model(cfg), train_dataset_cfg=data.DatasetConfig(
          task, tiny.LENGTHS, batch_size=8, pack=pack),
      partitioner=kw.pop('partitioner', partitioning.PjitPartitioner()),
      model_dir=str(model_dir), total_steps=steps, random_seed=1, log_period=5,
      eval_period=None,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=lr),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=kw.pop('period', steps)),
          restore=checkpoints.RestoreCheckpointConfig(path=str(base_path))), **kw)


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))
