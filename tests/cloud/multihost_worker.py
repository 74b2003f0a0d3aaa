"""One process of the multi-host test (run as `python -m tests.cloud.multihost_worker`).

It joins a two-process jax job (gloo collectives on CPU, one device per process) and trains
the tiny model through `t5tpu.train.train`, each process reading only its shard of the data.
Losses per step go to --out as JSON. The test's own process runs the reference with `run`.
"""
import argparse
import json
import os
import sys


def both_shards(get_dataset):
  """A get_dataset for one process that returns, as one global batch, what two hosts read
  as their halves (each host's shard of the data, side by side)."""
  def get(cfg, shard_id=0, num_shards=1, **kw):
    assert (shard_id, num_shards) == (0, 1)
    import tensorflow as tf
    halves = [get_dataset(cfg, i, 2, **kw) for i in range(2)]
    return tf.data.Dataset.zip(tuple(halves)).map(
        lambda a, b: {k: tf.concat([a[k], b[k]], 0) for k in a})
  return get


def run(model_dir: str, steps: int, devices=None):
  """Trains the tiny model for `steps` steps; returns the loss of each step and the state."""
  import jax
  from t5tpu import checkpoints, data, optimizers, partitioning, train, trainer
  from tests import tiny
  tiny.register_copy_task()
  losses = []
  step_fn = trainer.Trainer.train_step

  def recording(self, state, batch, rng):
    state, metrics = step_fn(self, state, batch, rng)
    m = jax.device_get(metrics)
    losses.append(float(m['cross_ent_sum']) / float(m['weight_sum']))
    return state, metrics
  trainer.Trainer.train_step = recording
  try:
    state = train.train(
        model=tiny.tiny_model(),
        train_dataset_cfg=data.DatasetConfig(tiny.COPY_TASK, tiny.LENGTHS, batch_size=8),
        partitioner=partitioning.PjitPartitioner(num_partitions=1, devices=devices),
        model_dir=model_dir, total_steps=steps, random_seed=0, log_period=2,
        eval_period=None,
        learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.01),
        checkpoint_cfg=checkpoints.CheckpointConfig(
            save=checkpoints.SaveCheckpointConfig(period=2)))
  finally:
    trainer.Trainer.train_step = step_fn
  return losses, state


def kernel_sum(state) -> float:
  import jax
  import numpy as np
  kernel = state.params['encoder']['layers_0']['attention']['query']['kernel']
  return float(np.asarray(jax.device_get(kernel.addressable_shards[0].data)).sum())


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--process_id', type=int, required=True)
  p.add_argument('--num_processes', type=int, default=2)
  p.add_argument('--coordinator', required=True)
  p.add_argument('--model_dir', required=True)
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--out', required=True)
  args = p.parse_args()
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  from t5tpu import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import jax
  assert jax.process_count() == args.num_processes and jax.local_device_count() == 1
  losses, state = run(args.model_dir, args.steps)
  with open(args.out, 'w') as f:
    json.dump({'losses': losses, 'process_index': jax.process_index(),
               'query_kernel_sum': kernel_sum(state)}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  sys.exit(main())
