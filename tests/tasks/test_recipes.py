"""The tutorial recipes (gin/examples) train and evaluate offline, end to end.

Their hyper-parameters stay as written (AdamW 1e-4, epochs, lengths); only what needs a
download is swapped: a tiny model of the same kind from scratch instead of the pretrained
t5-small, a local vocabulary, the shipped Stack Overflow sample and TFDS mock data for XSum,
and a batch the samples can fill.
"""
import json

import gin
import pytest

from t5tpu import train
from tests.tasks import helpers
from tests.tasks.helpers import seqio_test_spm

TINY = ['--gin.network.T5Config.emb_dim=16', '--gin.network.T5Config.num_heads=2',
        '--gin.network.T5Config.head_dim=8', '--gin.network.T5Config.mlp_dim=32',
        '--gin.network.T5Config.num_encoder_layers=1',
        '--gin.network.T5Config.num_decoder_layers=1', "--gin.network.T5Config.dtype='float32'",
        '--gin.INITIAL_CHECKPOINT_PATH=None', '--gin.BATCH_SIZE=8']


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def metrics_rows(model_dir, task):
  path = model_dir / 'inference_eval' / f'{task}-metrics.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_stackoverflow_recipe(tmp_path, clean_gin, capsys):
  user = tmp_path / 'user.gin'
  user.write_text("from __gin__ import dynamic_registration\nimport seqio\n"
                  "include 'examples/stackoverflow_tags.gin'\n"
                  "VOCABULARY = @seqio.ByteVocabulary()\n")
  model_dir = tmp_path / 'so'
  train.main([f'--gin_file={user}', f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_EPOCHS=2',
              *TINY])
  assert 'TRAIN_EPOCHS=2: 1 steps per epoch from step 0 -> TRAIN_STEPS=2' in (
      capsys.readouterr().err)  # the sample's 16 questions pack into one batch of 8 rows
  config = (model_dir / 'config.gin').read_text()
  assert 'LEARNING_RATE = 0.0001' in config and 'AdamW' in config
  rows = metrics_rows(model_dir, 'stackoverflow_tags')
  assert {'accuracy', 'precision', 'recall', 'f1'} <= set(rows[-1])


def mock_xsum(data_dir, n: int):
  """TFDS mock data for xsum, with split sizes (seqio's evaluator asks for them)."""
  import tensorflow_datasets as tfds
  info = tfds.builder('xsum:1.1.0', data_dir=str(data_dir)).info
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
                                       for s in ('train', 'validation', 'test')]))
  info_dir = data_dir / 'xsum' / '1.1.0'
  info_dir.mkdir(parents=True)
  info.write_to_directory(str(info_dir))
  return tfds.testing.mock_data(num_examples=n, data_dir=str(data_dir),
                                policy=tfds.testing.MockPolicy.USE_FILES)


@pytest.fixture
def forget_tfds_builders():
  """Memoized TFDS builders cleared before and after (whatever order workers run modules in)."""
  helpers.forget_tfds_builders()
  yield
  helpers.forget_tfds_builders()


def test_xsum_recipe_on_mock_data(tmp_path, clean_gin, forget_tfds_builders):
  model_dir = tmp_path / 'xsum'
  spm = seqio_test_spm()
  with mock_xsum(tmp_path / 'tfds', 16):
    train.main(['--gin_file=examples/xsum_t5_small.gin', f'--gin.MODEL_DIR="{model_dir}"',
                '--gin.TRAIN_EPOCHS=1', '--gin.EVALUATOR_NUM_EXAMPLES=8',
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                f"--gin.seqio.SentencePieceVocabulary.sentencepiece_model_file='{spm}'",
                *TINY])
  rows = metrics_rows(model_dir, 'xsum')
  assert {'rouge1', 'rouge2', 'rougeLsum'} <= set(rows[-1])
