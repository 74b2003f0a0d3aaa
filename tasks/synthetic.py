"""The offline suite of the delta-tuning study: generated tasks in four categories, one vocabulary.

`t5tpu study` with no task flags fine-tunes a tiny T5 on these. Everything is generated here
with fixed seeds over the invented world of tasks/knowledge.py (people, cities, countries), so
no download is needed, and all tasks share one small SentencePiece vocabulary
(tasks/data/synthetic_spm.model, VOCAB_SIZE pieces plus the span-corruption sentinels <X> and
<Y>), so one model can be tuned on each and a delta trained on one can be tried on another.

  task            category    metric (ranked by)     what the model must do
  synth_qa        qa          em (SQuAD EM/F1)       closed-book questions about the world's
                                                     people; validation words them in a way
                                                     training never does (the facts are also
                                                     stated in synth_corpus)
  synth_movies    sentiment   accuracy               label a movie review positive/negative
  synth_products  sentiment   accuracy               the same over product reviews (shared
                                                     polarity words, own aspects and fillers)
  synth_nli       inference   accuracy               entailment / neutral / contradiction of a
                                                     hypothesis given a premise about a person;
                                                     "born in <country>" needs world knowledge
  synth_tags      generation  f1 (tag-set F1)        the topic tags of a forum post, in a fixed
                                                     order ("astronomy music")
  synth_corpus    pretraining span corruption over unlabelled text of the same world (facts,
                              reviews, posts): the study's base model learns from it

Structure that makes methods differ: negation and "X but Y" contrasts decide a review's label,
neutral filler sentences and keywords of other topics ("this is not about boats") are
distractors, contradiction hypotheses use nearby values (a city of the same country, a year a
few years off), and 4 % of the sentiment labels are flipped (a noisy ceiling, as in real data).
Validation people, reviews and posts never appear in the training splits.

`python -m tasks.synthetic` rebuilds the vocabulary file (a test checks the shipped one matches).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Sequence, Tuple

import gin
import numpy as np

from tasks import knowledge

SEED = 20261202
VOCAB_SIZE = 1024
SENTINELS = ('<X>', '<Y>')
SPLITS = ('train', 'validation')
SPM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                        'synthetic_spm.model')
LABEL_NOISE = 0.04  # sentiment labels flipped at random


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  category: str
  metric: str  # the metric the study ranks and early-stops by
  sizes: Tuple[int, int]  # (train, validation) examples; qa's follow from the world


INFO: Dict[str, TaskInfo] = {
    'synth_qa': TaskInfo('qa', 'em', (0, 0)),
    'synth_movies': TaskInfo('sentiment', 'accuracy', (2000, 200)),
    'synth_products': TaskInfo('sentiment', 'accuracy', (2000, 200)),
    'synth_nli': TaskInfo('inference', 'accuracy', (2400, 240)),
    'synth_tags': TaskInfo('generation', 'f1', (2000, 200)),
}
CORPUS = 'synth_corpus'


# --------------------------------------------------------------------------- the world
def _people_split(seed: int = SEED):
  """The knowledge world's people as {name: {relation: answer}}, split 70/30 into
  (train people, validation people); cities as {city: country}."""
  people: Dict[str, Dict[str, str]] = {}
  cities: Dict[str, str] = {}
  for f in knowledge.facts():
    if f.relation == 'country':
      cities[f.subject] = f.answer
    else:
      people.setdefault(f.subject, {})[f.relation] = f.answer
  names = sorted(people)
  np.random.RandomState(seed).shuffle(names)
  cut = int(0.7 * len(names))
  return ({n: people[n] for n in names[:cut]}, {n: people[n] for n in names[cut:]}, cities)


def fact_sentences(name: str, facts: Dict[str, str], cities: Dict[str, str]) -> List[str]:
  city, year, job = facts['birth_city'], facts['birth_year'], facts['profession']
  return [f'{name} was born in {city}.', f'{name} was born in {year}.',
          f'{name} worked as a {job}.', f'{name}, a {job}, was born in {city} in {year}.',
          f'{name} was born in {cities[city]}.']


# --------------------------------------------------------------------------- closed-book QA
_QUESTIONS = {rel: templates[0] for rel, templates in knowledge.TEMPLATES.items()}


def _qa_example(subject: str, relation: str, answer: str, template: str) -> dict:
  return {'inputs': 'question: ' + template.format(s=subject), 'targets': answer,
          'answers': [answer]}


def qa_examples(split: str) -> List[dict]:
  """train: every fact asked with the training templates; validation: every person's facts
  asked with the held-out wording (knowledge.TEMPLATES' second list), never seen in training."""
  train_people, val_people, cities = _people_split()
  people = {**train_people, **val_people}
  if split == 'train':
    out = [_qa_example(c, 'country', k, t) for c, k in cities.items()
           for t in _QUESTIONS['country']]
    out += [_qa_example(p, rel, ans, t) for p, facts in people.items()
            for rel, ans in facts.items() for t in _QUESTIONS[rel]]
    return out
  return [_qa_example(p, rel, ans, knowledge.TEMPLATES[rel][1][0])
          for p, facts in people.items() for rel, ans in facts.items()]


# --------------------------------------------------------------------------- sentiment
_POSITIVE = ('wonderful', 'brilliant', 'delightful', 'superb', 'pleasant', 'excellent', 'lovely',
             'great')
_NEGATIVE = ('awful', 'dull', 'tedious', 'clumsy', 'bland', 'poor', 'terrible', 'disappointing')
_INTENSIFIERS = ('', '', 'really ', 'quite ', 'very ', 'rather ')
_VERBS = ('was', 'felt', 'seemed', 'is')
_DOMAINS = {
    'movies': dict(
        prefix='movie review: ',
        aspects=('the plot', 'the acting', 'the soundtrack', 'the ending', 'the dialogue',
                 'the pacing', 'the cast', 'the camera work'),
        positive=('gripping', 'moving', 'funny'), negative=('predictable', 'slow', 'forgettable'),
        fillers=('i saw it at the cinema on a sunday.', 'my sister picked this one.',
                 'it runs for two hours.', 'we watched it after dinner.',
                 'it was filmed in {city}.')),
    'products': dict(
        prefix='product review: ',
        aspects=('the battery', 'the screen', 'the delivery', 'the price', 'the packaging',
                 'the keyboard', 'the charger', 'the case'),
        positive=('sturdy', 'reliable', 'handy'), negative=('flimsy', 'broken', 'overpriced'),
        fillers=('i bought it last week.', 'it came in a blue box.', 'my brother uses one too.',
                 'i ordered two of them.', 'the shop is in {city}.')),
}


def _clause(rng, domain: dict, polarity: int) -> str:
  """'<aspect> <verb> [intensifier][not ]<adjective>' whose meaning has `polarity` (+1/-1)."""
  negate = rng.rand() < 0.15
  want = -polarity if negate else polarity
  words = (_POSITIVE + domain['positive']) if want > 0 else (_NEGATIVE + domain['negative'])
  aspect = domain['aspects'][rng.randint(len(domain['aspects']))]
  verb = _VERBS[rng.randint(len(_VERBS))]
  return (f'{aspect} {verb} {"not " if negate else ""}'
          f'{_INTENSIFIERS[rng.randint(len(_INTENSIFIERS))]}{words[rng.randint(len(words))]}')


def review(rng, domain_name: str, cities: Sequence[str]) -> Tuple[str, str]:
  """One generated review and its label; the last clause of a contrast decides."""
  domain = _DOMAINS[domain_name]
  polarity = 1 if rng.rand() < 0.5 else -1
  form = rng.choice(4, p=[0.4, 0.3, 0.15, 0.15])  # one clause, 'and', 'but', 'although'
  if form == 0:
    body = _clause(rng, domain, polarity) + '.'
  elif form == 1:
    body = f'{_clause(rng, domain, polarity)} and {_clause(rng, domain, polarity)}.'
  elif form == 2:
    body = f'{_clause(rng, domain, -polarity)} but {_clause(rng, domain, polarity)}.'
  else:
    body = f'although {_clause(rng, domain, -polarity)}, {_clause(rng, domain, polarity)}.'
  sentences = [body]
  for _ in range(rng.randint(3)):
    filler = domain['fillers'][rng.randint(len(domain['fillers']))]
    sentences.insert(rng.randint(len(sentences) + 1),
                     filler.format(city=cities[rng.randint(len(cities))]))
  if rng.rand() < LABEL_NOISE:
    polarity = -polarity
  return ' '.join(sentences), 'positive' if polarity > 0 else 'negative'


def sentiment_examples(domain_name: str, split: str, seed: int = SEED) -> List[dict]:
  info = INFO[f'synth_{domain_name}']
  n = info.sizes[SPLITS.index(split)]
  rng = np.random.RandomState([seed, SPLITS.index(split), len(domain_name)])
  cities = sorted(_people_split()[2])
  seen, out = set(), []
  if split == 'validation':  # never a review of the training split
    seen = {e['inputs'] for e in sentiment_examples(domain_name, 'train', seed)}
  while len(out) < n:
    text, label = review(rng, domain_name, cities)
    inputs = _DOMAINS[domain_name]['prefix'] + text
    if inputs not in seen:
      seen.add(inputs)
      out.append({'inputs': inputs, 'targets': label})
  return out


# --------------------------------------------------------------------------- inference
NLI_LABELS = ('entailment', 'neutral', 'contradiction')
_PREMISES = {  # the two relations a premise states
    ('profession', 'birth_city'): '{p}, a {profession}, was born in {birth_city}.',
    ('birth_city', 'birth_year'): '{p} was born in {birth_city} in {birth_year}.',
    ('birth_year', 'profession'): '{p}, born in {birth_year}, worked as a {profession}.',
}
_HYPOTHESES = {'birth_city': '{p} was born in {v}.', 'birth_year': '{p} was born in {v}.',
               'profession': '{p} worked as a {v}.', 'country': '{p} was born in {v}.'}


def _other_value(rng, relation: str, value: str, cities: Dict[str, str]) -> str:
  """A different value of the same kind, often a near one (a distractor)."""
  if relation == 'birth_year':
    return str(int(value) + int(rng.choice([-3, -2, -1, 1, 2, 3, 10, -10, 50])))
  if relation == 'profession':
    pool = [p for p in knowledge._PROFESSIONS if p != value]  # pylint: disable=protected-access
  elif relation == 'birth_city':
    same = [c for c in cities if cities[c] == cities[value] and c != value]
    pool = same if same and rng.rand() < 0.5 else [c for c in cities if c != value]
  else:  # country
    pool = sorted({k for k in cities.values() if k != value})
  return pool[rng.randint(len(pool))]


def nli_pair(rng, person: str, facts: Dict[str, str], others: Sequence[str],
             cities: Dict[str, str]) -> Tuple[str, str, str]:
  """(premise, hypothesis, label) about one person."""
  stated = list(_PREMISES)[rng.randint(len(_PREMISES))]
  premise = _PREMISES[stated].format(p=person, **facts)
  label = NLI_LABELS[rng.randint(3)]
  if label == 'neutral':
    if rng.rand() < 0.5:  # the relation the premise does not state
      rel = next(r for r in _HYPOTHESES if r not in stated and r != 'country')
      value = facts[rel] if rng.rand() < 0.5 else _other_value(rng, rel, facts[rel], cities)
      return premise, _HYPOTHESES[rel].format(p=person, v=value), label
    rel = stated[rng.randint(2)]  # another person
    other = others[rng.randint(len(others))]
    return premise, _HYPOTHESES[rel].format(p=other, v=facts[rel]), label
  choices = list(stated) + (['country'] if 'birth_city' in stated else [])
  rel = choices[rng.randint(len(choices))]
  value = cities[facts['birth_city']] if rel == 'country' else facts[rel]
  if label == 'contradiction':
    value = _other_value(rng, rel, value, cities)
  return premise, _HYPOTHESES[rel].format(p=person, v=value), label


def nli_examples(split: str, seed: int = SEED) -> List[dict]:
  train_people, val_people, cities = _people_split()
  people = train_people if split == 'train' else val_people
  names = sorted(people)
  rng = np.random.RandomState([seed, 7, SPLITS.index(split)])
  n = INFO['synth_nli'].sizes[SPLITS.index(split)]
  out, seen = [], set()
  while len(out) < n:
    person = names[rng.randint(len(names))]
    premise, hypothesis, label = nli_pair(rng, person, people[person],
                                          [x for x in names if x != person], cities)
    inputs = f'nli premise: {premise} hypothesis: {hypothesis}'
    if inputs not in seen:
      seen.add(inputs)
      out.append({'inputs': inputs, 'targets': label})
  return out


# --------------------------------------------------------------------------- tags
TOPICS = {
    'astronomy': ('telescope', 'planet', 'orbit', 'comet', 'moon', 'galaxy'),
    'baking': ('bread', 'oven', 'dough', 'flour', 'yeast', 'cake'),
    'chemistry': ('acid', 'molecule', 'flask', 'crystal', 'solvent', 'reaction'),
    'gardening': ('seeds', 'soil', 'roses', 'compost', 'hedge', 'tulips'),
    'music': ('violin', 'melody', 'chord', 'concert', 'piano', 'choir'),
    'painting': ('canvas', 'brush', 'palette', 'easel', 'portrait', 'varnish'),
    'sailing': ('boat', 'sail', 'harbour', 'anchor', 'wind', 'deck'),
    'travel': ('train', 'ticket', 'hotel', 'luggage', 'passport', 'map'),
}
_ASKS = ('how do i clean the {k}?', 'what is the best {k} for a beginner?',
         'my {k} and my {k2} do not work together.', 'where can i buy a good {k}?',
         'is it normal that the {k} looks like this?', 'i have a question about the {k}.')
_DISTRACTORS = ('this is not about the {k}.', 'i already asked about the {k} elsewhere.')
_FILLERS = ('thanks in advance.', 'i live in {city}.', 'any help is welcome.',
            'i am new here.')


def post(rng, cities: Sequence[str]) -> Tuple[str, str]:
  """A forum post and its tags (sorted, space-separated)."""
  names = sorted(TOPICS)
  chosen = sorted(rng.choice(len(names), size=1 + rng.randint(3), replace=False))
  sentences = []
  for t in chosen:
    words = TOPICS[names[t]]
    k, k2 = rng.choice(len(words), size=2, replace=False)
    sentences.append(_ASKS[rng.randint(len(_ASKS))].format(k=words[k], k2=words[k2]))
  rng.shuffle(sentences)
  if rng.rand() < 0.3:  # a keyword of a topic the post is not about
    rest = [i for i in range(len(names)) if i not in chosen]
    words = TOPICS[names[rest[rng.randint(len(rest))]]]
    sentences.append(_DISTRACTORS[rng.randint(2)].format(k=words[rng.randint(len(words))]))
  if rng.rand() < 0.5:
    sentences.insert(0, _FILLERS[rng.randint(len(_FILLERS))].format(
        city=cities[rng.randint(len(cities))]))
  return ' '.join(sentences), ' '.join(names[t] for t in chosen)


def tags_examples(split: str, seed: int = SEED) -> List[dict]:
  n = INFO['synth_tags'].sizes[SPLITS.index(split)]
  rng = np.random.RandomState([seed, 11, SPLITS.index(split)])
  cities = sorted(_people_split()[2])
  seen = set()
  if split == 'validation':
    seen = {e['inputs'] for e in tags_examples('train', seed)}
  out = []
  while len(out) < n:
    text, tags = post(rng, cities)
    inputs = 'tags: ' + text
    if inputs not in seen:
      seen.add(inputs)
      out.append({'inputs': inputs, 'targets': tags})
  return out


# --------------------------------------------------------------------------- corpus
def corpus_texts(seed: int = SEED) -> List[str]:
  """Unlabelled text: every person's facts (validation people too: that is what closed-book QA
  retrieves), and reviews and posts drawn apart from the tasks' own examples."""
  train_people, val_people, cities = _people_split()
  texts = [f'{c} is a city in {k}.' for c, k in cities.items()]
  for name, facts in {**train_people, **val_people}.items():
    texts += fact_sentences(name, facts, cities)
  rng = np.random.RandomState([seed, 99])
  city_names = sorted(cities)
  for domain in _DOMAINS:
    texts += [review(rng, domain, city_names)[0] for _ in range(600)]
  texts += [post(rng, city_names)[0] for _ in range(600)]
  return texts


def corrupt(rng, text: str) -> Tuple[str, str]:
  """T5-style span corruption at the word level: ~15 % of the words in one or two spans,
  each replaced by a sentinel in the input; the target lists the sentinels with their words."""
  words = text.split()
  n_mask = max(1, int(round(0.15 * len(words))))
  spans = 2 if n_mask >= 2 and len(words) >= 6 and rng.rand() < 0.5 else 1
  lengths = [n_mask] if spans == 1 else [n_mask // 2, n_mask - n_mask // 2]
  starts, taken = [], set()
  for length in lengths:
    for _ in range(20):
      s = rng.randint(len(words) - length + 1)
      if not taken & set(range(s - 1, s + length + 1)):
        break
    starts.append(s)
    taken |= set(range(s, s + length))
  inputs, targets, i = [], [], 0
  order = sorted(zip(starts, lengths))
  for (s, length), sentinel in zip(order, SENTINELS):
    inputs += words[i:s] + [sentinel]
    targets += [sentinel] + words[s:s + length]
    i = s + length
  inputs += words[i:]
  return ' '.join(inputs), ' '.join(targets)


def corpus_examples(split: str, seed: int = SEED, per_text: int = 4) -> List[dict]:
  texts = corpus_texts(seed)
  if split == 'validation':
    texts, per_text = texts[::10], 1
  rng = np.random.RandomState([seed, 5, SPLITS.index(split)])
  out = []
  for text in texts:
    for _ in range(per_text):
      inputs, targets = corrupt(rng, text)
      out.append({'inputs': inputs, 'targets': targets})
  return out


GENERATORS: Dict[str, Callable[[str], List[dict]]] = {
    'synth_qa': qa_examples,
    'synth_movies': lambda split: sentiment_examples('movies', split),
    'synth_products': lambda split: sentiment_examples('products', split),
    'synth_nli': nli_examples,
    'synth_tags': tags_examples,
    CORPUS: corpus_examples,
}


def examples(task: str, split: str) -> List[dict]:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; the synthetic tasks have {SPLITS}')
  return GENERATORS[task](split)


# --------------------------------------------------------------------------- vocabulary
def build_sentencepiece_model(vocab_size: int = VOCAB_SIZE) -> bytes:
  """BPE over every input and target of every task and split (deterministic), with the
  sentinels as whole pieces; the same recipe as the knowledge task's model."""
  lines = [t for task in GENERATORS for split in SPLITS for e in examples(task, split)
           for t in (e['inputs'], e['targets'])]
  return knowledge.train_sentencepiece(lines, vocab_size, 'bpe', SENTINELS)


def write_sentencepiece_model(path: str = SPM_PATH) -> str:
  with open(path, 'wb') as f:
    f.write(build_sentencepiece_model())
  return path


@gin.configurable(module='tasks.synthetic')
def vocabulary():
  """The suite's shared SentencePiece vocabulary (the study's tiny model uses it too)."""
  import seqio
  return seqio.SentencePieceVocabulary(SPM_PATH)


# --------------------------------------------------------------------------- registration
def _metric_fns(task: str):
  from tasks import metrics
  return {'qa': [metrics.squad], 'generation': [metrics.tagging]}.get(
      INFO[task].category, [metrics.accuracy]) if task in INFO else []


def register(task: str) -> str:
  """Registers one task of the suite (idempotent)."""
  import seqio
  import tensorflow as tf
  from tasks import common, postprocessors, vocab
  data = {split: examples(task, split) for split in SPLITS}
  qa = task == 'synth_qa'

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles the examples
    exs = data[split]
    features = {'inputs': [e['inputs'] for e in exs], 'targets': [e['targets'] for e in exs]}
    if qa:
      features['answers'] = tf.ragged.constant([e['answers'] for e in exs])
    return tf.data.Dataset.from_tensor_slices(features)

  common.add_task(
      task, seqio.FunctionDataSource(dataset_fn, splits=list(SPLITS), num_input_examples={
          s: len(exs) for s, exs in data.items()}),
      output_features=vocab.output_features(vocabulary()),
      preprocessors=common.text_to_text_preprocessors(),
      postprocess_fn=postprocessors.qa_answers if qa else postprocessors.strip_text,
      metric_fns=_metric_fns(task), shuffle_buffer_size=len(data['train']))
  return task


for _task in GENERATORS:
  register(_task)


if __name__ == '__main__':
  print(write_sentencepiece_model())
