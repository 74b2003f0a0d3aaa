"""Inference evaluation during training vs `t5tpu infer`: seconds per example, same model.

  python benchmarks/eval_vs_infer.py --model t5_1_1/small --batch 16 --examples 64

One randomly initialised model (vocabulary: the built-in closed-book QA task's, 512 pieces) is
saved as a checkpoint; then the first N and 2N questions of knowledge_qa's validation split
(~10 tokens each, in t5x's 128/32 closed-book QA lengths) are decoded greedily
  - by training's InferenceEvaluator (seqio.Evaluator: the task's pipeline, postprocessing,
    metrics, the JSONL and TensorBoard logs), as every EVAL_PERIOD does, and
  - by `t5tpu infer`'s infer() on a JSONL file of the same questions (reading the checkpoint,
    writing predictions).
Seconds per example are the marginal cost, (time(2N) - time(N)) / N, so what is paid once
(compiling, restoring the checkpoint, building the pipeline) cancels out and the rows compare
the per-example work (each side runs once first, untimed, for the process's first-use costs;
then the best of --repeats runs of each size counts). Both sides decode the same tokens (the predictions are checked equal).
Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import bench_setup  # also puts the repository on sys.path


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='t5_1_1/small', help='a gin/models name')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--examples', type=int, default=64, help='N: runs decode N and 2N examples')
  p.add_argument('--inputs', type=int, default=128)
  p.add_argument('--targets', type=int, default=32)
  p.add_argument('--dtype', default='auto', help="activation dtype: float32, bfloat16, or "
                 "auto (bfloat16 on accelerators, float32 on CPU)")
  p.add_argument('--repeats', type=int, default=3, help='timed runs per size (the best counts)')
  p.add_argument('--json', default=None, help='write results here')
  return p.parse_args()


def setup(args, work: str):
  """(model, partitioner, checkpoint path) of a random model saved in `work`."""
  import jax
  from t5tpu import checkpoints, models, network, optimizers, partitioning, trainer
  from tasks import knowledge
  args.vocab = knowledge.VOCAB_SIZE
  cfg, _ = bench_setup.model_config(args)
  vocab = knowledge.vocabulary()
  model = models.EncoderDecoderModel(module=network.Transformer(cfg), input_vocabulary=vocab,
                                     output_vocabulary=vocab, optimizer_def=optimizers.Adafactor())
  part = partitioning.PjitPartitioner()
  tr = trainer.Trainer(model, part, optimizers.create_learning_rate_scheduler())
  state = tr.init_state(jax.random.PRNGKey(0))
  ckpt = checkpoints.Checkpointer(os.path.join(work, 'model'), checkpoints.SaveCheckpointConfig())
  ckpt.save(state)
  ckpt.close()
  return model, part, checkpoints.step_dir(os.path.join(work, 'model'), 0)


def time_evaluator(model, part, path, args, n: int, work: str):
  from t5tpu import checkpoints, data, evaluation
  from t5tpu.delta import base as delta_base
  cfg = data.DatasetConfig('knowledge_qa', {'inputs': args.inputs, 'targets': args.targets},
                           split='validation', batch_size=args.batch, shuffle=False)
  t0 = time.perf_counter()
  model, layout, params = delta_base.load_for_inference(
      path, model, part, checkpoints.RestoreCheckpointConfig(path=path))
  ev = evaluation.InferenceEvaluator(model, layout, cfg, os.path.join(work, f'eval{n}'),
                                     num_examples=n)
  ev.evaluate(params, step=0)
  seconds = time.perf_counter() - t0
  rows = [json.loads(l) for l in open(os.path.join(work, f'eval{n}', 'inference_eval',
                                                   'knowledge_qa-000000.jsonl'))]
  return seconds, [r['prediction'] for r in rows]


def time_infer(model, part, path, args, n: int, work: str):
  from t5tpu import checkpoints, infer
  from tasks import knowledge
  questions = knowledge.examples('validation')[:n]
  os.makedirs(work, exist_ok=True)
  src = os.path.join(work, f'in{n}.jsonl')
  with open(src, 'w') as f:
    for ex in questions:
      f.write(json.dumps({'input': ex['inputs'], 'target': ex['targets']}) + '\n')
  out = os.path.join(work, f'out{n}.jsonl')
  t0 = time.perf_counter()
  infer.infer(model=model, partitioner=part, output_file=out, input_file=src,
              restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=path),
              batch_size=args.batch, max_input_length=args.inputs,
              max_decode_length=args.targets)
  seconds = time.perf_counter() - t0
  return seconds, [json.loads(l)['prediction'] for l in open(out)]


def best_of(repeats: int, run):
  """(the least seconds, the predictions) of `repeats` calls run(i)."""
  results = [run(i) for i in range(repeats)]
  return min(r[0] for r in results), results[-1][1]


def main():
  args = parse()
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as work:
    model, part, path = setup(args, work)
    n = args.examples
    for name, fn in [('inference eval (training)', time_evaluator),
                     ('t5tpu infer', time_infer)]:
      fn(model, part, path, args, n, work + '/warm')  # the process's first-use costs
      # The best of --repeats for each size: one slow run (the machine is shared) would
      # otherwise swing the difference of two times.
      t1, p1 = best_of(args.repeats, lambda i: fn(model, part, path, args, n, f'{work}/n{i}'))
      t2, p2 = best_of(args.repeats,
                       lambda i: fn(model, part, path, args, 2 * n, f'{work}/2n{i}'))
      assert p2[:n] == p1, f'{name}: the first {n} predictions changed with more examples'
      rows.append(dict(system=name, seconds_n=t1, seconds_2n=t2,
                       per_example=(t2 - t1) / n, predictions=p2))
  same = rows[0]['predictions'] == rows[1]['predictions']
  print(f'\n{args.model} ({bench_setup.model_config(args)[1]}), knowledge_qa validation, '
        f'batch {args.batch}, {args.inputs}/{args.targets} tokens, greedy, '
        f'{jax.devices()[0].device_kind}; N = {n}; same predictions: {same}')
  print(f"{'system':<28}{'N s':>8}{'2N s':>8}{'ms/example':>12}{'ratio':>8}")
  infer_cost = rows[1]['per_example']
  for r in rows:
    r['infer_over_this'] = infer_cost / r['per_example']
    print(f"{r['system']:<28}{r['seconds_n']:>8.2f}{r['seconds_2n']:>8.2f}"
          f"{r['per_example'] * 1e3:>12.1f}{r['infer_over_this']:>7.2f}x")
  print('ms/example: (time(2N) - time(N)) / N; ratio: infer\'s ms/example over the row\'s '
        '(> 1: faster than infer)')
  if not same:
    raise SystemExit('the two paths decoded different tokens')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'results': [
          {k: v for k, v in r.items() if k != 'predictions'} for r in rows]}, f, indent=1)


if __name__ == '__main__':
  main()
