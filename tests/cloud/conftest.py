"""Fixtures for the cloud tests: one loopback GCS server per session, a fresh bucket per test."""
import itertools
import os

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
  """
  from t5tpu import storage
  from tests.cloud import fault_proxy
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
