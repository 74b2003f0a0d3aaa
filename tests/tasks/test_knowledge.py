"""The built-in knowledge task: determinism, split relations, its vocabulary, learnability."""
import os
import time

import numpy as np
import pytest
import seqio

from tasks import knowledge, metrics
from tests.tasks.helpers import read_split


def test_generation_is_deterministic_and_sized():
  facts = knowledge.facts()
  assert facts == knowledge.facts()
  assert facts != knowledge.facts(seed=knowledge.SEED + 1)
  assert len(facts) == knowledge.NUM_CITIES + 3 * knowledge.NUM_PEOPLE == 324
  assert len({(f.subject, f.relation) for f in facts}) == len(facts)  # one answer per question
  for split in knowledge.SPLITS:
    assert knowledge.examples(split) == knowledge.examples(split)
  assert {s: len(knowledge.examples(s)) for s in knowledge.SPLITS} == {
      'train': 648, 'validation': 324, 'paraphrase': 324}


def test_split_relations():
  train = knowledge.examples('train')
  validation = knowledge.examples('validation')
  paraphrase = knowledge.examples('paraphrase')
  train_qa = {(e['inputs'], e['targets']) for e in train}
  # validation: the same facts, asked exactly as in training
  assert {(e['inputs'], e['targets']) for e in validation} <= train_qa
  # paraphrase: the same facts in the same order, worded in a way training never used
  assert [e['targets'] for e in paraphrase] == [e['targets'] for e in validation]
  assert not {e['inputs'] for e in paraphrase} & {e['inputs'] for e in train}
  for train_templates, held_out in knowledge.TEMPLATES.values():
    assert not set(train_templates) & set(held_out)
  # every fact is asked in every split
  facts = knowledge.facts()
  for split in (validation, paraphrase):
    assert len(split) == len(facts)
    assert all(f.subject in e['inputs'] and e['targets'] == f.answer
               for f, e in zip(facts, split))
  assert all(e['inputs'].startswith(knowledge.PREFIX) for e in train + paraphrase)
  assert all(e['answers'] == [e['targets']] for e in train)


def test_shipped_vocabulary_matches_the_generator():
  with open(knowledge.SPM_PATH, 'rb') as f:
    shipped = f.read()
  assert shipped == knowledge.build_sentencepiece_model(), (
      'tasks/data/knowledge_spm.model is stale: run `python -m tasks.knowledge`')


def test_vocabulary_spells_every_example_briefly():
  vocab = knowledge.vocabulary()
  assert vocab == knowledge.vocabulary()  # same path: model and task vocabularies agree
  assert vocab.vocab_size == knowledge.VOCAB_SIZE
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  for split in knowledge.SPLITS:
    for e in knowledge.examples(split):
      ids = vocab.encode(e['inputs'])
      target = vocab.encode(e['targets'])
      assert vocab.unk_id not in ids + target
      assert vocab.decode(target) == e['targets']
      # The demo's feature lengths (inputs 24, targets 8) hold every example with its EOS.
      assert len(ids) < 24 and len(target) < 8


def test_registered_task():
  task = seqio.get_mixture_or_task(knowledge.TASK_NAME)
  assert sorted(task.splits) == sorted(knowledge.SPLITS)
  assert task.metric_fns == [metrics.squad]
  assert task.output_features['targets'].vocabulary == knowledge.vocabulary()
  assert task.num_input_examples('train') == 648
  for split in knowledge.SPLITS:
    exs = read_split(knowledge.TASK_NAME, split)
    expected = knowledge.examples(split)
    assert [e['inputs_pretokenized'].decode() for e in exs] == [e['inputs'] for e in expected]
    assert all(e['targets'][-1] == 1 for e in exs)
  assert knowledge.register() == knowledge.TASK_NAME  # again: no error, no duplicate


def test_evaluator_on_the_paraphrase_split():
  vocab = knowledge.vocabulary()
  answers = [e['targets'] for e in knowledge.examples('paraphrase')]
  evaluator = seqio.Evaluator(knowledge.TASK_NAME, seqio.EncDecFeatureConverter(pack=False),
                              eval_split='paraphrase', use_memory_cache=False)

  def predict_fn(ds):  # right on even examples, an empty answer on odd ones
    rows = []
    for i, _ in ds.as_numpy_iterator():
      ids = (vocab.encode(answers[i]) if i % 2 == 0 else []) + [vocab.eos_id]
      rows.append((int(i), ids + [0] * (8 - len(ids))))
    return rows

  results, _ = evaluator.evaluate(compute_metrics=True, step=0, predict_fn=predict_fn)
  assert results.result()[knowledge.TASK_NAME] == {'em': 50.0, 'f1': 50.0}


# ----------------------------------------------------------------------------- learnability
def greedy_exact_match(model, params, split):
  """Greedy decoding (t5tpu.decoding) of a whole split, scored with SQuAD EM."""
  import jax
  from t5tpu import decoding
  exs = read_split(knowledge.TASK_NAME, split, {'inputs': 24, 'targets': 8})
  enc = np.zeros((len(exs), 24), np.int32)
  for i, e in enumerate(exs):
    enc[i, :len(e['inputs'])] = e['inputs']
  decode = jax.jit(lambda p, enc: decoding.predict(
      model, p, {'encoder_input_tokens': enc}, max_decode_length=8, method='greedy'))
  vocab = knowledge.vocabulary()
  predictions = [vocab.decode(row.tolist()) for row in np.asarray(decode(params, enc))]
  targets = [[a.decode() for a in e['answers']] for e in exs]
  return metrics.squad(targets, predictions)['em']


@pytest.mark.skipif(not os.environ.get('T5TPU_SLOW_TESTS'),
                    reason='trains for about a minute; set T5TPU_SLOW_TESTS=1')
def test_tiny_t5_learns_the_facts(tmp_path):
  """The demo's set-up (gin/examples/knowledge_tiny.gin) reaches high exact match on CPU."""
  import jax
  from t5tpu import checkpoints, data, models, network, optimizers, partitioning, train
  vocab = knowledge.vocabulary()
  config = network.T5Config(
      vocab_size=knowledge.VOCAB_SIZE, dtype='float32', emb_dim=128, num_heads=4, head_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, mlp_dim=256,
      mlp_activations=('gelu', 'linear'), dropout_rate=0.0, logits_via_embedding=False)
  model = models.EncoderDecoderModel(module=network.Transformer(config), input_vocabulary=vocab,
                                     output_vocabulary=vocab,
                                     optimizer_def=optimizers.Adafactor())
  mesh = partitioning.PjitPartitioner(num_partitions=1)
  start = time.time()
  state = train.train(
      model=model, partitioner=mesh, model_dir=str(tmp_path), total_steps=100, random_seed=0,
      train_dataset_cfg=data.DatasetConfig(knowledge.TASK_NAME, {'inputs': 24, 'targets': 8},
                                           batch_size=64, pack=False),
      learning_rate_fn=optimizers.create_learning_rate_scheduler(factors='constant',
                                                                 base_learning_rate=0.01),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=10_000)), eval_period=None)
  seconds = time.time() - start
  init = model.init_params(jax.random.PRNGKey(0), {'encoder_input_tokens': (1, 24),
                                                   'decoder_input_tokens': (1, 8)})
  before = greedy_exact_match(model, init, 'validation')
  validation = greedy_exact_match(model, state.params, 'validation')
  paraphrase = greedy_exact_match(model, state.params, 'paraphrase')
  print(f'knowledge_qa: {seconds:.0f} s of training; EM before {before:.1f}, validation '
        f'{validation:.1f}, paraphrase {paraphrase:.1f}')
  assert before < 5
  assert validation >= 80
