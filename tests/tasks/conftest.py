"""Fixtures for the task tests: an offline stand-in for the T5 vocabulary."""
import pytest

from tests.tasks.helpers import seqio_test_spm


@pytest.fixture(scope='session', autouse=True)
def offline_default_vocabulary():
  """Points the tasks' default vocabulary at seqio's test model (the T5 one is on GCS).

  The shared DEFAULT_VOCABULARY is resolved once, here, through the same gin binding users
  set; the gin config is cleared again so other tests start from an empty config.
  """
  import gin
  from tasks import vocab
  vocab.DEFAULT_VOCABULARY.reset()
  gin.bind_parameter('tasks.vocab.default_vocabulary.sentencepiece_model_file', seqio_test_spm())
  assert vocab.DEFAULT_VOCABULARY.sentencepiece_model_file == seqio_test_spm()
  gin.clear_config()
  yield vocab.DEFAULT_VOCABULARY
  vocab.DEFAULT_VOCABULARY.reset()
