"""Test set-up: 8 virtual CPU devices (meshes), quiet TensorFlow, a tiny in-memory task, and
one persistent XLA compilation cache for the whole session."""
import atexit
import json
import os
import shutil
import tempfile

# The environment the tests were started with, before this file and the libraries add to it:
# what a user's shell has (tests/subprocess_env.py runs t5tpu as a user would). pytest-xdist
# workers inherit the controller's environment after this file changed it, so the
# controller hands them the original, as JSON.
_USER_ENV_KEY = 'T5TPU_TESTS_USER_ENVIRON'
if _USER_ENV_KEY in os.environ:
  USER_ENVIRON = json.loads(os.environ[_USER_ENV_KEY])
else:
  USER_ENVIRON = dict(os.environ)
  os.environ[_USER_ENV_KEY] = json.dumps(USER_ENVIRON)

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# Many tests compile the same tiny train step again: in-process with a fresh Trainer, and in
# every `python -m t5tpu.train` a test starts (a resume, each kill -9 trial). jax's persistent
# cache, keyed on the program, lets the second of them load it instead (a tiny knowledge run:
# 49 s cold, 25 s warm). One fresh directory per session, made by the pytest process that
# starts first; xdist workers inherit it, subprocesses get it from subprocess_env.user_env.
CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
if CACHE_ENV not in os.environ:
  os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix='t5tpu-tests-xla-cache-')
  atexit.register(shutil.rmtree, os.environ[CACHE_ENV], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def copy_task():
  from tests import tiny
  return tiny.register_copy_task()
