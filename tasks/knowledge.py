"""A built-in closed-book QA task over invented facts, for the offline demo: `knowledge_qa`.

The project generates a small world with a fixed seed: invented countries, cities in them and
people with a birth city, a birth year and a profession. Each fact is asked with several
question templates; a model must store the answers in its weights (closed-book), as T5 does
for TriviaQA, but small enough for a tiny T5 to learn on a CPU in a couple of minutes.

Splits of `knowledge_qa` (inputs `knowledge question: <question>`, targets the answer):
- train: every fact, asked with each of its training templates;
- validation: every fact once, asked the training way (one of the training questions, so it
  measures how well training stored the facts);
- paraphrase: every fact once, asked with a held-out template never seen in training (does
  the model answer a rephrased question, or only the exact wording it memorised?).
Metric: SQuAD EM/F1 (keys 'em', 'f1').

Vocabulary: `vocabulary()`, a small SentencePiece model trained on the generated text and
shipped as tasks/data/knowledge_spm.model (VOCAB_SIZE pieces: pad 0, EOS 1, UNK 2, no
sentinels), so the demo needs no download. Short token sequences are what make the tiny model
learn fast: a question is ~10 pieces and an answer 1-3. `python -m tasks.knowledge` rebuilds
the file (tests check that the shipped one matches the generator).

Learnability (gin/examples/knowledge_tiny.gin: T5.1.1-style emb 128, 4 heads x 32, 2+2 layers,
mlp 256, float32; batch 64, inputs 24 / targets 8 tokens, unpacked, Adafactor at a constant
1e-2, from scratch; greedy decoding), measured on a shared 2-core CPU (load average 5-8):
  steps  validation EM  paraphrase EM  whole `t5tpu.train` command
     0         0.0            -
    60        97.5          66.4          52 s
   100        98.1-98.8     66.7          54-81 s (3 seeds)
   150        98.5          68.2          83 s
   200        98.8          68.8         107 s
Training runs at ~2.5-3.3 steps/s there; the rest is imports, compilation and evaluation.
"""
from __future__ import annotations

import collections
import io
import os
import tempfile
from typing import Dict, List, Sequence

import gin
import numpy as np

SEED = 20240611
NUM_COUNTRIES = 6
NUM_CITIES = 24
NUM_PEOPLE = 100
VOCAB_SIZE = 512  # pieces in the shipped SentencePiece model
TASK_NAME = 'knowledge_qa'
PREFIX = 'knowledge question: '
SPLITS = ('train', 'validation', 'paraphrase')
SPM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                        'knowledge_spm.model')

Fact = collections.namedtuple('Fact', ['subject', 'relation', 'answer'])

# relation -> (training templates, held-out paraphrase templates); '{s}' is the subject.
TEMPLATES = {
    'birth_city': (['where was {s} born?', 'in which city was {s} born?'],
                   ['what is the birthplace of {s}?']),
    'birth_year': (['when was {s} born?', 'in what year was {s} born?'],
                   ['{s} was born in which year?']),
    'profession': (["what was {s}'s profession?", 'what did {s} do for a living?'],
                   ['what job did {s} have?']),
    'country': (['which country is {s} in?', 'in what country is {s} located?'],
                ['{s} is a city in which country?']),
}

_PROFESSIONS = ('painter', 'chemist', 'sailor', 'poet', 'architect', 'baker', 'astronomer',
                'violinist', 'surgeon', 'merchant', 'botanist', 'engineer', 'judge', 'weaver',
                'cartographer', 'sculptor')
_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'z', 'br', 'dr',
           'kr', 'tr', 'st', 'th')
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ou')
_CODAS = ('', '', 'n', 'r', 'l', 's')


def _names(rng: np.random.RandomState, count: int, syllables: int, taken: set) -> List[str]:
  """`count` new capitalised invented words of `syllables` syllables, none in `taken`."""
  out = []
  while len(out) < count:
    word = ''.join(_ONSETS[rng.randint(len(_ONSETS))] + _VOWELS[rng.randint(len(_VOWELS))] +
                   _CODAS[rng.randint(len(_CODAS))] for _ in range(syllables))
    word = word.capitalize()
    if word not in taken:
      taken.add(word)
      out.append(word)
  return out


def facts(seed: int = SEED) -> List[Fact]:
  """The generated world as (subject, relation, answer) facts, in a fixed order."""
  rng = np.random.RandomState(seed)
  taken: set = set()
  countries = _names(rng, NUM_COUNTRIES, 2, taken)
  cities = _names(rng, NUM_CITIES, 3, taken)
  firsts = _names(rng, NUM_PEOPLE, 2, taken)
  lasts = _names(rng, NUM_PEOPLE, 2, taken)
  out = [Fact(city, 'country', countries[i % NUM_COUNTRIES]) for i, city in enumerate(cities)]
  for first, last in zip(firsts, lasts):
    person = f'{first} {last}'
    out.append(Fact(person, 'birth_city', cities[rng.randint(NUM_CITIES)]))
    out.append(Fact(person, 'birth_year', str(1600 + rng.randint(400))))
    out.append(Fact(person, 'profession', _PROFESSIONS[rng.randint(len(_PROFESSIONS))]))
  return out


def _example(fact: Fact, template: str) -> dict:
  return {'inputs': PREFIX + template.format(s=fact.subject), 'targets': fact.answer,
          'answers': [fact.answer]}


def examples(split: str, seed: int = SEED) -> List[dict]:
  """The {'inputs', 'targets', 'answers'} examples of one split."""
  all_facts = facts(seed)
  if split == 'train':
    return [_example(f, t) for f in all_facts for t in TEMPLATES[f.relation][0]]
  if split == 'validation':  # the training wording, templates taken in turn
    return [_example(f, TEMPLATES[f.relation][0][i % len(TEMPLATES[f.relation][0])])
            for i, f in enumerate(all_facts)]
  if split == 'paraphrase':
    return [_example(f, TEMPLATES[f.relation][1][i % len(TEMPLATES[f.relation][1])])
            for i, f in enumerate(all_facts)]
  raise ValueError(f'unknown split {split!r}; knowledge_qa has {SPLITS}')


# --------------------------------------------------------------------------- vocabulary
def build_sentencepiece_model(seed: int = SEED, vocab_size: int = VOCAB_SIZE,
                              model_type: str = 'bpe') -> bytes:
  """Trains the task's SentencePiece model on every question and answer (deterministic).

  BPE keeps the frequent words of the questions whole and splits the invented names into a
  few pieces.
  """
  lines = []
  for split in SPLITS:
    for ex in examples(split, seed):
      lines += [ex['inputs'], ex['targets']]
  return train_sentencepiece(lines, vocab_size, model_type)


def train_sentencepiece(lines: Sequence[str], vocab_size: int, model_type: str = 'bpe',
                        user_defined_symbols: Sequence[str] = ()) -> bytes:
  """A SentencePiece model of `lines` as reproducible bytes (pad 0, EOS 1, UNK 2, no BOS).

  Normalisation is a single no-op-in-practice rule (ideographic space -> space) rather than
  'identity', whose empty rule table makes every model load log a message.
  """
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2
  model = io.BytesIO()
  extra = {'user_defined_symbols': list(user_defined_symbols)} if user_defined_symbols else {}
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, 'normalization.tsv')
    with open(rules, 'w') as f:
      f.write('3000\t20\n')
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, normalization_rule_tsv=rules,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2, **extra)
  # The model records the rule file's (temporary) path; drop it so the bytes are reproducible.
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  proto.normalizer_spec.normalization_rule_tsv = ''
  return proto.SerializeToString(deterministic=True)


def write_sentencepiece_model(path: str = SPM_PATH) -> str:
  with open(path, 'wb') as f:
    f.write(build_sentencepiece_model())
  return path


@gin.configurable(module='tasks.knowledge')
def vocabulary():
  """The knowledge task's SentencePiece vocabulary (use it for the demo model too)."""
  import seqio
  return seqio.SentencePieceVocabulary(SPM_PATH)


# --------------------------------------------------------------------------- registration
def register(name: str = TASK_NAME) -> str:
  """Registers the task (idempotent); importing this module does it for `knowledge_qa`."""
  import seqio
  import tensorflow as tf
  from tasks import common, metrics, postprocessors, vocab
  data: Dict[str, List[dict]] = {split: examples(split) for split in SPLITS}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles the examples
    exs = data[split]
    return tf.data.Dataset.from_tensor_slices({
        'inputs': [e['inputs'] for e in exs], 'targets': [e['targets'] for e in exs],
        'answers': tf.ragged.constant([e['answers'] for e in exs])})

  common.add_task(
      name, seqio.FunctionDataSource(
          dataset_fn, splits=list(SPLITS),
          num_input_examples={s: len(exs) for s, exs in data.items()}),
      output_features=vocab.output_features(vocabulary()),
      preprocessors=common.text_to_text_preprocessors(),
      postprocess_fn=postprocessors.qa_answers, metric_fns=[metrics.squad],
      shuffle_buffer_size=len(data['train']))
  return name


def describe(seed: int = SEED) -> str:
  counts = {s: len(examples(s, seed)) for s in SPLITS}
  return f'{len(facts(seed))} facts; examples per split: {counts}'


def main(argv: Sequence[str] = ()) -> None:
  del argv
  print(f'wrote {write_sentencepiece_model()} ({describe()})')


register()

if __name__ == '__main__':
  main()
