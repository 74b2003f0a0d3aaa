"""Decoding over a KV cache: greedy, temperature / top-k sampling, and beam search.

The encoder runs once. A first decoder call over a full-length dummy target creates the
self-attention caches (zeros) and computes every layer's cross-attention keys and values from
the encoder output; each step after that feeds one token. Loops are `lax.while_loop`s that stop
when every sequence has emitted EOS (or at max_decode_length), so the whole search is one
jitted program, partitioned like training (batch over `data`, heads/mlp over `model`).

Outputs are token ids [batch, max_decode_length] (for beam search: [batch, num_decodes,
max_decode_length], best first), EOS included, zeros after it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from t5tpu.network import Transformer

NEG_INF = -1.0e7
EOS_ID = 1


# ----------------------------------------------------------------------------- model calls

def _encode(model, params, batch):
  return model.module.apply({'params': params}, batch['encoder_input_tokens'],
                            batch.get('encoder_segment_ids'), method=Transformer.encode)


def _init_cache(model, params, encoded, encoder_tokens, max_len, rows=None):
  """Zeroed self-attention caches (`rows` of them: one per sequence decoded, default one per
  example) and the cross-attention keys/values (one per example)."""
  dummy = jnp.zeros((rows or encoder_tokens.shape[0], max_len), jnp.int32)
  _, variables = model.module.apply(
      {'params': params}, encoded, encoder_tokens, dummy, decode=True, mutable=['cache'],
      method=Transformer.decode)
  return variables['cache']


def _step(model, params, cache, encoded, encoder_tokens, tokens, max_len):
  """Logits [batch, vocab] for one new token per sequence, and the updated cache."""
  logits, variables = model.module.apply(
      {'params': params, 'cache': cache}, encoded, encoder_tokens, tokens[:, None],
      decode=True, max_decode_length=max_len, mutable=['cache'], method=Transformer.decode)
  return logits[:, 0, :].astype(jnp.float32), variables['cache']


# ----------------------------------------------------------------------------- sampling

def temperature_sample(model, params, batch, rng, max_decode_length: int,
                       temperature: float = 1.0, topk: int = 1, eos_id: int = EOS_ID):
  """Samples one continuation per example; topk=1 (the default) is greedy decoding.

  temperature 0 is also greedy. topk=0 samples from the full distribution.
  Returns (tokens [b, L], log-probabilities [b]).
  """
  encoded = _encode(model, params, batch)
  enc_tokens = batch['encoder_input_tokens']
  b, L = enc_tokens.shape[0], max_decode_length
  cache = _init_cache(model, params, encoded, enc_tokens, L)
  greedy = temperature == 0.0 or topk == 1

  def cond(state):
    i, _, _, finished, _, _ = state
    return (i < L) & ~jnp.all(finished)

  def body(state):
    i, tokens, cache, finished, rng, logprob = state
    prev = jnp.where(i == 0, 0, tokens[:, jnp.maximum(i - 1, 0)])
    logits, cache = _step(model, params, cache, encoded, enc_tokens, prev, L)
    log_probs = jax.nn.log_softmax(logits)
    rng, sub = jax.random.split(rng)
    if greedy:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      scaled = logits / temperature
      if topk > 0:
        kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      nxt = jax.random.categorical(sub, scaled, axis=-1)
    nxt = jnp.where(finished, 0, nxt).astype(jnp.int32)
    logprob = logprob + jnp.where(
        finished, 0.0, jnp.take_along_axis(log_probs, nxt[:, None], -1)[:, 0])
    tokens = tokens.at[:, i].set(nxt)
    finished = finished | (nxt == eos_id)
    return i + 1, tokens, cache, finished, rng, logprob

  init = (jnp.int32(0), jnp.zeros((b, L), jnp.int32), cache, jnp.zeros((b,), jnp.bool_),
          rng, jnp.zeros((b,), jnp.float32))
  _, tokens, _, _, _, logprob = jax.lax.while_loop(cond, body, init)
  return tokens, logprob


# ----------------------------------------------------------------------------- beam search

def brevity_penalty(alpha: float, length):
  """Google NMT length penalty ((5 + length) / 6) ** alpha, as t5x."""
  return jnp.power((5.0 + length) / 6.0, alpha)


def _gather_beams(tree, beam_indices, batch_size, old_beams, new_beams):
  """Reorders [batch*old_beams, ...] leaves (cache) or [batch, old_beams, ...] arrays."""
  def gather_flat(x):
    if x.ndim == 0 or x.shape[0] != batch_size * old_beams:
      return x  # e.g. the cache's scalar decode position
    x = x.reshape((batch_size, old_beams) + x.shape[1:])
    x = jnp.take_along_axis(x, beam_indices.reshape(
        beam_indices.shape + (1,) * (x.ndim - 2)), axis=1)
    return x.reshape((batch_size * new_beams,) + x.shape[2:])
  return jax.tree.map(gather_flat, tree)


def _reorder_cache(cache, beam_indices, batch_size, beams):
  """The decoder cache after beam selection. Self-attention caches follow their beams; the
  cross-attention keys and values are the example's, shared by its beams, and stay."""
  flat = traverse_util.flatten_dict(cache)
  return traverse_util.unflatten_dict({
      path: value if 'encoder_decoder_attention' in path else
      _gather_beams(value, beam_indices, batch_size, beams, beams)
      for path, value in flat.items()})


def beam_search(model, params, batch, max_decode_length: int, num_decodes: int = 4,
                alpha: float = 0.6, eos_id: int = EOS_ID):
  """Beam search with t5x's brevity penalty. Returns (tokens [b, k, L], scores [b, k]).

  Scores are log-probabilities divided by the brevity penalty. With alpha=0 and one beam
  the result is exactly greedy decoding.
  """
  k, L = num_decodes, max_decode_length
  enc_tokens = batch['encoder_input_tokens']
  b = enc_tokens.shape[0]
  encoded = _encode(model, params, batch)
  # Each beam has its own self-attention cache, [b*k, ...]; the beams of an example share its
  # encoder output and cross-attention keys/values, [b, ...] (network.MultiHeadAttention).
  cache = _init_cache(model, params, encoded, enc_tokens, L, rows=b * k)

  live_seqs = jnp.zeros((b, k, L), jnp.int32)
  # Only beam 0 is alive at the start, so the first step does not pick k copies of one token.
  live_logprobs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  fin_seqs = jnp.zeros((b, k, L), jnp.int32)
  fin_scores = jnp.full((b, k), NEG_INF, jnp.float32)
  fin_flags = jnp.zeros((b, k), jnp.bool_)

  def cond(state):
    i, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags, cache = state
    # Stop once no live beam can beat the worst finished one, even with the best possible
    # (longest) length normalisation.
    best_live = live_logprobs[:, 0] / brevity_penalty(alpha, L)
    worst_finished = jnp.where(jnp.all(fin_flags, axis=1), jnp.min(fin_scores, axis=1),
                               NEG_INF)
    return (i < L) & ~jnp.all(worst_finished > best_live)

  def body(state):
    i, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags, cache = state
    prev = jnp.where(i == 0, 0, live_seqs[:, :, jnp.maximum(i - 1, 0)]).reshape(b * k)
    logits, cache = _step(model, params, cache, encoded, enc_tokens, prev, L)
    log_probs = jax.nn.log_softmax(logits).reshape(b, k, -1)
    vocab = log_probs.shape[-1]
    candidates = (live_logprobs[:, :, None] + log_probs).reshape(b, k * vocab)
    top_logprobs, top_idx = jax.lax.top_k(candidates, 2 * k)
    top_beams, top_tokens = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(live_seqs, top_beams[:, :, None], axis=1)
    top_seqs = top_seqs.at[:, :, i].set(top_tokens)
    is_eos = top_tokens == eos_id

    # Live: the best k candidates that did not just end.
    live_cand = jnp.where(is_eos, NEG_INF, top_logprobs)
    new_live_logprobs, live_pick = jax.lax.top_k(live_cand, k)
    new_live_seqs = jnp.take_along_axis(top_seqs, live_pick[:, :, None], axis=1)
    beams_of_live = jnp.take_along_axis(top_beams, live_pick, axis=1)
    cache = _reorder_cache(cache, beams_of_live, b, k)

    # Finished: merge those that just ended with the previous finished set, keep the best k.
    new_scores = jnp.where(is_eos, top_logprobs / brevity_penalty(alpha, i + 1), NEG_INF)
    all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    all_flags = jnp.concatenate([fin_flags, is_eos], axis=1)
    fin_scores, fin_pick = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, fin_pick[:, :, None], axis=1)
    fin_flags = jnp.take_along_axis(all_flags, fin_pick, axis=1)
    return i + 1, new_live_seqs, new_live_logprobs, fin_seqs, fin_scores, fin_flags, cache

  state = (jnp.int32(0), live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags, cache)
  _, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags, _ = jax.lax.while_loop(
      cond, body, state)
  # Examples where nothing finished within L tokens fall back to their live beams.
  any_finished = jnp.any(fin_flags, axis=1)
  live_scores = live_logprobs / brevity_penalty(alpha, L)
  seqs = jnp.where(any_finished[:, None, None], fin_seqs, live_seqs)
  scores = jnp.where(any_finished[:, None], jnp.where(fin_flags, fin_scores, NEG_INF),
                     live_scores)
  order = jnp.argsort(-scores, axis=1)
  return (jnp.take_along_axis(seqs, order[:, :, None], axis=1),
          jnp.take_along_axis(scores, order, axis=1))


# ----------------------------------------------------------------------------- entry point

def max_length_of(batch, max_decode_length: Optional[int]) -> int:
  if max_decode_length:
    return int(max_decode_length)
  if 'decoder_input_tokens' in batch:
    return int(batch['decoder_input_tokens'].shape[1])
  if 'decoder_target_tokens' in batch:
    return int(batch['decoder_target_tokens'].shape[1])
  raise ValueError('give max_decode_length, or a batch with decoder_input_tokens whose '
                   'length (the task\'s target length) bounds the decode')


def predict(model, params, batch: Mapping[str, Any], rng=None, *,
            max_decode_length: Optional[int] = None, method: Optional[str] = None,
            num_decodes: Optional[int] = None, alpha: Optional[float] = None,
            temperature: float = 1.0, topk: int = 1, return_scores: bool = False,
            return_all_decodes: bool = False, eos_id: int = EOS_ID):
  """Decodes a batch. `method`: 'beam' (t5x's default: num_decodes beams, alpha 0.6),
  'greedy', or 'sample' (temperature, topk). Defaults come from the model's settings."""
  L = max_length_of(batch, max_decode_length)
  num_decodes = num_decodes or model.num_decodes
  alpha = model.length_penalty_alpha if alpha is None else alpha
  method = method or ('greedy' if num_decodes == 1 else 'beam')
  if method == 'beam':
    seqs, scores = beam_search(model, params, batch, L, num_decodes, alpha, eos_id)
    if not return_all_decodes:
      seqs, scores = seqs[:, 0], scores[:, 0]
  elif method in ('greedy', 'sample'):
    if method == 'greedy':
      temperature, topk = 0.0, 1
    rng = jax.random.PRNGKey(0) if rng is None else rng
    seqs, scores = temperature_sample(model, params, batch, rng, L, temperature, topk, eos_id)
  else:
    raise ValueError(f"decoding method {method!r}: use 'greedy', 'beam' or 'sample'")
  return (seqs, scores) if return_scores else seqs


def make_predict_fn(model, layout, replicate_outputs: bool = False,
                    **decode_kwargs) -> Callable:
  """A jitted `fn(params, batch, rng) -> (tokens, scores)`, partitioned like training
  (`fn.hlo_text(params, batch, rng)`: the compiled program's HLO text).

  Compiled once per batch shape; params keep their layout (a layout.ParamLayout of the
  whole model), the batch is split over the mesh's data axis. `replicate_outputs` gives every host all the outputs (evaluation).
  """
  from jax.sharding import PartitionSpec

  def fn(params, batch, rng):
    return predict(model, params, batch, rng, return_scores=True, **decode_kwargs)

  cache = {}

  def jitted(batch):
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in cache:
      cache[key] = jax.jit(
          fn, in_shardings=(layout.shardings, layout.batch_shardings(batch),
                            layout.partitioner.sharding(PartitionSpec())),
          out_shardings=layout.partitioner.sharding(
              PartitionSpec() if replicate_outputs else PartitionSpec('data')))
    return cache[key]

  def call(params, batch, rng):
    with layout.partitioner.context():
      return jitted(batch)(params, batch, rng)

  def hlo_text(params, batch, rng) -> str:
    """The optimized HLO of the program `call` runs for this batch (profiling.op_kinds)."""
    with layout.partitioner.context():
      return jitted(batch).lower(params, batch, rng).compile().as_text()

  call.hlo_text = hlo_text
  return call
