"""Metric functions for seqio tasks: QA exact match / F1, ROUGE, accuracy, tag-set P/R/F1.

Every public function has seqio's metric signature `(targets, predictions) -> {name: float}`,
so it can go straight into a task's `metric_fns` and be run by `seqio.Evaluator`. Values are
percentages (x100), as the t5 library reports them.

QA normalisation follows the official evaluation scripts (as the t5 library does):
- SQuAD v1.1: lowercase; delete ASCII punctuation; drop the words a/an/the; collapse spaces.
- TriviaQA: the same, except that punctuation plus the quote-like characters ‘ ’ ´ ` and the
  underscore are replaced by a space instead of deleted, and the result is stripped.
EM and F1 take the maximum over all gold answers of an example, then the mean over examples.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_SQUAD_PUNCTUATION = frozenset(string.punctuation)
_TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation + '‘’´`_')


def _normalize(text: str, punctuation: frozenset, replacement: str) -> str:
  text = text.lower()
  text = ''.join(replacement if ch in punctuation else ch for ch in text)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def normalize_squad(text: str) -> str:
  return _normalize(text, _SQUAD_PUNCTUATION, '')


def normalize_trivia_qa(text: str) -> str:
  return _normalize(text, _TRIVIA_QA_PUNCTUATION, ' ').strip()


def token_f1(target: str, prediction: str) -> float:
  """F1 of the whitespace tokens of two (normalised) strings, counting repeats."""
  pred_tokens, target_tokens = prediction.split(), target.split()
  overlap = sum((collections.Counter(pred_tokens) & collections.Counter(target_tokens)).values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(pred_tokens)
  recall = overlap / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


Answers = Union[str, Sequence[str]]


def _as_answer_list(answers: Answers) -> list:
  if isinstance(answers, (str, bytes)):
    answers = [answers]
  return [a.decode('utf-8') if isinstance(a, bytes) else str(a) for a in answers]


def qa_metrics(targets: Sequence[Answers], predictions: Sequence[str],
               normalize: Callable[[str], str] = normalize_squad) -> dict:
  """{'em', 'f1'}: max over each example's gold answers, mean over examples, x100."""
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  if not targets:
    return {'em': 0.0, 'f1': 0.0}
  em = f1 = 0.0
  for answers, prediction in zip(targets, predictions):
    golds = [normalize(a) for a in _as_answer_list(answers)]
    pred = normalize(prediction)
    if not golds:
      continue  # no gold answer: scores 0, as max over an empty set would not exist
    em += max(float(pred == g) for g in golds)
    f1 += max(token_f1(g, pred) for g in golds)
  return {'em': 100 * em / len(targets), 'f1': 100 * f1 / len(targets)}


def squad(targets: Sequence[Answers], predictions: Sequence[str]) -> dict:
  """EM/F1 with SQuAD normalisation (Natural Questions, WebQuestions, custom QA)."""
  return qa_metrics(targets, predictions, normalize_squad)


def trivia_qa(targets: Sequence[Answers], predictions: Sequence[str]) -> dict:
  """EM/F1 with TriviaQA normalisation, against all answer aliases."""
  return qa_metrics(targets, predictions, normalize_trivia_qa)


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """{'accuracy'}: exact string equality, x100 (as t5's metrics.accuracy)."""
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  if not targets:
    return {'accuracy': 0.0}
  return {'accuracy': 100 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def split_tags(text: Union[str, Iterable[str]], separator: str = None) -> frozenset:
  """A tag string ('python pandas') or a list of tags -> a set of tags (no empty ones)."""
  if isinstance(text, (str, bytes)):
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    tags = text.split(separator)
  else:
    tags = list(text)
  return frozenset(t.strip() for t in tags if t and t.strip())


def set_metrics(targets: Sequence, predictions: Sequence, separator: str = None) -> dict:
  """Tag-set metrics: {'exact_set_match', 'precision', 'recall', 'f1'} x100.

  Each example's target and prediction are sets of tags (whitespace-separated by default;
  order and repeats do not matter). precision/recall/f1 are per-example values averaged over
  examples (an empty prediction for an empty target counts as perfect);
  `micro_precision`/`micro_recall`/`micro_f1` pool the tag counts of all examples.
  """
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  n = len(targets)
  if not n:
    return {k: 0.0 for k in ('exact_set_match', 'precision', 'recall', 'f1', 'micro_precision',
                             'micro_recall', 'micro_f1')}
  exact = p_sum = r_sum = f_sum = 0.0
  tp_all = pred_all = gold_all = 0
  for target, prediction in zip(targets, predictions):
    gold, pred = split_tags(target, separator), split_tags(prediction, separator)
    tp = len(gold & pred)
    tp_all, pred_all, gold_all = tp_all + tp, pred_all + len(pred), gold_all + len(gold)
    exact += float(gold == pred)
    p = tp / len(pred) if pred else float(not gold)
    r = tp / len(gold) if gold else float(not pred)
    p_sum, r_sum = p_sum + p, r_sum + r
    f_sum += 2 * p * r / (p + r) if p + r else 0.0
  micro_p = tp_all / pred_all if pred_all else 0.0
  micro_r = tp_all / gold_all if gold_all else 0.0
  micro_f = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
  return {'exact_set_match': 100 * exact / n, 'precision': 100 * p_sum / n,
          'recall': 100 * r_sum / n, 'f1': 100 * f_sum / n, 'micro_precision': 100 * micro_p,
          'micro_recall': 100 * micro_r, 'micro_f1': 100 * micro_f}


def tagging(targets: Sequence, predictions: Sequence) -> dict:
  """Accuracy (exact string match) plus tag-set metrics; for classification and tagging."""
  return {**accuracy(list(map(str, targets)), list(map(str, predictions))),
          **set_metrics(targets, predictions)}


ROUGE_KEYS = ('rouge1', 'rouge2', 'rougeLsum')


def _sentences_on_lines(summary: str) -> str:
  # rougeLsum splits summaries into sentences at newlines; T5 puts one after each " . ".
  return summary.replace(' . ', ' .\n')


def rouge(targets: Sequence[str], predictions: Sequence[str],
          score_keys: Sequence[str] = ROUGE_KEYS, seed: int = 0) -> dict:
  """ROUGE F-measures x100 as the t5 library computes them.

  rouge_score's scorer without stemming; " . " becomes " .\\n" first so rougeLsum sees the
  sentences; scores are aggregated with rouge_score's BootstrapAggregator, and the mid
  (median) F-measure is reported. The bootstrap draws from numpy's global generator, so it is
  seeded here (and the caller's generator state is restored) to make results repeatable.
  """
  from rouge_score import rouge_scorer, scoring
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  if not targets:
    return {k: 0.0 for k in score_keys}
  scorer = rouge_scorer.RougeScorer(list(score_keys))
  aggregator = scoring.BootstrapAggregator()
  for target, prediction in zip(targets, predictions):
    aggregator.add_scores(scorer.score(target=_sentences_on_lines(target),
                                       prediction=_sentences_on_lines(prediction)))
  saved = np.random.get_state()
  np.random.seed(seed)
  try:
    result = aggregator.aggregate()
  finally:
    np.random.set_state(saved)
  return {k: 100 * result[k].mid.fmeasure for k in score_keys}


def rouge_mean(targets: Sequence[str], predictions: Sequence[str],
               score_keys: Sequence[str] = ROUGE_KEYS) -> dict:
  """Plain mean of per-example ROUGE F-measures x100 (no bootstrap)."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(score_keys))
  scores = collections.defaultdict(list)
  for target, prediction in zip(targets, predictions):
    for k, s in scorer.score(target=_sentences_on_lines(target),
                             prediction=_sentences_on_lines(prediction)).items():
      scores[k].append(s.fmeasure)
  return {k: 100 * float(np.mean(scores[k])) if scores[k] else 0.0 for k in score_keys}


# Metric kinds for tasks registered from files (tasks.custom): kind -> metric functions.
METRICS_BY_KIND: Mapping[str, tuple] = {
    'qa': (squad,),
    'trivia_qa': (trivia_qa,),
    'classification': (tagging,),
    'tagging': (tagging,),
    'summarization': (rouge,),
    'accuracy': (accuracy,),
}
