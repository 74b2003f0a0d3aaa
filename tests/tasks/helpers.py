"""Test helpers for tasks: seqio's offline SentencePiece model, fake TFDS data, reading splits."""
import contextlib
import os


def seqio_test_spm() -> str:
  """The 26-piece SentencePiece model shipped inside the seqio wheel."""
  import seqio
  return os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                      'sentencepiece.model')


@contextlib.contextmanager
def fake_tfds(examples_by_dataset):
  """tfds.testing.mock_data that serves `examples_by_dataset[name]` (a list of dicts) and
  records which (dataset, split) pairs were read, split slices included."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  requested = []

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    requested.append((self.name, str(split)))
    rows = examples_by_dataset[self.name]
    columns = {}
    for key in rows[0]:
      values = [r[key] for r in rows]
      if isinstance(values[0], dict):
        columns[key] = {k: _column([v[k] for v in values]) for k in values[0]}
      else:
        columns[key] = _column(values)
    return tf.data.Dataset.from_tensor_slices(columns)

  def _column(values):
    if isinstance(values[0], list):
      return tf.ragged.constant(values, dtype=tf.string)
    return tf.constant(values)

  try:
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
      yield requested
  finally:
    forget_tfds_builders()


def forget_tfds_builders():
  """seqio memoizes TFDS builders, mocked split sizes included: a test that mocks TFDS must
  not see an earlier test's, nor leave its own to later tests."""
  import seqio
  seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()  # pylint: disable=protected-access


def read_split(task_name, split, lengths=None):
  """All examples of one split of a task, as numpy dicts (no shuffling, no in-memory cache)."""
  import seqio
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(lengths or {'inputs': 512, 'targets': 128}, split=split, shuffle=False,
                        try_in_mem_cache=False)
  return list(ds.as_numpy_iterator())
