"""Test set-up: 8 virtual CPU devices (meshes), quiet TensorFlow, a tiny in-memory task."""
import json
import os

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

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def copy_task():
  from tests import tiny
  return tiny.register_copy_task()
