"""One process of the multi-host test (run as `python -m tests.cloud.multihost_worker`).

With --num_processes=2 it joins a two-process jax job (gloo collectives on CPU) and trains
the tiny model through `t5tpu.train.train`, each process reading only its shard of the data.
With --num_processes=1 it is the reference: one process whose two CPU devices see the same
global batches (the two hosts' shards side by side). Losses per step go to --out as JSON.
"""
import argparse
import json
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--process_id', type=int, default=0)
  p.add_argument('--num_processes', type=int, default=1)
  p.add_argument('--coordinator', default=None)
  p.add_argument('--model_dir', required=True)
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--out', required=True)
  args = p.parse_args()
  devices_here = 2 // args.num_processes  # two devices in all, either way
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices_here}'
  os.environ['JAX_PLATFORMS'] = 'cpu'

  from t5tpu import distributed
  if args.num_processes > 1:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import jax
  import numpy as np
  from t5tpu import checkpoints, data, optimizers, partitioning, train, trainer
  from tests import tiny
  tiny.register_copy_task()
  assert jax.device_count() == 2 and jax.process_count() == args.num_processes

  if args.num_processes == 1:
    # The reference sees, as one global batch, what the two hosts read as their halves.
    get_dataset = data.get_dataset

    def both_shards(cfg, shard_id=0, num_shards=1, **kw):
      assert (shard_id, num_shards) == (0, 1)
      halves = [get_dataset(cfg, i, 2, **kw) for i in range(2)]
      import tensorflow as tf
      return tf.data.Dataset.zip(tuple(halves)).map(
          lambda a, b: {k: tf.concat([a[k], b[k]], 0) for k in a})
    data.get_dataset = both_shards

  losses = []
  step_fn = trainer.Trainer.train_step

  def recording(self, state, batch, rng):
    state, metrics = step_fn(self, state, batch, rng)
    m = jax.device_get(metrics)
    losses.append(float(m['cross_ent_sum']) / float(m['weight_sum']))
    return state, metrics
  trainer.Trainer.train_step = recording

  state = train.train(
      model=tiny.tiny_model(),
      train_dataset_cfg=data.DatasetConfig(tiny.COPY_TASK, tiny.LENGTHS, batch_size=8),
      partitioner=partitioning.PjitPartitioner(num_partitions=1),
      model_dir=args.model_dir, total_steps=args.steps, random_seed=0, log_period=2,
      eval_period=None,
      learning_rate_fn=optimizers.create_learning_rate_scheduler(base_learning_rate=0.01),
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=2)))
  kernel = state.params['encoder']['layers_0']['attention']['query']['kernel']
  with open(args.out, 'w') as f:
    json.dump({'losses': losses, 'process_index': jax.process_index(),
               'query_kernel_sum': float(np.asarray(
                   jax.device_get(kernel.addressable_shards[0].data)).sum())}, f)
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  sys.exit(main())
