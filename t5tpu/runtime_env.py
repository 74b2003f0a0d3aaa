"""Process set-up that must happen before jax, etils or TensorFlow are imported.

Imported by t5tpu/__init__.py, so every entry point gets it:
- orbax reaches gs:// through etils.epath: use gcsfs there (the client t5tpu's own I/O and the
  tests use) rather than TensorFlow's filesystem;
- a machine without a TPU does not let jax probe the TPU plugin (libtpu, installed for
  `t5tpu plan`, otherwise logs INVALID_ARGUMENT errors about TPU_WORKER_HOSTNAMES at start-up
  of every CPU run). Compiling for a TPU topology with `t5tpu plan` still works: it does not
  need the TPU backend;
- TensorFlow's start-up chatter (oneDNN, "Could not find cuda drivers"), which its C++ side
  writes to stderr before any log level applies, is dropped while TensorFlow is imported;
  anything else it writes then is passed on.
Nothing here overrides a variable the user has set.
"""
from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Lines TensorFlow prints at import on every machine without a GPU; nothing to act on.
_TF_CHATTER = re.compile(
    r'oneDNN custom operations are on|Could not find cuda drivers|'
    r'All log messages before absl::InitializeLog\(\) is called|'
    r'Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|'
    r'This TensorFlow binary is optimized to use available CPU instructions|'
    r'To enable the following instructions|rebuild TensorFlow with the appropriate compiler|'
    r'computation_placer\.cc.*already registered|Failed call to cuInit|'
    r'cuda_executor|gpu_device\.cc')

# Set by TPU runtimes (Cloud TPU VMs, Colab). Not TPU_SKIP_MDS_QUERY or TPU_LIBRARY_PATH:
# jax sets those itself whenever libtpu is installed, TPU or not.
_TPU_ENV = ('TPU_NAME', 'TPU_ACCELERATOR_TYPE', 'COLAB_TPU_ADDR', 'TPU_WORKER_ID',
            'CLOUD_TPU_TASK_ID')


def tpu_present() -> bool:
  """Whether this machine may have a TPU: its device files (v2-v4: /dev/accel*; v5e and
  later: /dev/vfio/<n>) or a TPU runtime's environment variables."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return True
  return any(os.environ.get(name) for name in _TPU_ENV)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def choose_jax_platforms() -> None:
  """JAX_PLATFORMS=cpu where libtpu is installed but no TPU (or GPU plugin) is here."""
  if 'JAX_PLATFORMS' in os.environ or tpu_present() or not _installed('libtpu'):
    return
  if any(_installed(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                                 'jax_rocm7_plugin')):
    return  # a GPU build: let jax pick its accelerator
  os.environ['JAX_PLATFORMS'] = 'cpu'


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Redirects the process's stderr while the `tensorflow` package is first imported."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # once: find the real spec, then wrap its loader
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    loader = spec.loader
    original_exec = loader.exec_module

    def exec_module(module):
      with _stderr_filtered():
        original_exec(module)

    loader.exec_module = exec_module
    return spec


class _stderr_filtered:
  """Sends file descriptor 2 to a temporary file; replays its lines but the chatter."""

  def __enter__(self):
    try:
      sys.stderr.flush()
      self._saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
      self._saved = None
      return self
    self._tmp = tempfile.TemporaryFile(mode='w+b')
    os.dup2(self._tmp.fileno(), 2)
    return self

  def __exit__(self, *exc):
    if self._saved is None:
      return False
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._tmp.seek(0)
    text = self._tmp.read().decode('utf-8', 'replace')
    self._tmp.close()
    kept = [l for l in text.splitlines() if l.strip() and not _TF_CHATTER.search(l)]
    if kept:
      sys.stderr.write('\n'.join(kept) + '\n')
    return False


def quiet_tensorflow_import() -> None:
  if 'tensorflow' in sys.modules or os.environ.get('T5TPU_VERBOSE_TF'):
    return
  if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def configure() -> None:
  os.environ.setdefault('EPATH_USE_TF', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  # gcsfs: skip a probe for hierarchical-namespace buckets that costs 60 s per bucket offline.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  choose_jax_platforms()
  quiet_tensorflow_import()
