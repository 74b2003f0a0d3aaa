"""A seqio SentencePieceVocabulary whose gs:// model file is read through t5tpu.storage.

seqio reads the model file with TensorFlow's filesystem, and TensorFlow's gs:// client cannot
be pointed at another endpoint, so that path could never be tested off GCS. This subclass
copies a gs:// file once into the local cache (storage.local_copy, gcsfs: the client
checkpoints use) and hands seqio the local copy. It keeps the gs:// path as its identity, so it
compares equal to a plain seqio.SentencePieceVocabulary of the same file (seqio and t5x check
that task and model vocabularies match). Local paths behave exactly as in seqio.

In gin: `VOCABULARY = @vocabularies.SentencePieceVocabulary()` with
`vocabularies.SentencePieceVocabulary.sentencepiece_model_file = 'gs://...'`.
"""
from __future__ import annotations

import threading

import seqio

from t5tpu import storage

_lock = threading.Lock()


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):

  def _model_context(self):
    path = self._sentencepiece_model_file
    if self._model or not storage.is_remote(path):
      return super()._model_context()
    local = storage.local_copy(path)
    with _lock:  # seqio loads from the attribute: point it at the copy while it loads
      self._sentencepiece_model_file = local
      try:
        return super()._model_context()
      finally:
        self._sentencepiece_model_file = path
