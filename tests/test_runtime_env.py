"""Process set-up: which commands restart with huge pages for malloc, and that they do."""
import subprocess
import sys

import pytest

from t5tpu import runtime_env
from tests import subprocess_env

PY = '/usr/bin/python3'


@pytest.mark.parametrize('argv, runs', [
    ([PY, '-m', 't5tpu.train', '--gin_file=x.gin'], True),
    ([PY, '-u', '-X', 'dev', '-m', 't5tpu.infer'], True),
    ([PY, '-m', 't5tpu.study'], True),
    ([PY, '/venv/bin/t5tpu', 'eval', '--gin_file=x.gin'], True),
    ([PY, '/venv/bin/t5tpu', 'demo'], True),
    ([PY, '-m', 't5tpu.plan'], False),  # compiles for a TPU: host memory matters more there
    ([PY, '/venv/bin/t5tpu', 'convert'], False),
    ([PY, '/venv/bin/t5tpu'], False),
    ([PY, '-m', 'pytest', 'tests'], False),
    ([PY, '-c', 'import t5tpu', '-m', 't5tpu.train'], False),
    ([PY, 'my_script.py', 'train'], False),
    ([PY], False),
])
def test_which_commands_run_a_model(argv, runs):
  assert runtime_env.runs_a_model(argv) == runs


def _wanted(environ=(), model=True, glibc=(2, 36), thp='madvise', cpu=True):
  return runtime_env.huge_pages_wanted(dict(environ), model, glibc, thp, cpu)


def test_huge_pages_only_where_they_help_and_never_over_the_users_setting():
  assert _wanted()
  assert not _wanted(model=False)
  assert not _wanted(cpu=False)  # a TPU or GPU run: its buffers are not malloc's
  assert not _wanted(glibc=(2, 31))  # no glibc.malloc.hugetlb before 2.35
  assert not _wanted(glibc=())  # musl and others
  assert not _wanted(thp='never')
  assert not _wanted(thp='always')  # every mapping gets huge pages already
  assert not _wanted({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert not _wanted({'T5TPU_HUGE_PAGES': '0'})


def _machine_supports_it() -> bool:
  return (sys.platform.startswith('linux') and runtime_env._glibc_version() >= (2, 35)
          and runtime_env._thp_mode() == 'madvise')


@pytest.mark.skipif(not _machine_supports_it(),
                    reason='needs glibc >= 2.35 and transparent huge pages in madvise mode')
def test_a_model_command_restarts_itself_once_with_the_tunable():
  code = ('import os, sys\n'
          'print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)\n'
          'from t5tpu import runtime_env\n'
          'runtime_env.use_huge_pages(model_command=True)\n'
          'print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"))\n')
  env = subprocess_env.user_env()
  for name in ('GLIBC_TUNABLES', 'T5TPU_HUGE_PAGES', 'JAX_PLATFORMS'):
    env.pop(name, None)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split('\n')
  pid = _pid(out[0])
  # The first process printed, then became (same PID) one with the tunable, which printed
  # again and went on without restarting a second time.
  assert out[:3] == [f'{pid} None', f'{pid} {runtime_env.HUGE_PAGES_TUNABLE}',
                     f'after {pid} {runtime_env.HUGE_PAGES_TUNABLE}'], out
  env['T5TPU_HUGE_PAGES'] = '0'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split('\n')
  assert out[1] == f'after {_pid(out[0])} None', out


def _pid(line: str) -> str:
  return line.split()[0]


def test_importing_t5tpu_in_a_program_restarts_nothing():
  code = ('import os\nimport t5tpu\n'
          'print(os.environ.get("GLIBC_TUNABLES"))\n')
  env = subprocess_env.user_env()
  env.pop('GLIBC_TUNABLES', None)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.strip() == 'None'
