"""gin/examples/*.gin parse with t5tpu's gin helpers and name what they promise.

They are not run (they need downloads), except the Stack Overflow one's task, whose sample
data ships with t5tpu.
"""
import os

import gin
import pytest
import seqio

from t5tpu import gin_utils
from tests.tasks.helpers import read_split

T5_1_1_SMALL = 'gs://t5-data/pretrained_models/t5x/t5_1_1_small/checkpoint_1000000'


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse(name, *bindings):
  gin_utils.parse_gin([os.path.join('gin', 'examples', name)],
                      ["MODEL_DIR = '/tmp/unused'", *bindings])
  return lambda macro: gin.query_parameter(f'{macro}/macro.value')


def test_every_example_is_tested():
  names = sorted(os.listdir(os.path.join(gin_utils.gin_config_dir(), 'examples')))
  # knowledge_demo.gin runs end to end in tests/test_demo.py, synthetic_tiny_model.gin in
  # tests/study/test_study.py.
  assert names == ['cbqa_t5_1_1_small.gin', 'knowledge_demo.gin', 'knowledge_tiny.gin',
                   'knowledge_tiny_model.gin', 'stackoverflow_tags.gin',
                   'synthetic_tiny_model.gin', 'xsum_t5_1_1_small.gin', 'xsum_t5_base.gin',
                   'xsum_t5_small.gin']


@pytest.mark.parametrize('name, task', [('cbqa_t5_1_1_small.gin', 'natural_questions_open'),
                                        ('xsum_t5_1_1_small.gin', 'xsum')])
def test_finetune_examples(clean_gin, name, task):
  macro = parse(name)
  assert macro('MIXTURE_OR_TASK_NAME') == task
  assert task in seqio.TaskRegistry.names()  # the gin file imported the task module
  assert macro('TRAIN_STEPS') == 1_020_000
  assert macro('INITIAL_CHECKPOINT_PATH') == T5_1_1_SMALL
  assert macro('LOSS_NORMALIZING_FACTOR') == 233472
  assert gin.query_parameter('network.T5Config.emb_dim') == 512  # t5_1_1 small


def test_stackoverflow_example_registers_its_task_from_gin(clean_gin, tmp_path):
  # The model gin's vocabulary is the T5 one on GCS; offline, a user gin swaps in bytes for
  # both model and task (as tests/test_train.py does).
  user = tmp_path / 'user.gin'
  user.write_text("from __gin__ import dynamic_registration\nimport seqio\n"
                  "include 'examples/stackoverflow_tags.gin'\n"
                  "VOCABULARY = @seqio.ByteVocabulary()\n")
  gin_utils.parse_gin([str(user)], ["MODEL_DIR = '/tmp/unused'",
                                    "tasks.custom.register_file_task.prefix = 'assign tag: '"])
  macro = lambda m: gin.query_parameter(f'{m}/macro.value')  # noqa: E731
  assert macro('TRAIN_STEPS') is None and macro('TRAIN_EPOCHS') == 10  # the tutorial's
  assert macro('BATCH_SIZE') == 48 and macro('LEARNING_RATE') == 1e-4
  assert type(gin.get_configurable('t5tpu.models.EncoderDecoderModel')().optimizer_def
              ).__name__ == 'AdamW'
  assert macro('INITIAL_CHECKPOINT_PATH').endswith('/t5x/t5_small/checkpoint_1000000')
  name = gin.get_configurable('tasks.custom.register_file_task')()
  assert name == 'stackoverflow_tags'
  task = seqio.get_mixture_or_task(name)
  assert task.output_features['inputs'].vocabulary == seqio.ByteVocabulary()
  exs = read_split(name, 'validation')
  first = exs[0]['inputs_pretokenized'].decode()
  assert first.startswith('assign tag: Sort a list of tuples by the second element I have')
  assert exs[0]['targets_pretokenized'].decode() == 'python list sorting'


@pytest.mark.parametrize('name, emb_dim, checkpoint', [('xsum_t5_small.gin', 512, 't5_small'),
                                                      ('xsum_t5_base.gin', 768, 't5_base')])
def test_xsum_recipes(clean_gin, name, emb_dim, checkpoint):
  macro = parse(name)
  assert macro('MIXTURE_OR_TASK_NAME') == 'xsum' and macro('TRAIN_EPOCHS') == 3
  assert macro('LEARNING_RATE') == 1e-4 and macro('DROPOUT_RATE') == 0.1
  assert macro('INITIAL_CHECKPOINT_PATH').endswith(f'/t5x/{checkpoint}/checkpoint_1000000')
  assert gin.query_parameter('network.T5Config.emb_dim') == emb_dim
  model = gin.get_configurable('t5tpu.models.EncoderDecoderModel')()
  assert type(model.optimizer_def).__name__ == 'AdamW'
  assert model.loss_normalizing_factor is None


def test_knowledge_example(clean_gin):
  from tasks import knowledge
  macro = parse('knowledge_tiny.gin')
  assert macro('MIXTURE_OR_TASK_NAME') == knowledge.TASK_NAME
  assert macro('INITIAL_CHECKPOINT_PATH') is None  # trained from scratch
  assert macro('TRAIN_STEPS') == macro('EVAL_PERIOD') == 100  # one evaluation, at the end
  assert gin.query_parameter('network.T5Config.vocab_size') == knowledge.VOCAB_SIZE
  assert macro('TASK_FEATURE_LENGTHS') == {'inputs': 24, 'targets': 8}
  model = gin.get_configurable('t5tpu.models.EncoderDecoderModel')()
  assert model.input_vocabulary == knowledge.vocabulary()
  assert model.config.emb_dim == 128 and model.config.num_encoder_layers == 2


def test_knowledge_model_gin_serves_offline_eval(clean_gin):
  from tasks import knowledge
  gin_utils.parse_gin([os.path.join('gin', 'examples', 'knowledge_tiny_model.gin'),
                       os.path.join('gin', 'runs', 'eval.gin')],
                      ["CHECKPOINT_PATH = '/tmp/unused'", "EVAL_OUTPUT_DIR = '/tmp/unused'",
                       "EVAL_SPLIT = 'paraphrase'", "MIXTURE_OR_TASK_NAME = 'knowledge_qa'"])
  model = gin.get_configurable('t5tpu.models.EncoderDecoderModel')()
  assert model.output_vocabulary == knowledge.vocabulary()
  assert model.config.vocab_size == knowledge.VOCAB_SIZE
