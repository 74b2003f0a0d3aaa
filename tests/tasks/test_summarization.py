"""Summarization tasks on fake TFDS data: prefix, fields, splits, metric and mixture."""
import pytest
import seqio

import tasks.summarization  # noqa: F401  (registers the tasks)
from tasks import metrics
from tests.tasks.helpers import fake_tfds, read_split

CNN = [{'article': 'The council met on Monday . It approved the budget .',
        'highlights': 'Council approves budget .', 'id': '1', 'publisher': 'cnn'}]
XSUM = [{'document': 'Heavy rain flooded roads across the region overnight .',
         'summary': 'Floods hit the region.'}]


@pytest.fixture(scope='module')
def fake_data():
  with fake_tfds({'cnn_dailymail': CNN, 'xsum': XSUM}) as requested:
    yield requested


@pytest.mark.parametrize('task, tfds_name, dataset, source, target', [
    ('cnn_dailymail_v002', 'cnn_dailymail:3.4.0', 'cnn_dailymail', CNN[0]['article'],
     CNN[0]['highlights']),
    ('xsum', 'xsum:1.1.0', 'xsum', XSUM[0]['document'], XSUM[0]['summary']),
])
def test_summarize_examples(fake_data, task, tfds_name, dataset, source, target):
  t = seqio.get_mixture_or_task(task)
  assert t.source.tfds_dataset.name == tfds_name
  assert t.metric_fns == [metrics.rouge]
  for split in ('train', 'validation', 'test'):
    del fake_data[:]
    [ex] = read_split(task, split)
    assert fake_data == [(dataset, split)]
    assert ex['inputs_pretokenized'].decode() == 'summarize: ' + source
    assert ex['targets_pretokenized'].decode() == target


def test_inputs_are_trimmed_and_end_with_eos(fake_data):
  [ex] = read_split('cnn_dailymail_v002', 'train', {'inputs': 8, 'targets': 4})
  assert len(ex['inputs']) == 8 and ex['inputs'][-1] == 1
  assert len(ex['targets']) <= 4 and ex['targets'][-1] == 1


def test_summarization_mixture_rates(fake_data):
  mix = seqio.get_mixture_or_task('summarization')
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert rates == {'cnn_dailymail_v002': 287_113, 'xsum': 204_045}
