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
  anything else it writes then is passed on;
- a command that runs a model on a CPU (`t5tpu train|eval|infer|demo|study`, or
  `python -m t5tpu.<those>`) restarts itself once, before anything is imported, with glibc's
  malloc giving transparent huge pages to its large blocks (see use_huge_pages).
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
from typing import Optional

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
_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                'jax_rocm7_plugin')


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
  if any(_installed(m) for m in _GPU_PLUGINS):
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


# ------------------------------------------------------------------ huge pages for XLA:CPU

# XLA:CPU allocates a step's large temporaries (logits, the embedding's gradient, ...) afresh
# on every step, and glibc hands blocks that large out as new mappings, so every step pays a
# page fault per 4 KiB it touches. With glibc.malloc.hugetlb=1 (glibc >= 2.35) those mappings
# are marked for transparent huge pages: a fault per 2 MiB. T5.1.1-small's CPU train step
# (batch 8, 128/32 tokens, Adafactor) went from 0.898 to 0.710 s (docs/performance.md).
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_MODEL_COMMANDS = ('train', 'eval', 'infer', 'demo', 'study')


def runs_a_model(argv) -> bool:
  """Whether the process's command line (sys.orig_argv) is a t5tpu command that runs a model:
  `python [flags] -m t5tpu.train ...` or the `t5tpu train ...` console script."""
  argv, i = list(argv), 1
  while i < len(argv) and argv[i].startswith('-') and argv[i] not in ('-m', '-c', '-'):
    i += 2 if argv[i] in ('-X', '-W', '--check-hash-based-pycs') else 1  # the interpreter's
  if i < len(argv) and argv[i] == '-m':
    return i + 1 < len(argv) and argv[i + 1] in {f't5tpu.{c}' for c in _MODEL_COMMANDS}
  return (i + 1 < len(argv) and os.path.basename(argv[i]) == 't5tpu'
          and argv[i + 1] in _MODEL_COMMANDS)


def _glibc_version() -> tuple:
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    return tuple(int(x) for x in version.split('.')[:2]) if name == 'glibc' else ()
  except (AttributeError, ValueError, OSError):
    return ()


def _thp_mode() -> str:
  """The kernel's transparent huge page mode: 'always', 'madvise', 'never' or ''."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      chosen = re.search(r'\[(\w+)\]', f.read())
    return chosen.group(1) if chosen else ''
  except OSError:
    return ''


def _on_cpu(environ) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms == 'cpu'
  return not tpu_present() and not any(_installed(m) for m in _GPU_PLUGINS)


def huge_pages_wanted(environ, model_command: bool, glibc_version: tuple, thp_mode: str,
                      on_cpu: bool) -> bool:
  """Whether to restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: a command that runs a
  model on a CPU, under glibc >= 2.35 and a kernel that gives huge pages on request
  ('madvise'; with 'always' every mapping has them already), unless GLIBC_TUNABLES is set
  (the user's, or ours after the restart) or T5TPU_HUGE_PAGES=0."""
  return (model_command and on_cpu and 'GLIBC_TUNABLES' not in environ
          and environ.get('T5TPU_HUGE_PAGES', '1') != '0'
          and glibc_version >= (2, 35) and thp_mode == 'madvise')


def use_huge_pages(model_command: Optional[bool] = None) -> None:
  """Restarts this process (same PID, arguments and environment, plus GLIBC_TUNABLES) when
  huge_pages_wanted says so; glibc reads its tunables only when a process starts.
  `model_command`: whether this process runs a model (default: runs_a_model of its command
  line; the benchmarks say True, to measure t5tpu as its commands run)."""
  argv = getattr(sys, 'orig_argv', None)
  if not argv or not sys.platform.startswith('linux') or 'GLIBC_TUNABLES' in os.environ:
    return
  if not (runs_a_model(argv) if model_command is None else model_command):
    return  # every import of t5tpu gets here: nothing more is read for other programs
  if huge_pages_wanted(os.environ, True, _glibc_version(), _thp_mode(),
                       _on_cpu(os.environ)):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, 'GLIBC_TUNABLES': HUGE_PAGES_TUNABLE})


def configure() -> None:
  use_huge_pages()
  os.environ.setdefault('EPATH_USE_TF', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  # gcsfs: skip a probe for hierarchical-namespace buckets that costs 60 s per bucket offline.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  choose_jax_platforms()
  quiet_tensorflow_import()
