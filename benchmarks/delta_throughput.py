"""Delta tuning vs full fine-tuning: train-step time, tokens/s and memory, in one run.

  python benchmarks/delta_throughput.py --model t5_1_1/small --batch 8 --inputs 128 --targets 32

Every method trains the same T5 shape on the same random batches with Adafactor, on whatever
device is there (CPU here; the same command on a GPU or TPU). Memory is XLA's own account of
the compiled step (arguments: parameters, optimizer state and batch; temporaries:
activations and gradients), so it is comparable across methods on one device. Prints a table
with ratios against full fine-tuning measured in the same run, and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from train_throughput import random_batch  # the same random batches (this folder)

METHODS = ('ft', 'lora', 'adapter', 'prefix', 'prompt', 'bitfit')


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='t5_1_1/small', help='a gin/models name')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--inputs', type=int, default=128)
  p.add_argument('--targets', type=int, default=32)
  p.add_argument('--steps', type=int, default=5, help='timed steps after warm-up')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='auto', help="activations: float32, bfloat16, or auto "
                 "(bfloat16 on accelerators, float32 on CPU)")
  p.add_argument('--base_dtype', default='float32', help="the frozen base's dtype")
  p.add_argument('--json', default=None)
  return p.parse_args()


def delta_config(method: str, base_dtype: str):
  from t5tpu import delta
  kinds = {'lora': dict(lora=delta.LoRA()), 'adapter': dict(adapter=delta.Adapter()),
           'prefix': dict(prefix=delta.Prefix()), 'prompt': dict(prompt=delta.Prompt()),
           'bitfit': dict(bitfit=delta.BitFit())}
  return None if method == 'ft' else delta.DeltaConfig(base_dtype=base_dtype, **kinds[method])


def bench(method: str, cfg, args, batches) -> dict:
  import jax
  from t5tpu import data, layout, models, network, optimizers, partitioning, trainer
  dc = delta_config(method, args.base_dtype)
  opt = optimizers.Adafactor(multiply_by_parameter_scale=dc is None)
  model = models.EncoderDecoderModel(module=network.Transformer(dataclasses.replace(
      cfg, delta=dc)), optimizer_def=opt)
  tr = trainer.Trainer(model, partitioning.PjitPartitioner(devices=jax.devices()[:1]),
                       lambda step: 1e-3, None,
                       layout.input_shapes(args.batch, {'inputs': args.inputs,
                                                        'targets': args.targets}))
  state = tr.init_state(jax.random.PRNGKey(0))
  if dc is not None:
    tr.set_frozen(tr.init_frozen(jax.random.PRNGKey(0)))
  device_batches = [data.make_global_batch(b, tr.batch_shardings(b)) for b in batches]
  step = tr.compile_train_step(batches[0])
  with tr.partitioner.context():
    compiled = step.lower(state, tr.frozen, device_batches[0], jax.random.PRNGKey(1)).compile()
  mem = compiled.memory_analysis()
  rng = jax.random.PRNGKey(1)

  def run(n, state):
    with tr.partitioner.context():
      for i in range(n):
        state, metrics = compiled(state, tr.frozen, device_batches[i % len(batches)], rng)
    return jax.block_until_ready((state, metrics))

  state, _ = run(args.warmup, state)
  t0 = time.perf_counter()
  state, metrics = run(args.steps, state)
  seconds = (time.perf_counter() - t0) / args.steps
  trainable = tr.trainable_layout.num_values()
  return {'method': method, 'step_seconds': seconds,
          'tokens_per_second': args.batch * (args.inputs + args.targets) / seconds,
          'trainable': trainable, 'total': tr.params_layout.num_values(),
          'argument_bytes': int(getattr(mem, 'argument_size_in_bytes', 0) or 0),
          'temp_bytes': int(getattr(mem, 'temp_size_in_bytes', 0) or 0),
          'loss': float(metrics['loss'])}


def main():
  args = parse()
  import jax
  from t5tpu import model_shapes
  dtype = args.dtype
  if dtype == 'auto':
    dtype = 'float32' if jax.devices()[0].platform == 'cpu' else 'bfloat16'
  cfg = dataclasses.replace(model_shapes.named_configs()[args.model], dtype=dtype,
                            dropout_rate=0.0)
  rng = np.random.RandomState(0)
  batches = [random_batch(rng, args.batch, args.inputs, args.targets, cfg.vocab_size)
             for _ in range(2)]
  rows = [bench(m, cfg, args, batches) for m in args.methods.split(',')]
  ft = next((r for r in rows if r['method'] == 'ft'), rows[0])
  gib = 2 ** 30
  print(f'\n{args.model}, batch {args.batch}, {args.inputs}/{args.targets} tokens, {dtype} '
        f'activations, base {args.base_dtype}, on {jax.devices()[0].device_kind}')
  print(f'| method | trainable | step s | tokens/s | vs {ft["method"]} | arguments GiB | '
        'temporaries GiB | memory vs ft |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    memory = r['argument_bytes'] + r['temp_bytes']
    ft_memory = ft['argument_bytes'] + ft['temp_bytes']
    print(f"| {r['method']} | {r['trainable'] / 1e6:.3f}M ({100 * r['trainable'] / r['total']:.3g}%)"
          f" | {r['step_seconds']:.3f} | {r['tokens_per_second']:.0f} | "
          f"{r['tokens_per_second'] / ft['tokens_per_second']:.2f}x | "
          f"{r['argument_bytes'] / gib:.3f} | {r['temp_bytes'] / gib:.3f} | "
          f"{memory / max(ft_memory, 1):.2f}x |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch, 'inputs': args.inputs,
                 'targets': args.targets, 'dtype': dtype, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
