"""The delta methods' parameters and computations, at the places network.py hooks them in.

Every parameter is float32 with logical axes, like the base's: a LoRA A of an
`embed`->`joined_kv` kernel follows `embed`, its B follows `joined_kv`, the rank replicated;
a prefix's keys follow `heads`; an adapter's and a prompt's follow `embed`. So delta
parameters shard with the base on any mesh.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from t5tpu import delta as delta_lib
from t5tpu import matmul


def _param(module: nn.Module, name: str, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _path(module: nn.Module) -> str:
  return '/'.join(module.scope.path)


# ----------------------------------------------------------------------------- Dense: LoRA, BitFit

def dense_deltas(module: nn.Module, cfg: delta_lib.DeltaConfig, x, y, kernel_axes,
                 deterministic: bool):
  """y (= x W) plus the LoRA branch and the BitFit bias of this projection, where they apply."""
  path = _path(module)
  features = y.shape[-1]
  lora = cfg.lora
  if lora is not None and lora.applies_to(path):
    # PEFT's A init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
    a = _param(module, 'lora_a', nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
               (x.shape[-1], lora.rank), (kernel_axes[0], None))
    b = _param(module, 'lora_b', nn.initializers.zeros, (lora.rank, features),
               (None, kernel_axes[1]))
    h = x
    if lora.dropout and not deterministic:
      h = nn.Dropout(lora.dropout)(h, deterministic=False)
    low = matmul.project(h, a.astype(x.dtype))
    y = y + (matmul.project(low, b.astype(x.dtype)) * lora.scale).astype(y.dtype)
  bitfit = cfg.bitfit
  if bitfit is not None and bitfit.applies_to(path):
    bias = _param(module, 'bias', nn.initializers.zeros, (features,), (kernel_axes[1],))
    y = y + bias.astype(y.dtype)
  return y


# ----------------------------------------------------------------------------- adapters

_ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu, 'tanh': jnp.tanh}


class Adapter(nn.Module):
  """h + up(act(down(h))): the identity at initialisation (up is zero)."""
  cfg: delta_lib.Adapter
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h):
    d = h.shape[-1]
    down = _param(self, 'down', nn.initializers.normal(self.cfg.init_scale),
                  (d, self.cfg.dim), ('embed', None))
    up = _param(self, 'up', nn.initializers.zeros, (self.cfg.dim, d), (None, 'embed'))
    z = _ACTIVATIONS[self.cfg.activation](matmul.project(h, down.astype(h.dtype)))
    return h + matmul.project(z, up.astype(h.dtype))


def adapt(cfg: Optional[delta_lib.DeltaConfig], sublayer: str, y, dtype):
  """A sublayer's output through its adapter, if the config puts one after `sublayer`
  ('attention', 'self_attention', 'cross_attention' or 'mlp'). Call inside a compact layer."""
  adapter = cfg.adapter if cfg is not None else None
  if adapter is None or not adapter.after('mlp' if sublayer == 'mlp' else 'attention'):
    return y
  return Adapter(adapter, dtype, name=f'{sublayer}_adapter')(y)


# ----------------------------------------------------------------------------- prefix

class PrefixKeysValues(nn.Module):
  """[length, heads, head_dim] keys and values of one attention's prefix."""
  cfg: delta_lib.Prefix
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self):
    cfg, h, d = self.cfg, self.num_heads, self.head_dim
    axes = (None, 'heads', 'kv')
    if not cfg.reparameterize:
      init = nn.initializers.normal(cfg.init_scale)
      return (_param(self, 'key', init, (cfg.length, h, d), axes),
              _param(self, 'value', init, (cfg.length, h, d), axes))
    fan_in = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    emb = _param(self, 'embedding', nn.initializers.normal(1.0), (cfg.length, cfg.hidden),
                 (None, None))
    w_in = _param(self, 'mlp_in', fan_in, (cfg.hidden, cfg.hidden), (None, None))
    w_out = _param(self, 'mlp_out', nn.initializers.variance_scaling(
        cfg.init_scale ** 2, 'fan_in', 'normal'), (cfg.hidden, 2 * h * d), (None, 'joined_kv'))
    kv = jnp.tanh(emb @ w_in) @ w_out
    kv = kv.reshape(cfg.length, 2, h, d)
    return kv[:, 0], kv[:, 1]


def add_prefix(cfg: Optional[delta_lib.DeltaConfig], key, value, bias, num_heads, head_dim,
               heads_major: bool = False):
  """Keys and values [b, k, h, d] ([b, h, k, d] when `heads_major`, decoding's cache layout)
  with the prefix's before them; the bias [.., q, k] gains zero columns for the prefix (no
  position bias, never masked). Call inside the attention."""
  prefix = cfg.prefix if cfg is not None else None
  if prefix is None:
    return key, value, bias
  pk, pv = PrefixKeysValues(prefix, num_heads, head_dim, name='prefix')()  # [k, h, d]
  if heads_major:
    pk, pv = jnp.swapaxes(pk, 0, 1), jnp.swapaxes(pv, 0, 1)
  b, axis = key.shape[0], 2 if heads_major else 1
  widen = lambda p, x: jnp.concatenate(
      [jnp.broadcast_to(p.astype(x.dtype)[None], (b,) + p.shape), x], axis=axis)
  key, value = widen(pk, key), widen(pv, value)
  if bias is not None:
    bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(prefix.length, 0)])
  return key, value, bias


# ----------------------------------------------------------------------------- prompt

def prompt_length(cfg: Optional[delta_lib.DeltaConfig]) -> int:
  return cfg.prompt.length if cfg is not None and cfg.prompt is not None else 0


def encoder_valid(cfg: Optional[delta_lib.DeltaConfig], tokens):
  """Which encoder positions are real: the soft prompt's always, then tokens > 0."""
  valid = tokens > 0
  n = prompt_length(cfg)
  if n:
    valid = jnp.concatenate([jnp.ones(tokens.shape[:-1] + (n,), jnp.bool_), valid], axis=-1)
  return valid


class SoftPrompt(nn.Module):
  cfg: delta_lib.Prompt

  @nn.compact
  def __call__(self, x, segment_ids=None):
    if segment_ids is not None:
      raise delta_lib.DeltaError(
          'prompt tuning needs unpacked inputs (a packed row holds several examples, each '
          'needing its own prompt): set data.DatasetConfig.pack = False, as delta/prompt.gin '
          'does for training and evaluation')
    p = _param(self, 'embedding', nn.initializers.normal(self.cfg.init_scale),
               (self.cfg.length, x.shape[-1]), (None, 'embed'))
    p = jnp.broadcast_to(p.astype(x.dtype)[None], (x.shape[0],) + p.shape)
    return jnp.concatenate([p, x], axis=1)


def initialize_prompt(cfg: delta_lib.Prompt, embedding, rng, vocabulary=None):
  """The prompt's starting value from the (frozen) vocabulary embedding [vocab, d]."""
  if cfg.init_text is not None:
    if vocabulary is None:
      raise delta_lib.DeltaError('Prompt.init_text needs the model\'s vocabulary')
    ids = [int(t) for t in vocabulary.encode(cfg.init_text)]
    if not ids:
      raise delta_lib.DeltaError(f'Prompt.init_text={cfg.init_text!r} has no tokens')
    ids = jnp.asarray([ids[i % len(ids)] for i in range(cfg.length)])
  elif cfg.init == 'vocab':
    top = min(cfg.init_vocab_size, embedding.shape[0])
    ids = jax.random.randint(rng, (cfg.length,), 3 if top > 3 else 0, top)
  else:
    return None
  return jnp.take(embedding, ids, axis=0).astype(jnp.float32)
