"""The study's three analyses, computed from results.json's runs and transfer scores alone.

- performance: each run's best validation score; per (task, method) the mean over seeds, per
  method the mean over tasks, the ranking by that mean, and each method's trainable fraction;
- convergence: the first evaluated step at which a run reaches 90 % / 95 % of its own best
  score (mean over seeds), per method the mean over tasks, ranked (fewest steps first), and the
  score-vs-step curves averaged over seeds;
- transferability: a method's best checkpoint for task A scored on task B, relative to B's own
  best score with that method (100 = as good as training on B), and the mean of those relative
  scores within a category and across categories.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

FRACTIONS = (90, 95)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
  values = [v for v in values if v is not None]
  return float(statistics.fmean(values)) if values else None


def _ranking(means: Dict[str, Optional[float]], descending: bool) -> List[str]:
  known = [m for m in means if means[m] is not None]
  return sorted(known, key=lambda m: -means[m] if descending else means[m])


def steps_to(curve: Sequence[Sequence[float]], fraction: float) -> Optional[int]:
  """First step whose score reaches `fraction` of the curve's best (None for a best of 0)."""
  if not curve:
    return None
  best = max(v for _, v in curve)
  if best <= 0:
    return None
  return int(next(s for s, v in curve if v >= fraction * best - 1e-9))


def _runs_of(results: dict, method: str, task: str) -> List[dict]:
  seeds = set(results['config']['seeds'])
  return [r for r in results['runs'].values()
          if r['method'] == method and r['task'] == task and r['seed'] in seeds]


def performance(results: dict, methods: Sequence[str], tasks: Sequence[str]) -> dict:
  scores = {t: {m: _mean([r['best_score'] for r in _runs_of(results, m, t)]) for m in methods}
            for t in tasks}
  spread = {t: {m: (statistics.pstdev([r['best_score'] for r in _runs_of(results, m, t)])
                    if len(_runs_of(results, m, t)) > 1 else None) for m in methods}
            for t in tasks}
  mean = {m: _mean([scores[t][m] for t in tasks]) for m in methods}
  params = results.get('methods', {})
  trainable = {m: params.get(m, {}).get('trainable') for m in methods}
  percent = {m: (100.0 * params[m]['trainable'] / params[m]['total']) if m in params else None
             for m in methods}
  return {'scores': scores, 'std': spread, 'mean': mean, 'ranking': _ranking(mean, True),
          'trainable': trainable, 'trainable_percent': percent}


def _mean_curve(runs: Sequence[dict]) -> List[List[float]]:
  """The seeds' curves averaged at the steps all of them evaluated."""
  if not runs:
    return []
  steps = set.intersection(*[{s for s, _ in r['curve']} for r in runs])
  return [[s, float(statistics.fmean(dict(map(tuple, r['curve']))[s] for r in runs))]
          for s in sorted(steps)]


def convergence(results: dict, methods: Sequence[str], tasks: Sequence[str]) -> dict:
  out = {'steps_to': {}, 'mean': {}, 'ranking': {}}
  for f in FRACTIONS:
    table = {t: {m: _mean([steps_to(r['curve'], f / 100) for r in _runs_of(results, m, t)])
                 for m in methods} for t in tasks}
    mean = {m: _mean([table[t][m] for t in tasks]) for m in methods}
    out['steps_to'][str(f)] = table
    out['mean'][str(f)] = mean
    out['ranking'][str(f)] = _ranking(mean, False)
  out['curves'] = {t: {m: _mean_curve(_runs_of(results, m, t)) for m in methods} for t in tasks}
  return out


def transfer(results: dict, methods: Sequence[str], tasks: Sequence[str],
             categories: Dict[str, str]) -> dict:
  order = sorted(tasks, key=lambda t: (categories[t], list(tasks).index(t)))
  raw = results.get('transfer', {})
  seed = results['config']['seeds'][0]
  relative, within, across = {}, {}, {}
  for m in methods:
    own = {t: results['runs'].get(f'{m}/{t}/seed{seed}', {}).get('best_score') for t in tasks}
    table = {a: {b: (100.0 * raw[m][a][b] / own[b]) if raw.get(m, {}).get(a, {}).get(b)
                 is not None and own[b] else None for b in tasks} for a in tasks}
    relative[m] = table
    pairs = [(a, b) for a in tasks for b in tasks if a != b]
    within[m] = _mean([table[a][b] for a, b in pairs if categories[a] == categories[b]])
    across[m] = _mean([table[a][b] for a, b in pairs if categories[a] != categories[b]])
  return {'order': order, 'scores': {m: raw.get(m, {}) for m in methods},
          'relative': relative, 'within_category': within, 'across_category': across}


def analyse(results: dict) -> dict:
  cfg = results['config']
  methods, tasks = list(cfg['methods']), list(cfg['tasks'])
  categories = {t: results['tasks'][t]['category'] for t in tasks}
  out = {'methods': methods, 'tasks': tasks, 'categories': categories,
         'metrics': {t: results['tasks'][t]['metric'] for t in tasks},
         'performance': performance(results, methods, tasks),
         'convergence': convergence(results, methods, tasks)}
  if results.get('transfer'):
    out['transfer'] = transfer(results, methods, tasks, categories)
  return out
