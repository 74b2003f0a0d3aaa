"""One place for paths: local files and gs:// objects behind the same small API.

gs:// goes through gcsfs (fsspec), the client that also honours STORAGE_EMULATOR_HOST, so the
code path tests exercise against a local GCS server is the one users run against real GCS.
orbax reaches gs:// through etils.epath, which t5tpu points at the same gcsfs backend
(EPATH_USE_TF=false, set in t5tpu/__init__.py) instead of TensorFlow's filesystem.
"""
from __future__ import annotations

import functools
import os
import posixpath
import shutil
from typing import IO, List


def is_remote(path: str) -> bool:
  return str(path).startswith('gs://')


@functools.lru_cache(maxsize=None)
def _gcs():
  import gcsfs  # imported lazily: local runs never pay for it
  kwargs = {}
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST')
  if endpoint:
    kwargs.update(endpoint_url=endpoint, token='anon')
  return gcsfs.GCSFileSystem(**kwargs)


def filesystem(path: str):
  """The fsspec filesystem for a path (gcsfs for gs://, the local one otherwise)."""
  if is_remote(path):
    return _gcs()
  import fsspec
  return fsspec.filesystem('file')


def join(path: str, *parts: str) -> str:
  if is_remote(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def exists(path: str) -> bool:
  if is_remote(path):
    return _gcs().exists(path)
  return os.path.exists(path)


def isdir(path: str) -> bool:
  if is_remote(path):
    return _gcs().isdir(path)
  return os.path.isdir(path)


def listdir(path: str) -> List[str]:
  """Names (not paths) of the entries directly under path."""
  if is_remote(path):
    fs = _gcs()
    fs.invalidate_cache(path)
    if not fs.exists(path):
      return []
    return sorted(posixpath.basename(p.rstrip('/')) for p in fs.ls(path, detail=False))
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path: str) -> None:
  if is_remote(path):
    return  # object stores have no directories
  os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = 'r') -> IO:
  if is_remote(path):
    return _gcs().open(path, mode)
  if 'w' in mode or 'a' in mode:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return open(path, mode)


def read_text(path: str) -> str:
  with open_file(path, 'r') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes whole-or-nothing: a temporary file renamed into place (locally)."""
  if is_remote(path):
    with _gcs().open(path, 'w') as f:  # a GCS object appears only when fully uploaded
      f.write(text)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  with open_file(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def remove_tree(path: str) -> None:
  """Removes a file or a directory tree (or the objects under a gs:// prefix)."""
  if is_remote(path):
    if _gcs().exists(path):
      _gcs().rm(path, recursive=True)
  elif os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def orbax_path(path: str):
  """An etils.epath.Path for orbax (gs:// through gcsfs, see the module docstring)."""
  from etils import epath
  return epath.Path(path)


def local_copy_dir(path: str, cache_root: str) -> str:
  """For readers that need a local directory (TensorFlow, transformers): copy gs:// down."""
  if not is_remote(path):
    return path
  dest = os.path.join(cache_root, path[len('gs://'):])
  if not os.path.exists(dest):
    tmp = dest + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    _gcs().get(path.rstrip('/') + '/', tmp + '/', recursive=True)
    os.replace(tmp, dest)
  return dest
