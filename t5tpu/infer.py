"""`t5tpu infer` / `python -m t5tpu.infer`: predictions (and scores) as JSONL.

Inputs come from a task split (MIXTURE_OR_TASK_NAME, INFER_SPLIT) or from a file
(INPUT_FILE: plain text, one input per line, or .jsonl with an `input` field and optionally a
`target` field). Output: INFER_OUTPUT_FILE, one JSON object per input, in input order:
{"input", "prediction"[, "score", "target", "target_score"]}.

Large inputs are processed in chunks written as `<output>.part-NNNNN`; a rerun skips the chunks
already written, and the parts are joined into the output file at the end, so an interrupted
run resumes instead of starting over.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from t5tpu import checkpoints as ckpt_lib
from t5tpu import data as data_lib
from t5tpu import decoding
from t5tpu import distributed
from t5tpu import errors
from t5tpu import eval as eval_lib
from t5tpu import evaluation
from t5tpu import models
from t5tpu import partitioning
from t5tpu import storage
from t5tpu.delta import base as delta_base

log = logging.getLogger('t5tpu.infer')


def read_file_examples(path: str, input_field: str = 'input',
                       target_field: str = 'target') -> Iterator[dict]:
  """{'input': str[, 'target': str]} per line of a .txt or .jsonl file (local or gs://)."""
  jsonl = path.endswith('.jsonl') or path.endswith('.json')
  with storage.open_file(path, 'r') as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      if not jsonl:
        yield {'input': line}
        continue
      row = json.loads(line)
      if input_field not in row:
        raise ValueError(f'{path}:{n}: no {input_field!r} field (fields: {sorted(row)}); '
                         'set INPUT_FIELD')
      example = {'input': row[input_field]}
      if target_field in row:
        example['target'] = row[target_field]
      yield example


def read_task_examples(cfg: data_lib.DatasetConfig) -> Iterator[dict]:
  """Text and token ids of a task split, in order."""
  task = data_lib.task_of(cfg)
  ds = task.get_dataset(cfg.task_feature_lengths, split=cfg.split, shuffle=False,
                        num_epochs=1, use_cached=cfg.use_cached, try_in_mem_cache=False)
  for ex in ds.as_numpy_iterator():
    text = lambda k: ex[k].decode() if isinstance(ex.get(k), bytes) else ex.get(k)
    out = {'input': text('inputs_pretokenized'), 'input_ids': list(ex['inputs'])}
    if 'targets' in ex:
      out['target'] = text('targets_pretokenized')
      out['target_ids'] = list(ex['targets'])
    yield out


def _bucket(n: int) -> int:
  """Pad lengths to powers of two (at least 16): few shapes, few compilations."""
  return max(16, 1 << (max(n, 1) - 1).bit_length())


def encode_batch(examples, vocab, max_input_length: Optional[int], decode_length: int):
  """Model features for a list of examples (token ids computed where missing)."""
  def ids(ex, key, text_key):
    if key in ex:
      return [int(t) for t in ex[key] if t != 0]
    return list(vocab.encode(ex[text_key])) + [decoding.EOS_ID]
  inputs = [ids(ex, 'input_ids', 'input') for ex in examples]
  length = max_input_length or _bucket(max(len(x) for x in inputs))
  enc = np.zeros((len(examples), length), np.int32)
  for i, x in enumerate(inputs):
    x = x[:length - 1] + [decoding.EOS_ID] if len(x) > length else x
    enc[i, :len(x)] = x
  batch = {'encoder_input_tokens': enc,
           'decoder_input_tokens': np.zeros((len(examples), decode_length), np.int32)}
  if all('target' in ex or 'target_ids' in ex for ex in examples):
    tgt = np.zeros((len(examples), decode_length), np.int32)
    for i, ex in enumerate(examples):
      t = ids(ex, 'target_ids', 'target')[:decode_length]
      tgt[i, :len(t)] = t
    batch['decoder_target_tokens'] = tgt
    batch['decoder_input_tokens'] = np.concatenate(
        [np.zeros((len(examples), 1), np.int32), tgt[:, :-1]], axis=1)
  return batch


def _pad_rows(batch, size):
  n = next(iter(batch.values())).shape[0]
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _decode_text(vocab, tokens) -> str:
  tokens = [int(t) for t in tokens]
  if decoding.EOS_ID in tokens:
    tokens = tokens[:tokens.index(decoding.EOS_ID)]
  return vocab.decode([t for t in tokens if t > 0])


def infer(*,
          model: models.EncoderDecoderModel,
          restore_checkpoint_cfg: ckpt_lib.RestoreCheckpointConfig,
          partitioner: partitioning.PjitPartitioner,
          output_file: str,
          dataset_cfg: Optional[data_lib.DatasetConfig] = None,
          input_file: Optional[str] = None,
          input_field: str = 'input',
          target_field: str = 'target',
          batch_size: int = 32,
          max_input_length: Optional[int] = None,
          max_decode_length: Optional[int] = None,
          score: bool = False,
          chunk_size: int = 1024,
          decode_kwargs: Optional[dict] = None) -> str:
  """Writes predictions for every input to output_file; returns its path."""
  if bool(input_file) == bool(dataset_cfg and dataset_cfg.mixture_or_task_name):
    raise ValueError('give exactly one source: INPUT_FILE, or MIXTURE_OR_TASK_NAME')
  lengths = (dataset_cfg.task_feature_lengths or {}) if dataset_cfg else {}
  decode_length = max_decode_length or lengths.get('targets')
  if not decode_length:
    raise ValueError('set MAX_DECODE_LENGTH (or TASK_FEATURE_LENGTHS with a targets length)')
  max_input_length = max_input_length or lengths.get('inputs')
  partitioner.check_batch_size(batch_size)

  if restore_checkpoint_cfg.mode == 'all':
    raise errors.UserError("infer reads one checkpoint: RestoreCheckpointConfig.mode 'all' is "
                           "for t5tpu eval; use 'specific', 'latest' or 'best'")
  path = eval_lib.checkpoints_to_evaluate(restore_checkpoint_cfg.path,
                                          restore_checkpoint_cfg.mode)[-1][1]
  model, layout, params = delta_base.load_for_inference(path, model, partitioner,
                                                        restore_checkpoint_cfg)
  predict = evaluation.decoding_fn(model, layout, decode_kwargs or {})
  score_fns = {}  # per batch shape, like the shardings

  examples = read_file_examples(input_file, input_field, target_field) if input_file \
      else read_task_examples(dataset_cfg)
  vocab = model.input_vocabulary
  parts = []
  chunk, index = [], 0
  shardings = {}

  def run_chunk(rows, part_path):
    lines = []
    for start in range(0, len(rows), batch_size):
      group = rows[start:start + batch_size]
      batch = _pad_rows(encode_batch(group, vocab, max_input_length, decode_length),
                        batch_size)
      key = tuple(sorted((k, v.shape) for k, v in batch.items()))
      shardings.setdefault(key, layout.batch_shardings(batch))
      gbatch = evaluation.global_batch_from_host(batch, shardings[key])
      tokens, pred_scores = jax.device_get(predict(params, gbatch, jax.random.PRNGKey(0)))
      target_scores = None
      if score and 'decoder_target_tokens' in batch:
        if key not in score_fns:
          score_fns[key] = evaluation.jit_score(model, layout, shardings[key])
        with layout.partitioner.context():
          target_scores = jax.device_get(score_fns[key](params, gbatch))
      for i, ex in enumerate(group):
        row = {'input': ex['input'], 'prediction': _decode_text(model.output_vocabulary,
                                                                tokens[i])}
        if score:
          row['score'] = float(pred_scores[i])
        if 'target' in ex:
          row['target'] = ex['target']
          if target_scores is not None:
            row['target_score'] = float(target_scores[i])
        lines.append(json.dumps(row, ensure_ascii=False))
    if distributed.is_primary():
      storage.write_text(part_path, '\n'.join(lines) + '\n')

  for ex in examples:
    chunk.append(ex)
    if len(chunk) == chunk_size:
      parts.append(_process(chunk, index, output_file, run_chunk))
      chunk, index = [], index + 1
  if chunk:
    parts.append(_process(chunk, index, output_file, run_chunk))
  if distributed.is_primary():
    text = ''.join(storage.read_text(p) for p in parts)
    storage.write_text(output_file, text)
    for p in parts:
      storage.remove_tree(p)
    log.info('wrote %d predictions to %s', text.count('\n'), output_file)
  return output_file


def _process(rows, index, output_file, run_chunk) -> str:
  part = f'{output_file}.part-{index:05d}'
  if storage.exists(part):
    log.info('%s already written; skipping its %d inputs', part, len(rows))
  else:
    run_chunk(rows, part)
  return part


MACRO_FLAGS = {
    '--checkpoint_path': ('CHECKPOINT_PATH', str),
    '--input_file': ('INPUT_FILE', str),
    '--output_file': ('INFER_OUTPUT_FILE', str),
    '--max_decode_length': ('MAX_DECODE_LENGTH', int),
    '--batch_size': ('BATCH_SIZE', int),
    '--score': ('SCORE', bool),
}


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  from t5tpu import gin_utils
  gin_utils.run_configured(infer, argv, 'Predict (and score) with a checkpoint, from a task '
                           'split or a file of inputs.', MACRO_FLAGS)


if __name__ == '__main__':
  from t5tpu import infer as _infer_module
  _infer_module.main(sys.argv[1:])
