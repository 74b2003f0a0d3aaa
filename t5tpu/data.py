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

from t5tpu import errors

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


class UnknownTaskError(errors.UserError):
  pass


def get_task(name: str):
  import difflib
  import seqio
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise UnknownTaskError(
        f'no seqio task or mixture named {name!r}.{hint} Import the module that registers '
        "it: add `import tasks.<module>` to your gin file or set MIXTURE_OR_TASK_MODULE "
        f'(registered now: {", ".join(known[:20])}{" ..." if len(known) > 20 else ""})'
    ) from None


def task_of(cfg: 'DatasetConfig'):
  """The seqio task or mixture a DatasetConfig names, its module imported first."""
  import_task_module(cfg.module)
  return get_task(cfg.mixture_or_task_name)


def check_task(cfg: DatasetConfig, model) -> None:
  """Refuses, before anything is written, a task the model cannot train on.

  T5's relative position buckets have no maximum length, so any positive feature length is
  valid; what is checked is that the task has the encoder-decoder features, that lengths are
  positive integers, and that the task tokenises with the model's vocabularies (a different
  vocabulary trains without error but on ids that mean other pieces, or beyond the embedding).
  """
  task = task_of(cfg)
  name = cfg.mixture_or_task_name
  lengths = cfg.task_feature_lengths
  if lengths is not None:
    for key in ('inputs', 'targets'):
      value = lengths.get(key) if hasattr(lengths, 'get') else None
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.UserError(
            f'TASK_FEATURE_LENGTHS={dict(lengths)!r}: {key!r} must be a positive number of '
            "tokens, e.g. TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 128}")
  vocab_size = model.config.vocab_size
  for feature, model_vocab in (('inputs', model.input_vocabulary),
                               ('targets', model.output_vocabulary)):
    feat = task.output_features.get(feature)
    if feat is None:
      raise errors.UserError(
          f'task {name!r} has no {feature!r} feature (it has '
          f'{sorted(task.output_features)}); an encoder-decoder T5 needs inputs and targets')
    vocab = feat.vocabulary
    if model_vocab is not None and vocab != model_vocab:
      raise errors.UserError(
          f'task {name!r} tokenises {feature!r} with {_describe_vocab(vocab)}, but the model '
          f'uses {_describe_vocab(model_vocab)}: the ids would mean other pieces. Register the '
          'task with the model\'s vocabulary (tasks use the gin binding '
          'seqio.SentencePieceVocabulary.sentencepiece_model_file, as the model gins do), or '
          'bind the model to the task\'s.')
    if vocab.vocab_size > vocab_size:
      raise errors.UserError(
          f'task {name!r}: its {feature!r} vocabulary has {vocab.vocab_size} ids but the '
          f'model\'s embedding has {vocab_size}: use a model gin with vocab_size >= '
          f'{vocab.vocab_size}')


def _describe_vocab(vocab) -> str:
  path = getattr(vocab, 'sentencepiece_model_file', None)
  extra = getattr(vocab, 'extra_ids', 0)
  where = f' {path}' if path else ''
  return f'{type(vocab).__name__}{where} ({vocab.vocab_size} ids, {extra} extra)'


def feature_converter(pack: bool):
  import seqio
  return seqio.EncDecFeatureConverter(pack=pack)


def get_dataset(cfg: DatasetConfig, shard_id: int = 0, num_shards: int = 1,
                seed: Optional[int] = None, batch: bool = True, drop_remainder: bool = True):
  """tf.data pipeline of this host's batches of model features (numpy-ready)."""
  import seqio
  import tensorflow as tf
  task = task_of(cfg)
  if cfg.batch_size % num_shards:
    raise ValueError(f'batch_size {cfg.batch_size} is not divisible by {num_shards} hosts')
  kwargs = dict(sequence_length=cfg.task_feature_lengths, split=cfg.split,
                use_cached=cfg.use_cached, shuffle=cfg.shuffle, seed=seed,
                # One host reads everything: no ShardInfo, which would make seqio list the
                # source's files (TFDS split metadata that mock data and some builders lack).
                shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
                num_epochs=cfg.num_epochs,
                try_in_mem_cache=False)
  ds = task.get_dataset(**kwargs)
  ds = feature_converter(cfg.pack)(ds, cfg.task_feature_lengths)
  if batch:
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True  # required for exact resume
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


EPOCH_CACHE = 'train_epoch_size.json'


def steps_per_epoch(cfg: DatasetConfig, cache_dir: str, shard_id: int = 0,
                    num_shards: int = 1) -> int:
  """Batches in one pass over the training split (packed as configured), counted once.

  Counting reads the split through preprocessing once; the count is cached in
  `cache_dir/train_epoch_size.json` under the data set-up's fingerprint, so a resumed run (or
  a raised TRAIN_EPOCHS) does not count again. Hosts may hold shards of different sizes:
  process 0's count is everyone's.
  """
  import dataclasses
  import json
  from t5tpu import distributed, storage
  key = fingerprint(dataclasses.replace(cfg, num_epochs=1), shard_id, num_shards)
  path = storage.join(cache_dir, EPOCH_CACHE)
  cached = json.loads(storage.read_text(path)) if storage.exists(path) else {}
  if key in cached:
    return int(cached[key])
  log.info('TRAIN_EPOCHS: counting the batches of one pass over %s/%s (once; cached in %s)',
           cfg.mixture_or_task_name, cfg.split, path)
  # Read as training reads it (the order does not change the count).
  one_pass = dataclasses.replace(cfg, num_epochs=1)
  count = int(get_dataset(one_pass, shard_id, num_shards, seed=0).reduce(
      0, lambda n, _: n + 1))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    count = int(multihost_utils.broadcast_one_to_all(np.int64(count)))
  if count == 0:
    raise errors.UserError(
        f'TRAIN_EPOCHS: the {cfg.split!r} split of {cfg.mixture_or_task_name!r} gives no '
        f'batch of BATCH_SIZE={cfg.batch_size}: use a smaller BATCH_SIZE or more data')
  if distributed.is_primary():
    storage.write_text(path, json.dumps({**cached, key: count}, indent=1) + '\n')
  return count


class InputIterator:
  """Numpy batches from a tf.data pipeline, with a position a restarted run can resume at.

  Resuming must not cost time in proportion to the step: replaying every consumed example
  through preprocessing (`ds.skip(position)`) re-tokenises millions of examples at step 100k.
  So the iterator can take a *snapshot*: tf.data's own serialised iterator state (shuffle
  buffers and file offsets included), small and exact. A restart restores the newest snapshot
  at or before its position and skips only the few batches after it. Pipelines tf.data cannot
  serialise (Python generators, py_function) fall back to skipping, with a log line.
  """

  def __init__(self, make_dataset, seed: int, position: int = 0,
               snapshot: Optional[Mapping[str, Any]] = None, fingerprint: str = ''):
    self.seed = seed
    self.position = position
    self.fingerprint = fingerprint
    self._snapshots_ok = True
    ds = make_dataset(seed)
    self.element_spec = ds.element_spec
    start = self._usable_snapshot(snapshot, position)
    if start is None:
      if position:
        log.info('input pipeline: no snapshot of the input position; replaying %d batches '
                 'already trained on', position)
      self._it = iter(ds.skip(position) if position else ds)
    else:
      self._it = iter(ds)
      try:
        self._restore(snapshot['state'])
      except Exception as e:  # pylint: disable=broad-except
        log.warning('input pipeline: the saved input position does not restore into this '
                    'pipeline (%s); replaying instead', str(e).splitlines()[0][:200])
        self._it = iter(ds.skip(position))
        return
      self._skip(position - start)

  def _usable_snapshot(self, snapshot, position) -> Optional[int]:
    if not snapshot:
      return None
    if snapshot.get('fingerprint') != self.fingerprint:
      log.warning('input pipeline: the saved input position belongs to another data set-up '
                  '(task, split, lengths, batch or shards changed); replaying instead')
      return None
    start = int(snapshot['position'])
    return start if start <= position else None

  def _restore(self, encoded: str) -> None:
    import base64
    import tensorflow as tf
    state = tf.io.parse_tensor(base64.b64decode(encoded), tf.variant)
    tf.raw_ops.DeserializeIterator(resource_handle=self._it._iterator_resource,  # pylint: disable=protected-access
                                   serialized=state)

  def _skip(self, n: int) -> None:
    for _ in range(n):
      next(self._it)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._it)
    self.position += 1
    return {k: v.numpy() for k, v in batch.items()}

  def snapshot(self) -> Optional[dict]:
    """The pipeline's state at the current position (JSON-ready), or None if tf.data cannot
    serialise this pipeline."""
    if not self._snapshots_ok:
      return None
    import base64
    import tensorflow as tf
    try:
      state = tf.raw_ops.SerializeIterator(
          resource_handle=self._it._iterator_resource,  # pylint: disable=protected-access
          external_state_policy=2)  # FAIL: a pipeline with Python state cannot resume exactly
      encoded = base64.b64encode(tf.io.serialize_tensor(state).numpy()).decode('ascii')
    except (tf.errors.OpError, ValueError, TypeError) as e:
      log.info('input pipeline: tf.data cannot snapshot this pipeline (%s); a resumed run '
               'will replay the batches it already trained on', str(e).splitlines()[0])
      self._snapshots_ok = False
      return None
    return {'position': self.position, 'fingerprint': self.fingerprint, 'state': encoded}


def fingerprint(cfg: DatasetConfig, shard_id: int, num_shards: int) -> str:
  """What an input position is relative to: a snapshot is only valid for the same set-up."""
  lengths = sorted((cfg.task_feature_lengths or {}).items())
  return (f'{cfg.mixture_or_task_name}|{cfg.split}|{lengths}|{cfg.batch_size}|{cfg.pack}|'
          f'{cfg.shuffle}|{cfg.num_epochs}|{shard_id}/{num_shards}')


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
  """Moves the next batches to the devices in a background thread (hides host->device time).

  It runs ahead of the train step, so the input iterator's own position is ahead of the
  trained one; with `snapshot_every`, it snapshots the iterator each time that many batches
  have been read, and `snapshot_at(position)` gives the newest snapshot at or before a trained
  position (what a checkpoint stores). `close()` stops the thread.
  """

  def __init__(self, iterator: Iterator, shardings: Mapping[str, Any], size: int = 2,
               snapshot_every: Optional[int] = None):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._iterator = iterator
    self._shardings = shardings
    self._snapshot_every = snapshot_every
    self._snapshots: Dict[int, dict] = {}
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._take_snapshot(force=True)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _take_snapshot(self, force: bool = False) -> None:
    take = getattr(self._iterator, 'snapshot', None)
    every = self._snapshot_every
    if take is None or not every:
      return
    position = self._iterator.position
    if not force and position % every:
      return
    snap = take()
    if snap is not None:
      with self._lock:
        self._snapshots[position] = snap
        for old in sorted(self._snapshots)[:-3]:  # the checkpointed one is among the newest
          del self._snapshots[old]

  def snapshot_at(self, position: int) -> Optional[dict]:
    with self._lock:
      usable = [p for p in self._snapshots if p <= position]
      return self._snapshots[max(usable)] if usable else None

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for batch in self._iterator:
        self._take_snapshot()
        if not self._put(make_global_batch(batch, self._shardings)):
          return
    except Exception as e:  # surfaced on the consumer side
      self._put(e)
      return
    self._put(StopIteration())

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)
