"""Tasks from your own TSV / CSV / JSONL files, registered from Python or from gin.

Python:
  from tasks import custom
  custom.register_file_task(
      'my_tags', {'train': 'gs://bucket/train-*.tsv', 'validation': 'gs://bucket/valid.tsv'},
      input_field=['title', 'body'], target_field='tags', prefix='assign tag: ',
      metric='tagging')

gin (the function returns the task name, so it can *be* the task name; gin calls it when the
run reads MIXTURE_OR_TASK_NAME, after all bindings are parsed; repeated calls with the same
arguments are no-ops):
  from tasks import custom
  MIXTURE_OR_TASK_NAME = @custom.register_file_task()
  custom.register_file_task:
    name = 'my_tags'
    paths = {'train': 'data/train.tsv', 'validation': 'data/valid.tsv'}
    input_field = ['title', 'body']
    ...
See gin/examples/stackoverflow_tags.gin.

Files: TSV and CSV need a header row naming the columns (or pass `fieldnames`). TSV fields are
split on tabs with no quoting (seqio's TSV convention); CSV uses standard quoting. JSONL has one
JSON object per line; list values (e.g. a list of tags) are joined with spaces. Paths may be
local or gs:// (read through t5tpu.storage, i.e. gcsfs) and may contain glob patterns.
Relative paths that do not exist in the current directory are looked up in the t5tpu
installation, so the shipped samples (`tasks/data/...`) work from anywhere.

Text fields: `input_field` / `target_field` is a column name, a list of column names (their
texts joined by a space), or a template such as '{title}\\n{body}'. `prefix` goes in front of
the inputs. Metric kinds: 'qa' (SQuAD EM/F1 against the target plus any `answers_field`),
'trivia_qa' (TriviaQA normalisation), 'classification' and 'tagging' (accuracy plus tag-set
precision/recall/F1), 'summarization' (ROUGE), 'accuracy'.

Data is streamed from the files on each pass (nothing is loaded whole into memory); seqio
shuffles examples with a buffer of `shuffle_buffer_size`, and shuffles the file order too.
"""
from __future__ import annotations

import csv
import glob as glob_lib
import json
import logging
import os
import random
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from t5tpu import storage
from tasks import common
from tasks import metrics as metrics_lib
from tasks import postprocessors
from tasks import vocab as vocab_lib

log = logging.getLogger(__name__)

FORMATS = ('tsv', 'csv', 'jsonl')
FieldSpec = Union[str, Sequence[str]]
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPECS: Dict[str, tuple] = {}  # name -> the arguments it was registered with


def _has_glob(path: str) -> bool:
  return any(c in path for c in '*?[')


def resolve_path(path: str) -> str:
  """Local relative paths: the current directory first, then the t5tpu installation."""
  if storage.is_remote(path) or os.path.isabs(path):
    return path
  if glob_lib.glob(path) or os.path.exists(path):
    return os.path.abspath(path)
  candidate = os.path.join(_PROJECT_ROOT, path)
  if glob_lib.glob(candidate) or os.path.exists(candidate):
    return candidate
  return path  # reported as missing by list_files


def list_files(patterns: Union[str, Sequence[str]]) -> list:
  """The files matched by one or more paths or glob patterns (local or gs://), in order."""
  if isinstance(patterns, str):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    pattern = resolve_path(pattern)
    if _has_glob(pattern):
      matched = sorted(storage.filesystem(pattern).glob(pattern))
      if storage.is_remote(pattern):
        matched = [m if m.startswith('gs://') else 'gs://' + m for m in matched]
    else:
      matched = [pattern] if storage.exists(pattern) else []
    if not matched:
      raise FileNotFoundError(f'no file matches {pattern!r}')
    files.extend(matched)
  return files


def infer_format(path: str) -> str:
  name = path.lower()
  for ext, fmt in (('.tsv', 'tsv'), ('.csv', 'csv'), ('.jsonl', 'jsonl'), ('.json', 'jsonl')):
    if name.endswith(ext):
      return fmt
  raise ValueError(f'cannot tell the format of {path!r} from its name: pass format=')


def read_records(path: str, fmt: str, fieldnames: Optional[Sequence[str]] = None
                 ) -> Iterator[Mapping[str, Any]]:
  """Yields each row / object of one file as a dict."""
  with storage.open_file(path, 'r') as f:
    if fmt == 'jsonl':
      for n, line in enumerate(f, 1):
        if line.strip():
          record = json.loads(line)
          if not isinstance(record, dict):
            raise ValueError(f'{path}:{n}: expected a JSON object per line')
          yield record
    elif fmt in ('tsv', 'csv'):
      kwargs = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv' else {}
      yield from csv.DictReader(f, fieldnames=fieldnames, **kwargs)
    else:
      raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')


def _value_text(value) -> str:
  if value is None:
    return ''
  if isinstance(value, (list, tuple)):
    return ' '.join(_value_text(v) for v in value)
  return str(value)


def field_text(record: Mapping[str, Any], spec: FieldSpec) -> str:
  """The text of a column, of several columns joined by spaces, or of a '{col}' template."""
  if not isinstance(spec, str):
    return ' '.join(field_text(record, s) for s in spec)
  if '{' in spec:
    return spec.format_map({k: _value_text(v) for k, v in record.items()})
  if spec not in record:
    raise KeyError(f'no field {spec!r} in a record with fields {sorted(record)}')
  return _value_text(record[spec])


def _answer_list(value) -> list:
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [_value_text(v) for v in value]
  return [a for a in str(value).split('|') if a]  # TSV/CSV: alternatives separated by '|'


def make_example(record: Mapping[str, Any], input_field: FieldSpec, target_field: FieldSpec,
                 prefix: str = '', answers_field: Optional[str] = None,
                 with_answers: bool = False) -> dict:
  """One record -> {'inputs', 'targets'[, 'answers']} strings."""
  example = {'inputs': prefix + field_text(record, input_field),
             'targets': field_text(record, target_field)}
  if with_answers:
    answers = [example['targets']]
    if answers_field:
      answers += [a for a in _answer_list(record.get(answers_field)) if a not in answers]
    example['answers'] = answers
  return example


def _dataset_fn(paths, fmt, fieldnames, example_kwargs):
  with_answers = example_kwargs['with_answers']
  signature = {'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string)}
  if with_answers:
    signature['answers'] = tf.TensorSpec([None], tf.string)

  def dataset_fn(split, shuffle_files, seed=None):
    files = list_files(paths[split])
    if shuffle_files:
      random.Random(seed).shuffle(files)

    def generate():
      for path in files:
        for record in read_records(path, fmt or infer_format(path), fieldnames):
          yield make_example(record, **example_kwargs)
    return tf.data.Dataset.from_generator(generate, output_signature=signature)
  return dataset_fn


@gin.configurable(module='tasks.custom')
def register_file_task(name: str = gin.REQUIRED,
                       paths: Mapping[str, Union[str, Sequence[str]]] = gin.REQUIRED,
                       input_field: FieldSpec = 'inputs',
                       target_field: FieldSpec = 'targets',
                       prefix: str = '',
                       metric: str = 'qa',
                       format: Optional[str] = None,  # pylint: disable=redefined-builtin
                       fieldnames: Optional[Sequence[str]] = None,
                       answers_field: Optional[str] = None,
                       vocabulary: Optional[seqio.Vocabulary] = None,
                       shuffle_buffer_size: int = 10_000,
                       num_input_examples: Optional[Mapping[str, int]] = None) -> str:
  """Registers (or re-registers) a seqio task reading `paths`; returns its name.

  Args:
    name: the seqio task name.
    paths: split -> a file path or glob pattern (or a list of them), local or gs://.
    input_field, target_field: a column, a list of columns or a '{column}' template.
    prefix: text put in front of the inputs, e.g. 'assign tag: '.
    metric: 'qa' | 'trivia_qa' | 'classification' | 'tagging' | 'summarization' | 'accuracy'.
    format: 'tsv' | 'csv' | 'jsonl'; None infers it from each file's extension.
    fieldnames: column names for TSV/CSV files without a header row.
    answers_field: (qa) a column with further correct answers (a JSON list, or '|'-separated).
    vocabulary: default tasks.vocab.DEFAULT_VOCABULARY (the T5 vocabulary, as the model gins).
      In gin, `vocabulary = %VOCABULARY` makes it the model's own.
    shuffle_buffer_size: seqio's example shuffle buffer for training.
    num_input_examples: split -> example count, for mixing rates by size (optional).
  """
  if metric not in metrics_lib.METRICS_BY_KIND:
    raise ValueError(f'metric={metric!r}: use one of {sorted(metrics_lib.METRICS_BY_KIND)}')
  if format is not None and format not in FORMATS:
    raise ValueError(f'format={format!r}: use one of {FORMATS}')
  if isinstance(paths, str) or not paths:
    raise ValueError("paths must map split names to files, e.g. {'train': 'train.tsv'}")
  with_answers = metric in ('qa', 'trivia_qa')
  spec = (dict(paths), input_field, target_field, prefix, metric, format, fieldnames,
          answers_field, vocabulary, shuffle_buffer_size, num_input_examples)
  if name in seqio.TaskRegistry.names():
    if name in _SPECS and _SPECS[name] == spec:
      return name  # the same registration again (gin evaluates the reference per use)
    if name not in _SPECS:
      raise ValueError(f'a task named {name!r} exists and was not registered from files')
    log.info('re-registering file task %s with new arguments', name)
  example_kwargs = dict(input_field=input_field, target_field=target_field, prefix=prefix,
                        answers_field=answers_field, with_answers=with_answers)
  source = seqio.FunctionDataSource(
      _dataset_fn(dict(paths), format, fieldnames, example_kwargs), splits=list(paths),
      num_input_examples=num_input_examples)
  common.add_task(
      name, source, output_features=vocab_lib.output_features(vocabulary),
      preprocessors=common.text_to_text_preprocessors(),
      postprocess_fn=postprocessors.qa_answers if with_answers else None,
      metric_fns=list(metrics_lib.METRICS_BY_KIND[metric]),
      shuffle_buffer_size=shuffle_buffer_size, replace=True)
  _SPECS[name] = spec
  return name
