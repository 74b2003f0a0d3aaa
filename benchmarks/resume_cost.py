"""What resuming costs at a large input position: snapshot restore vs replaying the input.

  python benchmarks/resume_cost.py --positions 1000,5000,20000

For each position P, the built-in knowledge_qa training pipeline (the demo's: batch 64,
24/8 tokens) is read to P once (a training run's own cost, not timed), a snapshot of the
iterator is taken (what a checkpoint stores), and then two fresh iterators are timed to their
first batch after P: one restoring the snapshot (t5tpu's resume), one replaying P batches
through preprocessing (`ds.skip(P)`, the resume before snapshots). Both must yield the same
batch. Prints a table with the ratio and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--positions', default='1000,5000,20000',
                 help='comma-separated input positions (batches) to resume at')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--json', default=None, help='write results here')
  return p.parse_args()


def main():
  args = parse()
  import numpy as np
  import seqio
  import tasks.knowledge  # noqa: F401  (registers knowledge_qa)
  from t5tpu import data
  del seqio
  cfg = data.DatasetConfig('knowledge_qa', {'inputs': 24, 'targets': 8}, batch_size=args.batch,
                           pack=False)
  make = lambda seed: data.get_dataset(cfg, seed=seed)
  fp = data.fingerprint(cfg, 0, 1)
  rows = []
  for position in [int(p) for p in args.positions.split(',')]:
    it = data.InputIterator(make, seed=0, fingerprint=fp)
    for _ in range(position):
      next(it)
    snapshot = it.snapshot()
    expected = next(it)

    t0 = time.perf_counter()
    restored = next(data.InputIterator(make, seed=0, position=position, snapshot=snapshot,
                                       fingerprint=fp))
    t_snapshot = time.perf_counter() - t0
    t0 = time.perf_counter()
    replayed = next(data.InputIterator(make, seed=0, position=position, fingerprint=fp))
    t_replay = time.perf_counter() - t0
    for got in (restored, replayed):
      assert all(np.array_equal(got[k], expected[k]) for k in expected), 'batches differ'
    rows.append({'position': position, 'examples_skipped': position * args.batch,
                 'snapshot_s': t_snapshot, 'replay_s': t_replay,
                 'snapshot_kib': len(snapshot['state']) * 3 / 4 / 1024,
                 'speedup': t_replay / t_snapshot})

  print(f'\nresume cost, knowledge_qa pipeline, batch {args.batch} (same batch both ways)\n')
  print(f'{"position":>9} {"examples":>10} {"snapshot s":>11} {"replay s":>9} '
        f'{"replay/snapshot":>16} {"snapshot KiB":>13}')
  for r in rows:
    print(f'{r["position"]:>9} {r["examples_skipped"]:>10} {r["snapshot_s"]:>11.3f} '
          f'{r["replay_s"]:>9.2f} {r["speedup"]:>15.1f}x {r["snapshot_kib"]:>13.0f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
