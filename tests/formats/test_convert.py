"""`t5tpu convert` end to end: t5x fixture -> Hugging Face -> legacy T5X -> orbax."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from t5tpu import errors, initial_checkpoint
from t5tpu.formats import convert, flatten, model_param_shapes, t5x_legacy, t5x_orbax
from tests.formats import common

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


@pytest.fixture(scope='module')
def fixture_state():
  return t5x_legacy.read(common.fixture_path())


def test_cli_fixture_to_hf_gives_the_same_logits(tmp_path, fixture_state):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  out = tmp_path / 'hf'
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(ROOT), 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, '-m', 't5tpu.cli', 'convert',
                        f'--from={common.fixture_path()}', f'--to={out}', '--to_format=hf'],
                       env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 't5_1_1/tiny' in run.stdout and '(hf, step 0)' in run.stdout
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
  cfg = common.named('t5_1_1/tiny', dtype='float32', dropout_rate=0.0)
  enc, dec_in, targets = common.padded_batch(32128, seed=2)
  ours = common.logits(cfg, fixture_state['target'], enc, dec_in, targets)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  diff = float(np.abs(ours - theirs)[targets > 0].max())
  print(f'fixture: max |logit difference| t5tpu vs exported HF: {diff:.2e}')
  assert diff < 1e-4


def test_hf_to_t5x_to_orbax(tmp_path, fixture_state):
  from t5tpu.formats import hf
  cfg = common.named('t5_1_1/tiny')
  hf.write(str(tmp_path / 'hf'), fixture_state['target'], cfg)

  convert.main([f'--from={tmp_path / "hf"}', f'--to={tmp_path / "t5x"}',
                '--to_format=t5x_legacy'])
  legacy = t5x_legacy.read(str(tmp_path / 't5x' / 'checkpoint_0'))
  common.assert_trees_equal(legacy['target'], fixture_state['target'])
  # no optimizer state in HF: t5x's zero Adafactor state, shaped as the fixture's
  shapes = lambda tree: {k: np.shape(v) for k, v in flatten(tree).items()}
  assert shapes(legacy['state']['param_states']) == shapes(
      fixture_state['state']['param_states'])

  # a MODEL_DIR as --from: its latest checkpoint; bfloat16 parameters out
  convert.main([f'--from={tmp_path / "t5x"}', f'--to={tmp_path / "run"}', '--to_format=orbax',
                '--dtype=bfloat16', '--params_only'])
  orbax_state = t5x_orbax.read(str(tmp_path / 'run' / 'checkpoint_0'))
  assert 'param_states' not in orbax_state['state']
  emb = orbax_state['target']['token_embedder']['embedding']
  assert str(emb.dtype) == 'bfloat16'
  assert np.array_equal(emb, fixture_state['target']['token_embedder']['embedding'].astype(
      emb.dtype))


def test_model_gin_that_does_not_fit(tmp_path, capsys):
  argv = [f'--from={common.fixture_path()}', f'--to={tmp_path / "out"}', '--to_format=hf',
          '--model_gin=models/t5_1_0/tiny.gin']
  with pytest.raises(initial_checkpoint.CheckpointMismatchError,
                     match=r'(?s)looks like: t5_1_1/tiny.*configured model is:   t5_1_0/tiny'):
    convert.main.__wrapped__(argv)  # main without errors.report_user_errors
  with pytest.raises(SystemExit) as exit_info:  # the command: one message, exit status 2
    convert.main(argv)
  assert exit_info.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.startswith('t5tpu: error: checkpoint ') and 'Traceback' not in err
  assert not (tmp_path / 'out').exists()
  assert convert.config_from_gin('t5_1_1/tiny') == common.named('t5_1_1/tiny', dropout_rate=0.1)
  assert model_param_shapes(convert.config_from_gin('models/t5_1_1/tiny.gin')) == {
      k: np.shape(v) for k, v in flatten(t5x_legacy.read(common.fixture_path())['target']).items()}


def test_relative_paths_from_the_current_folder(tmp_path, monkeypatch, fixture_state):
  monkeypatch.chdir(tmp_path)
  os.mkdir('src')
  shutil.copy(common.fixture_path(), 'src/tiny.checkpoint_0')
  convert.main(['--from=src/tiny.checkpoint_0', '--to=run', '--to_format=orbax'])
  common.assert_trees_equal(t5x_orbax.read(str(tmp_path / 'run' / 'checkpoint_0'))['target'],
                            fixture_state['target'])
  # a relative MODEL_DIR in, a relative checkpoint_<step> out
  convert.main(['--from=run', '--to=t5x/checkpoint_0', '--to_format=t5x_legacy',
                '--params_only'])
  common.assert_trees_equal(t5x_legacy.read(str(tmp_path / 't5x' / 'checkpoint_0'))['target'],
                            fixture_state['target'])


def _convert_error(capsys, argv) -> str:
  """convert.main's one-line error (exit status 2, no traceback); also checks its type."""
  with pytest.raises(errors.UserError):
    convert.main.__wrapped__(argv)
  capsys.readouterr()
  with pytest.raises(SystemExit) as info:
    convert.main(argv)
  assert info.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert 'Traceback' not in err and err.startswith('t5tpu: error: ')
  return err[len('t5tpu: error: '):].strip()


def test_bad_inputs_are_one_message_and_write_nothing(tmp_path, capsys):
  out = tmp_path / 'out'
  with open(common.fixture_path(), 'rb') as f:
    data = f.read()
  half = tmp_path / 'half.checkpoint_0'
  half.write_bytes(data[:len(data) // 2])
  msg = _convert_error(capsys, [f'--from={half}', f'--to={out}', '--to_format=hf'])
  assert msg.startswith(f'{half} is truncated: its msgpack data ends early')
  msg = _convert_error(capsys, [f'--from={tmp_path / "nowhere"}', f'--to={out}',
                                '--to_format=orbax'])
  assert msg.startswith(f'no checkpoint at {tmp_path / "nowhere"} (it does not exist): expected')
  (tmp_path / 'gpt2').mkdir()
  (tmp_path / 'gpt2' / 'config.json').write_text(json.dumps(
      {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel']}))
  msg = _convert_error(capsys, [f'--from={tmp_path / "gpt2"}', f'--to={out}',
                                '--to_format=t5x_legacy'])
  assert msg.startswith(f"{tmp_path / 'gpt2' / 'config.json'} is a Hugging Face 'gpt2' model "
                        '(GPT2LMHeadModel), not T5.')
  assert not out.exists()
  # an existing export is not overwritten without --overwrite
  out.mkdir()
  (out / 'config.json').write_text('{}')
  msg = _convert_error(capsys, [f'--from={common.fixture_path()}', f'--to={out}',
                                '--to_format=hf'])
  assert msg == f'{out} already holds a Hugging Face model (--overwrite replaces it)'
  assert os.listdir(out) == ['config.json'] and (out / 'config.json').read_text() == '{}'
