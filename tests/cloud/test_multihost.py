"""Multi-host training on one machine: two jax processes (gloo collectives on CPU), one device
each, against one process with two devices seeing the same global batches.

Checks: jax.distributed start-up from flags, each host reading only its data shard, identical
losses and parameters, one collective orbax checkpoint per step in a shared MODEL_DIR that a
single process can read, and per-run files (model-info.txt, config.gin, TensorBoard) written
once, by process 0.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5tpu import checkpoints, storage
from tests.cloud import gcs_server

STEPS = 4


def _launch(args, tmp_path, name):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env['PYTHONPATH'] = os.getcwd()
  log = open(tmp_path / f'{name}.log', 'w')
  return subprocess.Popen([sys.executable, '-m', 'tests.cloud.multihost_worker', *args],
                          env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, tmp_path, timeout=400):
  for name, proc in procs.items():
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f'{name} failed:\n' + (tmp_path / f'{name}.log').read_text()[-4000:]


@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path, monkeypatch):
  import jax
  from t5tpu import data
  from tests.cloud import multihost_worker
  port = gcs_server.free_port()
  multi_dir, single_dir = tmp_path / 'multi', tmp_path / 'single'
  procs = {
      f'host{i}': _launch([f'--process_id={i}', '--num_processes=2',
                           f'--coordinator=127.0.0.1:{port}', f'--model_dir={multi_dir}',
                           f'--steps={STEPS}', f'--out={tmp_path / f"host{i}.json"}'],
                          tmp_path, f'host{i}')
      for i in range(2)}
  # The reference, here while the hosts start: one process, two devices, the same global
  # batches (both hosts' shards side by side).
  try:
    monkeypatch.setattr(data, 'get_dataset', multihost_worker.both_shards(data.get_dataset))
    single_losses, single_state = multihost_worker.run(str(single_dir), STEPS,
                                                       devices=jax.devices()[:2])
    results = {'single': {'losses': single_losses,
                          'query_kernel_sum': multihost_worker.kernel_sum(single_state)}}
    _wait(procs, tmp_path)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
  results.update({n: json.loads((tmp_path / f'{n}.json').read_text()) for n in procs})

  single = results['single']['losses']
  assert len(single) == STEPS and single[-1] < single[0]
  for host in ('host0', 'host1'):
    np.testing.assert_allclose(results[host]['losses'], single, rtol=1e-5)
    np.testing.assert_allclose(results[host]['query_kernel_sum'],
                               results['single']['query_kernel_sum'], rtol=1e-5)
  assert [results[h]['process_index'] for h in ('host0', 'host1')] == [0, 1]

  # One checkpoint per period, written by both processes together, readable by one.
  assert checkpoints.all_steps(str(multi_dir)) == [2, 4]
  multi = checkpoints.read_state_dict(str(multi_dir / 'checkpoint_4'))
  ref = checkpoints.read_state_dict(str(single_dir / 'checkpoint_4'))
  kernel = lambda d: d['target']['encoder']['layers_0']['attention']['query']['kernel']
  np.testing.assert_allclose(kernel(multi), kernel(ref), rtol=1e-5)
  assert int(multi['state']['step']) == STEPS

  # Files every process would write alike are written once, by process 0.
  assert (multi_dir / 'model-info.txt').exists() and (multi_dir / 'config.gin').exists()
  events = [f for f, _ in storage.walk_files(str(multi_dir / 'train')) if 'tfevents' in f]
  assert len(events) == 1


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Mesh:
  """Enough of a jax Mesh for partitioning.data_shard (hashable, like Mesh)."""

  def __init__(self, hosts, shape):
    self.axis_names = ('data', 'model')
    self.devices = np.empty(shape, object)
    for i, host in enumerate(hosts):
      self.devices.flat[i] = _Device(host)


@pytest.mark.parametrize('hosts,shape,expect', [
    ([0, 0, 0, 0, 1, 1, 1, 1], (2, 4), {0: (0, 2), 1: (1, 2)}),  # model axis within a host
    ([0, 0, 0, 0, 1, 1, 1, 1], (1, 8), {0: (0, 1), 1: (0, 1)}),  # model axis spans hosts
    ([0, 1, 2, 3], (2, 2), {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}),
    ([0, 1], (2, 1), {0: (0, 2), 1: (1, 2)}),  # the two-process test above
])
def test_data_shard_per_host(hosts, shape, expect):
  from t5tpu import partitioning
  mesh = _Mesh(hosts, shape)
  assert {h: partitioning.data_shard(mesh, h) for h in expect} == expect


def test_data_shard_rejects_uneven_layouts():
  from t5tpu import partitioning
  with pytest.raises(ValueError, match='whole rows'):
    partitioning.data_shard(_Mesh([0, 0, 0, 1], (4, 1)), 0)
