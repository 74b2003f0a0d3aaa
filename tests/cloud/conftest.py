"""Fixtures for the cloud tests: one loopback GCS server per session, a fresh bucket per test."""
import asyncio
import itertools
import os
import types

import pytest

from tests.cloud import gcs_server

_names = itertools.count()


def _bucket_name() -> str:
  # Unique per process: gs:// copies are cached under ~/.cache/t5tpu/gcs/<bucket>/..., which
  # parallel test workers (pytest -n) and earlier runs share.
  return f't5tpu-test-{os.getpid()}-{next(_names)}'


@pytest.fixture(scope='session')
def gcs_server_process():
  server = gcs_server.FakeGcsServer()
  yield server
  server.stop()


@pytest.fixture
def fake_gcs(gcs_server_process, monkeypatch):
  """The server, with every gs:// client of this process pointed at it and a new bucket.

  Yields the server; `gcs.bucket` is 'gs://<a bucket of this test>' and `gcs.env` is the
  environment to hand to subprocesses.
  """
  from t5tpu import storage
  server = gcs_server_process
  env = server.client_env()
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  storage.reset_clients()
  server.bucket = server.create_bucket(_bucket_name())
  server.env = env
  yield server
  storage.reset_clients()


@pytest.fixture
def gcs_faults(gcs_server_process, monkeypatch):
  """A fault-injecting proxy in front of the server, with every client pointed at the proxy.

  Yields the FaultProxy (tests/cloud/fault_proxy.py); `proxy.bucket` is a new bucket (made
  on the server directly, past any rules) and `proxy.env` the environment for subprocesses.
  gcsfs backs off 10x faster in this process (see _quick_gcsfs_backoff).
  """
  from t5tpu import storage
  from tests.cloud import fault_proxy
  _quick_gcsfs_backoff(monkeypatch)
  server = gcs_server_process
  proxy = fault_proxy.FaultProxy(server.url)
  env = proxy.client_env(server.client_env())
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  storage.reset_clients()
  proxy.bucket = server.create_bucket(_bucket_name())
  proxy.env = env
  yield proxy
  storage.reset_clients()
  proxy.stop()


_BACKOFF_SCALE = 0.1


def _quick_gcsfs_backoff(monkeypatch):
  """gcsfs waits 1, 2, 4, 8 and 16 s (plus up to 1 s each) between its 6 attempts, so a
  lasting fault surfaces after about 31 s. gcsfs has no setting for it; its retry loop calls
  `asyncio.sleep` through its own module's `asyncio` name, which this points at a copy of
  asyncio whose sleep is 10x shorter. The attempts, their order and the final error are
  gcsfs's own; only the waits between them shrink."""
  import gcsfs.retry

  async def sleep(delay, result=None):
    return await asyncio.sleep(delay * _BACKOFF_SCALE, result)

  quick = types.ModuleType('asyncio_with_quick_sleep')
  quick.__dict__.update(vars(asyncio))
  quick.sleep = sleep
  monkeypatch.setattr(gcsfs.retry, 'asyncio', quick)
