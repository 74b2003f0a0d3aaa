"""Running t5tpu the way a user does: a subprocess with the user's environment, not the tests'."""
import os
import re

ERROR_LOOKING = re.compile(r'ERROR|E0000|INVALID_ARGUMENT|Traceback')


def user_env(**extra) -> dict:
  """The environment pytest started with: without what tests/conftest.py sets for in-process
  tests (8 CPU devices, JAX_PLATFORMS) and what imported libraries set (jax, for libtpu)."""
  from tests import conftest
  env = dict(conftest.USER_ENVIRON)
  # The session's compilation cache changes how fast a program loads, not what it does.
  env.setdefault(conftest.CACHE_ENV, os.environ[conftest.CACHE_ENV])
  env.update(extra)
  return env


def assert_clean_stderr(stderr: str) -> None:
  """A normal run prints nothing that reads as a failure."""
  bad = [l for l in stderr.splitlines() if ERROR_LOOKING.search(l)]
  assert not bad, '\n'.join(bad[:10])
