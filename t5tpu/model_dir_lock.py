"""One training run per MODEL_DIR: a lock the second run is refused by, naming the first.

Two runs writing checkpoints into one MODEL_DIR corrupt each other's resume (and orbax makes
the loser fail or wait on a barrier for minutes). The lock is `MODEL_DIR/.t5tpu-run.lock`:
- local MODEL_DIR: an exclusive flock on that file. The kernel drops it when the process dies,
  kill -9 included, so a stale lock cannot exist; the file's JSON names the holder for the
  message.
- gs:// MODEL_DIR: an object with the holder's JSON and a heartbeat the holder rewrites every
  HEARTBEAT_S; a lock whose heartbeat is older than STALE_S is a dead run's and is taken over
  (with a warning). GCS has no flock, so this is a convention all t5tpu runs follow.
Only process 0 of a multi-host run takes it: the hosts of one run share MODEL_DIR.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

from t5tpu import distributed
from t5tpu import errors
from t5tpu import storage

log = logging.getLogger(__name__)

LOCK_NAME = '.t5tpu-run.lock'
HEARTBEAT_S = 30.0
STALE_S = 180.0


class ModelDirInUseError(errors.UserError):
  pass


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
          'heartbeat': time.time(), 'command': ' '.join(sys.argv)[:300]}


def _describe(info: dict) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {started}"
          f"{', command: ' + info['command'] if info.get('command') else ''}")


def _in_use(model_dir: str, info: dict) -> ModelDirInUseError:
  return ModelDirInUseError(
      f'MODEL_DIR {model_dir} is in use by another t5tpu run ({_describe(info)}). Two runs '
      'writing one MODEL_DIR would corrupt its checkpoints: wait for that run to finish or '
      'stop it, or give this run another MODEL_DIR.')


class ModelDirLock:
  """`with ModelDirLock(model_dir):` holds MODEL_DIR for one run; refuses a second one."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = storage.join(model_dir, LOCK_NAME)
    self._fd: Optional[int] = None
    self._created_dir = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._info = _holder()

  def __enter__(self):
    if distributed.is_primary():
      if storage.is_remote(self.model_dir):
        self._acquire_remote()
      else:
        self._acquire_local()
    return self

  def __exit__(self, *exc):
    if distributed.is_primary():
      if storage.is_remote(self.model_dir):
        self._release_remote()
      else:
        self._release_local()
    return False

  # ------------------------------------------------------------------ local: flock
  def _acquire_local(self) -> None:
    import fcntl
    self._created_dir = not os.path.exists(self.model_dir)
    os.makedirs(self.model_dir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        info = _read_json(os.read(fd, 65536))
        os.close(fd)
        raise _in_use(self.model_dir, info) from None
      # The holder we waited on may have unlinked the file meanwhile: lock the current file.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(self._info).encode())
    os.fsync(fd)
    self._fd = fd

  def _release_local(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still locked: a waiting run re-checks the inode
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None
    if self._created_dir:
      try:
        os.rmdir(self.model_dir)  # only if this run wrote nothing else: leave no trace
      except OSError:
        pass

  # ------------------------------------------------------------------ gs://: heartbeat
  def _acquire_remote(self) -> None:
    if storage.exists(self.path):
      info = _read_json(storage.read_text(self.path))
      age = time.time() - float(info.get('heartbeat', 0))
      if age < STALE_S:
        raise _in_use(self.model_dir, info)
      log.warning('MODEL_DIR %s: taking over the lock of a run that stopped without releasing '
                  'it (%s; no heartbeat for %.0f s)', self.model_dir, _describe(info), age)
    self._write_remote()
    # Two runs starting together both wrote: the last writer wins, the other sees it here.
    time.sleep(1.0)
    info = _read_json(storage.read_text(self.path))
    if (info.get('host'), info.get('pid'), info.get('started')) != (
        self._info['host'], self._info['pid'], self._info['started']):
      raise _in_use(self.model_dir, info)
    self._thread = threading.Thread(target=self._heartbeat, daemon=True)
    self._thread.start()

  def _write_remote(self) -> None:
    self._info['heartbeat'] = time.time()
    storage.write_text(self.path, json.dumps(self._info))

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write_remote()
      except Exception as e:  # a missed beat is retried; the run itself goes on
        log.warning('MODEL_DIR lock heartbeat failed (%s); retrying', e)

  def _release_remote(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    self._thread = None
    try:
      storage.remove_tree(self.path)
    except Exception as e:
      log.warning('could not remove the MODEL_DIR lock %s (%s); the next run takes it over '
                  'after %.0f s', self.path, e, STALE_S)


def _read_json(raw) -> dict:
  try:
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
  except (ValueError, UnicodeDecodeError):
    return {}
