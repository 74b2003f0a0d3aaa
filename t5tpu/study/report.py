"""STUDY_DIR/report.md and its plots, written from STUDY_DIR/results.json alone.

Tables read like the paper's: methods as columns, tasks as rows. Every number in a table is a
value of results.json['analysis'] printed with the precision `fmt` gives it.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

from t5tpu import errors
from t5tpu import storage

NAMES = {'ft': 'FT', 'lora': 'LoRA', 'adapter': 'Adapter', 'prefix': 'Prefix',
         'prompt': 'Prompt', 'bitfit': 'BitFit'}


def fmt(value: Optional[float], digits: int = 1) -> str:
  return '–' if value is None else f'{value:.{digits}f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *['| ' + ' | '.join(r) + ' |' for r in rows]]


def _method_table(first: str, rows: Dict[str, Dict[str, Optional[float]]],
                  methods: Sequence[str], digits: int = 1, extra=()) -> List[str]:
  body = [[name] + [fmt(values[m], digits) for m in methods] for name, values in rows.items()]
  return _table([first] + [NAMES.get(m, m) for m in methods], body + list(extra))


def _save(fig, study_dir: str, name: str) -> str:
  import matplotlib.pyplot as plt
  path = storage.join(study_dir, name)
  with storage.open_file(path, 'wb') as f:
    fig.savefig(f, dpi=100, format='png')
  plt.close(fig)
  return name


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_curves(study_dir: str, a: dict) -> Dict[str, str]:
  plt, files = _plt(), {}
  for task in a['tasks']:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in a['methods']:
      curve = a['convergence']['curves'][task][m]
      if curve:
        ax.plot([s for s, _ in curve], [v for _, v in curve], 'o-', ms=3, label=NAMES.get(m, m))
    ax.set(xlabel='training step', ylabel=f'validation {a["metrics"][task]}', title=task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files[task] = _save(fig, study_dir, f'convergence_{task}.png')
  return files


def plot_performance(study_dir: str, a: dict) -> str:
  plt = _plt()
  perf = a['performance']
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for m in a['methods']:
    x, y = perf['trainable_percent'][m], perf['mean'][m]
    if x is not None and y is not None:
      ax.scatter([x], [y], s=40)
      ax.annotate(NAMES.get(m, m), (x, y), textcoords='offset points', xytext=(5, 4))
  ax.set(xscale='log', xlabel='trainable parameters (% of the model)',
         ylabel='mean best validation score', title='performance vs trainable fraction')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, study_dir, 'performance.png')


def plot_transfer(study_dir: str, a: dict) -> str:
  plt = _plt()
  t, order, methods = a['transfer'], a['transfer']['order'], a['methods']
  cols = min(3, len(methods))
  rows = (len(methods) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.4 * rows), squeeze=False)
  image = None
  for ax, m in zip(axes.flat, methods):
    grid = [[t['relative'][m][src][dst] if t['relative'][m][src][dst] is not None
             else float('nan') for dst in order] for src in order]
    image = ax.imshow(grid, vmin=0, vmax=100, cmap='viridis')
    ax.set_xticks(range(len(order)), order, rotation=45, ha='right', fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.set_title(NAMES.get(m, m), fontsize=9)
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        if v == v:  # not NaN
          ax.text(j, i, f'{v:.0f}', ha='center', va='center', fontsize=6,
                  color='white' if v < 60 else 'black')
  for ax in list(axes.flat)[len(methods):]:
    ax.axis('off')
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.6, label='% of the target task\'s own score')
  fig.suptitle('transfer: trained on row, evaluated on column', fontsize=10)
  return _save(fig, study_dir, 'transfer.png')


def render(results: dict, images: Dict[str, object]) -> str:
  a, cfg = results['analysis'], results['config']
  methods, tasks = a['methods'], a['tasks']
  base = results.get('base', {})
  perf, conv = a['performance'], a['convergence']
  label = {t: f'{t} ({a["metrics"][t]})' for t in tasks}
  lines = ['# Delta-tuning study', '',
           f'Base: `{base.get("checkpoint")}`' + (
               f' (pre-trained here on {base["task"]} for {base["steps"]} steps)'
               if base.get('pretrained_here') else ''),
           f'Runs: up to {cfg["train_steps"]} steps, batch {cfg["batch_size"]}, dropout '
           f'{cfg.get("dropout_rate")}, evaluated every '
           f'{cfg["eval_period"]} steps, early stopping after {cfg["patience"]} evaluations '
           f'without improvement; seeds {", ".join(map(str, cfg["seeds"]))}; learning rates '
           + ', '.join(f'{NAMES.get(m, m)} {cfg["learning_rates"][m]:g}' for m in methods) + '.',
           'Tasks: ' + ', '.join(f'{t} ({a["categories"][t]}, {a["metrics"][t]})'
                                 for t in tasks) + '.', '',
           '## 1. Performance', '',
           'Best validation score of each run (mean over seeds), the mean over tasks, and the '
           'share of the model each method trains.', '']
  trainable = [['trainable %'] + [fmt(perf['trainable_percent'][m], 4) for m in methods]]
  lines += _method_table('task (metric)', {label[t]: perf['scores'][t] for t in tasks} | {
      '**mean**': perf['mean']}, methods, extra=trainable)
  lines += ['', 'Ranking by mean score: ' + ' > '.join(NAMES.get(m, m) for m in perf['ranking']),
            '', f'![performance vs trainable fraction]({images["performance"]})', '',
            '## 2. Convergence', '']
  for f in ('90', '95'):
    lines += [f'Steps to reach {f} % of the run\'s own best score (mean over seeds):', '']
    lines += _method_table('task', {t: conv['steps_to'][f][t] for t in tasks} | {
        '**mean**': conv['mean'][f]}, methods, digits=0)
    lines += ['', f'Ranking (fastest first, {f} %): ' +
              ' < '.join(NAMES.get(m, m) for m in conv['ranking'][f]), '']
  lines += [f'![{t}]({images["curves"][t]})' for t in tasks] + ['']
  if 'transfer' in a:
    tr = a['transfer']
    order = tr['order']
    lines += ['## 3. Transferability', '',
              'Each method\'s best checkpoint for the row task, evaluated zero-shot on the column '
              'task, as % of the column task\'s own score with that method (diagonal = 100). '
              'Tasks are grouped by category: ' +
              ', '.join(f'{t} ({a["categories"][t]})' for t in order) + '.', '']
    for m in methods:
      lines += [f'**{NAMES.get(m, m)}**', '']
      lines += _table(['trained on \\ evaluated on'] + order,
                      [[src] + [fmt(tr['relative'][m][src][dst]) for dst in order]
                       for src in order])
      lines.append('')
    lines += ['Mean relative score of transfers between different tasks:', '']
    lines += _method_table('', {'same category': tr['within_category'],
                                'other category': tr['across_category']}, methods)
    lines += ['', f'![transfer heatmaps]({images["transfer"]})', '']
  lines += ['Every number above is in results.json (`analysis`); each run\'s logs, metrics and '
            'checkpoints are under runs/<method>/<task>-seed<n>/.', '']
  return '\n'.join(lines)


def write(study_dir: str) -> str:
  """Writes report.md and the PNGs from results.json; returns report.md's path."""
  path = storage.join(study_dir, 'results.json')
  if not storage.exists(path):
    raise errors.UserError(f'{path} does not exist: run the study first')
  results = json.loads(storage.read_text(path))
  if 'analysis' not in results:  # an interrupted study: what it has so far
    from t5tpu.study import analysis
    results['analysis'] = analysis.analyse(results)
  a = results['analysis']
  images = {'curves': plot_curves(study_dir, a), 'performance': plot_performance(study_dir, a)}
  if 'transfer' in a:
    images['transfer'] = plot_transfer(study_dir, a)
  out = storage.join(study_dir, 'report.md')
  storage.write_text(out, render(results, images))
  return out
