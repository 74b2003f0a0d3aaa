"""Hugging Face hub names (hf://org/name[@revision]) from the local Hugging Face cache, offline.

The cache is built the way huggingface_hub lays it out (models--org--name/{blobs, snapshots,
refs}), checked with huggingface_hub's own scan_cache_dir / try_to_load_from_cache, and holds a
random tiny T5 that transformers saved. Every test runs with HF_HUB_OFFLINE=1 and fails on any
attempt to open a network connection.
"""
import copy
import hashlib
import os
import shutil
import socket
import time
import types

import gin
import pytest

from t5tpu import errors, gin_utils, initial_checkpoint, network, storage
from t5tpu.formats import convert, hf, hub, t5x_legacy
from tests.formats import common
from tests.formats.test_hf import TOL, hf_logits, hf_model, max_diff

huggingface_hub = pytest.importorskip('huggingface_hub')
transformers = pytest.importorskip('transformers')

REPO = 'org/tiny-t5'
MAIN = hashlib.sha1(b'main commit').hexdigest()  # 40 hex digits, as a git commit
V1 = hashlib.sha1(b'v1 commit').hexdigest()
EXTRA_IDS = 3  # sentinels in the main snapshot's tokenizer_config.json
# LFS files are stored under their sha256, the others under their git blob sha1.
_LFS = ('.safetensors', '.bin', '.model')


def _blob_name(name: str, data: bytes) -> str:
  if name.endswith(_LFS):
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def add_snapshot(cache, repo: str, commit: str, folder, refs=()) -> str:
  """Puts the files of `folder` into `cache` as huggingface_hub does: content in blobs/,
  snapshots/<commit>/<file> a relative symlink to its blob, refs/<ref> the commit."""
  root = os.path.join(cache, 'models--' + repo.replace('/', '--'))
  snapshot = os.path.join(root, 'snapshots', commit)
  os.makedirs(os.path.join(root, 'blobs'), exist_ok=True)
  os.makedirs(snapshot, exist_ok=True)
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    blob = os.path.join(root, 'blobs', _blob_name(name, data))
    with open(blob, 'wb') as f:
      f.write(data)
    link = os.path.join(snapshot, name)
    if not os.path.lexists(link):  # a file a snapshot has already stays
      os.symlink(os.path.relpath(blob, snapshot), link)
  os.makedirs(os.path.join(root, 'refs'), exist_ok=True)
  for ref in refs:
    with open(os.path.join(root, 'refs', ref), 'w') as f:
      f.write(commit)  # no newline, as huggingface_hub writes it
  return snapshot


def seqio_spm() -> str:
  import seqio
  return os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                      'sentencepiece.model')


@pytest.fixture(scope='module')
def models():
  return {'main': hf_model(v11=True), 'v1': hf_model(v11=False, seed=1)}


@pytest.fixture(scope='module')
def cache(tmp_path_factory, models):
  """HF_HUB_CACHE with org/tiny-t5: main (T5 1.1, spiece.model + T5Tokenizer files with 3
  sentinels) and tag v1 (T5 1.0, spiece.model only); org/config-only (just config.json)."""
  root = tmp_path_factory.mktemp('hf_cache')
  cache = str(root / 'hub')
  main, v1 = root / 'main', root / 'v1'
  models['main'].save_pretrained(main)
  hf.write_tokenizer(str(main), seqio_spm(), extra_ids=EXTRA_IDS)  # spiece.model + configs
  models['v1'].save_pretrained(v1)
  shutil.copy(seqio_spm(), v1 / hub.SPM_NAME)
  add_snapshot(cache, REPO, MAIN, main, refs=['main'])
  add_snapshot(cache, REPO, V1, v1, refs=['v1'])
  os.makedirs(root / 'config_only')
  shutil.copy(main / 'config.json', root / 'config_only')
  add_snapshot(cache, 'org/config-only', MAIN, root / 'config_only', refs=['main'])
  return cache


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test if anything tries to open a network connection."""
  attempts = []

  def connect(sock, address):
    attempts.append(address)
    raise OSError(f'test: no network ({address})')
  monkeypatch.setattr(socket.socket, 'connect', connect)
  yield
  assert not attempts, f'network connections attempted: {attempts}'


@pytest.fixture
def offline(cache, monkeypatch, no_network):
  """HF_HUB_CACHE = the test cache and HF_HUB_OFFLINE=1. huggingface_hub reads the environment
  once, at import: its constants are set as well."""
  monkeypatch.setenv('HF_HUB_CACHE', cache)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', cache)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  return cache


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def snapshot(cache, commit, repo=REPO) -> str:
  return os.path.join(cache, 'models--' + repo.replace('/', '--'), 'snapshots', commit)


# ----------------------------------------------------------------------------- the cache

def test_huggingface_hub_recognises_the_cache(offline):
  info = huggingface_hub.scan_cache_dir(offline)
  assert not info.warnings, info.warnings
  repos = {r.repo_id: r for r in info.repos}
  assert sorted(repos) == ['org/config-only', REPO]
  revisions = {r.commit_hash: r.refs for r in repos[REPO].revisions}
  assert revisions == {MAIN: frozenset({'main'}), V1: frozenset({'v1'})}
  found = huggingface_hub.try_to_load_from_cache(REPO, 'config.json', revision='v1')
  assert found == os.path.join(snapshot(offline, V1), 'config.json')


def test_hub_name_resolves_offline(offline):
  assert hub.parse('hf://org/tiny-t5') == (REPO, 'main')
  assert hub.parse('hf://t5-small') == ('t5-small', 'main')  # the hub's legacy names
  assert hub.resolve('hf://org/tiny-t5') == snapshot(offline, MAIN)
  assert hub.resolve('hf://org/tiny-t5/') == snapshot(offline, MAIN)
  assert initial_checkpoint.detect_format('hf://org/tiny-t5') == 'hf'
  assert storage.resolve('hf://org/tiny-t5') == 'hf://org/tiny-t5'  # not a local path


def test_revision_resolves(offline):
  assert hub.parse('hf://org/tiny-t5@refs/pr/1') == (REPO, 'refs/pr/1')
  assert hub.resolve('hf://org/tiny-t5@v1') == snapshot(offline, V1)
  assert hub.resolve(f'hf://org/tiny-t5@{V1}') == snapshot(offline, V1)  # a commit
  assert hub.hf_config('hf://org/tiny-t5@v1') == common.small_config(
      False, dtype='bfloat16', dropout_rate=0.1)  # T5 1.0; T5Config()'s dtype and dropout
  with pytest.raises(errors.UserError, match='is not a Hugging Face model name'):
    hub.parse('hf://org/tiny-t5@')


# ----------------------------------------------------------------------------- restore

def test_restore_gives_the_logits_of_transformers(offline, models):
  cfg = hub.hf_config('hf://org/tiny-t5', network.T5Config(dtype='float32', dropout_rate=0.0))
  assert cfg == common.small_config(True)
  assert cfg == hf.read_with_config(snapshot(offline, MAIN), dtype='float32')[1]  # weights'
  trainer = common.make_trainer(cfg)
  enc, dec_in, targets = common.padded_batch(100)
  expected = hf_logits(models['main'], enc, dec_in)
  state = initial_checkpoint.load('hf://org/tiny-t5', trainer)  # what training restores
  params = initial_checkpoint.load_params('hf://org/tiny-t5', trainer.params_layout)  # eval and infer
  for restored in (state.params, params):
    diff = max_diff(common.logits(cfg, restored, enc, dec_in, targets), expected, targets)
    assert diff < TOL


def test_a_model_gin_that_disagrees_gives_the_mismatch_error(offline):
  trainer = common.make_trainer(common.named('t5_1_1/tiny', dtype='float32'))
  with pytest.raises(initial_checkpoint.CheckpointMismatchError) as e:
    initial_checkpoint.load('hf://org/tiny-t5', trainer)
  msg = str(e.value)
  assert msg.startswith('checkpoint hf://org/tiny-t5 does not fit the configured model:')
  assert 'token_embedder/embedding: (100, 16) vs (32128, 8)' in msg
  assert 'the checkpoint looks like: no named model (emb 16, 4 heads x 6' in msg
  assert 'the configured model is:   t5_1_1/tiny' in msg


def test_convert_from_a_hub_name(offline, tmp_path, capsys):
  convert.main(['--from=hf://org/tiny-t5', f'--to={tmp_path / "t5x"}',
                '--to_format=t5x_legacy'])
  assert 'hf://org/tiny-t5 -> ' in capsys.readouterr().out
  legacy = t5x_legacy.read(str(tmp_path / 't5x' / 'checkpoint_0'))
  common.assert_trees_equal(legacy['target'], hf.read(snapshot(offline, MAIN))['target'])


# ----------------------------------------------------------------------------- not there

def test_not_cached_offline_is_one_clear_error(offline, tmp_path, capsys):
  start = time.monotonic()
  with pytest.raises(SystemExit) as e:
    convert.main(['--from=hf://google/flan-t5-base', f'--to={tmp_path / "out"}',
                  '--to_format=orbax'])
  assert e.value.code == errors.EXIT_USER_ERROR
  stderr = capsys.readouterr().err
  assert stderr == (
      't5tpu: error: hf://google/flan-t5-base: google/flan-t5-base (revision main) is not in '
      f'the Hugging Face cache ({offline}), and HF_HUB_OFFLINE is set, so nothing is '
      'downloaded: run once with network access (without HF_HUB_OFFLINE), or download it '
      'first with `hf download google/flan-t5-base` (`huggingface-cli download '
      'google/flan-t5-base` in older huggingface_hub)\n')
  assert time.monotonic() - start < 5  # no retries, no timeouts
  assert not (tmp_path / 'out').exists()
  # the same error for every reader; a revision is named, with the flag that fetches it
  with pytest.raises(hub.HubModelUnavailableError, match=r'\(revision v2\) is not in .*'
                     r'`hf download google/flan-t5-base --revision v2`'):
    initial_checkpoint.read_state_dict('hf://google/flan-t5-base@v2')
  with pytest.raises(errors.UserError, match='revision nope'):
    hub.resolve('hf://org/tiny-t5@nope')


def test_a_partial_copy_in_the_cache_names_what_it_lacks(offline):
  with pytest.raises(hub.HubModelUnavailableError, match=(
      r'the copy of org/config-only \(revision main\) in the Hugging Face cache .* lacks '
      r'weights \(model.safetensors or pytorch_model.bin\), and HF_HUB_OFFLINE is set')):
    initial_checkpoint.detect_format('hf://org/config-only')


# ----------------------------------------------------------------------------- gin

def parse(*bindings):
  gin_utils.parse_gin([os.path.join(gin_utils.gin_config_dir(), 'models', 'hf.gin')],
                      ["INITIAL_CHECKPOINT_PATH = 'hf://org/tiny-t5'", 'DROPOUT_RATE = 0.0',
                       *bindings], finalize=False)


def evaluate(binding: str):
  """What gin passes for `binding` (deepcopy evaluates the references in it, as gin does)."""
  return copy.deepcopy(gin.query_parameter(binding))


def test_models_hf_gin_takes_the_shape_from_config_json(offline, clean_gin, caplog):
  parse("network.T5Config.remat_policy = 'full'")
  with caplog.at_level('INFO', logger='t5tpu.formats.hub'):
    cfg = evaluate('network.Transformer.config')
  assert cfg == common.small_config(True, dtype='bfloat16', remat_policy='full')
  assert 'model from hf://org/tiny-t5 config.json: no named model (emb 16, 4 heads x 6, 2+3 ' \
         'layers, mlp 32 (gated gelu), vocab 100, untied logits)' in caplog.text
  # eval / infer (no INITIAL_CHECKPOINT_PATH): HF_MODEL names the model
  gin.clear_config()
  parse("HF_MODEL = 'hf://org/tiny-t5@v1'")
  assert evaluate('network.Transformer.config').logits_via_embedding  # T5 1.0


def test_hf_gin_without_a_hugging_face_model_says_so(offline, clean_gin):
  parse(f"HF_MODEL = '{common.fixture_path()}'")
  with pytest.raises(errors.UserError, match='is a t5x_legacy_file checkpoint: set HF_MODEL'):
    evaluate('network.Transformer.config')
  gin.clear_config()
  parse('INITIAL_CHECKPOINT_PATH = None')  # as runs/pretrain.gin sets it
  with pytest.raises(errors.UserError, match=r'HF_MODEL \(by default INITIAL_CHECKPOINT_PATH'
                     r'\) is not set'):
    evaluate('network.Transformer.config')


# README's gin file for the repo's own vocabulary, as a user writes it.
VOCAB_GIN = """
from __gin__ import dynamic_registration
import seqio
from t5tpu.formats import hub
include 'models/hf.gin'
seqio.SentencePieceVocabulary.sentencepiece_model_file = @hub.vocab_file()
seqio.SentencePieceVocabulary.extra_ids = @hub.vocab_extra_ids()
"""


def test_the_repo_sentencepiece_model_as_vocabulary(offline, clean_gin, tmp_path):
  from tasks import vocab
  readme = open(os.path.join(os.path.dirname(__file__), '..', '..', 'README.md')).read()
  assert VOCAB_GIN.strip() in readme
  (tmp_path / 'my_run.gin').write_text(VOCAB_GIN)
  gin_utils.parse_gin([str(tmp_path / 'my_run.gin')],
                      ["INITIAL_CHECKPOINT_PATH = 'hf://org/tiny-t5'"], finalize=False)
  model_vocab = evaluate('models.EncoderDecoderModel.input_vocabulary')
  assert model_vocab.sentencepiece_model_file == os.path.join(snapshot(offline, MAIN),
                                                              'spiece.model')
  assert model_vocab.extra_ids == EXTRA_IDS
  assert vocab.default_vocabulary() == model_vocab  # the tasks follow the model's binding
  tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot(offline, MAIN))
  text = 'this is a test <extra_id_1>'
  assert tokenizer(text).input_ids == list(model_vocab.encode(text)) + [model_vocab.eos_id]
  # no tokenizer_config.json: T5Tokenizer's default, 100 sentinels
  assert hub.vocab_extra_ids('hf://org/tiny-t5@v1') == 100


# ----------------------------------------------------------------------------- online

@pytest.fixture
def fake_hub(tmp_path, monkeypatch, no_network):
  """Online, with huggingface_hub.snapshot_download's transfer faked (no network): a
  download puts the files of tmp_path/hub_repo that match allow_patterns into the cache, as
  huggingface_hub would; cache look-ups (local_files_only) are the real function's."""
  cache, files = str(tmp_path / 'cache'), tmp_path / 'hub_repo'
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', cache)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  real, downloads = huggingface_hub.snapshot_download, []

  def snapshot_download(repo_id, *, revision, allow_patterns, local_files_only=False):
    if local_files_only:
      return real(repo_id, revision=revision, allow_patterns=allow_patterns,
                  local_files_only=True)
    if not files.exists():
      raise huggingface_hub.errors.RepositoryNotFoundError(
          '404 Client Error. Repository Not Found',
          response=types.SimpleNamespace(headers={}, status_code=404, request=None))
    got = tmp_path / f'download_{len(downloads)}'
    got.mkdir()
    names = list(huggingface_hub.utils.filter_repo_objects(
        sorted(os.listdir(files)), allow_patterns=allow_patterns))
    for name in names:
      shutil.copy(files / name, got / name)
    downloads.append(names)
    return add_snapshot(cache, repo_id, MAIN, got, refs=[revision])
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
  return files, downloads


def test_online_downloads_a_t5s_files_in_one_weights_format(fake_hub, models, monkeypatch):
  torch = pytest.importorskip('torch')
  files, downloads = fake_hub
  files.mkdir()  # an older repo: pytorch_model.bin, no safetensors; TF weights too
  models['main'].config.to_json_file(files / 'config.json')
  torch.save(models['main'].state_dict(), files / 'pytorch_model.bin')
  (files / 'tf_model.h5').write_bytes(b'TF weights: never downloaded')
  shutil.copy(seqio_spm(), files / 'spiece.model')
  folder = hub.resolve('hf://org/tiny-t5')
  # safetensors asked for first; with none there, pytorch_model.bin
  assert downloads == [['config.json', 'spiece.model'],
                       ['config.json', 'pytorch_model.bin', 'spiece.model']]
  assert sorted(os.listdir(folder)) == ['config.json', 'pytorch_model.bin', 'spiece.model']
  assert hub.hf_config('hf://org/tiny-t5', common.small_config(True)) == common.small_config(True)
  # from now on the cache serves it, offline too
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  assert hub.resolve('hf://org/tiny-t5') == folder and len(downloads) == 2


def test_online_errors_of_the_hub_are_user_errors(fake_hub):
  with pytest.raises(hub.HubModelUnavailableError, match=(
      r'^hf://org/nothing: the Hugging Face hub has no model org/nothing \(or it is private')):
    initial_checkpoint.detect_format('hf://org/nothing')
