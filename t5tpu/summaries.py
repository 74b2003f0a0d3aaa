"""Training scalars: TensorBoard events and a JSONL copy, written by process 0 only.

`metrics.jsonl` (one {"step": ..., name: value} object per logged step) is the same data in a
form scripts and the demo's plots read without TensorBoard. It is rewritten whole at most every
`flush_secs` (object stores cannot append), so it never holds a torn line.

For gs:// log dirs, t5tpu registers its own tensorboardX writer that uploads through
t5tpu.storage (gcsfs), the client checkpoints use and tests reach on a local GCS server.
tensorboardX's built-in gs:// writer uploads once more from `__del__` after `close()`, at
garbage-collection time, and retries for two minutes when that fails.
"""
from __future__ import annotations

import io
import json
import time
from typing import Mapping

from t5tpu import distributed, storage


class _GcsEventFile:
  """An event file on gs://: records are buffered; each flush rewrites the whole object.

  GCS objects cannot be appended to; scalar event files stay small (kilobytes to a few
  megabytes), so rewriting on each flush (every flush_secs) is cheap.
  """

  def __init__(self, path: str):
    self.path = path
    self._buffer = io.BytesIO()
    self._flushed = 0
    self._closed = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    size = self._buffer.tell()
    if size == self._flushed:
      return
    with storage.open_file(self.path, 'wb') as f:
      f.write(self._buffer.getvalue())
    self._flushed = size

  def close(self) -> None:
    if not self._closed:
      self.flush()
      self._closed = True


class _GcsEventFileFactory:
  def open(self, path):
    return _GcsEventFile(path)

  def directory_check(self, path):
    del path  # object stores need no directories


def _register_gcs_writer():
  from tensorboardX import record_writer
  record_writer.register_writer_factory('gs', _GcsEventFileFactory())


class SummaryWriter:
  def __init__(self, logdir: str, flush_secs: float = 30.0, jsonl: bool = True):
    self._writer = None
    self._jsonl_path = storage.join(logdir, 'metrics.jsonl') if jsonl else None
    self._rows: dict = {}  # step -> JSON line
    self._flush_secs = flush_secs
    self._last_flush = time.monotonic()
    if distributed.is_primary():
      from tensorboardX import SummaryWriter as _Writer
      if storage.is_remote(logdir):
        _register_gcs_writer()
      storage.makedirs(logdir)
      self._writer = _Writer(logdir=logdir, flush_secs=int(flush_secs))
      if self._jsonl_path and storage.exists(self._jsonl_path):
        for line in storage.read_text(self._jsonl_path).splitlines():  # a resumed run
          if line.strip():
            self._rows[json.loads(line).get('step')] = line

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    if self._jsonl_path:
      # A resumed run may replay steps after the last checkpoint: keep the newest values.
      self._rows[int(step)] = json.dumps({'step': int(step),
                                          **{k: float(v) for k, v in values.items()}})
      if time.monotonic() - self._last_flush > self._flush_secs:
        self.flush()

  def flush(self) -> None:
    if self._writer is None:
      return
    self._writer.flush()
    if self._jsonl_path and self._rows:
      lines = [self._rows[k] for k in sorted(self._rows)]
      storage.write_text(self._jsonl_path, '\n'.join(lines) + '\n')
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self._writer is not None:
      self.flush()
      self._writer.close()
