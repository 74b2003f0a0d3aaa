"""Decode throughput: t5tpu's greedy and beam search vs transformers' `generate`.

  python benchmarks/decode_throughput.py --model t5_1_1/small --batch 8 --inputs 128 --new_tokens 32

Both sides decode the same T5 shape (random weights) from the same random inputs, in the same
process, on whatever device is there (CPU here; CUDA when a GPU is present). EOS is disabled
on both sides (t5tpu: an EOS id no token has; transformers: min_new_tokens = max_new_tokens),
so every sequence is exactly --new_tokens long and both do the same work. Prints new tokens
per second per decoding method (counted per example, not per beam) with t5tpu /
transformers ratios, and writes JSON with --json.
"""
from __future__ import annotations

import argparse
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
  p.add_argument('--new_tokens', type=int, default=32)
  p.add_argument('--beams', default='1,4', help='comma-separated: 1 is greedy decoding')
  p.add_argument('--repeats', type=int, default=3, help='timed decodes after warm-up')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--dtype', default='auto', help="activation dtype: float32, bfloat16, or "
                 "auto (bfloat16 on accelerators, float32 on CPU)")
  p.add_argument('--skip_hf', action='store_true')
  p.add_argument('--profile', default=None, metavar='DIR',
                 help='trace one more t5tpu decode per method into DIR (TensorBoard profile) '
                      'and print where its time goes')
  p.add_argument('--json', default=None, help='write results here')
  return p.parse_args()


def _median_seconds(fn, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_t5tpu(cfg, args, inputs, beams: int) -> float:
  import jax
  from t5tpu import decoding, layout as layout_lib, models, network, partitioning
  model = models.EncoderDecoderModel(module=network.Transformer(cfg))
  layout = layout_lib.ParamLayout.for_model(model, partitioning.PjitPartitioner())
  with layout.partitioner.context():
    params = jax.jit(lambda r: model.init_params(r, layout_lib.input_shapes(
        1, {'inputs': args.inputs, 'targets': args.new_tokens})),
        out_shardings=layout.shardings)(jax.random.PRNGKey(0))
  method = {'method': 'greedy'} if beams == 1 else {'method': 'beam', 'num_decodes': beams}
  predict = decoding.make_predict_fn(model, layout, max_decode_length=args.new_tokens,
                                     eos_id=-1, **method)  # -1: no token ends a sequence
  batch = {'encoder_input_tokens': inputs}
  batch = jax.device_put(batch, layout.batch_shardings(batch))
  rng = jax.random.PRNGKey(0)

  def run():
    tokens, _ = predict(params, batch, rng)
    jax.block_until_ready(tokens)
    assert tokens.shape[-1] == args.new_tokens
  seconds = _median_seconds(run, args.warmup, args.repeats)
  if args.profile:
    profile(run, predict.hlo_text(params, batch, rng), args, beams)
  return seconds


def profile(run, hlo_text: str, args, beams: int) -> None:
  """One more decode under the profiler, and where its time went (t5tpu/profiling.py); a
  failure is reported, not raised, so the timings still count."""
  import os
  from t5tpu import profiling
  name = 'greedy' if beams == 1 else f'beam{beams}'
  try:
    table = profiling.trace_calls(run, os.path.join(args.profile, name), 1, hlo_text,
                                  unit='decode')
    print(f'\nwhere t5tpu decoding ({name}) spends its time:\n{table}\n')
  except Exception as e:  # pylint: disable=broad-except
    print(f'profiling failed: {type(e).__name__}: {e}')


def hf_model(cfg):
  import torch
  model, device = bench_setup.hf_t5(cfg)
  dtype = torch.bfloat16 if cfg.dtype == 'bfloat16' else torch.float32
  return model.to(dtype=dtype).eval(), device


def bench_hf(model, device, args, inputs, beams: int) -> float:
  import torch
  ids = torch.tensor(inputs, dtype=torch.long, device=device)
  mask = (ids > 0).long()

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams,
                           do_sample=False, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens)
    if device == 'cuda':
      torch.cuda.synchronize()
    assert out.shape[-1] == args.new_tokens + 1  # + the decoder start token
  return _median_seconds(run, args.warmup, args.repeats)


def main():
  args = parse()
  import jax
  cfg, dtype = bench_setup.model_config(args)
  inputs = np.random.RandomState(0).randint(
      2, min(cfg.vocab_size, 32000), (args.batch, args.inputs)).astype(np.int32)
  beams = [int(b) for b in args.beams.split(',')]
  hf = None if args.skip_hf else hf_model(cfg)
  new_tokens = args.batch * args.new_tokens

  print(f'\n{args.model} ({dtype}, vocab {cfg.vocab_size}), batch {args.batch}, '
        f'{args.inputs} input tokens, {args.new_tokens} new tokens, '
        f'{jax.devices()[0].device_kind}; {bench_setup.malloc_setting()}')
  print(f"{'decoding':<12}{'t5tpu s':>10}{'tokens/s':>11}{'transformers s':>16}{'tokens/s':>11}"
        f"{'ratio':>8}")
  results = []
  for k in beams:
    name = 'greedy' if k == 1 else f'beam {k}'
    ours = bench_t5tpu(cfg, args, inputs, k)
    theirs = bench_hf(*hf, args, inputs, k) if hf else float('nan')
    ratio = theirs / ours
    print(f'{name:<12}{ours:>10.3f}{new_tokens / ours:>11.0f}{theirs:>16.3f}'
          f'{new_tokens / theirs:>11.0f}{ratio:>7.2f}x')
    results.append({'decoding': name, 'beams': k, 't5tpu_seconds': ours,
                    't5tpu_tokens_per_second': new_tokens / ours,
                    'transformers_seconds': theirs,
                    'transformers_tokens_per_second': new_tokens / theirs,
                    'ratio': ratio})
  print('ratio: t5tpu tokens/s / transformers tokens/s (same run, same machine)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'dtype': dtype, 'device': jax.devices()[0].device_kind,
                 'malloc': bench_setup.malloc_setting(),
                 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
