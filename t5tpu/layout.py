"""Where a model's parameters live on the mesh: shapes, logical axes and shardings.

Training, evaluation, inference and `t5tpu plan` all need the parameter layout; only
training needs an optimizer. `ParamLayout.for_model` derives it from the model alone (no
batch: parameter shapes do not depend on it), and `subset` gives the layout of a part of the
tree, e.g. the trainable and the frozen parameters of a delta run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec

from t5tpu import partitioning as partitioning_lib


def input_shapes(batch_size: int, lengths: Mapping[str, int]) -> dict:
  """The network's input shapes for a batch of examples of these feature lengths."""
  return {'encoder_input_tokens': (batch_size, lengths['inputs']),
          'decoder_input_tokens': (batch_size, lengths['targets'])}


def _is_spec(x):
  return isinstance(x, PartitionSpec)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry their shardings (for lowering and orbax restores)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def unshared(tree):
  """The tree with every array in a buffer of its own.

  Restores and jitted initialisers may hand back one device buffer for several equal arrays
  (Adafactor's [1] zero slots, equal restored values); the train step donates its state, and
  XLA refuses to donate a buffer twice.
  """
  return jax.tree.map(lambda x: x.copy(), tree)


@dataclasses.dataclass
class ParamLayout:
  """A parameter tree's ShapeDtypeStructs, logical PartitionSpecs and NamedShardings."""
  partitioner: partitioning_lib.PjitPartitioner
  abstract: Any
  logical: Any
  shardings: Any

  @classmethod
  def for_model(cls, model, partitioner: partitioning_lib.PjitPartitioner) -> 'ParamLayout':
    with partitioner.context():
      boxed = model.abstract_variables(input_shapes(1, {'inputs': 8, 'targets': 8}))['params']
    logical = nn.get_partition_spec(boxed)
    shardings = jax.tree.map(lambda s: partitioner.sharding(partitioner.mesh_spec(s)),
                             logical, is_leaf=_is_spec)
    return cls(partitioner, nn.unbox(boxed), logical, shardings)

  def subset(self, keep: Callable[[tuple], bool], dtype: Optional[str] = None) -> 'ParamLayout':
    """The layout of the leaves whose path `keep(path)` accepts (floating leaves in `dtype`)."""
    abstract = pick_specs(self.abstract, keep)
    if dtype is not None:
      dt = jnp.dtype(dtype)
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), abstract)
    return ParamLayout(self.partitioner, abstract,
                       pick_specs(self.logical, keep), pick_specs(self.shardings, keep))

  def abstract_with_shardings(self):
    """ShapeDtypeStructs that carry their shardings (for lowering and orbax restores)."""
    return with_shardings(self.abstract, self.shardings)

  def place(self, params):
    """Host or device parameters onto this layout's shardings, in its dtypes."""
    return jax.device_put(cast_like(params, self.abstract), self.shardings)

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict:
    return {k: self.partitioner.data_sharding(len(v.shape)) for k, v in batch.items()}

  def num_values(self) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(self.abstract))


def cast_like(tree, abstract):
  """Each leaf of `tree` in the dtype of its counterpart in `abstract` (host or traced)."""
  return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x,
                      tree, abstract)


def pick_specs(tree, keep: Callable[[tuple], bool]):
  """The leaves of a nested dict (of arrays, specs or shardings) whose path `keep` accepts."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep(k)})
