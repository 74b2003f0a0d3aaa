"""Metrics: official QA normalisation, EM/F1, ROUGE as t5 computes it, accuracy, tag sets."""
import numpy as np
import pytest

from tasks import metrics


@pytest.mark.parametrize('text, expected', [
    ('The Cat!', 'cat'),
    ('  an   Apple a day ', 'apple day'),
    ('theater', 'theater'),  # articles only as whole words
    ('rock-n-roll', 'rocknroll'),  # SQuAD deletes punctuation
    ("Barack_Obama's", 'barackobamas'),  # '_' and "'" are ASCII punctuation: deleted
    ('‘Quoted’', '‘quoted’'),  # SQuAD leaves non-ASCII quotes alone
    ('A.B.C.', 'abc'),
])
def test_normalize_squad(text, expected):
  assert metrics.normalize_squad(text) == expected


@pytest.mark.parametrize('text, expected', [
    ('rock-n-roll', 'rock n roll'),  # TriviaQA replaces punctuation by a space
    ('Barack_Obama', 'barack obama'),
    ('‘Quoted’ ´x` ', 'quoted x'),
    ('The  Beatles.', 'beatles'),
    ("don't", 'don t'),
    ('the a an', ''),
])
def test_normalize_trivia_qa(text, expected):
  assert metrics.normalize_trivia_qa(text) == expected


def test_qa_metrics_max_over_answers_and_mean_over_examples():
  targets = [['Barack Obama', 'Obama'], ['Paris'], ['the Nile river']]
  predictions = ['obama', 'London', 'Nile']
  got = metrics.squad(targets, predictions)
  # ex1: exact match with the alias 'Obama'; ex2: nothing; ex3: F1 of 'nile' vs 'nile river'.
  assert got['em'] == pytest.approx(100 / 3)
  assert got['f1'] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)


def test_qa_f1_counts_repeated_tokens_once_per_occurrence():
  assert metrics.token_f1('a b b', 'b b b') == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
  assert metrics.token_f1('x', 'y') == 0.0


def test_trivia_qa_vs_squad_normalisation_differs_on_underscores():
  targets, predictions = [['Rock_and_roll']], ['rock and roll']
  assert metrics.trivia_qa(targets, predictions)['em'] == 100.0
  assert metrics.squad(targets, predictions)['em'] == 0.0


def test_qa_accepts_single_strings_and_bytes():
  assert metrics.squad(['Paris', [b'Rome']], ['paris', 'rome.'])['em'] == 100.0
  with pytest.raises(ValueError):
    metrics.squad(['a'], ['a', 'b'])


def test_accuracy_is_exact_string_equality():
  assert metrics.accuracy(['a', 'b', 'c', 'd'], ['a', 'b', 'c', 'D']) == {'accuracy': 75.0}


def test_set_metrics():
  got = metrics.set_metrics(['python pandas', 'git', 'c# csv', ''],
                            ['pandas numpy python', 'git', 'java', ''])
  per_example_p = [2 / 3, 1, 0, 1]
  per_example_r = [1, 1, 0, 1]
  per_example_f = [0.8, 1, 0, 1]
  assert got['precision'] == pytest.approx(100 * np.mean(per_example_p))
  assert got['recall'] == pytest.approx(100 * np.mean(per_example_r))
  assert got['f1'] == pytest.approx(100 * np.mean(per_example_f))
  assert got['exact_set_match'] == 50.0
  assert got['micro_precision'] == pytest.approx(100 * 3 / 5)
  assert got['micro_recall'] == pytest.approx(100 * 3 / 5)


def test_tagging_order_and_repeats_do_not_matter_for_sets_but_do_for_accuracy():
  got = metrics.tagging(['python list'], ['list python python'])
  assert got['exact_set_match'] == 100.0 and got['f1'] == 100.0
  assert got['accuracy'] == 0.0


def _rouge_score_directly(targets, predictions, keys):
  from rouge_score import rouge_scorer, scoring
  scorer = rouge_scorer.RougeScorer(list(keys))
  aggregator = scoring.BootstrapAggregator()
  for t, p in zip(targets, predictions):
    aggregator.add_scores(scorer.score(t.replace(' . ', ' .\n'), p.replace(' . ', ' .\n')))
  np.random.seed(0)
  return {k: 100 * v.mid.fmeasure for k, v in aggregator.aggregate().items()}


def test_rouge_matches_rouge_score():
  targets = ['the cat sat on the mat . it was happy .', 'a storm hit the coast on monday .',
             'prices rose sharply in march .']
  predictions = ['the cat was on the mat . the cat was happy .', 'storm hits coast .',
                 'in march prices fell .']
  got = metrics.rouge(targets, predictions)
  assert set(got) == {'rouge1', 'rouge2', 'rougeLsum'}
  expected = _rouge_score_directly(targets, predictions, metrics.ROUGE_KEYS)
  for k in got:
    assert got[k] == pytest.approx(expected[k])


def test_rouge_single_example_values():
  from rouge_score import rouge_scorer
  got = metrics.rouge(['the cat sat . the dog ran .'], ['the dog ran . the cat sat .'])
  scorer = rouge_scorer.RougeScorer(['rougeL', 'rougeLsum'])
  # Sentence splitting makes rougeLsum see two matching sentences; plain rougeL does not.
  assert got['rougeLsum'] == pytest.approx(100.0)
  plain = scorer.score('the cat sat . the dog ran .', 'the dog ran . the cat sat .')
  assert plain['rougeL'].fmeasure < 0.7
  assert got['rouge1'] == pytest.approx(100.0)


def test_rouge_is_repeatable_and_leaves_numpy_random_state_alone():
  targets = ['one two three four', 'five six seven', 'eight nine']
  predictions = ['one two four', 'five seven', 'nine ten']
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  first = metrics.rouge(targets, predictions)
  assert np.array_equal(np.random.get_state()[1], before)
  assert metrics.rouge(targets, predictions) == first
  mean = metrics.rouge_mean(targets, predictions)
  assert set(mean) == set(first)


def test_metric_kinds():
  assert metrics.METRICS_BY_KIND['qa'] == (metrics.squad,)
  assert metrics.METRICS_BY_KIND['tagging'] == (metrics.tagging,)
  assert metrics.METRICS_BY_KIND['summarization'] == (metrics.rouge,)
