"""The analyses and the report, on hand-made results (no training)."""
import json

import pytest

from t5tpu.study import analysis, report
from tests.study.common import table_numbers


def _run(method, task, seed, curve, trainable=10, total=1000):
  best_step, best = max(curve, key=lambda sv: (sv[1], -sv[0]))
  return {'method': method, 'task': task, 'seed': seed, 'curve': curve, 'best_step': best_step,
          'best_score': best, 'last_step': curve[-1][0], 'stopped_early': False,
          'metric': 'accuracy', 'parameters': {'trainable': trainable, 'total': total}}


def make_results():
  curves = {
      ('ft', 'a'): [[10, 50.0], [20, 80.0], [30, 90.0]],
      ('ft', 'b'): [[10, 70.0], [20, 72.0], [30, 71.0]],
      ('lora', 'a'): [[10, 20.0], [20, 40.0], [30, 60.0]],
      ('lora', 'b'): [[10, 10.0], [20, 76.0], [30, 80.0]],
  }
  runs = {f'{m}/{t}/seed0': _run(m, t, 0, c, trainable=1000 if m == 'ft' else 5)
          for (m, t), c in curves.items()}
  return {
      'config': {'methods': ['ft', 'lora'], 'tasks': ['a', 'b'], 'seeds': [0],
                 'train_steps': 30, 'batch_size': 8, 'eval_period': 10, 'patience': 2,
                 'learning_rates': {'ft': 1e-3, 'lora': 3e-3}},
      'tasks': {'a': {'metric': 'accuracy', 'category': 'x'},
                'b': {'metric': 'accuracy', 'category': 'y'}},
      'base': {'checkpoint': '/base', 'pretrained_here': False},
      'runs': runs,
      'methods': {'ft': {'trainable': 1000, 'total': 1000}, 'lora': {'trainable': 5,
                                                                     'total': 1005}},
      'transfer': {'ft': {'a': {'a': 90.0, 'b': 35.0}, 'b': {'a': 9.0, 'b': 72.0}},
                   'lora': {'a': {'a': 60.0, 'b': 0.0}, 'b': {'a': 30.0, 'b': 80.0}}},
  }


def test_steps_to_a_fraction_of_the_best():
  curve = [[10, 50.0], [20, 80.0], [30, 90.0], [40, 85.0]]
  assert analysis.steps_to(curve, 0.9) == 30  # 81 needed
  assert analysis.steps_to(curve, 0.5) == 10
  assert analysis.steps_to([[10, 0.0]], 0.9) is None
  assert analysis.steps_to([], 0.9) is None


def test_performance_convergence_and_transfer():
  a = analysis.analyse(make_results())
  perf = a['performance']
  assert perf['scores'] == {'a': {'ft': 90.0, 'lora': 60.0}, 'b': {'ft': 72.0, 'lora': 80.0}}
  assert perf['mean'] == {'ft': 81.0, 'lora': 70.0}
  assert perf['ranking'] == ['ft', 'lora']
  assert perf['trainable_percent']['lora'] == pytest.approx(100 * 5 / 1005)
  conv = a['convergence']
  # ft: a reaches 81 at 30, b reaches 64.8 at 10; lora: a 54 at 30, b 72 at 20
  assert conv['steps_to']['90'] == {'a': {'ft': 30, 'lora': 30}, 'b': {'ft': 10, 'lora': 20}}
  assert conv['mean']['90'] == {'ft': 20.0, 'lora': 25.0}
  assert conv['ranking']['90'] == ['ft', 'lora']
  tr = a['transfer']
  assert tr['relative']['ft']['a'] == {'a': 100.0, 'b': pytest.approx(100 * 35 / 72)}
  assert tr['relative']['lora']['b']['a'] == pytest.approx(50.0)
  assert tr['within_category'] == {'ft': None, 'lora': None}  # one task per category
  assert tr['across_category']['lora'] == pytest.approx((0.0 + 50.0) / 2)


def test_report_tables_are_the_numbers_of_results_json(tmp_path):
  results = make_results()
  results['analysis'] = analysis.analyse(results)
  (tmp_path / 'results.json').write_text(json.dumps(results))
  path = report.write(str(tmp_path))
  text = open(path).read()
  a = results['analysis']
  tables = table_numbers(text)
  assert tables[0] == [[90.0, 60.0], [72.0, 80.0], [81.0, 70.0],
                       [100.0, round(100 * 5 / 1005, 4)]]
  assert tables[1] == [[30, 30], [10, 20], [20, 25]]
  assert 'Ranking by mean score: FT > LoRA' in text
  for png in ['performance.png', 'convergence_a.png', 'convergence_b.png', 'transfer.png']:
    assert (tmp_path / png).stat().st_size > 1000
    assert f']({png})' in text
  # transfer tables: rows and columns in category order, relative scores
  order = a['transfer']['order']
  ft = [[round(a['transfer']['relative']['ft'][s][d], 1) for d in order] for s in order]
  assert tables[3] == ft
