"""The `t5tpu` command: one subcommand per entry point.

  t5tpu train   --gin_file=... --gin.MODEL_DIR=\"...\"   (= python -m t5tpu.train)
  t5tpu eval    ...                                      (= python -m t5tpu.eval)
  t5tpu infer   ...                                      (= python -m t5tpu.infer)
  t5tpu convert ...  checkpoint formats (T5X, MTF, Hugging Face)
  t5tpu gcs     ...  bucket set-up and copies
  t5tpu plan    ...  will it fit? compile for a Cloud TPU topology
  t5tpu demo         the built-in closed-book QA demo on CPU
  t5tpu study   ...  compare full fine-tuning and delta methods on tasks, write a report
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    'train': ('t5tpu.train', 'main', 'train / fine-tune (gin-configured)'),
    'eval': ('t5tpu.eval', 'main', 'evaluate one, the latest or all checkpoints'),
    'infer': ('t5tpu.infer', 'main', 'predict or score a task split or a file of inputs'),
    'convert': ('t5tpu.formats.convert', 'main', 'convert checkpoints between formats'),
    'gcs': ('t5tpu.gcs', 'main', 'set up a GCS bucket, copy checkpoints and data'),
    'plan': ('t5tpu.plan', 'main', 'compile for a Cloud TPU topology: does it fit?'),
    'demo': ('t5tpu.demo', 'main', 'fine-tune a tiny T5 on the built-in knowledge task'),
    'study': ('t5tpu.study', 'main', 'compare delta-tuning methods: performance, convergence, '
              'transfer'),
}


def usage() -> str:
  lines = ['usage: t5tpu <command> [flags]', '', 'commands:']
  lines += [f'  {name:<8} {help_}' for name, (_, _, help_) in COMMANDS.items()]
  lines += ['', "run 't5tpu <command> --help' for a command's flags"]
  return '\n'.join(lines)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage())
    return
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"t5tpu: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
  module_name, fn_name, _ = COMMANDS[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      print(f't5tpu {name}: not available in this version', file=sys.stderr)
      raise SystemExit(2)
    raise
  getattr(module, fn_name)(rest)


if __name__ == '__main__':
  main()
