"""Legacy T5X checkpoints: the format of every public gs://t5-data/pretrained_models/t5x/ model.

A checkpoint is a directory `checkpoint_<step>/` holding one msgpack file, `checkpoint`:

  {'version': 3, 'optimizer': {'target': {...}, 'state': {'step': ..., 'param_states': {...}}}}

Each leaf is either the array itself (flax's msgpack ndarray extension) or, for large arrays,
a TensorStore spec of a gzip zarr array stored beside the msgpack in a folder named by the
leaf's path with '.' for '/' (`target.encoder.layers_0.attention.query.kernel/`). The spec's
path is relative, and checkpoints written on GCS name a placeholder bucket
(`t5x-dummy-bucket`), so a checkpoint can be copied anywhere: we resolve both against the
directory the msgpack is read from. gs:// goes through tensorstore's own gcs driver (a local
test server is reached with TENSORSTORE_GCS_HTTP_URL).

Version 3 stores bfloat16 natively; version 2 stored bfloat16 bits as uint16 (viewed back
here). t5x's own test file (test_t5_tiny.checkpoint_0) is a bare msgpack with every array
inline: a path to such a file works as well as a directory.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from typing import Optional

import numpy as np
from flax import traverse_util

from t5tpu import storage
from t5tpu.formats import (COPY_AGAIN, CheckpointReadError, OutputExistsError, describe_error,
                           flatten, make_state_dict, param_states_of, params_of, step_of,
                           unflatten)

log = logging.getLogger(__name__)

VERSION = 3
MSGPACK_NAME = 'checkpoint'
DUMMY_BUCKET = 't5x-dummy-bucket'
# Arrays at least this big go to zarr folders when writing (t5x writes every partitioned
# array there; small ones, like the [1] Adafactor placeholders, stay inline either way).
DEFAULT_ZARR_MIN_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024 * 1024  # t5x aims zarr chunks at about 64 MiB


# ----------------------------------------------------------------------------- paths

def _msgpack_and_dir(path: str) -> tuple[str, str]:
  """(msgpack file, directory its relative zarr paths start from)."""
  path = path.rstrip('/')
  if storage.isdir(path):
    return storage.join(path, MSGPACK_NAME), path
  parent = posixpath.dirname(path) if storage.is_remote(path) else os.path.dirname(
      os.path.abspath(path))
  return path, parent


def _kvstore(ckpt_dir: str, relative: str) -> dict:
  relative = relative.rstrip('/')
  if storage.is_remote(ckpt_dir):
    m = re.fullmatch(r'gs://([^/]+)/?(.*)', ckpt_dir.rstrip('/'))
    bucket, prefix = m.group(1), m.group(2)
    return {'driver': 'gcs', 'bucket': bucket, 'path': posixpath.join(prefix, relative) + '/'}
  return {'driver': 'file', 'path': os.path.join(os.path.abspath(ckpt_dir), relative) + '/'}


def _is_ts_spec(x) -> bool:
  return isinstance(x, dict) and 'driver' in x and 'kvstore' in x


def _relative_path(spec: dict) -> str:
  """The array's folder: in kvstore.path (tensorstore >= 0.1.14) or at the top (older)."""
  kv = spec['kvstore']
  rel = kv.get('path') if isinstance(kv, dict) else None
  rel = rel or spec.get('path')
  if not rel:
    raise CheckpointReadError(f'a TensorStore spec in the checkpoint has no path: {spec}')
  return rel


# ----------------------------------------------------------------------------- read

def read_msgpack(path: str) -> dict:
  """The raw msgpack contents (arrays inline, zarr arrays still as spec dicts)."""
  import msgpack
  from flax import serialization
  msgpack_file, _ = _msgpack_and_dir(path)
  with storage.open_file(msgpack_file, 'rb') as f:
    data = f.read()
  try:
    contents = serialization.msgpack_restore(data)
  except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
    # msgpack raises ValueError('Unpack failed: incomplete input') for a cut-off file, and
    # its own FormatError / ExtraData (or numpy's errors, in flax's array hook) for garbage.
    raise CheckpointReadError(_unreadable(msgpack_file, data, e)) from None
  if not isinstance(contents, dict):
    raise CheckpointReadError(f'{msgpack_file} is not a T5X checkpoint: its msgpack data is a '
                              f'{type(contents).__name__}, not a state dict')
  return contents


def _unreadable(msgpack_file: str, data: bytes, error: Exception) -> str:
  if not data:
    return f'{msgpack_file} is empty (0 bytes): the checkpoint copy is incomplete: {COPY_AGAIN}'
  if 'incomplete input' in str(error):
    return (f'{msgpack_file} is truncated: its msgpack data ends early (after '
            f'{len(data):,} bytes), so the checkpoint copy is incomplete: {COPY_AGAIN}')
  return (f'{msgpack_file} is corrupt or not a T5X checkpoint: it does not decode as msgpack '
          f'({describe_error(error)}). If it is a copy, {COPY_AGAIN}')


def read(path: str) -> dict:
  """A legacy T5X checkpoint (dir or bare msgpack file, local or gs://) as a state dict."""
  import tensorstore as ts
  contents = read_msgpack(path)
  _, ckpt_dir = _msgpack_and_dir(path)
  version = int(contents.get('version', 0)) if isinstance(contents, dict) else 0
  if 'optimizer' in contents:
    tree = contents['optimizer']
  elif 'target' in contents:
    tree = contents  # version 0: a plain flax state dict
  else:
    raise CheckpointReadError(f'{path} is a msgpack without `optimizer` or `target`: not a T5X '
                              f'checkpoint (top-level keys: {sorted(contents)})')
  if version and version < 2:
    raise CheckpointReadError(f'{path}: T5X checkpoint version {version} is not supported '
                              '(2 and 3 are)')
  if not isinstance(tree, dict) or not isinstance(tree.get('target'), dict):
    raise CheckpointReadError(f'{path} is not a T5X checkpoint: it holds no parameters '
                              '(`optimizer/target`)')

  # zarr arrays are spec dicts in the msgpack: leaves, not subtrees
  flat = traverse_util.flatten_dict(tree, sep='/', is_leaf=lambda _, x: _is_ts_spec(x))
  pending, folders = {}, {}
  for name, leaf in flat.items():
    if _is_ts_spec(leaf):
      folders[name] = _relative_path(leaf).rstrip('/')
      spec = {'driver': leaf.get('driver', 'zarr'),
              'kvstore': _kvstore(ckpt_dir, folders[name])}
      pending[name] = ts.open(spec, open=True, read=True)
  # Open everything, then read everything: tensorstore overlaps the I/O.
  opened = {name: _result(fut, path, name, folders[name]) for name, fut in pending.items()}
  reads = {name: store.read() for name, store in opened.items()}
  for name, fut in reads.items():
    array = np.asarray(_result(fut, path, name, folders[name]))
    if version == 2 and array.dtype == np.uint16:
      import ml_dtypes
      array = array.view(ml_dtypes.bfloat16)
    flat[name] = array
  if opened:
    log.info('read %d zarr arrays and %d inline values from %s', len(opened),
             len(flat) - len(opened), path)

  tree = unflatten({k: (np.asarray(v) if not isinstance(v, (str, bytes)) else v)
                    for k, v in flat.items()})
  return make_state_dict(params_of(tree), int(np.asarray(step_of(tree))), param_states_of(tree))


def _result(future, path: str, name: str, folder: str):
  """A tensorstore open or read; a missing or damaged zarr folder names the array."""
  try:
    return future.result()
  except ValueError as e:  # tensorstore's NOT_FOUND / DATA_LOSS / FAILED_PRECONDITION
    raise CheckpointReadError(
        f'{path}: cannot read the array {name} from its zarr folder {folder}/ '
        f'({describe_error(e)}). The '
        f'checkpoint is incomplete or damaged: {COPY_AGAIN} (every folder beside the '
        '`checkpoint` file belongs to it)') from None


# ----------------------------------------------------------------------------- write

def chunk_shape(shape, itemsize: int, target_bytes: int = _CHUNK_BYTES) -> list[int]:
  """Chunks of at most ~target_bytes: halve the largest dimension until they fit."""
  chunks = [max(int(d), 1) for d in shape]
  while int(np.prod(chunks)) * itemsize > target_bytes and max(chunks) > 1:
    i = int(np.argmax(chunks))
    chunks[i] = (chunks[i] + 1) // 2
  return chunks


def _relative_spec(name: str, array: np.ndarray, remote: bool) -> dict:
  """The spec t5x stores in the msgpack: relative path, placeholder bucket on GCS."""
  import jax.numpy as jnp
  import tensorstore as ts
  folder = name.replace('/', '.')
  kvstore = ({'driver': 'gcs', 'bucket': DUMMY_BUCKET, 'path': folder} if remote
             else {'driver': 'file', 'path': folder})
  spec = {'driver': 'zarr', 'dtype': jnp.dtype(array.dtype).name, 'kvstore': kvstore,
          'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(array.shape),
                       'chunks': chunk_shape(array.shape, array.dtype.itemsize)}}
  return ts.Spec(spec).to_json()


def write(path: str, state_dict: dict, *,
          zarr_min_bytes: Optional[int] = DEFAULT_ZARR_MIN_BYTES,
          overwrite: bool = False) -> str:
  """Writes `state_dict` as the T5X checkpoint directory `path` (e.g. .../checkpoint_1000).

  Arrays of at least `zarr_min_bytes` go to gzip zarr folders (0: every array; None: all
  inline in the msgpack). Locally the directory appears whole (written under a temporary
  name, then renamed); on GCS the msgpack is written last, so its presence marks a
  complete checkpoint, as with t5x.
  """
  import tensorstore as ts
  from flax import serialization
  path = path.rstrip('/')
  remote = storage.is_remote(path)
  if storage.exists(storage.join(path, MSGPACK_NAME)):
    if not overwrite:
      raise OutputExistsError(f'{path} already holds a T5X checkpoint (overwrite=True, or '
                              't5tpu convert --overwrite, replaces it)')
    storage.remove_tree(path)
  work_dir = path if remote else f'{path}.tmp-{int(time.time())}-{os.getpid()}'
  storage.makedirs(work_dir)

  tree = make_state_dict(params_of(state_dict),
                         np.asarray(int(np.asarray(step_of(state_dict))), np.int32))
  tree['state']['param_states'] = param_states_of(state_dict) or {}  # always there in the file
  flat = {k: np.asarray(v) for k, v in flatten(tree).items()}
  opening = []
  for name, array in list(flat.items()):
    if zarr_min_bytes is None or array.ndim == 0 or array.nbytes < zarr_min_bytes:
      continue
    relative = _relative_spec(name, array, remote)
    absolute = dict(relative, kvstore=_kvstore(work_dir, _relative_path(relative)))
    opening.append((ts.open(absolute, create=True, delete_existing=True), array))
    flat[name] = relative
  # Issue every create and write before waiting on any: tensorstore overlaps the I/O.
  writes = [fut.result().write(np.ascontiguousarray(array)) for fut, array in opening]
  for w in writes:
    w.result()

  contents = {'version': VERSION, 'optimizer': unflatten(flat)}
  if not tree['state']['param_states']:
    contents['optimizer']['state']['param_states'] = {}
  with storage.open_file(storage.join(work_dir, MSGPACK_NAME), 'wb') as f:
    f.write(serialization.msgpack_serialize(contents))
  if not remote:
    os.replace(work_dir, path)
  log.info('wrote T5X checkpoint %s (%d arrays in zarr folders)', path, len(writes))
  return path
