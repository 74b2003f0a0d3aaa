"""One place for paths: local files and gs:// objects behind the same small API.

gs:// goes through gcsfs (fsspec), the client that also honours STORAGE_EMULATOR_HOST, so the
code path tests exercise against a local GCS server is the one users run against real GCS.
orbax reaches gs:// through etils.epath, which t5tpu points at the same gcsfs backend
(EPATH_USE_TF=false, set in t5tpu/__init__.py) instead of TensorFlow's filesystem.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import re
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, List, Optional, Sequence, Tuple

from t5tpu import errors


# A GCS request that receives nothing for this long is abandoned and retried. Without a limit
# a connection that died silently (no reset: a NAT or VM network change) hangs gcsfs forever,
# and tensorstore too. Both clients retry a timed-out request like a dropped connection.
STALL_SECONDS = float(os.environ.get('T5TPU_GCS_STALL_SECONDS') or 60)
# tensorstore reads these once, when it first talks to GCS: set them before that (at import).
os.environ.setdefault('TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS', str(max(1, int(STALL_SECONDS))))
os.environ.setdefault('TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES', '1')


def is_remote(path: str) -> bool:
  return str(path).startswith('gs://')


@functools.lru_cache(maxsize=None)
def _gcsfs_setup():
  """gcsfs's class and per-request timeout, for t5tpu's own client and for the one etils.epath
  makes for orbax (through fsspec's registry and config).

  The class: gcsfs chooses it once, when first imported. With GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
  unset it picks a subclass that probes the bucket for zonal and hierarchical features over
  gRPC, again after each failed probe: offline or against a GCS emulator (no gRPC there) each
  one-file write then waits a minute or two. runtime_env.configure() sets the variable to
  false, but a process that imported gcsfs before t5tpu has already chosen; so the plain
  client is taken here, unless the user set the variable to true.

  The timeout: gcsfs passes `requests_timeout` to aiohttp as is: a number would bound whole
  transfers, so it is a no-progress limit instead (sock_read), and a connect limit."""
  import aiohttp
  import fsspec.config
  import gcsfs.core  # binds gcsfs too
  wanted = os.environ.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', '').lower() in ('true', '1')
  cls = gcsfs.GCSFileSystem if wanted else gcsfs.core.GCSFileSystem
  for protocol in ('gs', 'gcs'):
    fsspec.register_implementation(protocol, cls, clobber=True)
  timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=STALL_SECONDS)
  fsspec.config.conf.setdefault('gs', {}).setdefault('requests_timeout', timeout)
  return cls, timeout


@functools.lru_cache(maxsize=None)
def _gcs():
  # No listing cache: checkpoints are written behind gcsfs's back (tensorstore, other hosts),
  # and a stale listing would hide a new checkpoint or show a deleted one.
  cls, timeout = _gcsfs_setup()  # gcsfs imported lazily: local runs never pay for it
  kwargs = {'use_listings_cache': False, 'requests_timeout': timeout}
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST')
  if endpoint:
    kwargs.update(endpoint_url=endpoint, token='anon')
  return cls(**kwargs)


def reset_clients() -> None:
  """Forget the gs:// client, e.g. after STORAGE_EMULATOR_HOST changed (tests)."""
  _gcs.cache_clear()
  try:
    _gcsfs_setup()[0].clear_instance_cache()
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
  thread resolves them later; gs:// paths and other URLs (hf://org/name) are unchanged."""
  if not path or is_remote(path) or '://' in str(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def move(src: str, dst: str) -> None:
  """Renames a file or directory (gs://: copies the objects, then deletes the originals)."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'move between local and gs:// paths: {src} -> {dst}')
  if is_remote(src):
    _gcs().mv(src.rstrip('/'), dst.rstrip('/'), recursive=True)
  else:
    os.replace(src, dst)


def orbax_path(path: str):
  """An etils.epath.Path for orbax (gs:// through gcsfs, see the module docstring).

  orbax requires absolute paths: a relative MODEL_DIR is resolved against the current folder.
  """
  from etils import epath
  if is_remote(path):
    _gcsfs_setup()  # before etils makes its gcsfs instance
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


# ----------------------------------------------------------------------------- failing early

GCS_HOST = 'storage.googleapis.com'
CREDENTIALS_HELP = (
    'Provide credentials: `gcloud auth application-default login` (a workstation or TPU VM), '
    '`from google.colab import auth; auth.authenticate_user()` (Colab), or '
    'GOOGLE_APPLICATION_CREDENTIALS=/path/to/service-account-key.json.')


def check_reachable(*paths: Optional[str], read_only: Sequence[Optional[str]] = (),
                    timeout: float = 5.0) -> None:
  """Fails within seconds, saying why, when the gs:// paths among `paths` cannot be used.

  Local paths (and None) need nothing. Without this check a run with no network retries for a
  long time before its first error (gcsfs about 30 s per call, tensorstore about 15 minutes).
  - STORAGE_EMULATOR_HOST set (a local GCS server): its endpoint must answer.
  - Otherwise application-default credentials must exist for `paths` (written to; looked up
    first: a missing key file or no ADC fails without touching the network), and
    storage.googleapis.com must resolve and accept a connection. `read_only` paths (an
    INITIAL_CHECKPOINT_PATH in a public bucket such as gs://t5-data) may be read anonymously.
  Then each bucket named must exist and be visible. Raises UserError.
  """
  writes = [str(p) for p in paths if p and is_remote(str(p))]
  reads = [str(p) for p in read_only if p and is_remote(str(p))]
  if not writes and not reads:
    return
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    base = emulator.rstrip('/') if '://' in emulator else f'http://{emulator}'
    what, session = f'the GCS endpoint STORAGE_EMULATOR_HOST={emulator}', None
  else:
    base, what = f'https://{GCS_HOST}', 'Google Cloud Storage'
    session = _authorized_session(_default_credentials()) if writes else _session_if_any()
  _check_connects(base, what, timeout)
  for bucket in sorted({split_gs(p)[0] for p in writes + reads}):
    _check_bucket(base, what, bucket, session, timeout)


def _session_if_any():
  """Credentials when there are some; else anonymous reads (public buckets)."""
  try:
    return _authorized_session(_default_credentials())
  except errors.UserError:
    return None


def _default_credentials():
  import google.auth
  from google.auth import exceptions
  scopes = ['https://www.googleapis.com/auth/devstorage.read_write']
  try:
    credentials, _ = google.auth.default(scopes=scopes)
  except exceptions.DefaultCredentialsError as e:
    where = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
    found = f'GOOGLE_APPLICATION_CREDENTIALS={where}: ' if where else ''
    raise errors.UserError(f'no Google Cloud credentials were found ({found}'
                           f'{_first_line(e)}). {CREDENTIALS_HELP}') from None
  return credentials


def _authorized_session(credentials):
  from google.auth.transport import requests as auth_requests
  return auth_requests.AuthorizedSession(credentials)


def _check_connects(base: str, what: str, timeout: float) -> None:
  """DNS and a TCP connection, each bounded by `timeout` (getaddrinfo has no timeout)."""
  parsed = urllib.parse.urlsplit(base)
  host = parsed.hostname or ''
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  hint = _unreachable_hint(what)
  result = {}

  def resolve():
    try:
      result['addrs'] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
      result['error'] = e

  thread = threading.Thread(target=resolve, daemon=True)
  thread.start()
  thread.join(timeout)
  if 'addrs' not in result:
    reason = (_first_line(result['error']) if 'error' in result else
              f'no DNS answer in {timeout:g} s')
    raise errors.UserError(f'cannot reach {what} ({host}: {reason}): {hint}')
  family, kind, proto, _, address = result['addrs'][0]
  try:
    with socket.socket(family, kind, proto) as s:
      s.settimeout(timeout)
      s.connect(address)
  except OSError as e:
    reason = 'timed out' if isinstance(e, socket.timeout) else _first_line(e)
    raise errors.UserError(f'cannot reach {what} ({host}:{port}: {reason}): {hint}') from None


def _unreachable_hint(what: str) -> str:
  return 'is it running?' if what.startswith('the GCS endpoint') else 'no network?'


def _check_bucket(base: str, what: str, bucket: str, session, timeout: float) -> None:
  """Lists at most one object: what reading and writing checkpoints needs at the least."""
  url = f'{base}/storage/v1/b/{urllib.parse.quote(bucket, safe="")}/o?maxResults=1&fields=kind'
  try:
    status, body = _http_get(url, session, timeout)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # requests, urllib, google.auth
    name = type(e).__name__
    if 'RefreshError' in name or 'TransportError' in name:
      raise errors.UserError(f'the Google Cloud credentials could not be used to reach '
                             f'gs://{bucket} ({_first_line(e)}). {CREDENTIALS_HELP}') from None
    raise errors.UserError(f'cannot reach {what} (listing gs://{bucket}: {_first_line(e)}): '
                           f'{_unreachable_hint(what)}') from None
  if status == 404:
    raise errors.UserError(f'bucket gs://{bucket} does not exist: check the path, or create '
                           f'it with `t5tpu gcs init gs://{bucket}`')
  if status == 401:
    raise errors.UserError(f'the credentials were refused for gs://{bucket} (HTTP 401): they '
                           f'may have expired. {CREDENTIALS_HELP}')
  if status == 403:
    raise errors.UserError(f'no access to gs://{bucket} (HTTP 403, {body[:200]!r}): grant the '
                           'account Storage Object Admin on the bucket, or use another bucket')
  # 200, or a transient 429/5xx the clients retry themselves: nothing to stop the run for.


def _http_get(url: str, session, timeout: float):
  if session is not None:
    r = session.get(url, timeout=timeout)
    return r.status_code, r.text
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.status, r.read().decode('utf-8', 'replace')
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode('utf-8', 'replace')


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


# ----------------------------------------------------------------------------- failures

# tensorstore reports the HTTP status and the OS error in its messages.
_HTTP_CODE = re.compile(r"http_response_code='(\d+)'|, (\d{3})$|HTTP (\d{3})")
_ERRNO_CODE = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")
_ERRNO_REASONS = {
    errno.ENOSPC: 'no space left on the device (the disk is full)',
    errno.EDQUOT: 'the disk quota is exceeded',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'permission denied',
    errno.EROFS: 'the file system is read-only',
}


def describe_failure(error: BaseException) -> Optional[str]:
  """What a storage client's error (or one orbax wrapped around it) means, in a few words plus
  the client's own first line; None when it is not a storage failure (a bug keeps its
  traceback)."""
  for e in _chain(error):
    reason = _reason(e)
    if reason:
      return f'{reason} ({type(e).__name__}: {_first_line(e)})'
  return None


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen and len(seen) < 20:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _reason(e: BaseException) -> Optional[str]:
  text = str(e)
  code = getattr(e, 'errno', None)
  if not isinstance(code, int):
    m = _ERRNO_CODE.search(text)
    code = int(next(g for g in m.groups() if g)) if m else None
  if code in _ERRNO_REASONS:
    return _ERRNO_REASONS[code]
  if 'No space left on device' in text:
    return _ERRNO_REASONS[errno.ENOSPC]
  status = getattr(e, 'code', None)
  if not isinstance(status, int):
    m = _HTTP_CODE.search(text.strip().splitlines()[0] if text.strip() else '')
    status = int(next(g for g in m.groups() if g)) if m else None
  if status == 403 or text.startswith('Forbidden'):
    return 'permission denied by GCS (HTTP 403)'
  if status == 401:
    return f'GCS refused the credentials (HTTP 401). {CREDENTIALS_HELP}'
  if status is not None and (status == 429 or 500 <= status < 600):
    return f'GCS kept failing (HTTP {status}) after the client retried'
  if _is_connection_error(e):
    return 'the connection to GCS kept failing after the client retried (no network?)'
  return None


def _is_connection_error(e: BaseException) -> bool:
  names = {c.__name__ for c in type(e).__mro__}
  return bool(names & {'ClientConnectionError', 'ServerDisconnectedError', 'ConnectionError',
                       'ClientConnectorError', 'ProxyError'}) or (
                           'UNAVAILABLE' in str(e) and 'connect' in str(e).lower())


@contextlib.contextmanager
def failures_as_user_errors(action: str, hint: str = ''):
  """Re-raises a storage failure inside the block as a UserError: '<action> failed: <what
  happened> (<the client's message>). <hint>'. Other errors pass unchanged.

  For the places storage errors surface: orbax raises a failed asynchronous save at the next
  save or at close, so `action` should name the checkpoint being written (and the message
  says what failed: disk full, permission denied, GCS errors after retries, no network).
  """
  try:
    yield
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = describe_failure(e)
    if reason is None:
      raise
    raise errors.UserError(f'{action} failed: {reason}.' + (f' {hint}' if hint else '')) from e
