"""Train state and the jitted, partitioned train and eval steps.

The train step is compiled once with explicit in/out shardings and donates the old state, so
parameters and optimizer state are updated in place. Gradient accumulation over microbatches
runs inside the step (`lax.scan`). Dropout randomness is `fold_in(base_rng, step)`, so a resumed
run draws exactly the masks an uninterrupted one would. Nothing in the step talks to the host.

With delta tuning (t5tpu.delta) the TrainState holds only the trainable parameters; the
frozen base is a separate, non-donated argument of the step: never differentiated, given no
optimizer state, never checkpointed. Full fine-tuning is the case of an empty frozen part.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import PartitionSpec

from t5tpu import delta as delta_lib
from t5tpu import formats
from t5tpu import layout as layout_lib
from t5tpu import partitioning as partitioning_lib


@struct.dataclass
class TrainState:
  """Step, parameters and optimizer state; the optimizer (an optimizers.OptimizerDef) rides
  along as static data, so the state alone knows how it is saved and restored."""
  step: jax.Array
  params: Any
  opt_state: Any
  optimizer_def: Any = struct.field(pytree_node=False, default=None)

  def state_dict(self) -> dict:
    """The checkpoint's layout: t5x's state dict (see t5tpu.formats)."""
    return formats.make_state_dict(self.params, self.step,
                                   self.optimizer_def.state_to_dict(self.opt_state))

  def restore_state_dict(self, state_dict) -> 'TrainState':
    """A new TrainState from a state dict, using `self` as the structural template."""
    step = formats.step_of(state_dict)
    opt_state = self.optimizer_def.state_from_dict(
        self.opt_state, formats.param_states_of(state_dict), step)
    return self.replace(step=jnp.asarray(step, jnp.int32),
                        params=formats.params_of(state_dict), opt_state=opt_state)


@dataclasses.dataclass
class StateLayout:
  """Abstract shapes, logical specs and shardings of a TrainState."""
  abstract: TrainState  # ShapeDtypeStructs
  logical_specs: TrainState  # params: logical PartitionSpecs; opt_state: derived
  shardings: TrainState  # NamedShardings

  def abstract_with_shardings(self):
    return layout_lib.with_shardings(self.abstract, self.shardings)


def _is_spec(x):
  return isinstance(x, PartitionSpec)


class Trainer:
  """Builds the state layout and the compiled steps for one model on one mesh.

  `params_layout`: every parameter of the model; `layout`: the TrainState (the trainable
  parameters and their optimizer state); `frozen_layout`: the frozen base of a delta run
  (empty otherwise), whose values `set_frozen` hands to the trainer once.

  `param_dtype` ('bfloat16' halves the parameters and their gradients; default float32): the
  update is computed in float32 (Adafactor; AdamW's moments take the parameters' dtype) and
  rounded to nearest, so an update under half a bfloat16 step of its parameter is lost.
  """

  def __init__(self, model, partitioner: partitioning_lib.PjitPartitioner,
               learning_rate_fn, num_microbatches: Optional[int] = None,
               input_shapes: Optional[Mapping[str, tuple]] = None,
               skip_nonfinite_steps: bool = False, param_dtype: Optional[str] = None):
    self.model = model
    self.skip_nonfinite_steps = skip_nonfinite_steps
    self.param_dtype = param_dtype
    self.partitioner = partitioner
    self.learning_rate_fn = learning_rate_fn
    self.num_microbatches = num_microbatches or 1
    self.optimizer_def = model.optimizer_def
    self.tx = self.optimizer_def.make(learning_rate_fn)
    self.input_shapes = dict(input_shapes or {})
    self.delta = delta_lib.config_of(model)
    self.params_layout = layout_lib.ParamLayout.for_model(model, partitioner)
    delta_lib.check_targets(self.delta, self.params_layout.abstract)
    trains = lambda path: self.delta is None or self.delta.trainable(path)
    # PARAM_DTYPE: the trained parameters' dtype in memory (their gradients follow it).
    self.trainable_layout = self.params_layout.subset(trains, dtype=param_dtype)
    self.frozen_layout = self.params_layout.subset(
        lambda path: not trains(path), dtype=self.delta.base_dtype if self.delta else None)
    self.frozen = {}
    self.layout = self._make_layout()
    self._train_step = None
    self._eval_step = None

  # ----------------------------------------------------------------------- layout
  def _make_layout(self) -> StateLayout:
    params = self.trainable_layout
    logical, abstract_params = params.logical, params.abstract
    param_mesh_specs = jax.tree.map(lambda s: s.spec, params.shardings)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_mesh_specs = self.optimizer_def.state_partition_specs(param_mesh_specs,
                                                              abstract_params)
    state = functools.partial(TrainState, optimizer_def=self.optimizer_def)
    abstract = state(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                     opt_state=abstract_opt)
    mesh_specs = state(step=PartitionSpec(), params=param_mesh_specs, opt_state=opt_mesh_specs)
    shardings = jax.tree.map(self.partitioner.sharding, mesh_specs, is_leaf=_is_spec)
    logical_specs = state(step=PartitionSpec(), params=logical, opt_state=opt_mesh_specs)
    return StateLayout(abstract, logical_specs, shardings)

  def init_state(self, rng) -> TrainState:
    """Parameters and optimizer state created directly in their shards (no host copy).

    With a delta, only the trainable parameters: XLA drops the base's initialisation."""
    def init(rng):
      params = self.init_params(rng)
      params, _ = delta_lib.split(self.delta, params)
      params = layout_lib.cast_like(params, self.trainable_layout.abstract)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params), optimizer_def=self.optimizer_def)
    with self.partitioner.context():
      return jax.jit(init, out_shardings=self.layout.shardings)(rng)

  def init_params(self, rng):
    return self.model.init_params(rng, self.input_shapes or layout_lib.input_shapes(
        1, {'inputs': 8, 'targets': 8}))

  def init_frozen(self, rng):
    """A randomly initialised frozen base, in its shards (tests, benchmarks, plans)."""
    def init(rng):
      return delta_lib.split(self.delta, self.init_params(rng))[1]
    with self.partitioner.context():
      return jax.jit(init, out_shardings=self.frozen_layout.shardings)(rng)

  def set_frozen(self, frozen) -> None:
    """The frozen base the steps use (placed in frozen_layout's shardings and dtype)."""
    self.frozen = self.frozen_layout.place(frozen) if frozen else {}

  def full_params(self, params):
    """The whole parameter tree for evaluation and decoding: trainable + frozen."""
    return delta_lib.merge(params, self.frozen)

  def state_from_params(self, params, step: int = 0) -> TrainState:
    """A fresh optimizer state around given (already sharded or host) parameters.

    With a PARAM_DTYPE the parameters are cast to it; without one they keep theirs (a
    restore dtype, as in t5x, decides)."""
    if self.param_dtype:
      params = self.trainable_layout.place(params)
    else:
      params = jax.device_put(params, self.layout.shardings.params)
    with self.partitioner.context():
      opt_state = jax.jit(self.tx.init, out_shardings=self.layout.shardings.opt_state)(params)
    step = jax.device_put(jnp.asarray(step, jnp.int32), self.layout.shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state,
                      optimizer_def=self.optimizer_def)

  # ----------------------------------------------------------------------- steps
  def batch_shardings(self, batch_spec: Mapping[str, Any]):
    return self.params_layout.batch_shardings(batch_spec)

  def _grads_and_metrics(self, params, frozen, batch, dropout_rng):
    normalizer, weights = self.model.loss_normalizer(batch)
    batch = {**batch, 'decoder_loss_weights': weights}
    loss_fn = lambda p, *a: self.model.loss_fn(delta_lib.merge(p, frozen), *a)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = self.num_microbatches
    if k == 1:
      (_, metrics), grads = grad_fn(params, batch, dropout_rng, normalizer)
      return grads, metrics

    # At trace time, for callers that skip train.py's check of the gin values.
    self.partitioner.check_batch_size(jax.tree.leaves(batch)[0].shape[0], k)

    def split(x):  # [b, ...] -> [k, b/k, ...]; each microbatch takes a slice of every shard
      b = x.shape[0]
      x = x.reshape((b // k, k) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, inputs):
      grads_acc, metrics_acc = carry
      i, mb = inputs
      mb = jax.tree.map(lambda x: nn.with_logical_constraint(
          x, ('batch',) + (None,) * (x.ndim - 1)), mb)
      (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(dropout_rng, i),
                                    normalizer)
      return (jax.tree.map(jnp.add, grads_acc, grads),
              jax.tree.map(jnp.add, metrics_acc, metrics)), None

    zeros_grads = jax.tree.map(jnp.zeros_like, params)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), dropout_rng,
                        normalizer)[0][1])
    zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(body, (zeros_grads, zeros_metrics),
                                       (jnp.arange(k), micro))
    return grads, metrics

  def _train_step_fn(self, state: TrainState, frozen, batch, base_rng):
    dropout_rng = jax.random.fold_in(base_rng, state.step)
    grads, metrics = self._grads_and_metrics(state.params, frozen, batch, dropout_rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params,
                                        global_step=state.step)
    params = optax.apply_updates(state.params, updates)
    # One flag per step, read by the host with the other metrics (no sync of its own): a
    # non-finite loss or update (NaN/Inf gradients, a NaN learning rate) would poison every
    # later step and checkpoint. The new parameters are checked, not the updates: they are
    # non-finite whenever an update is (the old ones were checked a step ago), and they
    # live anyway, where reducing each update kept it alive past its in-place apply (0.56
    # GiB more per core for T5.1.1-XXL on a v2-8, batch 8 no longer fitting).
    finite = jnp.isfinite(metrics['loss']) & all_finite(params)
    if self.skip_nonfinite_steps:  # keep the old parameters and optimizer state
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {**metrics, 'nonfinite_steps': 1 - finite.astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def compile_train_step(self, batch_spec: Mapping[str, Any]):
    """jit(state, frozen, batch, rng) with explicit shardings; the old state's buffers are
    donated to the new one (the frozen base is only read)."""
    rng_sharding = self.partitioner.sharding(PartitionSpec())
    return jax.jit(self._train_step_fn,
                   in_shardings=(self.layout.shardings, self.frozen_layout.shardings,
                                 self.batch_shardings(batch_spec), rng_sharding),
                   out_shardings=(self.layout.shardings, rng_sharding),
                   donate_argnums=(0,))

  def _jitted_train_step(self, batch):
    if self._train_step is None:
      self._train_step = self.compile_train_step(batch)
    return self._train_step

  def train_step(self, state: TrainState, batch, base_rng):
    with self.partitioner.context():
      return self._jitted_train_step(batch)(state, self.frozen, batch, base_rng)

  def train_step_hlo(self, state: TrainState, batch, base_rng) -> str:
    """The optimized HLO text of the compiled train step (profiling.op_kinds reads it); after
    a step has run, jax's compilation cache makes this cheap."""
    with self.partitioner.context():
      lowered = self._jitted_train_step(batch).lower(state, self.frozen, batch, base_rng)
      return lowered.compile().as_text()

  def eval_step(self, params, batch):
    """Teacher-forced metric sums for one batch (no dropout); `params` as in the state."""
    if self._eval_step is None:
      self._eval_step = jax.jit(
          lambda p, f, b: self.model.eval_fn(delta_lib.merge(p, f), b),
          in_shardings=(self.layout.shardings.params, self.frozen_layout.shardings,
                        self.batch_shardings(batch)),
          out_shardings=self.partitioner.sharding(PartitionSpec()))
    with self.partitioner.context():
      return self._eval_step(params, self.frozen, batch)


def all_finite(tree) -> jax.Array:
  """Whether every floating value in a tree is finite (one reduction per leaf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# --------------------------------------------------------------------------- throughput

def train_flops_per_example(cfg, input_length: int, target_length: int) -> float:
  """Model FLOPs of one training example (forward + backward = 6 x multiply-accumulates).

  The usual transformer count: projections, FFN, attention scores and values, cross-attention
  keys/values per input token, and the logits layer (embedding lookups and norms excluded).
  """
  d, inner, ff, vocab = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  n_ffn = len(cfg.mlp_activations) + 1  # wi (or wi_0, wi_1) and wo
  ti, to = input_length, target_length
  enc = cfg.num_encoder_layers * ti * (4 * d * inner + n_ffn * d * ff + 2 * ti * inner)
  dec = cfg.num_decoder_layers * (
      to * (4 * d * inner + 2 * d * inner + n_ffn * d * ff + 2 * to * inner + 2 * ti * inner)
      + ti * 2 * d * inner)
  logits = to * d * vocab
  return 6.0 * (enc + dec + logits)


# Dense bf16 peak per jax device (a TPU v2/v3 device is one core, half a chip).
_PEAK_FLOPS = {
    'tpu v2': 46e12 / 2, 'tpu v3': 123e12 / 2, 'tpu v4': 275e12, 'tpu v5 lite': 197e12,
    'tpu v5e': 197e12, 'tpu v5p': 459e12, 'tpu v5': 459e12, 'tpu v6 lite': 918e12,
    'tpu v6e': 918e12, 'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'l4': 121e12,
}


@functools.lru_cache(maxsize=None)
def peak_flops_per_device(device_kind: str, platform: str) -> Optional[float]:
  """Peak FLOP/s of one device: a table for accelerators, a short measurement for CPUs."""
  kind = device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops
  if platform == 'cpu':
    return _measure_cpu_matmul_flops()
  return None


def _measure_cpu_matmul_flops() -> float:
  """CPU 'peak': float32 matmul throughput of this machine, the best of 20 runs after 10
  untimed ones (~0.5 s on 2 cores). With 5 runs and one warm-up, the first matmuls of a
  process (thread pools and clocks still waking) gave peaks under what the train step's own
  matmuls then reached, and MFU over 100%."""
  import time
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  for _ in range(10):
    mm(a).block_until_ready()
  best = float('inf')
  for _ in range(20):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best
