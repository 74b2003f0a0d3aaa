"""Which checkpoint format a path holds, and reading any of them as t5x's state dict.

  <dir>/state/                 orbax (t5tpu's own, and t5x's current default)
  <dir>/checkpoint             legacy T5X msgpack (every public gs://t5-data/.../t5x/ model)
  <path>.index                 Mesh-TensorFlow / TF checkpoint (model.ckpt-N)
  <dir>/config.json            Hugging Face T5ForConditionalGeneration
  hf://<org>/<name>[@<rev>]    the same, by its hub name (formats.hub: cache, else download)
"""
from __future__ import annotations

from t5tpu import storage
from t5tpu.formats import CheckpointNotFoundError, hub


EXPECTED_LAYOUTS = ('expected an orbax checkpoint dir (with state/), a T5X checkpoint_N dir '
                    '(with a `checkpoint` file) or msgpack file, a TF/MTF prefix '
                    '(model.ckpt-N, with .index beside it) or a Hugging Face model dir (with '
                    'config.json)')


def detect_format(path: str) -> str:
  """'orbax' | 't5x_legacy' | 't5x_legacy_file' | 'mtf' | 'tf_dir' | 'hf', from what `path`
  holds; CheckpointNotFoundError (a FileNotFoundError) when it holds none of them."""
  path = path.rstrip('/')
  if hub.is_hub(path):
    hub.resolve(path)  # found in the Hugging Face cache or downloaded; else a clear error
    return 'hf'
  if storage.exists(storage.join(path, 'state')):
    return 'orbax'
  if storage.exists(storage.join(path, 'checkpoint')) and not storage.exists(
      storage.join(path, 'checkpoint.index')):
    with storage.open_file(storage.join(path, 'checkpoint'), 'rb') as f:
      head = f.read(64)
    if head.startswith(b'model_checkpoint_path'):
      return 'tf_dir'  # a TF checkpoint *directory* with a state file
    return 't5x_legacy'
  if storage.exists(path + '.index'):
    return 'mtf'
  if storage.exists(storage.join(path, 'config.json')):
    return 'hf'
  if storage.exists(path) and not storage.isdir(path):
    return 't5x_legacy_file'  # a bare msgpack file, e.g. t5x's test_t5_tiny.checkpoint_0
  what = 'the directory holds none of these' if storage.exists(path) else 'it does not exist'
  raise CheckpointNotFoundError(f'no checkpoint at {path} ({what}): {EXPECTED_LAYOUTS}')


def read_state_dict(path: str) -> dict:
  """The checkpoint at `path` as a numpy state dict in t5x's layout."""
  kind = detect_format(path)
  path = path.rstrip('/')
  if kind == 'orbax':
    from t5tpu.formats import t5x_orbax
    return t5x_orbax.read_tree(path)
  if kind in ('t5x_legacy', 't5x_legacy_file'):
    from t5tpu.formats import t5x_legacy
    return t5x_legacy.read(path)
  if kind == 'mtf':
    from t5tpu.formats import mtf
    return mtf.read(path)
  if kind == 'tf_dir':
    from t5tpu.formats import mtf
    return mtf.read(mtf.latest_in_dir(path))
  from t5tpu.formats import hf
  return hf.read(path)
