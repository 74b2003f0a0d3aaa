"""GLUE / SuperGLUE tasks of the delta-tuning study (Ding et al. 2023 used these, on T5).

`import tasks.glue` registers, from TFDS, in the t5 library's text format (the benchmark name,
then each feature as `name: text` in alphabetical order; targets are the label names):
  glue_sst2         sentiment   accuracy   glue/sst2         "sst2 sentence: ..." -> negative|positive
  glue_mnli         inference   accuracy   glue/mnli         "mnli hypothesis: ... premise: ..."
                                                             -> entailment|neutral|contradiction
                                                             (validation = validation_matched)
  glue_qnli         inference   accuracy   glue/qnli         "qnli question: ... sentence: ..."
  glue_qqp          paraphrase  accuracy   glue/qqp          "qqp question1: ... question2: ..."
  super_glue_boolq  qa          accuracy   super_glue/boolq  "boolq passage: ... question: ..."
                                                             -> False|True
Test labels of GLUE are hidden (-1), so each task has train and validation only. The data must
be prepared (`tfds build glue/sst2`, or a --tfds_data_dir holding it); nothing is downloaded at
import.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import seqio
import tensorflow as tf

from tasks import common
from tasks import metrics
from tasks import postprocessors
from tasks import vocab


@dataclasses.dataclass(frozen=True)
class GlueTask:
  tfds_name: str
  benchmark: str  # the input's first word, as the t5 library writes it
  features: Sequence[str]  # text features, in the order they appear in the input
  labels: Sequence[str]  # label names by label id
  category: str
  validation_split: str = 'validation'
  metric: str = 'accuracy'


TASKS: Dict[str, GlueTask] = {
    'glue_sst2': GlueTask('glue/sst2:2.0.0', 'sst2', ('sentence',), ('negative', 'positive'),
                          'sentiment'),
    'glue_mnli': GlueTask('glue/mnli:2.0.0', 'mnli', ('hypothesis', 'premise'),
                          ('entailment', 'neutral', 'contradiction'), 'inference',
                          validation_split='validation_matched'),
    'glue_qnli': GlueTask('glue/qnli:2.0.0', 'qnli', ('question', 'sentence'),
                          ('entailment', 'not_entailment'), 'inference'),
    'glue_qqp': GlueTask('glue/qqp:2.0.0', 'qqp', ('question1', 'question2'),
                         ('not_duplicate', 'duplicate'), 'paraphrase'),
    'super_glue_boolq': GlueTask('super_glue/boolq:1.0.2', 'boolq', ('passage', 'question'),
                                 ('False', 'True'), 'qa'),
}


def text_to_text(spec: GlueTask):
  """A preprocessor: TFDS features -> {'inputs', 'targets'} in the t5 library's format."""
  labels = tf.constant(list(spec.labels))

  def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
    def convert(ex):
      parts = [spec.benchmark]
      for name in spec.features:
        parts += [f'{name}:', ex[name]]
      return {'inputs': tf.strings.join(parts, separator=' '),
              'targets': tf.gather(labels, tf.cast(ex['label'], tf.int32)),
              'idx': ex['idx']}
    return ds.filter(lambda ex: ex['label'] >= 0).map(
        convert, num_parallel_calls=tf.data.AUTOTUNE)
  return fn


def register(name: str) -> str:
  spec = TASKS[name]
  source = seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits={
      'train': 'train', 'validation': spec.validation_split})
  common.add_task(name, source, output_features=vocab.output_features(),
                  preprocessors=common.text_to_text_preprocessors(text_to_text(spec)),
                  postprocess_fn=postprocessors.strip_text, metric_fns=[metrics.accuracy])
  return name


for _name in TASKS:
  register(_name)
