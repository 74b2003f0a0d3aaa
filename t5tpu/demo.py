"""`t5tpu demo`: train a small T5 on the built-in knowledge task on CPU, and show it learned.

It runs the same gin-configured `train` as any t5x-style run (gin/examples/knowledge_demo.gin):
exact match on the `validation` split before training (about 0) and every EVAL_PERIOD steps,
checkpoints in MODEL_DIR, then exact match on the held-out `paraphrase` split, and finally a
PNG of the loss and exact-match curves (MODEL_DIR/demo_curves.png). Running it again with a
larger --train_steps resumes from the last checkpoint instead of starting over.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from t5tpu import errors
from t5tpu import storage

DEMO_GIN = 'examples/knowledge_demo.gin'
TASK = 'knowledge_qa'


def _read_jsonl(path: str) -> list:
  if not storage.exists(path):
    return []
  return [json.loads(l) for l in storage.read_text(path).splitlines() if l.strip()]


def plot_curves(model_dir: str) -> str:
  """demo_curves.png: training loss per token, and exact match by step."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  train_rows = _read_jsonl(storage.join(model_dir, 'train', 'metrics.jsonl'))
  em_rows = _read_jsonl(storage.join(model_dir, 'inference_eval', f'{TASK}-metrics.jsonl'))
  fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax_loss.plot([r['step'] for r in train_rows],
               [r['cross_ent_loss_per_token'] for r in train_rows], color='tab:blue')
  ax_loss.set(xlabel='step', ylabel='training loss per token', yscale='log',
              title='loss')
  ax_em.plot([r['step'] for r in em_rows], [r['em'] for r in em_rows], 'o-', color='tab:green')
  ax_em.set(xlabel='step', ylabel='exact match (validation)', ylim=(-2, 102),
            title='exact match')
  for ax in (ax_loss, ax_em):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = storage.join(model_dir, 'demo_curves.png')
  local = path if not storage.is_remote(path) else '/tmp/demo_curves.png'
  fig.savefig(local, dpi=110)
  plt.close(fig)
  if local != path:
    with open(local, 'rb') as src, storage.open_file(path, 'wb') as dst:
      dst.write(src.read())
  return path


@errors.report_user_errors
def main(argv: Sequence[str] = ()) -> None:
  parser = argparse.ArgumentParser(
      prog='t5tpu demo', description=__doc__.split('\n\n')[0],
      epilog='Other flags (--gin.X=..., --gin_file=...) pass through to the gin config.')
  parser.add_argument('--model_dir', default=os.path.join('runs', 'knowledge_demo'),
                      help='where checkpoints, logs and the plot go (local or gs://)')
  parser.add_argument('--train_steps', type=int, default=None,
                      help='absolute step count (default: TRAIN_STEPS of the demo gin); '
                      'rerun with a larger value to continue training')
  args, rest = parser.parse_known_args(list(argv))
  flags = [f'--gin_file={DEMO_GIN}', f'--gin.MODEL_DIR={args.model_dir!r}'] + rest
  if args.train_steps is not None:
    flags.append(f'--gin.TRAIN_STEPS={args.train_steps}')

  import gin
  from t5tpu import eval as eval_lib
  from t5tpu import gin_utils
  from t5tpu import train as train_lib
  gin_utils.setup(flags, 'demo')
  logging.getLogger('absl').setLevel(logging.ERROR)
  train_lib_fn = gin.get_configurable(train_lib.train)
  state = train_lib_fn()
  step = int(state.step)
  # The held-out phrasing: does the model answer questions worded unlike anything it saw?
  paraphrase = gin.get_configurable(eval_lib.evaluate)(
      output_dir=storage.join(args.model_dir, "paraphrase_eval"))
  png = plot_curves(args.model_dir)

  em_rows = _read_jsonl(storage.join(args.model_dir, 'inference_eval', f'{TASK}-metrics.jsonl'))
  before = em_rows[0] if em_rows else None
  after = em_rows[-1] if em_rows else None
  para = paraphrase.get(step, {}).get(TASK, {})
  print('\n' + '=' * 72, file=sys.stderr)
  print(f'knowledge_qa demo: step {step} in {args.model_dir}', file=sys.stderr)
  if before and after:
    print(f"  exact match (validation): {before['em']:5.1f} at step {before['step']}  ->  "
          f"{after['em']:5.1f} at step {after['step']}", file=sys.stderr)
  if para:
    print(f"  exact match (paraphrase): {para.get('em', float('nan')):5.1f}   "
          '(question wordings never seen in training)', file=sys.stderr)
  print(f'  curves: {png}', file=sys.stderr)
  print(f'  predictions: {storage.join(args.model_dir, "inference_eval")}/', file=sys.stderr)
  print(f'  continue training: t5tpu demo --model_dir={args.model_dir} '
        f'--train_steps={step * 2}', file=sys.stderr)
  print('=' * 72, file=sys.stderr)


if __name__ == '__main__':
  main(sys.argv[1:])
