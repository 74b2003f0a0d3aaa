"""TensorBoard scalars (tensorboardX: local dirs and gs:// alike) written by process 0 only."""
from __future__ import annotations

from typing import Mapping

from t5tpu import distributed, storage


class SummaryWriter:
  def __init__(self, logdir: str):
    self._writer = None
    if distributed.is_primary():
      from tensorboardX import SummaryWriter as _Writer
      storage.makedirs(logdir)
      self._writer = _Writer(logdir=logdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), global_step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
