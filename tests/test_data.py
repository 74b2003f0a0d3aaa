"""The input iterator's resume: snapshots give exactly the batches a straight run reads."""
import numpy as np
import pytest

from t5tpu import data
from tests import tiny


def pipeline(copy_task, **kw):
  cfg = data.DatasetConfig(copy_task, tiny.LENGTHS, batch_size=8, **kw)
  return cfg, (lambda seed: data.get_dataset(cfg, seed=seed))


def batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def same(a, b) -> bool:
  return len(a) == len(b) and all(
      sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b))


@pytest.mark.parametrize('past_snapshot', [0, 3])
def test_snapshot_resumes_exactly(copy_task, caplog, past_snapshot):
  """Straight: 20 batches. Resumed: a snapshot at batch 10, the run stopped `past_snapshot`
  batches later, a new iterator continues from there."""
  _, make = pipeline(copy_task)
  straight = batches(data.InputIterator(make, seed=7), 20)
  first = data.InputIterator(make, seed=7, fingerprint='fp')
  batches(first, 10)
  snapshot = first.snapshot()
  assert snapshot['position'] == 10 and len(snapshot['state']) > 100
  with caplog.at_level('INFO'):
    resumed = data.InputIterator(make, seed=7, position=10 + past_snapshot, snapshot=snapshot,
                                 fingerprint='fp')
  assert 'replaying' not in caplog.text
  assert same(batches(resumed, 10 - past_snapshot), straight[10 + past_snapshot:])


def test_snapshot_of_another_setup_is_not_used(copy_task, caplog):
  _, make = pipeline(copy_task)
  straight = batches(data.InputIterator(make, seed=7), 8)
  first = data.InputIterator(make, seed=7, fingerprint='batch 8')
  batches(first, 5)
  with caplog.at_level('INFO'):
    resumed = data.InputIterator(make, seed=7, position=5, snapshot=first.snapshot(),
                                 fingerprint='batch 16')
  assert 'belongs to another data set-up' in caplog.text
  assert same(batches(resumed, 3), straight[5:])  # replayed instead: still exact


def test_pipeline_without_a_snapshot_replays(copy_task):
  """A pipeline tf.data cannot serialise (a Python generator) resumes by replaying."""
  import tensorflow as tf

  def make(seed):
    del seed
    gen = lambda: ({'x': np.full([2], i)} for i in range(100))
    return tf.data.Dataset.from_generator(
        gen, output_signature={'x': tf.TensorSpec([2], tf.int64)}).batch(4)

  it = data.InputIterator(make, seed=0)
  batches(it, 3)
  assert it.snapshot() is None
  resumed = data.InputIterator(make, seed=0, position=3)
  assert int(next(resumed)['x'][0, 0]) == 12


def test_fingerprint_names_what_a_position_depends_on(copy_task):
  cfg, _ = pipeline(copy_task)
  fp = data.fingerprint(cfg, 0, 1)
  assert fp != data.fingerprint(cfg, 1, 2)
  import dataclasses
  assert fp != data.fingerprint(dataclasses.replace(cfg, batch_size=16), 0, 1)
