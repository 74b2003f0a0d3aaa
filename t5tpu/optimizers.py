"""Optimizers (Adafactor with t5x's defaults, AdamW) and t5x-style learning-rate schedules.

Each optimizer is a small config dataclass (configured from gin) that builds an
`optax.GradientTransformation` for a learning-rate schedule and says how its state is laid out
over the mesh (`state_partition_specs`), so the state is created already sharded.

Adafactor's state mirrors t5x's exactly: per parameter `{'v_row', 'v_col', 'v', 'm'}` with
unused slots as zeros of shape [1], so it is saved and restored under t5x's names
(`state/param_states/<param path>/v_row`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import PartitionSpec

Schedule = Callable[[Any], Any]


# ----------------------------------------------------------------------------- schedules

def create_learning_rate_scheduler(factors: str = 'constant',
                                   base_learning_rate: float = 0.001,
                                   warmup_steps: int = 1000,
                                   decay_factor: float = 0.5,
                                   steps_per_decay: int = 20000,
                                   steps_per_cycle: int = 100000,
                                   step_offset: int = 0,
                                   min_learning_rate: float = 1e-8) -> Schedule:
  """A product of named factors, as t5x: e.g. 'constant * linear_warmup * rsqrt_decay'.

  Factors: constant (base_learning_rate), linear_warmup (min(1, step/warmup_steps)),
  rsqrt_decay (1/sqrt(max(step, warmup_steps))), rsqrt_normalized_decay, decay_every,
  cosine_decay (over steps_per_cycle), linear_decay (to 0 at steps_per_cycle).
  The schedule works on Python numbers, numpy and traced jax values alike.
  """
  names = [n.strip() for n in factors.split('*') if n.strip()]
  known = {'constant', 'linear_warmup', 'rsqrt_decay', 'rsqrt_normalized_decay',
           'decay_every', 'cosine_decay', 'linear_decay'}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'unknown learning-rate factor(s) {unknown} in {factors!r}; '
                     f'known: {sorted(known)}')

  def schedule(step):
    xp = np if isinstance(step, (int, float, np.ndarray, np.number)) else jnp
    step = xp.maximum(xp.asarray(step, np.float32) - step_offset, 0.0)
    ret = xp.asarray(1.0, np.float32)
    for name in names:
      if name == 'constant':
        ret = ret * base_learning_rate
      elif name == 'linear_warmup':
        ret = ret * xp.minimum(1.0, step / max(warmup_steps, 1))
      elif name == 'rsqrt_decay':
        ret = ret / xp.sqrt(xp.maximum(step, float(warmup_steps)))
      elif name == 'rsqrt_normalized_decay':
        ret = ret * xp.sqrt(float(warmup_steps)) / xp.sqrt(xp.maximum(step, float(warmup_steps)))
      elif name == 'decay_every':
        ret = ret * decay_factor ** (step // steps_per_decay)
      elif name == 'cosine_decay':
        progress = xp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
        ret = ret * xp.maximum(0.0, 0.5 * (1.0 + xp.cos(math.pi * (progress % 1.0))))
      elif name == 'linear_decay':
        ret = ret * xp.maximum(0.0, 1.0 - step / float(steps_per_cycle))
    return xp.maximum(ret, min_learning_rate)

  return schedule


# ----------------------------------------------------------------------------- Adafactor

class AdafactorState(NamedTuple):
  count: jax.Array  # int32 step counter (the train step)
  param_states: Any  # tree like params, leaves {'v_row', 'v_col', 'v', 'm'}


_SLOTS = ('m', 'v', 'v_col', 'v_row')


def _is_slot_dict(x):
  return isinstance(x, dict) and set(x) == set(_SLOTS)


@dataclasses.dataclass(frozen=True)
class Adafactor:
  """Adafactor (Shazeer & Stern 2018) with t5x's defaults and state layout.

  decay_rate is the exponent of the second-moment schedule beta2_t = 1 - (t+1)^-decay_rate;
  the accumulator is factored into row/column means when the second-largest dimension is at
  least `min_dim_size_to_factor`; updates are clipped to RMS `clipping_threshold` and scaled
  by the parameter's RMS (at least epsilon2). No momentum unless beta1 is set.
  """
  decay_rate: float = 0.8
  step_offset: int = 0
  clipping_threshold: Optional[float] = 1.0
  multiply_by_parameter_scale: bool = True
  min_dim_size_to_factor: int = 128
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  beta1: Optional[float] = None
  weight_decay_rate: Optional[float] = None
  factored: bool = True

  def factored_dims(self, shape):
    """(second-largest dim, largest dim) when the accumulator is factored, else None."""
    if not self.factored or len(shape) < 2:
      return None
    order = np.argsort(shape, kind='stable')
    if shape[order[-2]] < self.min_dim_size_to_factor:
      return None
    return int(order[-2]), int(order[-1])

  def _init_param(self, p):
    state = {k: jnp.zeros((1,), jnp.float32) for k in _SLOTS}
    dims = self.factored_dims(p.shape)
    if dims is None:
      state['v'] = jnp.zeros(p.shape, jnp.float32)
    else:
      d_row, d_col = dims
      state['v_row'] = jnp.zeros(np.delete(p.shape, d_col), jnp.float32)
      state['v_col'] = jnp.zeros(np.delete(p.shape, d_row), jnp.float32)
    if self.beta1 is not None:
      state['m'] = jnp.zeros(p.shape, jnp.float32)
    return state

  def make(self, learning_rate: Union[float, Schedule]) -> optax.GradientTransformation:
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
      return AdafactorState(jnp.zeros((), jnp.int32), jax.tree.map(self._init_param, params))

    def update_one(grad, state, param, step, lr):
      grad = grad.astype(jnp.float32)
      t = (step - self.step_offset).astype(jnp.float32) + 1.0
      decay = 1.0 - t ** (-self.decay_rate)
      new = dict(state)
      grad_sqr = grad * grad + self.epsilon1
      dims = self.factored_dims(param.shape)
      if dims is not None:
        d_row, d_col = dims
        new['v_row'] = decay * state['v_row'] + (1 - decay) * jnp.mean(grad_sqr, axis=d_col)
        new['v_col'] = decay * state['v_col'] + (1 - decay) * jnp.mean(grad_sqr, axis=d_row)
        row_axis_in_v_row = d_row - (1 if d_col < d_row else 0)
        row_mean = jnp.mean(new['v_row'], axis=row_axis_in_v_row, keepdims=True)
        row_factor = jnp.expand_dims((new['v_row'] / row_mean) ** -0.5, d_col)
        col_factor = jnp.expand_dims(new['v_col'] ** -0.5, d_row)
        y = grad * row_factor * col_factor
      else:
        new['v'] = decay * state['v'] + (1 - decay) * grad_sqr
        y = grad * new['v'] ** -0.5
      if self.clipping_threshold is not None:
        y = y / jnp.maximum(1.0, jnp.sqrt(jnp.mean(y * y)) / self.clipping_threshold)
      scale = lr
      if self.multiply_by_parameter_scale:
        scale = scale * jnp.maximum(jnp.sqrt(jnp.mean(param.astype(jnp.float32) ** 2)),
                                    self.epsilon2)
      step_update = scale * y
      if self.beta1 is not None:
        new['m'] = self.beta1 * state['m'] + (1 - self.beta1) * step_update
        step_update = new['m']
      delta = -step_update
      if self.weight_decay_rate is not None:
        delta = delta - self.weight_decay_rate * param
      return delta.astype(param.dtype), new

    def update(grads, state, params=None, global_step=None, **extra_args):
      del extra_args
      if params is None:
        raise ValueError('Adafactor needs the parameters (their scale sets the step size)')
      lr = lr_fn(state.count if global_step is None else global_step)
      out = jax.tree.map(lambda g, s, p: update_one(g, s, p, state.count, lr),
                         grads, state.param_states, params, is_leaf=_is_slot_dict)
      is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and _is_slot_dict(x[1])
      updates = jax.tree.map(lambda o: o[0], out, is_leaf=is_pair)
      new_states = jax.tree.map(lambda o: o[1], out, is_leaf=is_pair)
      return updates, AdafactorState(state.count + 1, new_states)

    return optax.GradientTransformationExtraArgs(init, update)

  def state_partition_specs(self, param_specs, param_shapes):
    """PartitionSpecs of the state, derived from each parameter's spec and shape."""
    def one(spec, shape):
      shape = tuple(shape.shape) if hasattr(shape, 'shape') else tuple(shape)
      spec = tuple(spec) + (None,) * (len(shape) - len(spec))
      out = {k: PartitionSpec(None) for k in _SLOTS}
      dims = self.factored_dims(shape)
      if dims is None:
        out['v'] = PartitionSpec(*spec)
      else:
        d_row, d_col = dims
        out['v_row'] = PartitionSpec(*[s for i, s in enumerate(spec) if i != d_col])
        out['v_col'] = PartitionSpec(*[s for i, s in enumerate(spec) if i != d_row])
      if self.beta1 is not None:
        out['m'] = PartitionSpec(*spec)
      return out
    states = jax.tree.map(one, param_specs, param_shapes,
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
    return AdafactorState(PartitionSpec(), states)

  # A checkpoint stores the state as t5x does: {'step': ..., 'param_states': ...}.
  def state_to_dict(self, opt_state):
    return opt_state.param_states

  def state_from_dict(self, template, param_states, step):
    del template
    return AdafactorState(jnp.asarray(step, jnp.int32), param_states)


# ----------------------------------------------------------------------------- AdamW

@dataclasses.dataclass(frozen=True)
class AdamW:
  """optax's AdamW; its moments are laid out like the parameters they follow."""
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: Optional[float] = 1.0

  def make(self, learning_rate) -> optax.GradientTransformation:
    """optax.adamw's chain, but the learning rate follows the *global* step.

    optax's own schedule counts updates from the optimizer's creation: fine-tuning a t5x
    checkpoint at step 1,000,000 with a fresh AdamW would apply the schedule's step-0 rate
    while the log shows step 1,000,000's. The trainer passes `global_step` (the train
    state's step) to every update, as t5x's schedules see it; Adam's bias correction keeps
    counting its own (fresh) moments. The state tree is optax.adamw's.
    """
    parts = []
    if self.max_grad_norm:
      parts.append(optax.clip_by_global_norm(self.max_grad_norm))
    parts.append(optax.chain(
        optax.scale_by_adam(self.b1, self.b2, self.eps),
        optax.add_decayed_weights(self.weight_decay),
        scale_by_schedule_at_global_step(learning_rate)))
    return optax.chain(*parts)

  def state_partition_specs(self, param_specs, param_shapes):
    tx = self.make(lambda step: 0.0)  # a schedule, as the trainer passes: same state tree
    abstract = jax.eval_shape(tx.init, param_shapes)
    return optax.tree_map_params(
        tx, lambda _, spec: spec, abstract, param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def state_to_dict(self, opt_state):
    return serialization.to_state_dict(opt_state)

  def state_from_dict(self, template, state_dict, step):
    del step  # optax keeps its own counters inside the state
    return serialization.from_state_dict(template, state_dict)


def scale_by_schedule_at_global_step(learning_rate) -> optax.GradientTransformationExtraArgs:
  """-learning_rate(global_step) * updates; without `global_step`, optax's own count.

  The state is optax's ScaleByScheduleState, so checkpoints keep optax.adamw's layout.
  """
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, global_step=None, **extra_args):
    del params, extra_args
    step = state.count if global_step is None else global_step
    step_size = -lr_fn(step)  # as optax.scale_by_learning_rate, to the bit
    updates = jax.tree.map(lambda u: jnp.array(step_size, dtype=u.dtype) * u, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


class OptimizerDef(Protocol):
  """What the trainer and checkpoints need of an optimizer (Adafactor and AdamW are two).

  A delta run hands it only the trainable parameters, so a frozen-parameter optimizer needs
  no implementation of its own.
  """

  def make(self, learning_rate) -> optax.GradientTransformation:
    """The transformation; `update` accepts `global_step` (the train state's step)."""

  def state_partition_specs(self, param_specs, param_shapes):
    """PartitionSpecs of the state, from the parameters' specs and shapes."""

  def state_to_dict(self, opt_state):
    """The state as the checkpoint stores it under state/param_states."""

  def state_from_dict(self, template, state_dict, step):
    """The state back from that dict (`template`: a state of the right structure)."""
