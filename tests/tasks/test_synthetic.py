"""The study's offline suite: well-formed examples, disjoint splits, structure, metrics, vocab."""
import collections

import numpy as np
import pytest
import seqio

from tasks import catalog, metrics, synthetic
from tests.tasks.helpers import read_split

TASKS = list(synthetic.INFO)
LABELS = {'synth_movies': {'positive', 'negative'}, 'synth_products': {'positive', 'negative'},
          'synth_nli': set(synthetic.NLI_LABELS)}


@pytest.mark.parametrize('task', TASKS + [synthetic.CORPUS])
def test_examples_are_well_formed_deterministic_and_disjoint(task):
  train, validation = (synthetic.examples(task, s) for s in synthetic.SPLITS)
  assert train == synthetic.examples(task, 'train')  # fixed seeds
  for e in train + validation:
    assert isinstance(e['inputs'], str) and e['inputs'].strip()
    assert isinstance(e['targets'], str) and e['targets'].strip()
  if task in LABELS:
    assert {e['targets'] for e in train} == LABELS[task]
  if task in synthetic.INFO and synthetic.INFO[task].sizes[0]:
    assert (len(train), len(validation)) == synthetic.INFO[task].sizes
  if task != synthetic.CORPUS:  # the corpus's validation re-corrupts training texts
    assert not {e['inputs'] for e in train} & {e['inputs'] for e in validation}


def test_labels_are_balanced_enough_to_need_learning():
  for task in LABELS:
    counts = collections.Counter(e['targets'] for e in synthetic.examples(task, 'train'))
    assert max(counts.values()) / sum(counts.values()) < 0.6, (task, counts)


def test_qa_validation_asks_every_fact_in_a_wording_training_never_uses():
  train_people, val_people, cities = synthetic._people_split()
  assert not set(train_people) & set(val_people)
  train = synthetic.examples('synth_qa', 'train')
  validation = synthetic.examples('synth_qa', 'validation')
  assert len(validation) == 3 * (len(train_people) + len(val_people))
  train_questions = {e['inputs'] for e in train}
  for e in validation:
    assert e['inputs'] not in train_questions and e['answers'] == [e['targets']]
  # every fact is also stated in the pre-training corpus
  corpus = ' '.join(synthetic.corpus_texts())
  for person, facts in {**train_people, **val_people}.items():
    assert f'{person} was born in {facts["birth_city"]}.' in corpus


def test_nli_labels_follow_from_the_premise():
  train_people, _, cities = synthetic._people_split()
  facts_of = {p: f for p, f in train_people.items()}
  for e in synthetic.examples('synth_nli', 'train')[:400]:
    premise, hypothesis = e['inputs'][len('nli premise: '):].split(' hypothesis: ')
    person = next(p for p in facts_of if premise.startswith(p))
    facts = facts_of[person]
    stated = [v for v in facts.values() if v in premise]
    claimed = hypothesis.rstrip('.').split(' ')[-1]
    if e['targets'] == 'entailment':
      assert hypothesis.startswith(person)
      assert claimed in stated or claimed == cities[facts['birth_city']]
    elif e['targets'] == 'contradiction':
      assert hypothesis.startswith(person) and claimed not in facts.values()
      assert claimed not in premise and claimed != cities[facts['birth_city']]
    else:  # neutral: another person, or a relation the premise does not state
      assert not hypothesis.startswith(person) or claimed not in premise


def test_tags_name_the_topics_of_the_post_and_not_the_distractor():
  for e in synthetic.examples('synth_tags', 'train')[:300]:
    tags = e['targets'].split()
    assert tags == sorted(tags) and set(tags) <= set(synthetic.TOPICS)
    text = e['inputs']
    for topic, words in synthetic.TOPICS.items():
      mentioned = [w for w in words if f' {w}' in text]
      distractor = any(d.format(k=w)[:-1] in text for d in synthetic._DISTRACTORS for w in words)
      if topic in tags:
        assert mentioned
      elif mentioned:
        assert distractor


def test_span_corruption_reassembles_the_text():
  rng = np.random.RandomState(0)
  for text in synthetic.corpus_texts()[::50]:
    inputs, targets = synthetic.corrupt(rng, text)
    pieces = dict(zip(synthetic.SENTINELS, [''] * 2))
    parts = targets.split()
    current = None
    for word in parts:
      if word in synthetic.SENTINELS:
        current = word
      else:
        pieces[current] = (pieces[current] + ' ' + word).strip()
    rebuilt = ' '.join(pieces.get(w, w) for w in inputs.split())
    assert rebuilt == text


def test_metrics_on_known_cases():
  assert metrics.accuracy(['positive', 'negative'], ['positive', 'positive']) == {
      'accuracy': 50.0}
  assert metrics.tagging(['astronomy music'], ['music astronomy'])['f1'] == 100.0
  assert metrics.tagging(['astronomy music'], ['music'])['f1'] == pytest.approx(200 / 3)
  assert metrics.squad([['Trasmir']], ['trasmir.'])['em'] == 100.0


def test_catalog_agrees_with_the_suite():
  for task, info in synthetic.INFO.items():
    entry = catalog.CATALOG[task]
    assert (entry.module, entry.category, entry.metric) == (
        'tasks.synthetic', info.category, info.metric)
  categories = {catalog.CATALOG[t].category for t in catalog.SYNTHETIC_SUITE}
  assert len(catalog.SYNTHETIC_SUITE) >= 4 and len(categories) >= 3


def test_shipped_vocabulary_matches_the_generator():
  with open(synthetic.SPM_PATH, 'rb') as f:
    shipped = f.read()
  assert shipped == synthetic.build_sentencepiece_model(), (
      'tasks/data/synthetic_spm.model is stale: run `python -m tasks.synthetic`')


def test_registered_tasks_read_through_seqio_with_the_shared_vocabulary():
  vocab = synthetic.vocabulary()
  assert vocab.vocab_size == synthetic.VOCAB_SIZE
  assert [len(vocab.encode(s)) for s in synthetic.SENTINELS] == [2, 2]  # '▁' + the sentinel
  for task in TASKS:
    assert seqio.get_mixture_or_task(task).output_features['targets'].vocabulary == vocab
    rows = read_split(task, 'validation')
    assert len(rows) == len(synthetic.examples(task, 'validation'))
    assert all(r['targets'][-1] == 1 for r in rows)  # EOS
