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
from typing import IO, List, Optional, Tuple


def is_remote(path: str) -> bool:
  return str(path).startswith('gs://')


@functools.lru_cache(maxsize=None)
def _gcs():
  import gcsfs  # imported lazily: local runs never pay for it
  # No listing cache: checkpoints are written behind gcsfs's back (tensorstore, other hosts),
  # and a stale listing would hide a new checkpoint or show a deleted one.
  kwargs = {'use_listings_cache': False}
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST')
  if endpoint:
    kwargs.update(endpoint_url=endpoint, token='anon')
  return gcsfs.GCSFileSystem(**kwargs)


def reset_clients() -> None:
  """Forget the gs:// client, e.g. after STORAGE_EMULATOR_HOST changed (tests)."""
  _gcs.cache_clear()
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass
  # etils.epath (orbax's paths) keeps its own gcsfs instance, made with the endpoint of the
  # time it was first used: without this, orbax's metadata would keep going to the old one.
  try:
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass


def split_gs(path: str) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  if not is_remote(path):
    raise ValueError(f'not a gs:// path: {path}')
  bucket, _, key = path[len('gs://'):].partition('/')
  return bucket, key


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


def resolve(path: str) -> str:
  """A path as the user meant it: local paths relative to the current folder become absolute
  (and `~` expands), so they stay right when a library (orbax, tensorstore) or another
  thread resolves them later; gs:// paths are unchanged."""
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def orbax_path(path: str):
  """An etils.epath.Path for orbax (gs:// through gcsfs, see the module docstring).

  orbax requires absolute paths: a relative MODEL_DIR is resolved against the current folder.
  """
  from etils import epath
  return epath.Path(resolve(path))


# ----------------------------------------------------------------------------- gs:// -> local

def default_cache_dir() -> str:
  """Where gs:// files are copied for readers that need local files ($T5TPU_CACHE)."""
  return os.environ.get('T5TPU_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 't5tpu', 'gcs')


def _cached_path(path: str, cache_root: Optional[str]) -> str:
  return os.path.join(cache_root or default_cache_dir(), path[len('gs://'):].rstrip('/'))


def local_copy(path: str, cache_root: Optional[str] = None) -> str:
  """A local copy of a gs:// file or directory (a local path comes back unchanged).

  For readers that open files themselves through TensorFlow's filesystem (seqio's
  SentencePieceVocabulary, TFDS) or plain open(): TensorFlow's gs:// client cannot be pointed
  at another endpoint, so going through gcsfs here keeps one tested gs:// path. The copy is
  made once (under a temporary name, then renamed) and reused while the object's generation
  is unchanged (a file copy is fetched again when the object was replaced).
  """
  if not is_remote(path):
    return path
  fs = _gcs()
  dest = _cached_path(path, cache_root)
  if fs.isdir(path):
    if not os.path.isdir(dest):
      tmp = f'{dest}.partial-{os.getpid()}'
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
      fs.get(path.rstrip('/') + '/', tmp + '/', recursive=True)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.replace(tmp, dest)
    return dest
  info = fs.info(path)
  version = f"{info.get('generation', '')}:{info.get('md5Hash', '')}:{info['size']}"
  stamp = dest + '.gcs-version'
  current = open(stamp).read() if os.path.isfile(stamp) and os.path.isfile(dest) else None
  if current != version:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f'{dest}.partial-{os.getpid()}'
    fs.get_file(path, tmp)
    os.replace(tmp, dest)
    with open(stamp, 'w') as f:
      f.write(version)
  return dest


def local_copy_dir(path: str, cache_root: str) -> str:
  """For readers that need a local directory (TensorFlow, transformers): copy gs:// down."""
  return local_copy(path, cache_root)


# ----------------------------------------------------------------------------- copies, sizes

# Files that mark a directory complete (orbax's commit file, seqio's cache marker): copied
# last, so a copy interrupted half-way is never taken for a complete checkpoint or dataset.
COMMIT_MARKERS = ('commit_success.txt', 'COMPLETED')


def walk_files(path: str) -> List[Tuple[str, int]]:
  """(relative path, size) of every file under path (path itself if it is a file)."""
  fs = filesystem(path)
  root = path.rstrip('/') if is_remote(path) else os.path.abspath(path)
  if not fs.isdir(root):
    return [('', fs.info(root)['size'])] if fs.exists(root) else []
  out = []
  prefix = _strip(root) + '/'
  for name, info in fs.find(root, detail=True).items():
    # 'folder/' objects (as `t5tpu gcs init` and the Cloud console make) hold no data.
    if info.get('type') == 'directory' or name.endswith('/'):
      continue
    out.append((_strip(name)[len(prefix):], int(info.get('size') or 0)))
  return sorted(out)


def _strip(p: str) -> str:
  p = p[len('gs://'):] if p.startswith('gs://') else p
  return p.rstrip('/')


def size_of(path: str) -> int:
  """Bytes stored under a path (a file, a directory or a gs:// prefix)."""
  return sum(size for _, size in walk_files(path))


def copy(src: str, dst: str, progress=None) -> int:
  """Copies a file or a directory tree between local paths and gs://, in any direction.

  Commit markers go last (see COMMIT_MARKERS). Returns the number of bytes copied.
  `progress(relpath, nbytes)` is called after each file.
  """
  files = walk_files(src)
  if not files:
    raise FileNotFoundError(f'nothing to copy at {src}')
  if files == [('', files[0][1])]:  # a single file
    _copy_file(src, dst)
    if progress:
      progress(os.path.basename(src), files[0][1])
    return files[0][1]
  files.sort(key=lambda f: (os.path.basename(f[0]) in COMMIT_MARKERS, f[0]))
  total = 0
  for rel, size in files:
    _copy_file(join(src.rstrip('/'), rel), join(dst.rstrip('/'), rel))
    total += size
    if progress:
      progress(rel, size)
  return total


def _copy_file(src: str, dst: str) -> None:
  if is_remote(src) and is_remote(dst):
    _gcs().copy(src, dst)
  elif is_remote(src):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f'{dst}.partial-{os.getpid()}'
    _gcs().get_file(src, tmp)
    os.replace(tmp, dst)
  elif is_remote(dst):
    _gcs().put_file(src, dst)  # the object appears only once fully uploaded
  else:
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copyfile(src, dst)
