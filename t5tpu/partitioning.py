"""Mesh construction and t5x-style logical axis rules.

Every array carries logical axis names (`batch`, `embed`, `mlp`, `heads`, `vocab`, ...); a
rule list maps them to the two mesh axes `data` and `model`. The default rules are t5x's
`standard_logical_axis_rules()` (1-D activation and parameter partitioning); the 2-D variants
shard `embed` over `model` (activations) and/or `data` (parameters, a ZeRO-3-like layout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5tpu import errors

LogicalRules = Sequence[Tuple[str, Optional[str]]]


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Optional[LogicalRules] = None
                                ) -> LogicalRules:
  """t5x's standard rules; `embed` gains `model`/`data` entries for the 2-D variants."""
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise ValueError('activation_partitioning_dims and parameter_partitioning_dims must '
                     f'be 1 or 2, got {activation_partitioning_dims} and '
                     f'{parameter_partitioning_dims}')
  rules = [('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
           ('kv', None), ('joined_kv', 'model')]
  if activation_partitioning_dims == 2:
    rules.append(('embed', 'model'))
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  if activation_partitioning_dims == 1 and parameter_partitioning_dims == 1:
    rules.append(('embed', None))
  rules += [('relpos_buckets', None), ('abspos_buckets', None), ('length', None),
            ('layers', None), ('stack', None), ('mlp_activations', None)]
  return tuple(additional_rules or ()) + tuple(rules)


def default_mesh(num_partitions: int = 1, model_parallel_submesh=None, devices=None) -> Mesh:
  """A ('data', 'model') mesh over all devices; `model` has num_partitions devices.

  `model_parallel_submesh` (t5x's (x, y, z, cores) tuple) takes precedence and sets the
  model-parallel size to its product. On TPU the device order follows the physical topology
  (jax's mesh_utils), so the model axis stays on neighbouring chips.
  """
  devices = list(jax.devices() if devices is None else devices)
  model = int(np.prod(model_parallel_submesh)) if model_parallel_submesh else num_partitions
  if model < 1 or len(devices) % model:
    raise errors.UserError(f'the model-parallel size {model} must divide the {len(devices)} '
                     'devices; change num_partitions (or model_parallel_submesh)')
  shape = (len(devices) // model, model)
  try:
    from jax.experimental import mesh_utils
    arranged = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception as e:  # CPU devices and unusual topologies: plain order works, slower
    log = logging.warning if devices[0].platform in ('tpu', 'gpu') else logging.debug
    log('device mesh %s in plain device order (mesh_utils: %s)', shape, e)
    arranged = np.array(devices).reshape(shape)
  return Mesh(arranged, ('data', 'model'))


@dataclasses.dataclass
class PjitPartitioner:
  """Holds the mesh and the logical rules; turns logical specs into shardings."""
  num_partitions: int = 1
  model_parallel_submesh: Optional[Tuple[int, ...]] = None
  logical_axis_rules: Optional[LogicalRules] = None
  devices: Optional[Sequence] = None  # defaults to jax.devices(); `t5tpu plan` passes TPU ones

  def __post_init__(self):
    if self.logical_axis_rules is None:
      self.logical_axis_rules = standard_logical_axis_rules()
    self.logical_axis_rules = tuple(tuple(r) for r in self.logical_axis_rules)
    self.mesh = default_mesh(self.num_partitions, self.model_parallel_submesh, self.devices)

  @property
  def data_size(self) -> int:
    return self.mesh.shape['data']

  @property
  def model_size(self) -> int:
    return self.mesh.shape['model']

  def mesh_spec(self, logical_spec) -> PartitionSpec:
    """Logical PartitionSpec -> mesh PartitionSpec under this partitioner's rules."""
    return nn.logical_to_mesh_axes(logical_spec, self.logical_axis_rules)

  def sharding(self, mesh_spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(self.mesh, mesh_spec)

  def data_sharding(self, ndim: int = 2) -> NamedSharding:
    """Batches: the leading (batch) dimension over `data`, the rest replicated."""
    return self.sharding(PartitionSpec('data', *([None] * (ndim - 1))))

  @contextlib.contextmanager
  def context(self):
    """Tracing context: activation constraints inside the network resolve on this mesh."""
    with jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
      yield

  def check_batch_size(self, batch_size: int, num_microbatches: Optional[int] = None):
    """Every device holds whole examples of every microbatch.

    A microbatch smaller than the data-parallel size would be padded over the devices, and
    with unevenly sharded activations XLA's SPMD partitioner has given wrong gradients
    (padding rows scattered into the pad token's embedding), besides idle devices."""
    devices = (f'{len(self.mesh.devices.flat)} devices / {self.model_size} model partitions')
    if batch_size % self.data_size:
      raise errors.UserError(f'BATCH_SIZE={batch_size} must be a multiple of the data-parallel '
                             f'size {self.data_size} ({devices})')
    k = num_microbatches or 1
    if batch_size % (self.data_size * k):
      raise errors.UserError(
          f'BATCH_SIZE={batch_size} with NUM_MICROBATCHES={k} gives microbatches that do not '
          f'split evenly over the data-parallel size {self.data_size} ({devices}): BATCH_SIZE '
          f'must be a multiple of {self.data_size} x {k} = {self.data_size * k}; use fewer '
          'microbatches, a larger batch or more model partitions')


@functools.lru_cache(maxsize=64)
def data_shard(mesh: Mesh, process_index: Optional[int] = None) -> Tuple[int, int]:
  """(index, count): the shard of the input data one process reads (t5x's DataLayout).

  A process feeds the batch rows that its devices hold along `data`. Usually each process
  holds its own block of rows (index = process index). When the `model` axis spans processes
  (say 8-way model parallelism on two hosts of four chips), the processes of one
  model-parallel group hold the same rows, so they must read the same shard, and there are
  fewer shards than processes.
  """
  if process_index is None:
    process_index = jax.process_index()
  axis = mesh.axis_names.index('data')
  rows = {}
  for idx, device in np.ndenumerate(mesh.devices):
    rows.setdefault(device.process_index, set()).add(idx[axis])
  blocks = sorted({tuple(sorted(r)) for r in rows.values()})
  flat = [i for block in blocks for i in block]
  if len(flat) != len(set(flat)) or len({len(b) for b in blocks}) != 1:
    raise ValueError('each process must hold whole rows of the data axis, the same number '
                     f'as every other process, and no row held by another: got {blocks}')
  return blocks.index(tuple(sorted(rows[process_index]))), len(blocks)


def describe_sharding(sharding: NamedSharding, shape) -> str:
  """'data x model' style text for model-info.txt."""
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  parts = []
  for dim, axis in zip(shape, spec):
    if axis is None:
      parts.append(f'{dim}')
    else:
      names = axis if isinstance(axis, tuple) else (axis,)
      n = math.prod(sharding.mesh.shape[a] for a in names)
      parts.append(f"{dim}/{n}({','.join(names)})")
  return '[' + ', '.join(parts) + ']'
