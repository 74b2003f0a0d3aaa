"""Closed-book question answering (Roberts, Raffel & Shazeer 2020) and the t5 trivia Colab.

`import tasks.cbqa` registers:
- `trivia_qa_open`, `natural_questions_open`, `web_questions_open`: the paper's tasks. The
  validation split is a held-out tail of TFDS train (the ORQA split sizes) and the test split
  is TFDS validation (test for WebQuestions). Training targets are one answer (TriviaQA's
  canonical value, the first NQ/WQ answer); evaluation scores EM/F1 against all of them.
- `*_test` variants: train on everything available and evaluate on the test split.
- mixtures `closed_book_qa` and `closed_book_qa_test`: the three tasks mixed in proportion to
  their training examples.
- `nq_context_free`, `triviaqa_context_free` and their mixture `trivia_all` (equal rates): the
  t5 Colab's setup, lowercased, `trivia question: ` prefix, exact match against one answer.
  (The Colab built its NQ data from the original NQ release; here TFDS natural_questions_open
  stands in for it.)
"""
from __future__ import annotations

import seqio
import tensorflow as tf

from tasks import common
from tasks import metrics
from tasks import postprocessors
from tasks import vocab

TRIVIA_QA = 'trivia_qa/unfiltered.nocontext:1.1.0'
NATURAL_QUESTIONS = 'natural_questions_open:1.0.0'
WEB_QUESTIONS = 'web_questions:1.0.0'

# Training examples per task (TFDS sizes: TriviaQA unfiltered.nocontext train 87,622 and
# validation 11,313; natural_questions_open train 87,925 and validation 3,610; web_questions
# train 3,778 and test 2,032). Used for mixing rates when TFDS cannot count them yet.
TRAIN_SIZES = {
    'trivia_qa_open': 78_785, 'natural_questions_open': 79_168, 'web_questions_open': 3_417,
    'trivia_qa_open_test': 87_622 + 11_313, 'natural_questions_open_test': 87_925,
    'web_questions_open_test': 3_778,
}


def _first(values: tf.Tensor) -> tf.Tensor:
  return values[0]


def qa_preprocessor(prefix: str, question_key: str, answer_fn, answers_fn):
  """TFDS example -> {inputs: prefix + question, targets: one answer, answers: all}."""
  @seqio.map_over_dataset
  def fn(ex):
    return {'inputs': tf.strings.join([prefix, ex[question_key]]),
            'targets': answer_fn(ex),
            'answers': answers_fn(ex)}
  return fn


def _trivia_qa_open(prefix='trivia_qa question: '):
  return qa_preprocessor(prefix, 'question', lambda ex: ex['answer']['value'],
                         lambda ex: ex['answer']['aliases'])


def _natural_questions_open(prefix='nq question: '):
  return qa_preprocessor(prefix, 'question', lambda ex: _first(ex['answer']),
                         lambda ex: ex['answer'])


def _web_questions_open(prefix='wq question: '):
  return qa_preprocessor(prefix, 'question', lambda ex: _first(ex['answers']),
                         lambda ex: ex['answers'])


def _register_cbqa(name, tfds_name, splits, preprocessor, metric):
  common.add_task(
      name, seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits),
      output_features=vocab.output_features(),
      preprocessors=common.text_to_text_preprocessors(preprocessor),
      postprocess_fn=postprocessors.qa_answers, metric_fns=[metric])


# ---- Roberts et al.: train / held-out part of train / official dev (or test) as test.
_register_cbqa('trivia_qa_open', TRIVIA_QA,
               {'train': 'train[:78785]', 'validation': 'train[78785:]', 'test': 'validation'},
               _trivia_qa_open(), metrics.trivia_qa)
_register_cbqa('natural_questions_open', NATURAL_QUESTIONS,
               {'train': 'train[:79168]', 'validation': 'train[79168:]', 'test': 'validation'},
               _natural_questions_open(), metrics.squad)
_register_cbqa('web_questions_open', WEB_QUESTIONS,
               {'train': 'train[:3417]', 'validation': 'train[3417:]', 'test': 'test'},
               _web_questions_open(), metrics.squad)

# ---- _test variants: all training data. TriviaQA's test answers are not public (its test
# split is scored by the leaderboard), so its dev set joins training; NQ and WQ evaluate on
# the open-domain test sets under the split name 'validation', as in the paper's code.
_register_cbqa('trivia_qa_open_test', TRIVIA_QA, {'train': 'train+validation', 'test': 'test'},
               _trivia_qa_open(), metrics.trivia_qa)
_register_cbqa('natural_questions_open_test', NATURAL_QUESTIONS,
               {'train': 'train', 'validation': 'validation'}, _natural_questions_open(),
               metrics.squad)
_register_cbqa('web_questions_open_test', WEB_QUESTIONS,
               {'train': 'train', 'validation': 'test'}, _web_questions_open(), metrics.squad)

common.add_mixture('closed_book_qa',
                   ['trivia_qa_open', 'natural_questions_open', 'web_questions_open'],
                   default_rate=common.rate_num_examples(TRAIN_SIZES))
common.add_mixture('closed_book_qa_test',
                   ['trivia_qa_open_test', 'natural_questions_open_test',
                    'web_questions_open_test'],
                   default_rate=common.rate_num_examples(TRAIN_SIZES))


# ---- The t5 trivia Colab: lowercased, one answer, plain exact match.
def _colab_normalize(text: tf.Tensor) -> tf.Tensor:
  # Lowercase, and drop the outermost pair of single quotes (the Colab's normalisation).
  return tf.strings.regex_replace(tf.strings.lower(text), "'(.*)'", r'\1')


def trivia_preprocessor(question_fn, answer_fn, prefix='trivia question: '):
  @seqio.map_over_dataset
  def fn(ex):
    return {'inputs': tf.strings.join([prefix, _colab_normalize(question_fn(ex))]),
            'targets': _colab_normalize(answer_fn(ex))}
  return fn


def _register_colab(name, tfds_name, preprocessor):
  common.add_task(
      name, seqio.TfdsDataSource(tfds_name=tfds_name, splits=['train', 'validation']),
      output_features=vocab.output_features(),
      preprocessors=common.text_to_text_preprocessors(preprocessor),
      postprocess_fn=postprocessors.lower_text, metric_fns=[metrics.accuracy])


# NQ questions carry no question mark; the Colab appended one.
_register_colab('nq_context_free', NATURAL_QUESTIONS,
                trivia_preprocessor(lambda ex: tf.strings.join([ex['question'], '?']),
                                    lambda ex: _first(ex['answer'])))
_register_colab('triviaqa_context_free', TRIVIA_QA,
                trivia_preprocessor(lambda ex: ex['question'],
                                    lambda ex: ex['answer']['value']))
common.add_mixture('trivia_all', ['nq_context_free', 'triviaqa_context_free'],
                   default_rate=1.0)
