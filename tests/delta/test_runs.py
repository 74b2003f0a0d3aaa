"""Delta runs end to end: delta-only checkpoints, exact resume, the base check, eval/infer."""
import json
import os

import jax
import pytest

from t5tpu import checkpoints, data, errors, eval as eval_lib, infer, partitioning
from t5tpu.delta import base as delta_base
from tests.delta import common


@pytest.fixture(scope='module')
def base_ckpt(tmp_path_factory, copy_task):
  return common.train_base(tmp_path_factory.mktemp('base') / 'run', copy_task)


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize('name', ['lora', 'prompt'])
def test_resume_is_bit_identical(name, base_ckpt, tmp_path, copy_task):
  cfg = common.METHODS[name]
  pack = name != 'prompt'
  straight = common.run_delta(cfg, base_ckpt, tmp_path / 'straight', copy_task, 8, pack=pack)
  common.run_delta(cfg, base_ckpt, tmp_path / 'split', copy_task, 4, pack=pack)
  resumed = common.run_delta(cfg, base_ckpt, tmp_path / 'split', copy_task, 8, pack=pack)
  assert common.tree_equal(straight.params, resumed.params)
  assert common.tree_equal(straight.opt_state, resumed.opt_state)


def test_lora_checkpoint_is_small_and_records_its_base(base_ckpt, tmp_path, copy_task):
  model_dir = tmp_path / 'lora'
  common.run_delta(common.METHODS['lora'], base_ckpt, model_dir, copy_task, 4)
  # The state item (parameters + optimizer state; the input snapshot beside it is the same
  # for both kinds of run).
  delta_bytes = _dir_bytes(os.path.join(checkpoints.step_dir(str(model_dir), 4), 'state'))
  full_bytes = _dir_bytes(os.path.join(base_ckpt, 'state'))
  print(f'LoRA checkpoint state {delta_bytes:,} bytes vs full fine-tuning {full_bytes:,} bytes')
  assert delta_bytes < full_bytes / 3
  names = checkpoints.param_shapes(checkpoints.step_dir(str(model_dir), 4))
  assert names and all(k.endswith(('lora_a', 'lora_b')) for k in names)
  record = json.loads((model_dir / 'delta.json').read_text())
  assert record['path'] == str(base_ckpt) and record['methods'] == 'lora'
  info = (model_dir / 'model-info.txt').read_text()
  assert 'trainable parameters: ' in info and 'frozen parameters: ' in info


def test_another_base_is_refused(base_ckpt, tmp_path, copy_task):
  model_dir = tmp_path / 'lora'
  common.run_delta(common.METHODS['lora'], base_ckpt, model_dir, copy_task, 4)
  other = common.train_base(tmp_path / 'other_base', copy_task, steps=2)
  with pytest.raises(delta_base.BaseMismatchError, match='trained on the base'):
    common.run_delta(common.METHODS['lora'], other, model_dir, copy_task, 8)


def test_prompt_with_packing_is_refused(base_ckpt, tmp_path, copy_task):
  with pytest.raises(errors.UserError, match='pack = False'):
    common.run_delta(common.METHODS['prompt'], base_ckpt, tmp_path / 'p', copy_task, 2,
                     pack=True)
  assert not (tmp_path / 'p' / 'checkpoint_2').exists()


@pytest.mark.parametrize('name', ['lora', 'prefix'])
def test_eval_and_infer_take_base_plus_delta(name, base_ckpt, tmp_path, copy_task):
  cfg = common.METHODS[name]
  model_dir = tmp_path / name
  state = common.run_delta(cfg, base_ckpt, model_dir, copy_task, 6)
  eval_cfg = data.DatasetConfig(copy_task, None, split='validation', batch_size=8,
                                shuffle=False, pack=False, num_epochs=1)
  results = eval_lib.evaluate(
      model=common.model(cfg), dataset_cfg=eval_cfg,
      restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=str(model_dir),
                                                                 mode='latest'),
      partitioner=partitioning.PjitPartitioner(), output_dir=str(tmp_path / 'eval'))
  assert 'exact_match' in results[6][copy_task]
  out = tmp_path / 'pred.jsonl'
  src = tmp_path / 'in.txt'
  src.write_text('copy abc\ncopy hh\n')
  infer.infer(model=common.model(cfg),
              restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=str(model_dir),
                                                                         mode='latest'),
              partitioner=partitioning.PjitPartitioner(), output_file=str(out),
              input_file=str(src), batch_size=8, max_decode_length=8)
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r['input'] for r in rows] == ['copy abc', 'copy hh']
  # The prediction equals greedy decoding of base + delta as trained (prefix: folded).
  from t5tpu import decoding, delta
  trainer_model = common.model(cfg)
  base = jax.device_get(__import__('t5tpu.initial_checkpoint', fromlist=['x']).read_state_dict(
      base_ckpt)['target'])
  params = delta.merge(jax.device_get(state.params), base)
  batch = infer.encode_batch([{'input': 'copy abc'}], trainer_model.input_vocabulary, None, 8)
  tokens = decoding.predict(trainer_model, params, batch, method='greedy')
  assert rows[0]['prediction'] == infer._decode_text(trainer_model.output_vocabulary, tokens[0])
