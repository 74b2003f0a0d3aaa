"""Storage faults against a real GCS server on loopback, injected by tests/cloud/fault_proxy.py.

Transient faults (HTTP 429 and 503, connections dropped without an answer, lost answers, slow
answers) during a checkpoint save, a restore and data reads are retried by the clients, and the
run ends with exactly the parameters of a fault-free run. Answers that never come are given up
on after T5TPU_GCS_STALL_SECONDS and retried. A permanent failure during a save and a full
local disk end the run with a UserError naming the checkpoint and the cause, and the previous
checkpoint stays whole: the same command resumes from it once the cause is gone. An outage
while reading the newest checkpoint is an error, not damage: the checkpoint is not set aside.
No network or no credentials: `storage.check_reachable` says which within seconds.

The faulty runs follow test_gcs_cycle's schedule (3 steps, checkpoint_3, resume to 6) against
one fault-free reference run per module; resumed cases start from a copy of its checkpoint_3.
"""
import contextlib
import os
import subprocess
import sys
import time

import gcsfs
import pytest

from t5tpu import checkpoints, data, errors, storage
from tests import tiny
from tests.cloud import gcs_server
from tests.cloud.test_gcs_cycle import _run, _same

FILE_TASK = 't5tpu_test_faults_file'


_CACHE_OPTIONS = {'jax_compilation_cache_dir': None,
                  'jax_persistent_cache_min_compile_time_secs': 0,
                  'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='module', autouse=True)
def compile_once(tmp_path_factory):
  """Every run here compiles the same steps. A persistent compilation cache, for this module
  only, makes each run after the first take seconds instead of most of a minute on 2 cores
  (and every run then executes the very same executables as the reference run)."""
  import jax
  from jax._src import compilation_cache  # reset: jax decides on the cache once per process
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  options = {**_CACHE_OPTIONS, 'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('jit'))}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


class Reference:
  """The fault-free run (local MODEL_DIR): its states and checkpoints at steps 3 and 6."""

  def __init__(self, root):
    self.model_dir = str(root / 'run')
    self.at_3 = _run(self.model_dir, 3)
    self.at_6 = _run(self.model_dir, 6)
    self.checkpoint_3 = checkpoints.step_dir(self.model_dir, 3)
    self.checkpoint_6 = checkpoints.step_dir(self.model_dir, 6)

  def seed_checkpoint_3(self, model_dir, *more_steps):
    """Puts the fault-free checkpoint_3 (and more_steps) into model_dir, as `t5tpu gcs cp`
    would: cheaper than training again."""
    for step in (3, *more_steps):
      storage.copy(checkpoints.step_dir(self.model_dir, step),
                   checkpoints.step_dir(model_dir, step))
    assert checkpoints.all_steps(model_dir) == [3, *more_steps]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, copy_task):
  return Reference(tmp_path_factory.mktemp('reference'))


def _assert_same(state, expected):
  assert int(state.step) == int(expected.step)
  assert _same(state.params, expected.params)
  assert _same(state.opt_state, expected.opt_state)


def _assert_same_checkpoint(path, expected_path):
  """Every array and the input position, read back from storage, bit for bit."""
  assert _same(checkpoints.read_state_dict(path), checkpoints.read_state_dict(expected_path))
  dataset = lambda p: storage.read_text(storage.join(p, 'dataset', 'metadata'))
  assert dataset(path) == dataset(expected_path)


def _assert_injected(*rules):
  """Each rule really fired: the faults happened, the run survived them."""
  for rule in rules:
    assert rule.injected > 0, f'no fault injected for {rule.pattern!r} ({rule.matched} matches)'


# ----------------------------------------------------------------------------- transient faults

def test_transient_faults_during_save(gcs_faults, reference):
  run = f'{gcs_faults.bucket}/models/run'
  ckpt = r'checkpoint_3(%2F|/)'
  rules = [
      # tensorstore (arrays, OCDBT) uploads: 503s, then a 429
      gcs_faults.fail(rf'^POST /upload/.*uploadType=media.*{ckpt}', status=503, times=2),
      gcs_faults.fail(rf'^POST /upload/.*uploadType=media.*{ckpt}', status=429, times=1),
      # a lost answer: the server stored the object, the client saw a reset and sends it again
      gcs_faults.fail(rf'^POST /upload/.*uploadType=media.*{ckpt}.*manifest', drop_after=True,
                      times=1),
      # gcsfs (orbax's metadata and commit markers): a dropped connection, a 429, a 503
      gcs_faults.fail(rf'^POST /upload/.*uploadType=resumable.*{ckpt}', drop=True, times=1),
      gcs_faults.fail(rf'^POST /upload/.*{ckpt}.*commit_success', status=429, times=1),
      gcs_faults.fail(rf'^POST /upload/.*{ckpt}', status=503, every=5, times=2),
      # and slow answers to the save's own reads
      gcs_faults.fail(rf'^GET .*{ckpt}', delay=1.0, times=2),
  ]
  state = _run(run, 3)
  _assert_injected(*rules)
  gcs_faults.clear()
  _assert_same(state, reference.at_3)
  assert checkpoints.all_steps(run) == [3]
  _assert_same_checkpoint(f'{run}/checkpoint_3', reference.checkpoint_3)


def test_transient_faults_during_restore(gcs_faults, reference):
  run = f'{gcs_faults.bucket}/models/run'
  reference.seed_checkpoint_3(run)
  ckpt = r'checkpoint_3(%2F|/)'
  rules = [
      gcs_faults.fail(rf'^GET /storage/v1/.*{ckpt}.*(_METADATA|metadata)', status=503, times=2),
      gcs_faults.fail(rf'^GET .*{ckpt}.*ocdbt', status=503, times=2),  # tensorstore reads
      gcs_faults.fail(rf'^GET .*{ckpt}.*ocdbt', status=429, times=1),
      gcs_faults.fail(rf'^GET .*{ckpt}', drop=True, every=4, times=3),
      gcs_faults.fail(rf'^GET .*{ckpt}.*manifest', delay=1.0, times=2),
  ]
  resumed = _run(run, 6)
  _assert_injected(*rules)
  _assert_same(resumed, reference.at_6)


def _tsv(words) -> str:
  return 'inputs\ttargets\n' + ''.join(f'copy {w}\t{w}\n' for w in words)


def _file_task(path):
  import seqio
  from tasks import custom
  return custom.register_file_task(
      FILE_TASK, {'train': path}, metric='accuracy', vocabulary=seqio.ByteVocabulary(),
      shuffle_buffer_size=64)


def _file_run(model_dir, task):
  return _run(model_dir, 6, train_dataset_cfg=data.DatasetConfig(task, tiny.LENGTHS,
                                                                 batch_size=8))


@pytest.fixture(scope='module')
def file_reference(tmp_path_factory):
  """A fault-free run on the same data file, read from local disk."""
  root = tmp_path_factory.mktemp('file_reference')
  (root / 'train.tsv').write_text(_tsv(tiny._words(256, 0)))  # pylint: disable=protected-access
  return _file_run(root / 'run', _file_task(str(root / 'train.tsv')))


def test_transient_faults_during_data_reads(gcs_faults, file_reference, tmp_path):
  path = f'{gcs_faults.bucket}/data/train.tsv'
  storage.write_text(path, _tsv(tiny._words(256, 0)))  # pylint: disable=protected-access
  task = _file_task(path)  # reads the header (through the proxy, no faults yet)
  data_file = r'data(%2F|/)train\.tsv'
  rules = [
      gcs_faults.fail(rf'^GET .*{data_file}.*alt=media', status=503, times=2),  # the bytes
      gcs_faults.fail(rf'^GET .*{data_file}', status=429, times=1),  # metadata or bytes
      gcs_faults.fail(rf'^GET .*{data_file}', drop=True, times=2),
      gcs_faults.fail(rf'^GET .*{data_file}', delay=1.0, every=2, times=2),
  ]
  state = _file_run(tmp_path / 'run', task)
  _assert_injected(*rules)
  _assert_same(state, file_reference)


_STALL_SCRIPT = """
import sys, time
import numpy as np
import orbax.checkpoint as ocp
from t5tpu import storage
path = sys.argv[1]
t = time.monotonic()
storage.write_text(path + '/note.txt', 'hello')
assert storage.read_text(path + '/note.txt') == 'hello'
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(storage.orbax_path(path + '/ckpt'), {'w': np.arange(64, dtype=np.float32)})
checkpointer.wait_until_finished()
restored = checkpointer.restore(storage.orbax_path(path + '/ckpt'))
assert np.array_equal(restored['w'], np.arange(64, dtype=np.float32))
print(f'seconds={time.monotonic() - t:.1f}')
"""


def test_stalled_requests_are_abandoned_and_retried(gcs_faults):
  """An answer that never comes (a connection that died without a reset) is given up on after
  T5TPU_GCS_STALL_SECONDS and retried, by gcsfs (t5tpu's files, orbax's metadata) and by
  tensorstore (orbax's arrays). In a new process: tensorstore reads its limit once."""
  stall = 40.0  # far longer than the limit below; the clients would wait for all of it
  rules = [
      gcs_faults.fail(r'^GET .*stall(%2F|/)note\.txt', delay=stall, times=1),  # gcsfs
      # orbax's metadata, through etils.epath's gcsfs: the start of an upload. (Not its last
      # chunk: fake-gcs-server answers a repeated last chunk with 404 where GCS says 200.)
      gcs_faults.fail(r'^POST /upload/.*\?name=stall/ckpt/[^&]*&uploadType=resumable',
                      delay=stall, times=1),
      gcs_faults.fail(r'^GET .*stall%2Fckpt%2F.*ocdbt', delay=stall, times=1),  # tensorstore
  ]
  env = {k: v for k, v in os.environ.items() if not k.startswith('TENSORSTORE_CURL_')}
  env.update(gcs_faults.env, T5TPU_GCS_STALL_SECONDS='2')  # t5tpu.storage sets tensorstore's
  t = time.monotonic()
  proc = subprocess.run([sys.executable, '-c', _STALL_SCRIPT, f'{gcs_faults.bucket}/stall'],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert time.monotonic() - t < stall, proc.stdout
  _assert_injected(*rules)


# ----------------------------------------------------------------------------- lasting failures

def test_permanent_failure_during_save_keeps_previous_checkpoint(gcs_faults, reference):
  run = f'{gcs_faults.bucket}/models/run'
  reference.seed_checkpoint_3(run)
  # Every attempt to write the commit marker of checkpoint_6 fails: gcsfs gives up after its
  # 6 attempts (about 30 s of backoff; 3 s here, see conftest). Everything else of checkpoint_6
  # was written.
  rule = gcs_faults.fail(r'^POST /upload/.*checkpoint_6/commit_success\.txt', status=503)
  with pytest.raises(errors.UserError) as e:
    _run(run, 6)
  assert rule.injected == gcsfs.GCSFileSystem.retries  # every attempt met it, then gcsfs gave up
  message = errors.message(e.value)
  assert f'{run}/checkpoint_6' in message and '503' in message, message
  gcs_faults.clear()
  # The half-written checkpoint_6 is not a checkpoint; checkpoint_3 is whole and restorable.
  assert checkpoints.all_steps(run) == [3]
  _assert_same(_run(run, 6), reference.at_6)


def test_lasting_failure_reading_the_newest_checkpoint_is_not_damage(gcs_faults, reference):
  """GCS fails every read of checkpoint_6's state for longer than the clients retry:
  that is an outage, not a damaged checkpoint. The run stops with a UserError and leaves
  checkpoint_6 where it is, rather than moving it aside and resuming from checkpoint_3."""
  run = f'{gcs_faults.bucket}/models/run'
  reference.seed_checkpoint_3(run, 6)
  rule = gcs_faults.fail(r'^GET .*checkpoint_6(%2F|/)state', status=503)
  with pytest.raises(errors.UserError) as e:
    _run(run, 9)
  _assert_injected(rule)
  message = errors.message(e.value)
  assert f'{run}/checkpoint_6' in message and '503' in message, message
  gcs_faults.clear()
  assert checkpoints.all_steps(run) == [3, 6]
  assert not [n for n in storage.listdir(run) if 'unreadable' in n]
  _assert_same_checkpoint(f'{run}/checkpoint_6', reference.checkpoint_6)


@contextlib.contextmanager
def _tiny_disk(path, size):
  """A real file system of `size` (tmpfs): mounting needs root; skip the test otherwise."""
  os.makedirs(path, exist_ok=True)
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                         capture_output=True, text=True, check=False)
  if mount.returncode:
    pytest.skip(f'cannot mount a tmpfs to fill up (needs root or CAP_SYS_ADMIN): '
                f'{mount.stderr.strip() or mount.returncode}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def _fill(disk, leave: int):
  """Takes all of the disk's free space but `leave` bytes."""
  st = os.statvfs(disk)
  with open(os.path.join(disk, 'filler'), 'wb') as f:
    f.write(b'\0' * max(0, st.f_bavail * st.f_frsize - leave))


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, reference):
  # Room to spare once the filler goes: while orbax writes a checkpoint, OCDBT keeps every
  # commit's data files, and on a loaded machine (many small commits) checkpoint_6's temporary
  # folder reached 5.2 MB, over twice the finished checkpoint; an 8 MB disk then filled up again.
  with _tiny_disk(tmp_path / 'disk', '64m') as disk:
    run = str(disk / 'run')
    reference.seed_checkpoint_3(run)  # about 2 MB
    # Leave room for model-info.txt, config.gin and events, not for a checkpoint.
    _fill(disk, leave=64 * 1024)
    with pytest.raises(errors.UserError) as e:
      _run(run, 6)
    message = errors.message(e.value)
    assert f'{run}/checkpoint_6' in message and 'disk is full' in message, message
    assert checkpoints.all_steps(run) == [3]
    os.remove(disk / 'filler')  # the user frees space and runs the same command again
    _assert_same(_run(run, 6), reference.at_6)


# ----------------------------------------------------------------------------- failing early

def test_check_reachable_local_paths_need_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{gcs_server.free_port()}')
  storage.check_reachable(str(tmp_path), None, '')


def test_check_reachable_emulator_bucket(fake_gcs):
  storage.check_reachable(f'{fake_gcs.bucket}/models/run', f'{fake_gcs.bucket}/ckpt/checkpoint_1')
  with pytest.raises(errors.UserError, match='gs://t5tpu-no-such-bucket does not exist'):
    storage.check_reachable('gs://t5tpu-no-such-bucket/run')


def test_no_network_fails_within_seconds(monkeypatch):
  closed = f'http://127.0.0.1:{gcs_server.free_port()}'  # nothing listens there
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', closed)
  t = time.monotonic()
  with pytest.raises(errors.UserError) as e:
    storage.check_reachable('gs://t5tpu-bucket/models/run')
  assert time.monotonic() - t < 10
  message = errors.message(e.value)
  assert message.startswith(f'cannot reach the GCS endpoint STORAGE_EMULATOR_HOST={closed}')
  assert 'refused' in message, message


def test_no_network_to_real_gcs_fails_within_seconds(tmp_path, monkeypatch):
  """Credentials present (an ADC file as `gcloud auth application-default login` writes), but
  GCS does not answer: the host is a closed loopback port, so nothing leaves this machine."""
  adc = tmp_path / 'adc.json'
  adc.write_text('{"type": "authorized_user", "client_id": "x", "client_secret": "y", '
                 '"refresh_token": "z"}')
  monkeypatch.delenv('STORAGE_EMULATOR_HOST', raising=False)
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(adc))
  monkeypatch.setattr(storage, 'GCS_HOST', f'127.0.0.1:{gcs_server.free_port()}')
  t = time.monotonic()
  with pytest.raises(errors.UserError) as e:
    storage.check_reachable('gs://t5tpu-bucket/models/run')
  assert time.monotonic() - t < 10
  message = errors.message(e.value)
  assert message.startswith('cannot reach Google Cloud Storage (127.0.0.1:'), message
  assert message.endswith('no network?'), message


def test_run_with_unreachable_model_dir_fails_within_seconds(monkeypatch, copy_task):
  """The training entry point checks gs:// paths first (storage.check_reachable): without
  it, gcsfs retries a refused connection for about 30 s per call, tensorstore for minutes."""
  closed = f'http://127.0.0.1:{gcs_server.free_port()}'
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', closed)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', closed)
  storage.reset_clients()
  t = time.monotonic()
  with pytest.raises(errors.UserError, match='cannot reach the GCS endpoint'):
    _run('gs://t5tpu-bucket/models/run', 3)
  assert time.monotonic() - t < 10
  storage.reset_clients()


def _check_in_fresh_process(tmp_path, **env_changes):
  """check_reachable in a new Python with no emulator set, so that google.auth reads the
  environment afresh; NO_GCE_CHECK stops it probing the GCE metadata server (not loopback)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
                      'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'GOOGLE_APPLICATION_CREDENTIALS')}
  env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), NO_GCE_CHECK='true')
  env.update(env_changes)
  code = ('import sys\n'
          'from t5tpu import errors, storage\n'
          'try:\n'
          "  storage.check_reachable('gs://t5tpu-bucket/models/run')\n"
          'except errors.UserError as e:\n'
          '  print(errors.message(e)); sys.exit(2)\n')
  t = time.monotonic()
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=60, check=False)
  return proc, time.monotonic() - t


def test_missing_credentials_file_fails_within_seconds(tmp_path):
  missing = str(tmp_path / 'no-such-key.json')
  proc, seconds = _check_in_fresh_process(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=missing)
  assert proc.returncode == 2, proc.stderr
  assert seconds < 10
  out = proc.stdout
  assert out.startswith('no Google Cloud credentials were found'), out
  assert missing in out and 'gcloud auth application-default login' in out, out


def test_no_credentials_at_all_fails_within_seconds(tmp_path):
  proc, seconds = _check_in_fresh_process(tmp_path)
  assert proc.returncode == 2, proc.stderr
  assert seconds < 10
  out = proc.stdout
  assert out.startswith('no Google Cloud credentials were found'), out
  assert 'gcloud auth application-default login' in out, out
  assert 'GOOGLE_APPLICATION_CREDENTIALS' in out, out
