"""t5x-style command lines: --gin_file=..., --gin.MACRO=value, --gin_bindings=..., search paths.

`python -m t5tpu.train --gin_file=runs/finetune.gin --gin.MODEL_DIR=\\"/tmp/run\\"` works as in
t5x. A --gin_file is looked up in the current directory, the search paths given, and the
project's own gin/ directory; an `include` inside a gin file resolves against the search paths
and the project's gin/ directory before the current directory, so `include
'models/t5_1_1/small.gin'` means the same file from any folder, whatever that folder holds.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import List, Optional, Sequence

import gin


def gin_config_dir() -> str:
  """The project's gin/ directory (a source checkout or the installed copy)."""
  here = pathlib.Path(__file__).resolve().parent
  for candidate in (here.parent / 'gin', here / 'gin_configs'):
    if candidate.is_dir():
      return str(candidate)
  raise FileNotFoundError('t5tpu gin configs not found next to the package')


def build_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description, allow_abbrev=False)
  p.add_argument('--gin_file', action='append', default=[],
                 help='gin config file (repeatable), e.g. runs/finetune.gin')
  p.add_argument('--gin_bindings', action='append', default=[],
                 help="gin binding (repeatable), e.g. \"MODEL_DIR='/tmp/run'\"")
  p.add_argument('--gin_search_paths', default='',
                 help='comma-separated directories to look for gin files and includes')
  p.add_argument('--tfds_data_dir', default=None, help='TFDS data dir (local or gs://)')
  p.add_argument('--seqio_additional_cache_dirs', default='',
                 help='comma-separated directories holding cached seqio tasks')
  p.add_argument('--coordinator_address', default=None,
                 help='multi-process runs off TPU: host:port of process 0')
  p.add_argument('--process_count', type=int, default=None)
  p.add_argument('--process_index', type=int, default=None)
  p.add_argument('--alsologtostderr', action='store_true', help='accepted for t5x parity')
  return p


def split_gin_flags(argv: Sequence[str]) -> tuple[List[str], List[str]]:
  """Pulls t5x's `--gin.NAME=VALUE` flags out of argv as gin bindings."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        from t5tpu import errors
        raise errors.UserError(f'{arg!r}: expected --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=1000')
      bindings.append(f'{name} = {value}')
    else:
      rest.append(arg)
  return bindings, rest


def parse_flags(argv: Sequence[str], description: str, macro_flags=None):
  """Flags -> args; `macro_flags` {'--input_file': ('INPUT_FILE', str)} become gin macros."""
  bindings, rest = split_gin_flags(list(argv))
  parser = build_parser(description)
  for flag, (macro, kind) in (macro_flags or {}).items():
    if kind is bool:
      parser.add_argument(flag, action='store_true', default=None, help=f'sets {macro}')
    else:
      parser.add_argument(flag, type=kind, default=None, help=f'sets {macro}')
  args = parser.parse_args(rest)
  for flag, (macro, kind) in (macro_flags or {}).items():
    value = getattr(args, flag.lstrip('-'))
    if value is not None:
      bindings.append(f'{macro} = {value!r}')
  args.gin_bindings = list(args.gin_bindings) + bindings
  args.user_bindings = [b for b in bindings if not any(
      b.startswith(f'{macro} =') for macro, _ in (macro_flags or {}).values())]
  return args


def _macro_name(binding: str) -> Optional[str]:
  """'TRAIN_STEPS = 5' -> 'TRAIN_STEPS'; None for bindings of a configurable's parameter."""
  name = binding.partition('=')[0].strip()
  return name if name and '.' not in name and '/' not in name else None


def _referenced_macros() -> set:
  """Names of the macros some parsed binding refers to (`%NAME`)."""
  from gin import config as gin_config
  found = set()

  def walk(value):
    if isinstance(value, gin_config.ConfigurableReference):
      if value.selector == 'gin.macro':
        found.add(value.scoped_selector.rsplit('/', 1)[0])
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)

  for params in gin_config._CONFIG.values():  # pylint: disable=protected-access
    walk(params)
  return found


def check_macros_used(bindings: Sequence[str]) -> None:
  """A macro set on the command line that no gin file uses is a typo: say so, don't train.

  (`--gin.TRAIN_STEPZ=40` would otherwise be accepted silently and the run would train to the
  gin file's TRAIN_STEPS.)
  """
  import difflib
  used = _referenced_macros()
  unused = [m for m in map(_macro_name, bindings) if m and m not in used]
  if not unused:
    return
  from t5tpu import errors
  lines = []
  for name in unused:
    close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    lines.append(f'--gin.{name}: no gin file uses a macro named {name}.{hint}')
  lines.append(f'Macros these gin files use: {", ".join(sorted(used))}.')
  raise errors.UserError('\n'.join(lines))


def _not_gin_search_noise(record: logging.LogRecord) -> bool:
  return not ('/gin/' in record.pathname and 'Path not found' in record.getMessage())


def _package_file_exists(config_path: str) -> bool:
  """gin's check for `include 'package/file.gin'` on the Python path, made safe.

  gin takes the head of an include path for a Python package. A plain folder of the same
  name in the current directory (the `runs/` folder the demo writes, under `python -m`, which
  puts the current directory on sys.path) is a namespace package without a file, and gin's own
  check then crashes with a TypeError. Such a folder is not a gin package: say no.
  """
  import importlib.util
  head, filename = os.path.split(config_path)
  if not head:
    return False
  try:
    spec = importlib.util.find_spec(head.replace('/', '.'))
  except (ImportError, ValueError):
    return False
  if spec is None or not spec.origin or not os.path.isfile(spec.origin):
    return False
  return os.path.isfile(os.path.join(os.path.dirname(spec.origin), filename))


def _install_safe_package_reader() -> None:
  from gin import config as gin_config
  from gin import resource_reader
  gin_config._FILE_READERS[:] = [  # pylint: disable=protected-access
      (reader, _package_file_exists if check is resource_reader.system_path_file_exists
       else check) for reader, check in gin_config._FILE_READERS]  # pylint: disable=protected-access


def _set_search_paths(search_paths: Sequence[str]) -> None:
  """Where gin looks for a file named in an `include`: the same answer from any folder.

  The user's search paths, then t5tpu's gin/ directory, then the current directory: a
  folder the user happens to run from cannot shadow `include 'runs/pretrain.gin'` of a
  project gin file, while the user's own files beside each other still find each other.
  """
  from gin import config as gin_config
  prefixes = [*[os.path.abspath(p) for p in search_paths if p], gin_config_dir(), '']
  gin_config._LOCATION_PREFIXES[:] = prefixes  # pylint: disable=protected-access


def resolve_gin_file(name: str, search_paths: Sequence[str] = ()) -> str:
  """A --gin_file as an absolute path: the current directory first (the user's own file),
  then the search paths, then t5tpu's gin/ directory ('runs/finetune.gin', and
  'gin/runs/finetune.gin' as written from the repository root)."""
  candidates = [name]
  if not os.path.isabs(name):
    candidates += [os.path.join(p, name) for p in search_paths if p]
    candidates.append(os.path.join(gin_config_dir(), name))
    if name.startswith('gin/'):
      candidates.append(os.path.join(gin_config_dir(), name[len('gin/'):]))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  from t5tpu import errors
  raise errors.UserError(
      f'gin file {name!r} not found: looked in the current directory, '
      f'{", ".join(p for p in search_paths if p) or "(no --gin_search_paths)"} and t5tpu\'s '
      f'gin/ directory ({gin_config_dir()}). Model gins are models/t5_1_1/small.gin and the '
      'like; run gins runs/finetune.gin, runs/eval.gin, ...')


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses gin files and bindings with the project's gin/ directory on the search path.

  `finalize=False` skips the check that every %gin.REQUIRED macro is set (`t5tpu plan`
  needs the model and partitioning of a run gin, not its MODEL_DIR or task).
  """
  # gin logs an ERROR on the root logger for every search path it tries before it finds a file.
  root = logging.getLogger()
  if _not_gin_search_noise not in root.filters:
    root.addFilter(_not_gin_search_noise)
  _install_safe_package_reader()
  _set_search_paths(search_paths)
  resolved = [resolve_gin_file(f, search_paths) for f in gin_files]
  gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
  if finalize:
    gin.finalize()


def setup(argv: Sequence[str], description: str, macro_flags=None):
  """Logging, flags, optional multi-process init and gin; returns the parsed flags."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      stream=sys.stderr, force=True)
  for noisy in ('absl', 'jax._src', 'orbax', 'tensorflow'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger().addFilter(
      lambda r: not ('/gin/' in r.pathname and r.levelno < logging.WARNING))
  args = parse_flags(argv, description, macro_flags)
  if not args.gin_file:
    raise SystemExit('give at least one --gin_file (e.g. --gin_file=runs/finetune.gin)')
  from t5tpu import distributed
  distributed.initialize(args.coordinator_address, args.process_count, args.process_index)
  if args.tfds_data_dir:
    import seqio
    seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  if args.seqio_additional_cache_dirs:
    import seqio
    seqio.add_global_cache_dirs(args.seqio_additional_cache_dirs.split(','))
  try:
    parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths.split(','))
  except (ValueError, IOError, TypeError, SyntaxError, ImportError) as e:
    from t5tpu import errors
    if isinstance(e, errors.UserError):
      raise
    raise errors.UserError(f'in the gin configuration: {errors.message(e)}') from e
  check_macros_used(args.user_bindings)
  return args


def run_configured(fn, argv: Sequence[str], description: str, macro_flags=None):
  """An entry point's main: set up from the command line, then call gin-configured `fn`."""
  import gin
  setup(argv, description, macro_flags)
  return gin.get_configurable(fn)()
