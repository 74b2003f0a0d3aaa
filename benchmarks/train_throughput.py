"""Train-step throughput: t5tpu vs Hugging Face transformers (PyTorch) on the same workload.

  python benchmarks/train_throughput.py --model t5_1_1/small --batch 8 --inputs 128 --targets 32
  python benchmarks/train_throughput.py --vocab 512     # t5x's own CPU reference workload
  python benchmarks/train_throughput.py --packed        # + closed-book QA lengths, packed
  python benchmarks/train_throughput.py --profile /tmp/p  # + where the t5tpu step's time goes
  python benchmarks/train_throughput.py --dropout 0.1   # fine-tuning's dropout on both sides
  python benchmarks/train_throughput.py --variant attention_kernel=cudnn  # + a t5tpu row
                                        # with that network.T5Config field changed (GPU)

Both sides train the same T5 shape on the same random token batches with each optimizer
(Adafactor: t5x defaults on our side, transformers' Adafactor with a fixed learning rate on
theirs; AdamW: optax's and torch's), in the same process, on whatever device is there (CPU here; CUDA when a GPU is present). Prints a
table of step time, tokens/s and MFU, with t5tpu / transformers ratios, and writes JSON.
MFU = model FLOPs (6 x multiply-accumulates, anchors.md) / step time / peak FLOP/s; on CPU the
"peak" is the measured float32 matmul throughput of this machine.

--packed adds a second table on real lengths: the built-in closed-book QA task (knowledge_qa's
train split, questions ~10 tokens, answers 1-3, as TriviaQA's are short against t5x's 128/32)
packed by seqio into --batch rows of --inputs/--targets, as t5tpu trains it; transformers gets
exactly the examples of each packed batch, padded to the batch's longest (its usual dynamic
padding). Same examples and real tokens per step on both sides, so the ratio of real
(non-padding) tokens/s is the ratio of step times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import bench_setup  # also puts the repository on sys.path


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='t5_1_1/small', help='a gin/models name')
  p.add_argument('--vocab', type=int, default=None,
                 help="vocabulary size (default: the model gin's, 32128)")
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--inputs', type=int, default=128)
  p.add_argument('--targets', type=int, default=32)
  p.add_argument('--steps', type=int, default=5, help='timed steps after warm-up')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='auto', help="activation dtype: float32, bfloat16, or "
                 "auto (bfloat16 on accelerators, float32 on CPU)")
  p.add_argument('--optimizer', default='both', choices=['adafactor', 'adamw', 'both'],
                 help='the same optimizer on both sides (transformers: its Adafactor, or '
                 'torch AdamW, fused where supported); both: one row pair each')
  p.add_argument('--dropout', type=float, default=0.0,
                 help="dropout rate on both sides (0.1 is t5x's and transformers' fine-tuning "
                      'default); each applies it where its T5 does')
  p.add_argument('--variant', action='append', default=[], metavar='FIELD=VALUE[,...]',
                 help='one more t5tpu row with these network.T5Config fields changed (e.g. '
                 'attention_kernel=cudnn, float32_attention_logits=False); repeatable; a row '
                 'that fails is reported and the others still run')
  p.add_argument('--skip_hf', action='store_true')
  p.add_argument('--torch_compile', action='store_true',
                 help='also a row of transformers under torch.compile')
  p.add_argument('--packed', action='store_true',
                 help='also the packed closed-book QA table (real tokens/s)')
  p.add_argument('--profile', default=None, metavar='DIR',
                 help='trace --steps more t5tpu steps into DIR (TensorBoard profile) and print '
                      'where their time goes')
  p.add_argument('--json', default=None, help='write results here')
  return p.parse_args()


def variant_config(cfg, spec: str):
  """`cfg` with the fields of 'field=value,field=value' replaced (values as Python literals,
  else strings)."""
  import ast
  changes = {}
  for item in spec.split(','):
    field, sep, value = item.partition('=')
    if not sep or field.strip() not in {f.name for f in dataclasses.fields(cfg)}:
      raise SystemExit(f'--variant {spec!r}: give network.T5Config fields as field=value')
    try:
      changes[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      changes[field.strip()] = value.strip()
  return dataclasses.replace(cfg, **changes)


def random_batch(rng, batch, inputs, targets, vocab):
  enc = rng.randint(2, vocab, (batch, inputs)).astype(np.int32)
  tgt = rng.randint(2, vocab, (batch, targets)).astype(np.int32)
  dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt, np.float32)}


def packed_batches(args, count: int):
  """`count` seqio-packed batches of knowledge_qa's train split, and the same examples of each
  as an unpacked batch padded to its longest (decoder inputs shifted per example)."""
  import seqio
  from tasks import knowledge  # registers knowledge_qa
  if args.vocab and args.vocab < knowledge.VOCAB_SIZE:
    raise SystemExit(f'--packed: knowledge_qa has {knowledge.VOCAB_SIZE} pieces; give '
                     f'--vocab {knowledge.VOCAB_SIZE} or more')
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  ds = seqio.get_mixture_or_task('knowledge_qa').get_dataset(lengths, split='train',
                                                               shuffle=False)
  ds = seqio.EncDecFeatureConverter(pack=True)(ds, lengths).batch(args.batch, drop_remainder=True)
  packed = [{k: np.asarray(v) for k, v in b.items()} for b in ds.take(count).as_numpy_iterator()]
  return packed, [unpack(b) for b in packed]


def unpack(b):
  """The examples of a packed batch, padded to the longest of them."""
  pairs = []
  for row in range(b['encoder_input_tokens'].shape[0]):
    for seg in np.unique(b['encoder_segment_ids'][row]):
      if seg == 0:
        continue
      pairs.append((b['encoder_input_tokens'][row][b['encoder_segment_ids'][row] == seg],
                    b['decoder_target_tokens'][row][b['decoder_segment_ids'][row] == seg]))
  ti, to = max(len(i) for i, _ in pairs), max(len(t) for _, t in pairs)
  enc = np.zeros((len(pairs), ti), np.int32)
  tgt = np.zeros((len(pairs), to), np.int32)
  for n, (i, t) in enumerate(pairs):
    enc[n, :len(i)], tgt[n, :len(t)] = i, t
  dec = np.concatenate([np.zeros((len(pairs), 1), np.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.float32)}


def real_tokens(b) -> int:
  return int((b['encoder_input_tokens'] > 0).sum() + (b['decoder_target_tokens'] > 0).sum())


def bench_t5tpu(cfg, args, batches, optimizer: str, profile: bool = True):
  import jax
  from t5tpu import data, models, network, optimizers, partitioning, trainer
  opt = optimizers.Adafactor() if optimizer == 'adafactor' else optimizers.AdamW(
      max_grad_norm=None)
  model = models.EncoderDecoderModel(module=network.Transformer(cfg), optimizer_def=opt)
  part = partitioning.PjitPartitioner()
  shapes = {'encoder_input_tokens': (args.batch, args.inputs),
            'decoder_input_tokens': (args.batch, args.targets)}
  tr = trainer.Trainer(model, part, optimizers.create_learning_rate_scheduler(), None, shapes)
  state = tr.init_state(jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(1)
  dev = [data.make_global_batch(b, tr.batch_shardings(b)) for b in batches]
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = tr.train_step(state, dev[i % len(dev)], rng)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - t0)
  # Per-token cross entropy, comparable with transformers' mean loss.
  loss = float(metrics['cross_ent_sum'] / metrics['weight_sum'])
  if args.profile and profile:
    profile_t5tpu(tr, state, dev, rng, args, optimizer)
  return times[args.warmup:], loss


def profile_t5tpu(tr, state, batches, rng, args, optimizer: str):
  """Traces --steps more steps and prints where their time went (t5tpu/profiling.py); a
  failure is reported, not raised, so the timings above still count."""
  import os
  import jax
  from t5tpu import profiling
  live = {'state': state, 'step': 0}

  def step():
    live['state'], metrics = tr.train_step(live['state'],
                                           batches[live['step'] % len(batches)], rng)
    live['step'] += 1
    jax.block_until_ready(metrics)
  try:
    hlo_text = tr.train_step_hlo(state, batches[0], rng)
    table = profiling.trace_calls(step, os.path.join(args.profile, optimizer), args.steps,
                                  hlo_text, module='train_step', unit='step')
    print(f'\nwhere the t5tpu step ({optimizer}) spends its time:\n{table}\n')
  except Exception as e:  # pylint: disable=broad-except
    print(f'profiling failed: {type(e).__name__}: {e}')


def bench_hf(cfg, args, batches, optimizer: str, compile_model: bool = False):
  import torch
  from transformers.optimization import Adafactor
  model, device = bench_setup.hf_t5(cfg)
  model = model.train()
  if optimizer == 'adafactor':
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True,
                    warmup_init=False, clip_threshold=1.0, decay_rate=-0.8)
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
  autocast = cfg.dtype == 'bfloat16'
  if compile_model:
    model = torch.compile(model)
  tb = [{k: torch.tensor(v).to(device) for k, v in b.items()} for b in batches]
  times = []
  for i in range(args.warmup + args.steps):
    b = tb[i % len(tb)]
    t0 = time.perf_counter()
    labels = b['decoder_target_tokens'].long()
    labels = labels.masked_fill(b['decoder_loss_weights'] == 0, -100)  # padding: no loss
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      out = model(input_ids=b['encoder_input_tokens'].long(),
                  attention_mask=(b['encoder_input_tokens'] > 0).long(),
                  decoder_input_ids=b['decoder_input_tokens'].long(), labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = float(out.loss.detach())
    if device == 'cuda':
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  return times[args.warmup:], loss


def release_torch_memory():
  """Gives the GPU memory PyTorch has cached (and torch.compile's graphs) back to the device."""
  import gc
  import sys
  if 'torch' not in sys.modules:
    return
  import torch
  torch._dynamo.reset()
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def main():
  args = parse()
  import jax
  from t5tpu import trainer
  cfg, dtype = bench_setup.model_config(args)
  variants = {spec: variant_config(cfg, spec) for spec in args.variant}  # bad specs: now
  rng = np.random.RandomState(0)
  batches = [random_batch(rng, args.batch, args.inputs, args.targets,
                          min(cfg.vocab_size, 32000)) for _ in range(2)]
  dev = jax.devices()[0]
  peak = trainer.peak_flops_per_device(dev.device_kind, dev.platform)
  flops = trainer.train_flops_per_example(cfg, args.inputs, args.targets) * args.batch
  tokens = args.batch * (args.inputs + args.targets)
  opt_names = ['adafactor', 'adamw'] if args.optimizer == 'both' else [args.optimizer]

  rows = []  # (optimizer, system, step seconds, first loss)

  def measured(opt, name, t, loss):  # each row as it comes: a cut-short run keeps the rest
    rows.append((opt, name, float(np.median(t)), loss))
    print(f'{opt} {name}: {rows[-1][2]:.4f} s per step', flush=True)

  # transformers first: its memory can be handed back, JAX's pool only grows (on a GPU the
  # other order ran transformers out of memory beside t5tpu's pool).
  for opt in opt_names:
    for compiled in ([] if args.skip_hf else [False] + [True] * args.torch_compile):
      name = 'transformers + compile' if compiled else 'transformers (eager)'
      try:
        measured(opt, name, *bench_hf(cfg, args, batches, opt, compiled))
      except Exception as e:  # noqa: BLE001  torch.compile's failures are its own; say so
        if not compiled:
          raise
        print(f'{opt} {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})')
  release_torch_memory()
  for opt in opt_names:
    measured(opt, 't5tpu (jax)', *bench_t5tpu(cfg, args, batches, opt))
    for spec in args.variant:
      try:
        measured(opt, f't5tpu {spec}',
                 *bench_t5tpu(variants[spec], args, batches, opt, profile=False))
      except Exception as e:  # noqa: BLE001  a variant's failure (e.g. no cuDNN) is reported
        print(f'{opt} t5tpu {spec}: failed ({type(e).__name__}: '
              f'{str(e).splitlines()[0][:300]})')
  order = ['t5tpu (jax)'] + [f't5tpu {s}' for s in args.variant] + [
      'transformers (eager)', 'transformers + compile']
  rows.sort(key=lambda r: (opt_names.index(r[0]), order.index(r[1])))
  print(f'\n{args.model} ({dtype}, vocab {cfg.vocab_size}, dropout {cfg.dropout_rate}), '
        f'batch {args.batch}, '
        f'{args.inputs}/{args.targets} tokens, '
        f'{dev.device_kind}; {flops / args.batch / 1e9:.2f} GFLOP per example; '
        f'peak {peak / 1e12:.2f} TFLOP/s; {bench_setup.malloc_setting()}')
  width = max([26] + [len(r[1]) + 2 for r in rows])
  print(f"{'optimizer':<11}{'system':<{width}}{'step s':>9}{'tokens/s':>10}{'MFU':>8}"
        f"{'loss/token':>11}{'ratio':>8}")
  results = []
  for opt, name, step, loss in rows:
    mfu = flops / step / peak if peak else float('nan')
    ours = [r[2] for r in rows if r[0] == opt and r[1] == 't5tpu (jax)'][0]
    ratio = step / ours  # t5tpu tokens/s over this row's
    print(f'{opt:<11}{name:<{width}}{step:>9.3f}{tokens / step:>10.0f}{mfu:>8.1%}{loss:>11.3f}'
          f'{ratio:>7.2f}x')
    results.append({'optimizer': opt, 'system': name, 'step_seconds': step,
                    'tokens_per_second': tokens / step, 'mfu': mfu, 'first_loss': loss,
                    't5tpu_over_this': ratio})
  print('ratio: t5tpu tokens/s over the row\'s (same run, same machine; > 1: t5tpu faster)')
  packed = packed_table(cfg, args, opt_names) if args.packed else []
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'dtype': dtype, 'device': dev.device_kind,
                 'malloc': bench_setup.malloc_setting(),
                 'results': results, 'packed': packed}, f, indent=1)


def packed_table(cfg, args, opt_names):
  """Real tokens/s on knowledge_qa: t5tpu on packed rows, transformers on the same examples
  padded per batch."""
  n = args.warmup + args.steps
  packed, padded = packed_batches(args, n)
  # Real tokens of the timed steps, the same on both sides (the batches repeat as in main).
  tokens = sum(real_tokens(packed[i % n]) for i in range(args.warmup, n))
  examples = np.mean([b['encoder_input_tokens'].shape[0] for b in padded])
  rows = []
  for opt in ([] if args.skip_hf else opt_names):  # transformers first, as in main
    t, _ = bench_hf(cfg, args, padded, opt)
    rows.append((opt, 'transformers, padded', sum(t)))
  release_torch_memory()
  for opt in opt_names:
    t, _ = bench_t5tpu(cfg, args, packed, opt, profile=False)  # profiled once, above
    rows.append((opt, 't5tpu (jax), packed', sum(t)))
  rows.sort(key=lambda r: (opt_names.index(r[0]), not r[1].startswith('t5tpu')))
  fill = tokens / ((args.steps) * args.batch * (args.inputs + args.targets))
  print(f'\npacked: knowledge_qa train split, {examples:.0f} examples per step '
        f'({args.batch} rows of {args.inputs}/{args.targets}, {fill:.0%} of their tokens '
        'real); transformers gets the same examples padded to each batch\'s longest')
  print(f"{'optimizer':<11}{'system':<26}{'step s':>9}{'real tok/s':>12}{'ratio':>8}")
  results = []
  for opt, name, seconds in rows:
    ours = [r[2] for r in rows if r[0] == opt and r[1].startswith('t5tpu')][0]
    print(f'{opt:<11}{name:<26}{seconds / args.steps:>9.3f}{tokens / seconds:>12.0f}'
          f'{seconds / ours:>7.2f}x')
    results.append({'optimizer': opt, 'system': name, 'step_seconds': seconds / args.steps,
                    'real_tokens_per_second': tokens / seconds,
                    'examples_per_step': float(examples), 't5tpu_over_this': seconds / ours})
  return results


if __name__ == '__main__':
  main()
