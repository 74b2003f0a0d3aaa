"""Test set-up: 8 virtual CPU devices (meshes), quiet TensorFlow, a tiny in-memory task."""
import os

# The environment the tests were started with, before this file and the libraries add to it:
# what a user's shell has (tests/subprocess_env.py runs t5tpu as a user would).
USER_ENVIRON = dict(os.environ)

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def copy_task():
  from tests import tiny
  return tiny.register_copy_task()
