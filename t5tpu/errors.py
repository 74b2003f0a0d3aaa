"""Errors the user can fix, and how every entry point reports them.

A `UserError` is bad input (a typo'd gin macro, a checkpoint that does not fit the model, a
data file without the named column ...). Its message names the problem and the fix; the
entry points print it as one line block, with no Python traceback, and exit with status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import re
import sys
from typing import Callable

EXIT_USER_ERROR = 2

# gin appends "  In call to configurable 'train' (<function train at 0x...>)" to exceptions
# raised inside configurables; for a user error the message itself says what to do.
_GIN_CONTEXT = re.compile(r"^\s+In call to configurable ")


class UserError(ValueError):
  """Bad input: the message names the problem and the fix (a ValueError, as Python
  reports bad arguments)."""


def message(error: BaseException) -> str:
  lines = str(error).splitlines()
  return '\n'.join(l for l in lines if not _GIN_CONTEXT.match(l)).strip()


def report_user_errors(main: Callable) -> Callable:
  """Wraps an entry point's main(argv): a UserError becomes one message and exit 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f't5tpu: error: {message(e)}', file=sys.stderr, flush=True)
      raise SystemExit(EXIT_USER_ERROR) from None

  return wrapped
