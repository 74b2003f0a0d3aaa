"""t5tpu.storage and `t5tpu gcs` against a GCS server on loopback (fake-gcs-server)."""
import io
import os
import subprocess
import sys

from t5tpu import checkpoints, gcs, storage
from tests import subprocess_env


def _tree(root, files):
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)


def test_files_round_trip(fake_gcs, tmp_path):
  url = f'{fake_gcs.bucket}/a/b.txt'
  storage.write_text(url, 'hello')
  assert storage.read_text(url) == 'hello'
  assert storage.exists(url) and not storage.isdir(url)
  assert storage.isdir(f'{fake_gcs.bucket}/a')
  assert storage.listdir(f'{fake_gcs.bucket}/a') == ['b.txt']
  assert storage.listdir(f'{fake_gcs.bucket}/nothing') == []
  storage.remove_tree(f'{fake_gcs.bucket}/a')
  assert not storage.exists(url)


def test_copy_both_ways_marker_last(fake_gcs, tmp_path):
  files = {'checkpoint_5/commit_success.txt': b'ok', 'checkpoint_5/state/d/x': b'\0' * 1000,
           'checkpoint_5/state/_METADATA': b'{}', 'checkpoint_5/empty': b''}
  _tree(tmp_path / 'src', files)
  order = []
  n = storage.copy(str(tmp_path / 'src'), f'{fake_gcs.bucket}/models/run',
                   progress=lambda rel, size: order.append(rel))
  assert n == sum(len(v) for v in files.values())
  assert order[-1] == 'checkpoint_5/commit_success.txt'  # a half copy is never "complete"
  assert dict(storage.walk_files(f'{fake_gcs.bucket}/models/run')) == {
      k: len(v) for k, v in files.items()}
  assert checkpoints.is_complete(f'{fake_gcs.bucket}/models/run/checkpoint_5')
  storage.copy(f'{fake_gcs.bucket}/models/run', str(tmp_path / 'back'))
  for rel, data in files.items():
    assert (tmp_path / 'back' / rel).read_bytes() == data
  assert storage.size_of(f'{fake_gcs.bucket}/models') == n
  storage.copy(f'{fake_gcs.bucket}/models/run', f'{fake_gcs.bucket}/models/copy')  # gs -> gs
  assert checkpoints.all_steps(f'{fake_gcs.bucket}/models/copy') == [5]


def test_incomplete_checkpoint_on_gcs_is_ignored(fake_gcs):
  run = f'{fake_gcs.bucket}/run'
  storage.write_text(f'{run}/checkpoint_2/_CHECKPOINT_METADATA', '{}')  # a save under way
  storage.write_text(f'{run}/checkpoint_2/state/_METADATA', '{}')
  storage.write_text(f'{run}/checkpoint_1/commit_success.txt', 'ok')
  assert checkpoints.all_steps(run) == [1]
  storage.write_text(f'{run}/checkpoint_2/commit_success.txt', 'ok')
  assert checkpoints.all_steps(run) == [1, 2]  # no stale listing cache


def test_local_copy(fake_gcs, tmp_path):
  storage.write_text(f'{fake_gcs.bucket}/data/vocab/spm.model', 'model-bytes')
  storage.write_text(f'{fake_gcs.bucket}/data/vocab/extra/x', 'x')
  local = storage.local_copy(f'{fake_gcs.bucket}/data/vocab/spm.model', str(tmp_path / 'cache'))
  assert open(local).read() == 'model-bytes'
  assert local.startswith(str(tmp_path / 'cache'))
  storage.write_text(f'{fake_gcs.bucket}/data/vocab/spm.model', 'changed!!!!')  # other size
  assert open(storage.local_copy(f'{fake_gcs.bucket}/data/vocab/spm.model',
                                 str(tmp_path / 'cache'))).read() == 'changed!!!!'
  d = storage.local_copy(f'{fake_gcs.bucket}/data/vocab', str(tmp_path / 'cache2'))
  assert sorted(os.listdir(d)) == ['extra', 'spm.model']
  assert storage.local_copy(str(tmp_path), 'unused') == str(tmp_path)


def test_gcs_init_cp_du(fake_gcs, tmp_path, monkeypatch):
  out = io.StringIO()
  info = gcs.init('gs://t5tpu-new-bucket', out=out)
  assert info['created'] and info['location'] == 'US-CENTRAL1'
  assert 'added gs://t5tpu-new-bucket/tfds/' in out.getvalue()
  info = gcs.init('gs://t5tpu-new-bucket', out=out)  # idempotent: checks
  assert not info['created']
  assert sorted(storage.listdir('gs://t5tpu-new-bucket')) == ['data', 'models', 'tfds']

  _tree(tmp_path / 'ds', {'train.tsv': b'q\ta\n' * 1000, 'COMPLETED': b''})
  gcs.cp(str(tmp_path / 'ds'), 'gs://t5tpu-new-bucket/data/qa', out=out)
  assert 'copied 2 file(s), 4.00 KB' in out.getvalue()
  assert gcs.usage('gs://t5tpu-new-bucket') == {'data/': 4000, 'models/': 0, 'tfds/': 0}
  # The folder markers are no files: the whole bucket copies down as its two files.
  assert [f for f, _ in storage.walk_files('gs://t5tpu-new-bucket')] == [
      'data/qa/COMPLETED', 'data/qa/train.tsv']
  monkeypatch.chdir(tmp_path)
  storage.copy('gs://t5tpu-new-bucket', 'mirror')  # a relative local path
  assert (tmp_path / 'mirror' / 'data' / 'qa' / 'train.tsv').stat().st_size == 4000

  out = io.StringIO()
  total = gcs.du('gs://t5tpu-new-bucket', models=['t5_1_1/small', 't5_1_0/11B'], out=out)
  text = out.getvalue()
  assert total == 4000 and '0.0% of the 5 GB free tier' in text
  assert '| t5_1_1/small | 77M | 307.84 MB |' in text
  assert '| t5_1_0/11B | 11,307M |' in text and '| none |' in text  # bigger than 5 GB


def test_model_storage_needs_known_counts():
  rows = {r['model']: r for r in gcs.model_storage_needs(['t5_1_1/base', 't5_1_0/small'])}
  assert rows['t5_1_1/base']['params'] == 247_577_856  # t5x's published parameter count
  assert rows['t5_1_0/small']['params_fp32'] == 4 * rows['t5_1_0/small']['params']
  # Adafactor's factored second moments add well under 1% for T5 shapes.
  extra = rows['t5_1_1/base']['train_checkpoint'] / rows['t5_1_1/base']['params_fp32']
  assert 1.0 < extra < 1.01


def test_cli_gcs_subprocess(fake_gcs, tmp_path):
  import subprocess
  import sys
  env = {**os.environ, **fake_gcs.env, 'PYTHONPATH': os.getcwd()}
  bucket = 'gs://t5tpu-cli-bucket'
  out = subprocess.run([sys.executable, '-m', 't5tpu.cli', 'gcs', 'init', bucket], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'created gs://t5tpu-cli-bucket' in out.stdout
  (tmp_path / 'f.txt').write_text('abc')
  out = subprocess.run([sys.executable, '-m', 't5tpu.cli', 'gcs', 'cp', str(tmp_path / 'f.txt'),
                        f'{bucket}/data/f.txt'], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert storage.read_text(f'{bucket}/data/f.txt') == 'abc'


def test_sentencepiece_vocabulary_from_gcs(fake_gcs, tmp_path, monkeypatch):
  import seqio
  from t5tpu import vocabularies
  monkeypatch.setenv('T5TPU_CACHE', str(tmp_path / 'cache'))
  local = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                       'sentencepiece.model')
  remote = f'{fake_gcs.bucket}/data/vocab/sentencepiece.model'
  storage.copy(local, remote)
  vocab = vocabularies.SentencePieceVocabulary(remote, extra_ids=10)
  reference = seqio.SentencePieceVocabulary(local, extra_ids=10)
  text = 'this is a test'
  assert vocab.encode(text) == reference.encode(text)
  assert vocab.decode(vocab.encode(text)) == reference.decode(reference.encode(text))
  assert vocab.vocab_size == reference.vocab_size == 36
  assert vocab.sentencepiece_model_file == remote  # identity stays the gs:// path
  assert vocab == seqio.SentencePieceVocabulary(remote, extra_ids=10)
  assert os.path.exists(tmp_path / 'cache' / remote[len('gs://'):])


_GCSFS_FIRST = '''
import sys
import gcsfs  # before t5tpu: gcsfs picks its client class now, with the variable unset
from t5tpu import storage
bucket = sys.argv[1]
storage.write_text(bucket + '/own.txt', 'through t5tpu')
storage.orbax_path(bucket + '/orbax.txt').write_text('through etils, as orbax writes')
print(storage.read_text(bucket + '/own.txt'), '|', storage.read_text(bucket + '/orbax.txt'))
'''


def test_gcsfs_imported_before_t5tpu_still_works(fake_gcs):
  """A process that imported gcsfs first (a notebook, another library) got gcsfs's
  experimental client, which probes buckets over gRPC: against this server each of t5tpu's
  writes took a minute or more, and orbax's client (through etils) logged a failed probe on
  every call. Both now use the plain client."""
  env = subprocess_env.user_env(**fake_gcs.env)
  env.pop('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', None)  # unset, as in most users' shells
  out = subprocess.run([sys.executable, '-c', _GCSFS_FIRST, fake_gcs.bucket], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == 'through t5tpu | through etils, as orbax writes'
  # what the probing client logs for each of etils' calls when it cannot probe
  assert 'Could not determine bucket type' not in out.stderr, out.stderr[-3000:]
