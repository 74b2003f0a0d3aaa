"""Closed-book QA tasks on fake TFDS data: prefixes, targets, all answers, split slices, mixtures."""
import importlib

import pytest
import seqio

import tasks.cbqa  # noqa: F401  (registers the tasks)
from tasks import metrics
from tests.tasks.helpers import fake_tfds, read_split

TRIVIA = [
    {'question': 'Which planet is the Red Planet?', 'question_id': 'q1', 'question_source': 's',
     'answer': {'value': 'Mars', 'aliases': ['Mars', 'Planet Mars', 'Mars (planet)'],
                'normalized_aliases': ['mars'], 'normalized_value': 'mars',
                'matched_wiki_entity_name': '', 'normalized_matched_wiki_entity_name': '',
                'type': 'WikipediaEntity'}},
    {'question': "Who wrote 'Hamlet'?", 'question_id': 'q2', 'question_source': 's',
     'answer': {'value': 'William Shakespeare', 'aliases': ['Shakespeare', 'William Shakespeare'],
                'normalized_aliases': ['shakespeare'], 'normalized_value': 'william shakespeare',
                'matched_wiki_entity_name': '', 'normalized_matched_wiki_entity_name': '',
                'type': 'WikipediaEntity'}},
]
NQ = [{'question': 'who sang hey jude', 'answer': ['The Beatles', 'Beatles']},
      {'question': 'capital of france', 'answer': ['Paris']}]
WQ = [{'question': 'what language do they speak in brazil?',
       'answers': ['Portuguese Language', 'Portuguese'], 'url': 'u'},
      {'question': 'where is the nile?', 'answers': ['Africa'], 'url': 'u'}]
FAKE = {'trivia_qa': TRIVIA, 'natural_questions_open': NQ, 'web_questions': WQ}


@pytest.fixture(scope='module')
def fake_data():
  with fake_tfds(FAKE) as requested:
    yield requested


@pytest.mark.parametrize('task, dataset, prefix, questions, targets, answers', [
    ('trivia_qa_open', 'trivia_qa', 'trivia_qa question: ', [t['question'] for t in TRIVIA],
     ['Mars', 'William Shakespeare'], [t['answer']['aliases'] for t in TRIVIA]),
    ('natural_questions_open', 'natural_questions_open', 'nq question: ',
     [q['question'] for q in NQ], ['The Beatles', 'Paris'], [q['answer'] for q in NQ]),
    ('web_questions_open', 'web_questions', 'wq question: ', [q['question'] for q in WQ],
     ['Portuguese Language', 'Africa'], [q['answers'] for q in WQ]),
])
def test_examples(fake_data, task, dataset, prefix, questions, targets, answers):
  del dataset
  exs = read_split(task, 'validation')
  assert [e['inputs_pretokenized'].decode() for e in exs] == [prefix + q for q in questions]
  assert [e['targets_pretokenized'].decode() for e in exs] == targets  # one answer to train on
  assert [[a.decode() for a in e['answers']] for e in exs] == answers  # all of them to score
  assert all(e['targets'][-1] == 1 for e in exs)  # EOS appended
  # What seqio.Evaluator hands the metric: targets become every gold answer.
  t = seqio.get_mixture_or_task(task)
  assert [t.postprocess_fn(e['targets_pretokenized'].decode(), example=e, is_target=True)
          for e in exs] == answers
  assert t.postprocess_fn('a prediction', example=exs[0], is_target=False) == 'a prediction'


@pytest.mark.parametrize('task, tfds_name, splits', [
    ('trivia_qa_open', 'trivia_qa',
     {'train': 'train[:78785]', 'validation': 'train[78785:]', 'test': 'validation'}),
    ('natural_questions_open', 'natural_questions_open',
     {'train': 'train[:79168]', 'validation': 'train[79168:]', 'test': 'validation'}),
    ('web_questions_open', 'web_questions',
     {'train': 'train[:3417]', 'validation': 'train[3417:]', 'test': 'test'}),
    ('trivia_qa_open_test', 'trivia_qa', {'train': 'train+validation', 'test': 'test'}),
    ('natural_questions_open_test', 'natural_questions_open',
     {'train': 'train', 'validation': 'validation'}),
    ('web_questions_open_test', 'web_questions', {'train': 'train', 'validation': 'test'}),
])
def test_split_slices_read_from_tfds(fake_data, task, tfds_name, splits):
  assert sorted(seqio.get_mixture_or_task(task).splits) == sorted(splits)
  for split, tfds_split in splits.items():
    del fake_data[:]
    read_split(task, split)
    assert fake_data == [(tfds_name, tfds_split)]


def test_tfds_names_and_versions():
  source = seqio.get_mixture_or_task('trivia_qa_open').source
  assert source.tfds_dataset.name == 'trivia_qa/unfiltered.nocontext:1.1.0'
  assert seqio.get_mixture_or_task('natural_questions_open').source.tfds_dataset.name == \
      'natural_questions_open:1.0.0'
  assert seqio.get_mixture_or_task('web_questions_open').source.tfds_dataset.name == \
      'web_questions:1.0.0'


def test_metrics_per_task():
  get = seqio.get_mixture_or_task
  assert get('trivia_qa_open').metric_fns == [metrics.trivia_qa]
  assert get('natural_questions_open').metric_fns == [metrics.squad]
  assert get('web_questions_open').metric_fns == [metrics.squad]


def test_closed_book_qa_mixture_rates_by_example_count(fake_data):
  mix = seqio.get_mixture_or_task('closed_book_qa')
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert rates == {'trivia_qa_open': 78785, 'natural_questions_open': 79168,
                   'web_questions_open': 3417}
  test_mix = seqio.get_mixture_or_task('closed_book_qa_test')
  assert {t.name for t in test_mix.tasks} == {'trivia_qa_open_test',
                                              'natural_questions_open_test',
                                              'web_questions_open_test'}
  # The mixture streams from its tasks in those proportions.
  ds = mix.get_dataset({'inputs': 64, 'targets': 16}, split='train', shuffle=False, seed=0,
                       try_in_mem_cache=False, copy_pretokenized=True)
  prefixes = [e['inputs_pretokenized'].decode().split(':')[0]
              for e in ds.take(400).as_numpy_iterator()]
  counts = {p: prefixes.count(p) for p in set(prefixes)}
  assert counts.get('wq question', 0) < 0.1 * counts['nq question']


def test_trivia_all_follows_the_colab(fake_data):
  nq = read_split('nq_context_free', 'train')
  assert [e['inputs_pretokenized'].decode() for e in nq] == [
      'trivia question: who sang hey jude?', 'trivia question: capital of france?']
  assert [e['targets_pretokenized'].decode() for e in nq] == ['the beatles', 'paris']
  tqa = read_split('triviaqa_context_free', 'validation')
  # lowercased, and the outermost single quotes dropped
  assert [e['inputs_pretokenized'].decode() for e in tqa] == [
      'trivia question: which planet is the red planet?', 'trivia question: who wrote hamlet?']
  assert [e['targets_pretokenized'].decode() for e in tqa] == ['mars', 'william shakespeare']
  mix = seqio.get_mixture_or_task('trivia_all')
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {'nq_context_free': 1.0,
                                                          'triviaqa_context_free': 1.0}
  task = seqio.get_mixture_or_task('triviaqa_context_free')
  assert task.metric_fns == [metrics.accuracy]
  assert task.postprocess_fn('Mars') == 'mars'


def test_reimport_does_not_register_twice():
  before = seqio.get_mixture_or_task('trivia_qa_open')
  importlib.reload(tasks.cbqa)
  assert seqio.get_mixture_or_task('trivia_qa_open') is before


def test_evaluator_scores_predictions_against_all_aliases(fake_data, monkeypatch):
  """seqio.Evaluator runs the task's postprocessor and metric on decoded predictions."""
  # seqio.Evaluator asks TFDS for the split size (to cache it in memory); mocked builders
  # have no split metadata, prepared data does.
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: 2)
  task = seqio.get_mixture_or_task('trivia_qa_open')
  vocab = task.output_features['targets'].vocabulary
  evaluator = seqio.Evaluator('trivia_qa_open', seqio.EncDecFeatureConverter(pack=False),
                              eval_split='validation', use_memory_cache=False,
                              sequence_length={'inputs': 64, 'targets': 32})
  # An alias that is not the training target, and a wrong answer.
  answers = ['planet mars', 'marlowe']

  def predict_fn(ds):  # like a model: fixed-length rows, EOS then padding
    rows = []
    for i, _ in ds.as_numpy_iterator():
      ids = vocab.encode(answers[int(i)]) + [vocab.eos_id]
      rows.append((int(i), ids + [0] * (32 - len(ids))))
    return rows

  results, _ = evaluator.evaluate(compute_metrics=True, step=0, predict_fn=predict_fn)
  assert results.result()['trivia_qa_open'] == {'em': 50.0, 'f1': 50.0}
