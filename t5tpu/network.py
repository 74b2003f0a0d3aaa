"""T5 as pure flax modules, with t5x's parameter names and logical axis names.

One `Transformer` covers T5 1.0 (ReLU FFN, logits through the shared embedding) and
T5 1.1 / Flan-T5 (gated GELU, untied `logits_dense`), chosen by `T5Config`. The tree of
parameters is exactly t5x's (`encoder/layers_0/attention/query/kernel`, ...), so public
checkpoints load by name. Every parameter is created with its logical axes (`embed`,
`joined_kv`, `mlp`, `vocab`, `heads`, `relpos_buckets`) which partitioning.py maps to a mesh.

Decoding uses a `cache` collection: the first call with `decode=True` over a full-length
dummy target creates zeroed self-attention caches and computes the cross-attention keys and
values once; every later call feeds one token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from t5tpu import errors
from t5tpu import matmul
from t5tpu.delta import modules as delta_modules

Array = jax.Array
NEG_INF = -1e10  # additive mask value, as t5x (large but finite: no NaN for all-masked rows)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and numerics of one T5 network (field names follow t5x's T5Config)."""
  vocab_size: int = 32128
  dtype: str = 'bfloat16'  # activation dtype; parameters are always float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('relu',)
  dropout_rate: float = 0.1
  logits_via_embedding: bool = True
  float32_attention_logits: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # 'none' keeps every activation; 'full' recomputes each layer in the backward pass;
  # 'dots' saves only matmul outputs (a middle ground for long sequences / big models).
  remat_policy: str = 'none'
  # How training and scoring compute attention: 'einsum' (t5x's own ops, bit-equal to it);
  # 'cudnn', jax.nn.dot_product_attention's fused cuDNN kernel (GPU only, bfloat16/float16:
  # one kernel instead of the logits, bias, softmax and weights passes over [batch, heads,
  # q, k]); 'jax', the same call's XLA implementation (anywhere; it checks the call against
  # 'einsum'); 'tpu_flash', Pallas's TPU flash-attention kernel (TPU only: the logits never
  # reach HBM, so larger batches fit; attentions whose key length is not a multiple of 128
  # take 'einsum'). The fused kernels keep float32 logits whatever float32_attention_logits
  # says, and apply t5x's attention dropout mask to the values (the same mask, the same sums
  # up to rounding). Decoding always takes 'einsum'.
  attention_kernel: str = 'einsum'
  # Delta tuning (t5tpu.delta.DeltaConfig, set by gin/delta/*.gin): extra parameters at the
  # hooks below; None is the plain T5.
  delta: Optional[object] = None

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


# ----------------------------------------------------------------------------- helpers

def _param(module: nn.Module, name: str, init: Callable, shape, axes):
  """A float32 parameter annotated with its logical axes (boxed for partitioning)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


_ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,  # tanh approximation, as T5 1.1 ("gelu_new" in transformers)
    'gelu_exact': functools.partial(nn.gelu, approximate=False),
    'silu': nn.silu,
    'swish': nn.silu,
    'linear': lambda x: x,
}


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int, xp=np):
  """Maps key_position - query_position to T5's log-spaced buckets.

  Works on numpy (static shapes, computed once at trace time) or jax.numpy (decoding,
  where the query position is traced).
  """
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Guard log(0) for the small positions that take the exact branch anyway.
  n_f = xp.maximum(n, 1).astype(np.float32)
  val_if_large = max_exact + (
      xp.log(n_f / max_exact) / math.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(np.int32)
  val_if_large = xp.minimum(val_if_large, num_buckets - 1)
  return ret + xp.where(is_small, n, val_if_large)


# ----------------------------------------------------------------------------- layers

class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: jnp.dtype

  def setup(self):
    self.embedding = _param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                            (self.num_embeddings, self.features), ('vocab', 'embed'))

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """Logits against the embedding table (T5 1.0's tied output layer), float32 out."""
    # (Kept as the batched einsum: the flattened form changes float32 sums in its gradient.)
    return jnp.einsum('...e,ve->...v', x, self.embedding.astype(x.dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias."""
  dtype: jnp.dtype
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free projection with a 2-D kernel [in, out] and logical axes (plus the LoRA
  branch or BitFit bias a delta config gives it)."""
  features: int
  kernel_axes: tuple
  dtype: jnp.dtype
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
  output_dtype: Optional[jnp.dtype] = None  # e.g. float32 logits from bf16 activations
  delta: Optional[object] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = _param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                    self.kernel_axes)
    y = matmul.project(x, kernel.astype(self.dtype), self.output_dtype)
    if self.delta is not None:
      y = delta_modules.dense_deltas(self, self.delta, x, y, self.kernel_axes, deterministic)
    return y


class RelativePositionBiases(nn.Module):
  """One [heads, buckets] table per stack; returns the additive bias [1, heads, q, k]."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, q_len: int, k_len: int, bidirectional: bool, q_position=None):
    table = _param(self, 'rel_embedding',
                   nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                   (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
    if q_position is None:  # static positions: buckets computed once, with numpy
      rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
      buckets = relative_position_bucket(rel, bidirectional, self.num_buckets,
                                         self.max_distance, np)
    else:  # one decoding step at a traced position
      rel = jnp.arange(k_len)[None, :] - q_position
      buckets = relative_position_bucket(rel, bidirectional, self.num_buckets,
                                         self.max_distance, jnp)
    values = jnp.take(table, buckets, axis=1)  # [heads, q, k]
    return values[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Attention without 1/sqrt(d) scaling (T5 folds it into the query init)."""
  num_heads: int
  head_dim: int
  dtype: jnp.dtype
  dropout_rate: float = 0.0
  float32_logits: bool = True
  delta: Optional[object] = None
  kernel: str = 'einsum'  # T5Config.attention_kernel

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, bias, *, deterministic: bool,
               decode: bool = False, decode_position=None, cross: bool = False):
    inner = self.num_heads * self.head_dim
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    query_init = lambda *a: kernel_init(*a) / np.sqrt(self.head_dim).astype(np.float32)
    proj = functools.partial(Dense, features=inner, kernel_axes=('embed', 'joined_kv'),
                             dtype=self.dtype, delta=self.delta)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    query = split(proj(kernel_init=query_init, name='query')(inputs_q, deterministic))
    key_proj = functools.partial(proj(kernel_init=kernel_init, name='key'),
                                 deterministic=deterministic)
    value_proj = functools.partial(proj(kernel_init=kernel_init, name='value'),
                                   deterministic=deterministic)

    # Decoding keeps its caches heads-major, [b, h, k, d], the layout both attention matmuls
    # read: stored [b, k, h, d], every step transposed each layer's cached keys and values
    # (a third of greedy decoding's time on CPU went to those copies). One token's new key
    # and value are transposed instead; training keeps [b, k, h, d] and its exact numerics.
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    if decode and cross:
      # Keys/values of the encoder output: computed on the cache-creating call, reused after.
      initialized = self.has_variable('cache', 'cached_key')
      if initialized:
        key = self.get_variable('cache', 'cached_key')
        value = self.get_variable('cache', 'cached_value')
      else:
        key = heads_major(split(key_proj(inputs_kv)))
        value = heads_major(split(value_proj(inputs_kv)))
        self.put_variable('cache', 'cached_key', key)
        self.put_variable('cache', 'cached_value', value)
    elif decode:
      initialized = self.has_variable('cache', 'cached_key')
      key = heads_major(split(key_proj(inputs_kv)))
      value = heads_major(split(value_proj(inputs_kv)))
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape,
                                   value.dtype)
      if initialized:
        # One new token: write it at decode_position, attend over the whole cache.
        start = (0, 0, decode_position, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        key, value = cached_key.value, cached_value.value
    else:
      key, value = split(key_proj(inputs_kv)), split(value_proj(inputs_kv))
    key, value, bias = delta_modules.add_prefix(self.delta, key, value, bias, self.num_heads,
                                                self.head_dim, heads_major=decode)

    # Beam search: the beams of an example (query rows b*k, beam-major within the example)
    # share one copy of its encoder keys/values (b rows) and attend as k x q query positions.
    q_rows, kv_rows = query.shape[0], key.shape[0]
    if q_rows != kv_rows:
      query = query.reshape((kv_rows, -1) + query.shape[2:])
    kv_axes, kv = (('batch', 'heads', 'length', 'kv'), 'bhkd') if decode else (
        ('batch', 'length', 'heads', 'kv'), 'bkhd')
    query = _constrain(query, ('batch', 'length', 'heads', 'kv'))
    key = _constrain(key, kv_axes)
    value = _constrain(value, kv_axes)

    dropout = not deterministic and self.dropout_rate > 0
    fused = self.kernel != 'einsum' and not decode and (
        self.kernel != 'tpu_flash' or _flash_fits(key))
    if fused:
      if dropout:
        # t5x's mask drops keys, shared by every query ([b, h, 1, k]): scaling those keys'
        # values gives the same sums as scaling the weights (not bit-equal: one rounding moves).
        keep = self._dropout_multiplier(key.shape[:1] + (self.num_heads, 1, key.shape[1]))
        value = value * jnp.transpose(keep, (0, 3, 1, 2))
      out = (_tpu_flash if self.kernel == 'tpu_flash' else self._fused)(query, key, value, bias)
    else:
      logit_dtype = jnp.float32 if self.float32_logits else self.dtype
      logits = jnp.einsum(f'bqhd,{kv}->bhqk', query, key, preferred_element_type=logit_dtype)
      if bias is not None:
        logits = logits + bias.astype(logit_dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      if dropout:
        weights = weights * self._dropout_multiplier(weights.shape[:-2] + (1,) +
                                                     weights.shape[-1:])
      out = jnp.einsum(f'bhqk,{kv}->bqhd', weights, value)
    out = out.reshape((q_rows, -1, inner))
    return Dense(features=inputs_q.shape[-1], kernel_axes=('joined_kv', 'embed'),
                 dtype=self.dtype, kernel_init=kernel_init, delta=self.delta,
                 name='out')(out, deterministic)

  def _fused(self, query, key, value, bias):
    """[b, q, h, d] attention in one jax.nn.dot_product_attention call (T5: no 1/sqrt(d)).
    cuDNN adds its bias in the inputs' dtype, so the relative position and mask bias is cast
    to it there; XLA's implementation adds it to float32 logits, as 'einsum' does."""
    if self.kernel == 'cudnn' and bias is not None:
      bias = bias.astype(query.dtype)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, scale=1.0,
                                        implementation='cudnn' if self.kernel == 'cudnn'
                                        else 'xla')

  def _dropout_multiplier(self, shape):
    """t5x's attention dropout: one keep/drop draw per key, shared by every query (a [b, h, 1, k]
    mask, q times fewer random bits than a full one), drawn from this module's own 'dropout'
    stream, as keep / keep_prob: the same key gives t5x's numbers."""
    keep_prob = 1.0 - self.dropout_rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob, shape)
    return keep.astype(self.dtype) / jnp.asarray(keep_prob, self.dtype)


class MlpBlock(nn.Module):
  """T5 FFN: `wi` + ReLU (1.0), or gated `wi_0`*`wi_1` (1.1's ('gelu', 'linear'))."""
  mlp_dim: int
  activations: Sequence[str]
  dtype: jnp.dtype
  dropout_rate: float = 0.0
  delta: Optional[object] = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    hidden = None
    for i, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      h = _ACTIVATIONS[act](Dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, kernel_init,
                                  delta=self.delta, name=name)(x, deterministic))
      hidden = h if hidden is None else hidden * h
    hidden = _constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    return Dense(x.shape[-1], ('mlp', 'embed'), self.dtype, kernel_init, delta=self.delta,
                 name='wo')(hidden, deterministic)


def _residual_dropout(cfg: T5Config):
  # t5x/MTF share each dropout mask across the sequence dimension.
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))


def _attention(cfg: T5Config, name: str):
  return MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.activation_dtype,
                            cfg.dropout_rate, cfg.float32_attention_logits, cfg.delta,
                            _checked_kernel(cfg), name=name)


_ATTENTION_KERNELS = ('einsum', 'cudnn', 'jax', 'tpu_flash')


def _checked_kernel(cfg: T5Config) -> str:
  kernel = cfg.attention_kernel
  if kernel not in _ATTENTION_KERNELS:
    raise errors.UserError(f'attention_kernel={kernel!r}; choose one of '
                           f"{', '.join(map(repr, _ATTENTION_KERNELS))}")
  if kernel == 'cudnn' and jax.default_backend() != 'gpu':
    raise errors.UserError(
        f"attention_kernel='cudnn' needs an NVIDIA GPU; this run's devices are "
        f"{jax.default_backend()}. Leave network.T5Config.attention_kernel at 'einsum'.")
  if kernel == 'cudnn' and cfg.activation_dtype not in (jnp.bfloat16, jnp.float16):
    raise errors.UserError(
        f"attention_kernel='cudnn' needs bfloat16 or float16 activations, not {cfg.dtype}: "
        "set network.T5Config.dtype = 'bfloat16', or leave attention_kernel at 'einsum'.")
  return kernel


# Pallas's TPU flash attention tiles keys in blocks of 128: shorter or ragged key lengths (a
# 32-token decoder's self-attention) take the einsum path.
_FLASH_BLOCK = 128


def _flash_fits(key) -> bool:
  return key.shape[1] % _FLASH_BLOCK == 0


def _flash_blocks(q_len: int, kv_len: int):
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
  bq = _FLASH_BLOCK if q_len % _FLASH_BLOCK == 0 else q_len  # a short query block is whole
  bk = _FLASH_BLOCK
  return pallas_flash.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)


def _tpu_flash(query, key, value, bias):
  """[b, q, h, d] attention in Pallas's TPU flash kernel (T5: no 1/sqrt(d) scaling): the
  logits and softmax stay in VMEM, block by block, instead of [b, h, q, k] float32 arrays in
  HBM. The kernel takes one full [b, h, q, k] bias (relative positions + mask, in the
  activations' dtype; it adds it to float32 logits, as 'einsum' does) and returns its
  gradient. Off a TPU it runs only under Pallas's interpreter (tests)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
  platform = matmul.traced_platform()
  if platform != 'tpu' and not _pallas_interpreted():
    raise errors.UserError(
        f"attention_kernel='tpu_flash' runs on a TPU (or compiles for one in `t5tpu plan`); "
        f"this run's devices are {platform}. Leave network.T5Config.attention_kernel at "
        "'einsum' (on an NVIDIA GPU: 'cudnn').")
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  q, k, v = heads_major(query), heads_major(key), heads_major(value)
  shape = q.shape[:3] + (k.shape[2],)
  blocks = _flash_blocks(shape[2], shape[3])

  def attend(q, k, v, ab):
    return pallas_flash.flash_attention(q, k, v, ab, sm_scale=1.0, block_sizes=blocks)

  ab = None if bias is None else jnp.broadcast_to(bias.astype(query.dtype), shape)
  attend = _sharded_over_batch_and_heads(attend, with_bias=ab is not None)
  return heads_major(attend(q, k, v, ab))


def _pallas_interpreted() -> bool:
  """Inside jax.experimental.pallas.tpu.force_tpu_interpret_mode() (read where Pallas reads
  it: jax has no public getter for this switch)."""
  from jax._src import config as jax_config
  switch = getattr(jax_config, 'pallas_tpu_interpret_mode_context_manager', None)
  return switch is not None and switch.value is not None


def _sharded_over_batch_and_heads(fn, with_bias: bool):
  """fn on each device's [batch, heads] shard: a Pallas kernel is one device's program, which
  the SPMD partitioner cannot split, so the mesh is mapped over explicitly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  spec = nn.logical_to_mesh_axes(('batch', 'heads', None, None))
  specs = (spec, spec, spec, spec if with_bias else None)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)


def _mlp(cfg: T5Config):
  return MlpBlock(cfg.mlp_dim, tuple(cfg.mlp_activations), cfg.activation_dtype,
                  cfg.dropout_rate, cfg.delta, name='mlp')


def _sublayer(cfg: T5Config, x, norm_name: str, adapter_name: str, fn, deterministic: bool):
  """T5's pre-norm residual block: x + dropout(adapter(fn(norm(x))))."""
  y = RMSNorm(cfg.activation_dtype, name=norm_name)(x)
  y = delta_modules.adapt(cfg.delta, adapter_name, fn(y), cfg.activation_dtype)
  return x + _residual_dropout(cfg)(y, deterministic=deterministic)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    attention = _attention(cfg, 'attention')
    x = _sublayer(cfg, x, 'pre_attention_layer_norm', 'attention',
                  lambda y: attention(y, y, bias, deterministic=deterministic), deterministic)
    x = _sublayer(cfg, x, 'pre_mlp_layer_norm', 'mlp',
                  lambda y: _mlp(cfg)(y, deterministic=deterministic), deterministic)
    return _constrain(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, deterministic: bool,
               decode: bool = False, decode_position=None):
    cfg = self.config
    self_attention = _attention(cfg, 'self_attention')
    cross_attention = _attention(cfg, 'encoder_decoder_attention')
    x = _sublayer(cfg, x, 'pre_self_attention_layer_norm', 'self_attention',
                  lambda y: self_attention(y, y, self_bias, deterministic=deterministic,
                                           decode=decode, decode_position=decode_position),
                  deterministic)
    x = _sublayer(cfg, x, 'pre_cross_attention_layer_norm', 'cross_attention',
                  lambda y: cross_attention(y, encoded, cross_bias, deterministic=deterministic,
                                            decode=decode, cross=True), deterministic)
    x = _sublayer(cfg, x, 'pre_mlp_layer_norm', 'mlp',
                  lambda y: _mlp(cfg)(y, deterministic=deterministic), deterministic)
    return _constrain(x, ('batch', 'length', 'embed'))


_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(cls, cfg: T5Config, static_argnums):
  if cfg.remat_policy == 'none':
    return cls
  if cfg.remat_policy not in _REMAT_POLICIES:
    raise ValueError(f'remat_policy={cfg.remat_policy!r}; choose one of '
                     f"'none', {', '.join(map(repr, _REMAT_POLICIES))}")
  return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                  static_argnums=static_argnums)


def _mask_to_bias(mask):
  """bool [b, 1, q, k] -> additive float32 bias."""
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def attention_mask(q_valid, k_valid, q_segments=None, k_segments=None, causal=False):
  """[b, 1, q, k] bool mask from validity, packing segments and causality."""
  mask = q_valid[:, None, :, None] & k_valid[:, None, None, :]
  if q_segments is not None:
    mask &= q_segments[:, None, :, None] == k_segments[:, None, None, :]
  if causal:
    q_len, k_len = q_valid.shape[-1], k_valid.shape[-1]
    mask &= jnp.tril(jnp.ones((q_len, k_len), jnp.bool_))[None, None]
  return mask


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, segment_ids=None, deterministic: bool = True):
    cfg = self.config
    x = self.shared_embedding(tokens)
    if delta_modules.prompt_length(cfg.delta):
      # Soft prompt tokens go first; relative positions then count them like any token.
      x = delta_modules.SoftPrompt(cfg.delta.prompt, name='prompt')(x, segment_ids)
    valid = delta_modules.encoder_valid(cfg.delta, tokens)
    mask = attention_mask(valid, valid, segment_ids, segment_ids)
    bias = RelativePositionBiases(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        cfg.num_heads, jnp.float32, name='relpos_bias')(
            valid.shape[-1], valid.shape[-1], bidirectional=True)
    bias = bias + _mask_to_bias(mask)
    x = _residual_dropout(cfg)(x, deterministic=deterministic)
    x = _constrain(x, ('batch', 'length', 'embed'))
    layer_cls = _maybe_remat(EncoderLayer, cfg, static_argnums=(3,))
    for i in range(cfg.num_encoder_layers):
      x = layer_cls(cfg, name=f'layers_{i}')(x, bias, deterministic)
    x = RMSNorm(cfg.activation_dtype, name='encoder_norm')(x)
    # As t5x: the encoder's output dropout is the one not shared across the sequence.
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, encoder_tokens, decoder_input_tokens,
               decoder_target_tokens=None, encoder_segment_ids=None,
               decoder_segment_ids=None, deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None):
    cfg = self.config
    relpos = RelativePositionBiases(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        cfg.num_heads, jnp.float32, name='relpos_bias')
    enc_valid = delta_modules.encoder_valid(cfg.delta, encoder_tokens)
    decode_position = None
    if decode:
      # The stack keeps the position of the next token; layers write their caches there.
      initialized = self.has_variable('cache', 'position')
      position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
    if decode and initialized:
      if max_decode_length is None:
        raise ValueError('decoding one token needs max_decode_length: the length the '
                         'cache was created with')
      decode_position = position.value
      max_len = max_decode_length
      k_valid = jnp.arange(max_len)[None, :] <= decode_position
      self_mask = k_valid[:, None, None, :]
      self_bias = relpos(1, max_len, bidirectional=False, q_position=decode_position)
      self_bias = self_bias + _mask_to_bias(self_mask)
      cross_mask = enc_valid[:, None, None, :]
      position.value = decode_position + 1
    else:
      targets = decoder_input_tokens if decoder_target_tokens is None else decoder_target_tokens
      dec_valid = targets > 0 if decoder_target_tokens is not None else jnp.ones_like(
          targets, jnp.bool_)
      self_mask = attention_mask(dec_valid, dec_valid, decoder_segment_ids,
                                 decoder_segment_ids, causal=True)
      length = decoder_input_tokens.shape[-1]
      self_bias = relpos(length, length, bidirectional=False) + _mask_to_bias(self_mask)
      # The cache-creating call of decoding has a row per beam but one per example on the
      # encoder side (see MultiHeadAttention): the encoder's validity is all it needs.
      cross_mask = enc_valid[:, None, None, :] if decode else attention_mask(
          dec_valid, enc_valid, decoder_segment_ids, encoder_segment_ids)
    cross_bias = _mask_to_bias(cross_mask)

    x = self.shared_embedding(decoder_input_tokens)
    x = _residual_dropout(cfg)(x, deterministic=deterministic)
    x = _constrain(x, ('batch', 'length', 'embed'))
    layer_cls = _maybe_remat(DecoderLayer, cfg, static_argnums=(5, 6))
    for i in range(cfg.num_decoder_layers):
      x = layer_cls(cfg, name=f'layers_{i}')(x, encoded, self_bias, cross_bias,
                                              deterministic, decode, decode_position)
    x = RMSNorm(cfg.activation_dtype, name='decoder_norm')(x)
    x = _residual_dropout(cfg)(x, deterministic=deterministic)
    if cfg.logits_via_embedding:
      # Tied output layer: T5 1.0 rescales by 1/sqrt(d_model) before the shared embedding.
      logits = self.shared_embedding.attend(x) / np.sqrt(x.shape[-1]).astype(np.float32)
    else:
      logits = Dense(cfg.vocab_size, ('embed', 'vocab'), cfg.activation_dtype,
                     output_dtype=jnp.float32, name='logits_dense')(x)
    return _constrain(logits, ('batch', 'length', 'vocab'))


class Transformer(nn.Module):
  """The T5 encoder-decoder. Logits come out in float32."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=False):
    return self.encoder(encoder_input_tokens, encoder_segment_ids,
                        deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, encoder_segment_ids=None, decoder_segment_ids=None,
             enable_dropout=False, decode=False, max_decode_length=None):
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, enable_dropout=False):
    del encoder_positions, decoder_positions  # relative attention needs no positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       enable_dropout)
