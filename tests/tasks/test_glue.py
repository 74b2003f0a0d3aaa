"""The study's GLUE / SuperGLUE tasks, read through seqio from TFDS's mock data."""
import pytest
import seqio

from tasks import catalog, glue
from tests.tasks.helpers import fake_tfds, read_split


def _rows(spec):
  """Three TFDS-like rows: labels 0 and 1, and a hidden test label (-1) the task drops."""
  return [dict({f: f'{f} text {i}' for f in spec.features}, label=label, idx=i)
          for i, label in enumerate([0, 1, -1])]


@pytest.mark.parametrize('name', sorted(glue.TASKS))
def test_task_reads_in_the_t5_format(name):
  spec = glue.TASKS[name]
  dataset = spec.tfds_name.split('/')[0]
  with fake_tfds({dataset: _rows(spec)}) as requested:
    rows = read_split(name, 'validation')
  assert [(d, s) for d, s in requested][-1][1] == spec.validation_split
  assert [r['inputs_pretokenized'].decode() for r in rows] == [
      ' '.join([spec.benchmark] + [f'{f}: {f} text {i}' for f in spec.features])
      for i in range(2)]
  assert [r['targets_pretokenized'].decode() for r in rows] == list(spec.labels[:2])
  assert all(r['targets'][-1] == 1 for r in rows)  # EOS appended


def test_catalog_knows_every_task():
  for name, spec in glue.TASKS.items():
    entry = catalog.CATALOG[name]
    assert (entry.module, entry.category, entry.metric) == ('tasks.glue', spec.category,
                                                            spec.metric)


def test_the_stackoverflow_task_registers_on_the_shipped_sample():
  from tasks import stackoverflow  # registers the task
  assert stackoverflow.paths()['validation'].endswith('stackoverflow_sample_validation.tsv')
  task = seqio.get_mixture_or_task('stackoverflow_tags')
  rows = list(task.get_dataset(None, split='validation', shuffle=False).take(3)
              .as_numpy_iterator())
  assert rows and rows[0]['inputs_pretokenized'].decode().startswith('assign tag: ')
