"""The largest batch of full fine-tuning that fits on this machine's accelerator.

  python benchmarks/max_batch.py --model t5_1_1/xl --inputs 512 --targets 128 --optimizer adamw

Compiles t5tpu's train step for a first batch (--start), reads the compiler's memory analysis
(arguments: parameters, optimizer state and batch; temporaries: activations and gradients),
and predicts the batch whose peak reaches the device's memory (its allocator limit, or
--memory_gib). That batch and the ones below it are then *run* for one step each, largest
first, until one runs: a run, not the prediction, is the answer. A few compiles in all, so a
3B model's search fits in a few minutes on a GPU. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import bench_setup  # also puts the repository on sys.path

GiB = 2 ** 30


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='t5_1_1/xl', help='a gin/models name')
  p.add_argument('--vocab', type=int, default=None)
  p.add_argument('--inputs', type=int, default=512)
  p.add_argument('--targets', type=int, default=128)
  p.add_argument('--optimizer', default='adamw', choices=['adafactor', 'adamw'])
  p.add_argument('--dtype', default='bfloat16', help='activation dtype')
  p.add_argument('--remat', default='none', help="T5Config.remat_policy: none, full, dots, "
                 "minimal")
  p.add_argument('--start', type=int, default=8, help='the batch compiled first')
  p.add_argument('--multiple', type=int, default=8, help='batches tried are multiples of this')
  p.add_argument('--max_runs', type=int, default=3, help='batches run before giving up')
  p.add_argument('--limit', type=int, default=8192, help='the largest batch tried')
  p.add_argument('--memory_gib', type=float, default=None,
                 help="device memory to fit in (default: the device's allocator limit)")
  p.add_argument('--json', default=None)
  return p.parse_args()


def device_memory_bytes(device) -> int:
  stats = device.memory_stats() or {}
  if 'bytes_limit' not in stats:
    raise SystemExit(f'{device.device_kind} reports no memory limit: give --memory_gib')
  return int(stats['bytes_limit'])


@dataclasses.dataclass
class Trial:
  batch: int
  peak_bytes: int = 0  # the compiler's estimate
  ran: bool = False
  error: str = ''
  seconds: float = 0.0


def make_trainer(cfg, args, batch: int):
  from t5tpu import layout, models, network, optimizers, partitioning, trainer
  opt = optimizers.Adafactor() if args.optimizer == 'adafactor' else optimizers.AdamW()
  model = models.EncoderDecoderModel(module=network.Transformer(cfg), optimizer_def=opt)
  return trainer.Trainer(model, partitioning.PjitPartitioner(),
                         optimizers.create_learning_rate_scheduler(), None,
                         layout.input_shapes(batch, {'inputs': args.inputs,
                                                     'targets': args.targets}))


def batch_spec(batch: int, args) -> dict:
  import jax
  import jax.numpy as jnp
  n = {'encoder_input_tokens': args.inputs, 'decoder_input_tokens': args.targets,
       'decoder_target_tokens': args.targets, 'decoder_loss_weights': args.targets}
  return {k: jax.ShapeDtypeStruct((batch, v), jnp.int32) for k, v in n.items()}


def compiled_peak(cfg, args, batch: int) -> int:
  """The compiler's peak memory for one train step (nothing is allocated)."""
  import jax
  from jax.sharding import PartitionSpec
  from t5tpu import layout as layout_lib
  tr = make_trainer(cfg, args, batch)
  spec = batch_spec(batch, args)
  part = tr.partitioner
  step = tr.compile_train_step(spec)
  with part.context():
    compiled = step.lower(
        tr.layout.abstract_with_shardings(), tr.frozen_layout.abstract_with_shardings(),
        layout_lib.with_shardings(spec, tr.batch_shardings(spec)),
        jax.ShapeDtypeStruct((2,), np.uint32, sharding=part.sharding(PartitionSpec()))
    ).compile()
  mem = compiled.memory_analysis()
  return int(mem.peak_memory_in_bytes or mem.argument_size_in_bytes + mem.temp_size_in_bytes)


def run_one_step(cfg, args, batch: int) -> None:
  """Initialises the state and runs one train step of this batch (raises when it OOMs)."""
  import gc
  import jax
  from t5tpu import data
  tr = make_trainer(cfg, args, batch)
  try:
    state = tr.init_state(jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    host = {k: rng.randint(2, min(cfg.vocab_size, 32000), v.shape).astype(np.int32)
            for k, v in batch_spec(batch, args).items()}
    host['decoder_loss_weights'] = np.ones_like(host['decoder_loss_weights'])
    state, metrics = tr.train_step(state, data.make_global_batch(host, tr.batch_shardings(host)),
                                   jax.random.PRNGKey(1))
    jax.block_until_ready(metrics['loss'])
  finally:
    state = metrics = None
    del tr
    gc.collect()
    jax.clear_caches()


def search(cfg, args, limit: int, log=print) -> list:
  m = args.multiple
  start = max(m, args.start // m * m)
  t0 = time.perf_counter()
  peak = compiled_peak(cfg, args, start)
  log(f'batch {start}: compiler peak {peak / GiB:.2f} GiB ({time.perf_counter() - t0:.0f} s)')
  trials = []
  # Peak = fixed (parameters, optimizer state) + per example; the fixed part is what a batch
  # of `start` leaves after its share, estimated from a second, smaller compile.
  small = max(m, start // 2 // m * m)
  if small < start:
    per_example = (peak - compiled_peak(cfg, args, small)) / (start - small)
  else:
    per_example = peak / start
  fixed = peak - per_example * start
  guess = int((limit - fixed) / max(per_example, 1)) // m * m
  log(f'predicted: {fixed / GiB:.2f} GiB fixed + {per_example / 2 ** 20:.1f} MiB per example '
      f'-> batch {guess}')
  batch = max(m, min(guess, args.limit // m * m))
  for _ in range(args.max_runs):
    trial = Trial(batch)
    t0 = time.perf_counter()
    try:
      run_one_step(cfg, args, batch)
      trial.ran = True
    except Exception as e:  # an accelerator OOM surfaces as the runtime's error  # noqa: BLE001
      text = str(e)
      if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
        raise
      trial.error = text.splitlines()[0][:200]
    trial.seconds = time.perf_counter() - t0
    trials.append(trial)
    log(f"batch {batch}: {'ran' if trial.ran else 'out of memory'} ({trial.seconds:.0f} s)")
    if trial.ran or batch == m:
      break
    batch = max(m, int(batch * 0.85) // m * m)
  return trials


def main():
  args = parse()
  import jax
  cfg, _ = bench_setup.model_config(args)
  cfg = dataclasses.replace(cfg, remat_policy=args.remat)
  device = jax.devices()[0]
  limit = int(args.memory_gib * GiB) if args.memory_gib else device_memory_bytes(device)
  print(f'{args.model}, {args.optimizer}, {args.dtype} activations, remat {args.remat}, '
        f'{args.inputs}/{args.targets} tokens, {device.device_kind}, '
        f'{limit / GiB:.1f} GiB')
  trials = search(cfg, args, limit)
  ran = [t.batch for t in trials if t.ran]
  print(f'largest batch that ran: {max(ran) if ran else "none"}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'device': device.device_kind, 'limit_bytes': limit,
                 'largest_batch': max(ran) if ran else None,
                 'trials': [dataclasses.asdict(t) for t in trials]}, f, indent=1)


if __name__ == '__main__':
  main()
