"""seqio glue: per-host datasets of model features, and an input iterator that can resume.

Each host reads only its shard of a task or mixture (seqio ShardInfo), converts it with
seqio's EncDecFeatureConverter (packed for training) and batches it. The iterator counts the
batches it has handed out; that count and the shuffle seed are saved with every checkpoint, and
a restart rebuilds the same deterministic pipeline and skips that many batches, so a resumed
run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any, Dict, Iterator, Mapping, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DatasetConfig:
  """Which data to read and how (field names follow t5x's DatasetConfig)."""
  mixture_or_task_name: str = ''
  task_feature_lengths: Optional[Mapping[str, int]] = None
  split: str = 'train'
  batch_size: int = 128  # global batch, over all hosts
  shuffle: bool = True
  seed: Optional[int] = None  # None: chosen at the first start, then kept in checkpoints
  use_cached: bool = False
  pack: bool = True
  module: Optional[str] = None  # a module to import to register the task
  num_epochs: Optional[int] = None  # None repeats forever (training)


def import_task_module(name: Optional[str]):
  if name:
    import importlib
    importlib.import_module(name)


def get_task(name: str):
  import seqio
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(
        f'no seqio task or mixture named {name!r}. Import the module that registers it: '
        "add `import tasks.<module>` to your gin file or set DatasetConfig.module "
        f'(known tasks: {", ".join(sorted(seqio.TaskRegistry.names())[:20])} ...)') from e


def feature_converter(pack: bool):
  import seqio
  return seqio.EncDecFeatureConverter(pack=pack)


def get_dataset(cfg: DatasetConfig, shard_id: int = 0, num_shards: int = 1,
                seed: Optional[int] = None, batch: bool = True, drop_remainder: bool = True):
  """tf.data pipeline of this host's batches of model features (numpy-ready)."""
  import seqio
  import tensorflow as tf
  import_task_module(cfg.module)
  task = get_task(cfg.mixture_or_task_name)
  if cfg.batch_size % num_shards:
    raise ValueError(f'batch_size {cfg.batch_size} is not divisible by {num_shards} hosts')
  kwargs = dict(sequence_length=cfg.task_feature_lengths, split=cfg.split,
                use_cached=cfg.use_cached, shuffle=cfg.shuffle, seed=seed,
                shard_info=seqio.ShardInfo(shard_id, num_shards), num_epochs=cfg.num_epochs,
                try_in_mem_cache=False)
  ds = task.get_dataset(**kwargs)
  ds = feature_converter(cfg.pack)(ds, cfg.task_feature_lengths)
  if batch:
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True  # required for exact resume
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class InputIterator:
  """Numpy batches from a tf.data pipeline, with a resumable position.

  `state()` is what checkpoints store; `InputIterator.resume(make_ds, state)` rebuilds the
  pipeline with the same seed and skips the batches already consumed.
  """

  def __init__(self, make_dataset, seed: int, position: int = 0):
    self.seed = seed
    self.position = position
    ds = make_dataset(seed)
    if position:
      log.info('input pipeline: skipping %d batches already trained on', position)
      ds = ds.skip(position)
    self._it = iter(ds.as_numpy_iterator())

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._it)
    self.position += 1
    return batch

  def state(self) -> dict:
    return {'position': self.position, 'seed': self.seed}


def make_global_batch(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any]):
  """This host's rows -> global jax Arrays sharded over the mesh's data axis.

  The global batch is this host's rows times the number of data shards (hosts that share a
  model-parallel group read the same shard: partitioning.data_shard).
  """
  from t5tpu import partitioning
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    _, num_shards = partitioning.data_shard(shardings[k].mesh)
    out[k] = jax.make_array_from_process_local_data(
        shardings[k], v, (v.shape[0] * num_shards,) + v.shape[1:])
  return out


class DevicePrefetcher:
  """Moves the next batches to the devices in a background thread (hides host->device time)."""

  def __init__(self, iterator: Iterator, shardings: Mapping[str, Any], size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._iterator = iterator
    self._shardings = shardings
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    try:
      for batch in self._iterator:
        self._queue.put(make_global_batch(batch, self._shardings))
    except Exception as e:  # surfaced on the consumer side
      self._queue.put(e)
      return
    self._queue.put(StopIteration())

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item
