"""Abstractive summarization: `import tasks.summarization` registers

- `cnn_dailymail_v002`: TFDS cnn_dailymail:3.4.0, article -> highlights (the t5 library's task);
- `xsum`: TFDS xsum:1.1.0, document -> one-sentence summary (t5 has no XSum task; this is
  the same recipe on XSum's fields);
- the mixture `summarization` (both, in proportion to their training examples).

Inputs are `summarize: <text>`; metrics are ROUGE-1/2/Lsum F-measures (tasks.metrics.rouge).
"""
from __future__ import annotations

import seqio
import tensorflow as tf

from tasks import common
from tasks import metrics
from tasks import vocab

CNN_DAILYMAIL = 'cnn_dailymail:3.4.0'
XSUM = 'xsum:1.1.0'

# Training examples, for mixing rates when TFDS cannot count them yet (CNN/DailyMail 3.x
# train; XSum train as published with the dataset).
TRAIN_SIZES = {'cnn_dailymail_v002': 287_113, 'xsum': 204_045}


def summarize(article_key: str, summary_key: str, prefix: str = 'summarize: '):
  """{article_key, summary_key} -> {inputs: prefix + article, targets: summary}."""
  @seqio.map_over_dataset
  def fn(ex):
    return {'inputs': tf.strings.join([prefix, ex[article_key]]), 'targets': ex[summary_key]}
  return fn


def _register(name, tfds_name, article_key, summary_key):
  common.add_task(
      name, seqio.TfdsDataSource(tfds_name=tfds_name, splits=['train', 'validation', 'test']),
      output_features=vocab.output_features(),
      preprocessors=common.text_to_text_preprocessors(summarize(article_key, summary_key)),
      metric_fns=[metrics.rouge])


_register('cnn_dailymail_v002', CNN_DAILYMAIL, 'article', 'highlights')
_register('xsum', XSUM, 'document', 'summary')
common.add_mixture('summarization', ['cnn_dailymail_v002', 'xsum'],
                   default_rate=common.rate_num_examples(TRAIN_SIZES))
