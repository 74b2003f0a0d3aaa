"""The vocabulary every t5tpu task uses, and a lazy handle on it for task registration.

The default is the SentencePiece model of the public T5 checkpoints exactly as t5x's model
gins name it: `cc_all.32000.100extra` with no extra ids. That file already holds the 100
sentinels, so it has the same 32,100 ids as the t5 library's `cc_all.32000` + 100 extra ids.
seqio compares vocabularies by constructor state, though, and t5x refuses a run whose model
and task vocabularies differ, so tasks must name the very same path and extra_ids as the model
gins (gin/models/*/base.gin bind `seqio.SentencePieceVocabulary.sentencepiece_model_file`).

Change it in gin with either binding (the first one wins):
  tasks.vocab.default_vocabulary.sentencepiece_model_file = 'gs://.../spm.model'
  seqio.SentencePieceVocabulary.sentencepiece_model_file = '...'   # the model gins' binding
so overriding the model's vocabulary also changes the tasks' one; `extra_ids` likewise. The
model's binding may be a reference (`@hub.vocab_file()`): the tasks take what it returns.

Tasks are registered when their module is imported, which in a gin file happens in the middle
of parsing, before later bindings and `--gin.` flags exist. So tasks hold DEFAULT_VOCABULARY, a
`DefaultVocabulary()` that asks `default_vocabulary()` only on first use (after gin has been
parsed) and from then on is that SentencePieceVocabulary, equal to it in seqio's eyes.
(`DEFAULT_VOCABULARY.reset()` makes it ask again, e.g. in a notebook that re-parses gin.)
"""
from __future__ import annotations

import copy
from typing import Optional

import gin
import seqio

DEFAULT_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
DEFAULT_EXTRA_IDS = 0

_MODEL_GIN_BINDING = 'seqio.SentencePieceVocabulary.'


def _model_gin_value(name: str):
  """The model gins' binding of SentencePieceVocabulary's `name`, if the gin config has one.

  A bound reference (`@hub.vocab_file()`) is called: deepcopy is how gin itself evaluates
  the references it passes to a configurable.
  """
  try:
    value = gin.query_parameter(_MODEL_GIN_BINDING + name)
  except (ValueError, KeyError):  # not bound (or seqio not registered with gin)
    return None
  return copy.deepcopy(value)  # outside the try: a failing reference is the user's error


@gin.configurable(module='tasks.vocab')
def default_vocabulary(sentencepiece_model_file: Optional[str] = None,
                       extra_ids: Optional[int] = None) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary of T5 checkpoints (or the one gin names instead)."""
  path = sentencepiece_model_file or _model_gin_value('sentencepiece_model_file') or \
      DEFAULT_SPM_PATH
  if extra_ids is None:
    extra_ids = _model_gin_value('extra_ids')
  return seqio.SentencePieceVocabulary(
      path, extra_ids=DEFAULT_EXTRA_IDS if extra_ids is None else extra_ids)


# The constructor state seqio compares and pickles (SentencePieceVocabulary.__getstate__).
_STATE_KEYS = frozenset({'_sentencepiece_model_file', '_extra_ids', '_normalizer_spec_overrides',
                         '_reverse_extra_ids', '_use_fast_tokenizer', '_model'})


class DefaultVocabulary(seqio.SentencePieceVocabulary):
  """`default_vocabulary()`, resolved on first use.

  Until then the instance has no state; the first attribute seqio reads copies the state of
  `default_vocabulary()` into it, so afterwards it is an ordinary SentencePieceVocabulary.
  Being a subclass, it also compares equal from the other side:
  `SentencePieceVocabulary(path) == DefaultVocabulary()` when the paths agree.
  """

  def __init__(self):  # pylint: disable=super-init-not-called
    pass  # state is filled in by _resolve()

  def _resolve(self) -> None:
    real = default_vocabulary()
    self.__dict__.update(real.__getstate__())
    self.__dict__['_model'] = None

  def __getattr__(self, name):
    # Only called for attributes not found normally, i.e. before resolution.
    if name in _STATE_KEYS and '_sentencepiece_model_file' not in self.__dict__:
      self._resolve()
      return self.__dict__[name]
    raise AttributeError(name)

  def __getstate__(self):
    if '_sentencepiece_model_file' not in self.__dict__:
      self._resolve()
    return super().__getstate__()

  def __eq__(self, other):
    if not isinstance(other, seqio.SentencePieceVocabulary):
      return False
    return self.__getstate__() == other.__getstate__()

  def __repr__(self):
    if '_sentencepiece_model_file' not in self.__dict__:
      return 'DefaultVocabulary(<unresolved>)'
    return (f'DefaultVocabulary(file={self._sentencepiece_model_file}, '
            f'extra_ids={self._extra_ids})')

  __str__ = __repr__


  def reset(self) -> None:
    """Forgets the resolution: the next use asks default_vocabulary() (and gin) again."""
    self.__dict__.clear()


# The one instance all registered tasks share, so one resolution serves them all.
DEFAULT_VOCABULARY = DefaultVocabulary()


def output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> dict:
  """{'inputs', 'targets'} features on `vocabulary` (default: DEFAULT_VOCABULARY)."""
  vocabulary = DEFAULT_VOCABULARY if vocabulary is None else vocabulary
  return {'inputs': seqio.Feature(vocabulary, add_eos=True, required=False),
          'targets': seqio.Feature(vocabulary, add_eos=True)}
