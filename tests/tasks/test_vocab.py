"""The default vocabulary: T5's path, gin overrides, lazy resolution, equality with the model's."""
import copy
import os
import pickle

import gin
import pytest
import seqio

from t5tpu import gin_utils
from tasks import vocab
from tests.tasks.helpers import seqio_test_spm


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def gin_path(name):
  return os.path.join(gin_utils.gin_config_dir(), name)


def test_default_is_the_model_gins_vocabulary(clean_gin):
  v = vocab.default_vocabulary()
  assert v.sentencepiece_model_file == vocab.DEFAULT_SPM_PATH
  assert vocab.DEFAULT_SPM_PATH.endswith('cc_all.32000.100extra/sentencepiece.model')
  assert v.extra_ids == 0  # the .100extra file already holds the sentinels
  # Exactly what gin/models/t5_1_1/base.gin builds, so seqio (and t5x) see them as equal.
  model_gin = open(gin_path('models/t5_1_1/base.gin')).read()
  assert vocab.DEFAULT_SPM_PATH in model_gin
  assert v == seqio.SentencePieceVocabulary(vocab.DEFAULT_SPM_PATH)
  assert v != seqio.SentencePieceVocabulary('gs://t5-data/vocabs/cc_all.32000/sentencepiece.model',
                                            extra_ids=100)


def test_follows_the_model_gin_binding(clean_gin):
  gin.parse_config("""
from __gin__ import dynamic_registration
import seqio
seqio.SentencePieceVocabulary.sentencepiece_model_file = 'gs://b/model.spm'
""")
  assert vocab.default_vocabulary().sentencepiece_model_file == 'gs://b/model.spm'
  # An explicit binding of the task vocabulary wins.
  gin.bind_parameter('tasks.vocab.default_vocabulary.sentencepiece_model_file', '/x/y.model')
  assert vocab.default_vocabulary().sentencepiece_model_file == '/x/y.model'


def test_lazy_vocabulary_resolves_after_late_bindings(clean_gin):
  lazy = vocab.DefaultVocabulary()  # as a task module would hold it, before gin is parsed
  assert 'unresolved' in repr(lazy)
  gin.bind_parameter('tasks.vocab.default_vocabulary.sentencepiece_model_file', seqio_test_spm())
  assert lazy.encode('hello') == seqio.SentencePieceVocabulary(seqio_test_spm()).encode('hello')
  assert lazy.vocab_size == 26 and lazy.eos_id == 1
  plain = seqio.SentencePieceVocabulary(seqio_test_spm())
  assert plain == lazy and lazy == plain  # both directions, as t5x's vocabulary check does
  assert lazy != seqio.SentencePieceVocabulary(seqio_test_spm(), extra_ids=10)
  assert copy.deepcopy(lazy) == plain
  assert pickle.loads(pickle.dumps(lazy)) == plain
  lazy.reset()
  gin.clear_config()
  assert lazy == seqio.SentencePieceVocabulary(vocab.DEFAULT_SPM_PATH)


def test_tasks_share_one_default_vocabulary(offline_default_vocabulary):
  features = vocab.output_features()
  assert features['inputs'].vocabulary is vocab.DEFAULT_VOCABULARY
  assert features['targets'].vocabulary is vocab.DEFAULT_VOCABULARY
  assert features['targets'].add_eos and not features['inputs'].required
  byte = seqio.ByteVocabulary()
  assert vocab.output_features(byte)['targets'].vocabulary is byte
