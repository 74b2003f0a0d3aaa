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

Checks. Bad files fail with one `FileTaskError` (a t5tpu.errors.UserError) naming the file, the
line and the fix, before any training step. Registering the task reads the header (or first
JSONL line) of each split's first file, so a typo'd column fails at once; the first read of a
split streams every file of it once (rows are parsed, not tokenized; once per file per
process) and fails on the first bad row. The problems:
  * a column that input_field / target_field / answers_field names is not in the header;
  * an empty file (no header row) or a split without a single example;
  * a TSV/CSV row with more or fewer fields than the header (TSV has no quoting, so a tab or
    a newline inside a field shifts the rest of the row), a JSONL line that is not an object,
    lacks a field or has it null: a missing value is never read as an empty text;
  * an empty (or all-whitespace) target: it would teach the model to output nothing, so it is
    an error unless `allow_empty_targets=True` says it is meant (e.g. tagging examples that
    have no tag). Empty inputs are fine (a column list often has an empty member).
`check_rows=False` skips the streaming pass (for files too big to read twice); a bad row then
stops the input pipeline inside TensorFlow with the same message, wrapped in a TF error.
"""
from __future__ import annotations

import csv
import dataclasses
import glob as glob_lib
import json
import logging
import os
import random
import re
import string
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import gin
import seqio
import tensorflow as tf

from t5tpu import errors, storage
from tasks import common
from tasks import metrics as metrics_lib
from tasks import postprocessors
from tasks import vocab as vocab_lib

log = logging.getLogger(__name__)

FORMATS = ('tsv', 'csv', 'jsonl')
FieldSpec = Union[str, Sequence[str]]
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPECS: Dict[str, tuple] = {}  # name -> the arguments it was registered with
_CHECKED: Dict[tuple, int] = {}  # (file, its size and mtime, what was checked) -> examples


class FileTaskError(errors.UserError, ValueError):
  """register_file_task's arguments or files do not make a task (the message says how)."""


class DataFileNotFoundError(errors.UserError, FileNotFoundError):
  """A path or pattern of `paths` that matches no file."""


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
      raise DataFileNotFoundError(f'no file matches {pattern!r}')
    files.extend(matched)
  return files


def infer_format(path: str) -> str:
  name = path.lower()
  for ext, fmt in (('.tsv', 'tsv'), ('.csv', 'csv'), ('.jsonl', 'jsonl'), ('.json', 'jsonl')):
    if name.endswith(ext):
      return fmt
  raise FileTaskError(f'cannot tell the format of {path!r} from its name (.tsv, .csv, .jsonl): '
                      "pass format='tsv', 'csv' or 'jsonl'")


def read_records(path: str, fmt: str, fieldnames: Optional[Sequence[str]] = None
                 ) -> Iterator[Mapping[str, Any]]:
  """Yields each row / object of one file as a dict."""
  for _, record in numbered_records(path, fmt, fieldnames):
    yield record


def numbered_records(path: str, fmt: str, fieldnames: Optional[Sequence[str]] = None
                     ) -> Iterator[Tuple[int, Mapping[str, Any]]]:
  """(line number, record) for each row / object of one file (1-based; a header is line 1).

  TSV/CSV rows with fewer fields than the header have None for the missing ones and rows
  with more have the rest under the key None (csv.DictReader's convention): see row_problem.
  """
  with storage.open_file(path, 'r') as f:
    if fmt == 'jsonl':
      for n, line in enumerate(f, 1):
        if line.strip():
          yield n, _json_record(path, n, line)
    elif fmt in ('tsv', 'csv'):
      reader = _dict_reader(f, fmt, fieldnames)
      for record in reader:
        yield reader.line_num, record  # the record's last line (CSV quotes may span lines)
    else:
      raise FileTaskError(f'unknown format {fmt!r}; use one of {FORMATS}')


def _dict_reader(f, fmt: str, fieldnames: Optional[Sequence[str]]) -> csv.DictReader:
  kwargs = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv' else {}
  return csv.DictReader(f, fieldnames=fieldnames, **kwargs)


def _json_record(path: str, n: int, line: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise FileTaskError(f'{path}:{n}: not valid JSON ({e.msg} at column {e.colno}): a JSONL '
                        'file holds one JSON object per line') from None
  if not isinstance(record, dict):
    raise FileTaskError(f'{path}:{n}: expected a JSON object per line, got '
                        f'{type(record).__name__} {line.strip()[:60]!r}')
  return record


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


# ----------------------------------------------------------------------------- checks
#
# Everything is checked in Python before tf.data runs: an exception raised inside the
# generator of a tf.data pipeline reaches the user as a TensorFlow error with a traceback,
# not as the FileTaskError it was.

@dataclasses.dataclass(frozen=True)
class Reads:
  """What a task reads from each record (hashable: part of the key of a checked file)."""
  task: str
  input_field: FieldSpec
  target_field: FieldSpec
  answers_field: Optional[str] = None
  allow_empty_targets: bool = False

  def columns(self) -> list:
    """(column, the argument that names it), input columns first, each column once."""
    named = [(c, 'input_field') for c in field_names(self.input_field)]
    named += [(c, 'target_field') for c in field_names(self.target_field)]
    seen = set()
    return [(c, role) for c, role in named if not (c in seen or seen.add(c))]


def _frozen(spec: FieldSpec) -> FieldSpec:
  return spec if isinstance(spec, str) else tuple(spec)


def field_names(spec: FieldSpec) -> list:
  """The columns a field spec reads: a column, each of a list, or a template's {names}."""
  if not isinstance(spec, str):
    return [name for s in spec for name in field_names(s)]
  if '{' not in spec:
    return [spec]
  # '{title}' reads the column 'title'; '{tags[0]}' and '{a.b}' read 'tags' and 'a'
  return [re.split(r'[.\[]', name, maxsplit=1)[0]
          for _, name, _, _ in string.Formatter().parse(spec) if name is not None]


def _check_spec(spec: FieldSpec, role: str) -> None:
  try:
    names = field_names(spec)
  except ValueError as e:  # an unmatched brace
    raise FileTaskError(f'{role}={spec!r} is not a valid template ({e}): name columns as '
                        "'{column}' and write a literal brace as '{{' or '}}'") from None
  if not names or any(not n or n.isdigit() for n in names):
    raise FileTaskError(f"{role}={spec!r} names no column: use a column name, a list of them "
                        "or a template such as '{title} {body}'")


def _quoting_hint(fmt: str) -> str:
  if fmt == 'tsv':
    return ('TSV has no quoting, so a tab or a line break inside a field splits the row: '
            'remove them from the text, or write CSV')
  return 'quote fields that hold commas or line breaks ("a, b"), as CSV writers do'


def _missing_columns(path: str, fmt: str, missing: list, columns: list, reads: Reads,
                     named_by_fieldnames: bool) -> str:
  wanted = ' and '.join(f'{c!r} ({role})' for c, role in missing)
  roles = ' / '.join(dict.fromkeys(role for _, role in missing))
  source = 'fieldnames' if named_by_fieldnames else 'the header row of the file'
  text = (f'{path}: task {reads.task!r} reads column{"s" if len(missing) > 1 else ""} '
          f'{wanted}, but the columns of this {fmt.upper()} file are {list(columns)}: fix '
          f'{roles}, or {source}')
  if len(columns) == 1 and not named_by_fieldnames:
    for other, sep in (('csv', ','), ('tsv', '\t')):
      if other != fmt and sep in columns[0]:
        text += (f" (the header is one column: is this a {other.upper()} file? pass "
                 f"format='{other}')")
  return text


def row_problem(record: Mapping[str, Any], fmt: str, reads: Reads) -> Optional[str]:
  """What makes one record unusable, or None. A missing value (a short TSV/CSV row, a JSONL
  field that is absent or null) is never taken for an empty text."""
  if fmt != 'jsonl':
    header = [k for k in record if k is not None]
    if None in record:  # csv.DictReader puts fields beyond the header under None
      return (f'{len(header) + len(record[None])} fields where the header has '
              f'{len(header)}. {_quoting_hint(fmt)}')
    short = [c for c in header if record[c] is None]
    if short:
      return (f'{len(header) - len(short)} field{"s" if len(header) - len(short) != 1 else ""}'
              f' where the header has {len(header)} (no value for {", ".join(short)}). '
              f'{_quoting_hint(fmt)}')
  for column, role in reads.columns():
    if column not in record:
      return (f'no field {column!r} ({role}); this line has {sorted(record)}. Every line '
              'needs the fields input_field and target_field name')
    if record[column] is None:
      return f'{column!r} ({role}) is null: give it a value, or drop the line'
  if not reads.allow_empty_targets and not field_text(record, reads.target_field).strip():
    return (f'the target (target_field={reads.target_field!r}) is empty: fill it in or drop '
            'the row, or pass allow_empty_targets=True to register_file_task if empty '
            'targets are meant (e.g. examples that have no tag)')
  return None


def check_header(path: str, fmt: str, fieldnames: Optional[Sequence[str]], reads: Reads,
                 split: str) -> None:
  """The columns of one file: its header row (TSV/CSV), or its first line (JSONL)."""
  if fmt == 'jsonl':
    for line, record in numbered_records(path, fmt):
      problem = row_problem(record, fmt, reads)
      if problem:
        raise FileTaskError(f'{path}:{line}: {problem}')
      return
    return  # no lines: check_split reports a split without examples
  if fieldnames:
    columns = list(fieldnames)
  else:
    with storage.open_file(path, 'r') as f:
      columns = _dict_reader(f, fmt, None).fieldnames
    if columns is None:
      raise FileTaskError(
          f'{path} (split {split!r} of task {reads.task!r}) is empty: a {fmt.upper()} file '
          'starts with a header row naming its columns (or pass fieldnames= for files '
          'without one), then one example per row')
  missing = [(c, role) for c, role in reads.columns() if c not in columns]
  if reads.answers_field and reads.answers_field not in columns:
    missing.append((reads.answers_field, 'answers_field'))
  if missing:
    raise FileTaskError(_missing_columns(path, fmt, missing, columns, reads,
                                         bool(fieldnames)))


def check_file(path: str, fmt: str, fieldnames: Optional[Sequence[str]], reads: Reads,
               split: str) -> int:
  """Streams every row of one file once; returns its number of examples.

  Raises one FileTaskError for the first bad row, with how many rows have problems.
  """
  check_header(path, fmt, fieldnames, reads, split)
  count, bad, first, has_answers = 0, [], None, False
  for line, record in numbered_records(path, fmt, fieldnames):
    count += 1
    problem = row_problem(record, fmt, reads)
    if problem:
      bad.append(line)
      first = first or f'{path}:{line}: {problem}'
    if reads.answers_field:
      has_answers = has_answers or record.get(reads.answers_field) is not None
  if first:
    if len(bad) > 1:
      lines = ', '.join(map(str, bad[:10])) + (' ...' if len(bad) > 10 else '')
      first += f' ({len(bad)} of the {count} rows of this file have problems: lines {lines})'
    raise FileTaskError(first)
  if fmt == 'jsonl' and reads.answers_field and count and not has_answers:
    raise FileTaskError(f'{path}: no line has the answers_field {reads.answers_field!r} of task '
                        f'{reads.task!r}: fix answers_field, or leave it out')
  return count


def _stamp(path: str) -> tuple:
  """Size and modification time: a file that changed since it was checked is checked again."""
  info = storage.filesystem(path).info(path)
  return (info.get('size'), str(info.get('mtime') or info.get('updated') or
                                info.get('generation')))


def check_split(split: str, files: Sequence[str], fmt: Optional[str],
                fieldnames: Optional[Sequence[str]], reads: Reads,
                check_rows: bool = True) -> int:
  """Checks the files of one split (each once per process); returns its example count.

  Without check_rows only each file's header and first example are read, and the count says
  only whether the split has examples.
  """
  total = 0
  for path in files:
    file_fmt = fmt or infer_format(path)
    key = (path, _stamp(path), file_fmt, tuple(fieldnames or ()), reads, check_rows)
    if key not in _CHECKED:
      if check_rows:
        _CHECKED[key] = check_file(path, file_fmt, fieldnames, reads, split)
      else:
        check_header(path, file_fmt, fieldnames, reads, split)
        _CHECKED[key] = sum(1 for _ in zip(range(1), numbered_records(path, file_fmt,
                                                                      fieldnames)))
    total += _CHECKED[key]
  if not total:
    where = (files[0] if len(files) == 1 else
             f'its {len(files)} files ({files[0]}, ...)')
    raise FileTaskError(
        f'split {split!r} of task {reads.task!r} has no examples: {where} hold'
        f'{"s" if len(files) == 1 else ""} no rows (a header row or blank lines only). Add '
        f'examples, or point paths[{split!r}] at the files that have them')
  return total


def _check_first_header(split: str, patterns, fmt: Optional[str],
                        fieldnames: Optional[Sequence[str]], reads: Reads) -> None:
  """At registration: the columns of the split's first file, so a typo'd field fails before
  a run starts (gin registers the task when the run reads MIXTURE_OR_TASK_NAME). Files that
  do not exist yet are reported when the split is read."""
  try:
    files = list_files(patterns)
  except FileNotFoundError:
    return
  check_header(files[0], fmt or infer_format(files[0]), fieldnames, reads, split)


def _split_files(name: str, split: str, patterns) -> list:
  try:
    return list_files(patterns)
  except DataFileNotFoundError as e:
    raise DataFileNotFoundError(
        f'{e}, for split {split!r} of task {name!r}: check paths[{split!r}] (a relative path '
        'is looked up in the current directory, then in the t5tpu installation)') from None


def _dataset_fn(paths, fmt, fieldnames, example_kwargs, reads: Reads, check_rows: bool):
  with_answers = example_kwargs['with_answers']
  signature = {'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string)}
  if with_answers:
    signature['answers'] = tf.TensorSpec([None], tf.string)

  def dataset_fn(split, shuffle_files, seed=None):
    files = _split_files(reads.task, split, paths[split])
    check_split(split, files, fmt, fieldnames, reads, check_rows)
    if shuffle_files:
      random.Random(seed).shuffle(files)

    def generate():
      for path in files:
        file_fmt = fmt or infer_format(path)
        for line, record in numbered_records(path, file_fmt, fieldnames):
          problem = row_problem(record, file_fmt, reads)
          if problem:  # check_rows=False, or the file changed after it was checked
            raise FileTaskError(f'{path}:{line}: {problem}')
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
                       num_input_examples: Optional[Mapping[str, int]] = None,
                       allow_empty_targets: bool = False,
                       check_rows: bool = True) -> str:
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
    allow_empty_targets: accept rows whose target is empty (by default an error, naming the
      file and line: see the module docstring).
    check_rows: stream every row once before the first read of a split (default); False
      reads only each file's header and first row up front (for very large files).

  Raises FileTaskError (a t5tpu.errors.UserError) for bad arguments and, at once, for a field
  the header of a split's first file lacks; the first read of a split raises it for bad rows.
  """
  if metric not in metrics_lib.METRICS_BY_KIND:
    raise FileTaskError(f'metric={metric!r}: use one of {sorted(metrics_lib.METRICS_BY_KIND)}')
  if format is not None and format not in FORMATS:
    raise FileTaskError(f'format={format!r}: use one of {FORMATS}')
  if isinstance(paths, str) or not paths:
    raise FileTaskError("paths must map split names to files, e.g. {'train': 'train.tsv'}")
  _check_spec(input_field, 'input_field')
  _check_spec(target_field, 'target_field')
  with_answers = metric in ('qa', 'trivia_qa')
  spec = (dict(paths), input_field, target_field, prefix, metric, format, fieldnames,
          answers_field, vocabulary, shuffle_buffer_size, num_input_examples,
          allow_empty_targets, check_rows)
  if name in seqio.TaskRegistry.names():
    if name in _SPECS and _SPECS[name] == spec:
      return name  # the same registration again (gin evaluates the reference per use)
    if name not in _SPECS:
      raise FileTaskError(f'a task named {name!r} exists and was not registered from files: '
                          'choose another name')
    log.info('re-registering file task %s with new arguments', name)
  reads = Reads(name, _frozen(input_field), _frozen(target_field),
                answers_field if with_answers else None, allow_empty_targets)
  for split, patterns in paths.items():
    _check_first_header(split, patterns, format, fieldnames, reads)
  example_kwargs = dict(input_field=input_field, target_field=target_field, prefix=prefix,
                        answers_field=answers_field, with_answers=with_answers)
  source = seqio.FunctionDataSource(
      _dataset_fn(dict(paths), format, fieldnames, example_kwargs, reads, check_rows),
      splits=list(paths),
      num_input_examples=num_input_examples)
  common.add_task(
      name, source, output_features=vocab_lib.output_features(vocabulary),
      preprocessors=common.text_to_text_preprocessors(),
      postprocess_fn=postprocessors.qa_answers if with_answers else None,
      metric_fns=list(metrics_lib.METRICS_BY_KIND[metric]),
      shuffle_buffer_size=shuffle_buffer_size, replace=True)
  _SPECS[name] = spec
  return name
