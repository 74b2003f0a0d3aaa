"""Multi-host start-up: jax.distributed on TPU VM pods (automatic) or from flags elsewhere."""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)
_initialized = False


def _on_multihost_tpu_vm() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins this process to the job. Must run before anything touches jax devices.

  On a TPU VM pod slice jax finds the coordinator itself. Elsewhere (GPU clusters, or several
  CPU processes on one machine in tests) pass --coordinator_address, --process_count and
  --process_index. A single process needs nothing.
  """
  global _initialized
  if _initialized:
    return
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --process_count and --process_index')
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu' or not _has_accelerator_env():
      # CPU processes exchange collectives over gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    _initialized = True
  elif _on_multihost_tpu_vm():
    jax.distributed.initialize()
    _initialized = True
  if _initialized:
    log.info('process %d of %d, %d local / %d global devices', jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _has_accelerator_env() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CUDA_VISIBLE_DEVICES'))


def is_primary() -> bool:
  """Process 0 writes the files every process would otherwise write alike."""
  return jax.process_index() == 0
