"""Hugging Face T5: import gives transformers' logits; export loads in transformers."""
import json
import os

import numpy as np
import pytest

from t5tpu import errors, initial_checkpoint
from t5tpu.formats import CheckpointReadError, flatten, hf, unflatten
from tests.formats import common

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4  # float32


def hf_model(v11: bool, seed: int = 0):
  """A random T5 1.0 (tied, ReLU) or 1.1 (untied head, gated GELU, 4 x 6 != 16) model."""
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=100, d_model=16, d_kv=6 if v11 else 4, d_ff=32, num_layers=2,
      num_decoder_layers=3, num_heads=4, feed_forward_proj='gated-gelu' if v11 else 'relu',
      tie_word_embeddings=not v11, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if v11:  # transformers 5 ties lm_head to `shared` unless given its own
    model.lm_head = torch.nn.Linear(16, 100, bias=False)
    torch.nn.init.normal_(model.lm_head.weight)
  with torch.no_grad():  # norms away from 1, so a mixed-up scale would show
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1 + 0.3 * torch.randn_like(p))
  return model


def hf_logits(model, enc, dec_in) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()


def max_diff(a, b, targets) -> float:
  return float(np.abs(a - b)[targets > 0].max())


@pytest.mark.parametrize('v11', [False, True], ids=['t5_1_0_tied', 't5_1_1_untied'])
@pytest.mark.parametrize('file_format', ['safetensors', 'bin'])
def test_import_matches_transformers(tmp_path, v11, file_format):
  model = hf_model(v11)
  if file_format == 'safetensors':
    model.save_pretrained(tmp_path)
  else:  # the older pytorch_model.bin layout, with the tied copies torch's state_dict has
    model.config.to_json_file(tmp_path / 'config.json')
    torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  state, cfg = hf.read_with_config(str(tmp_path), dtype='float32')
  assert cfg == common.small_config(v11)
  assert state['state'] == {'step': 0}
  enc, dec_in, targets = common.padded_batch(100)
  diff = max_diff(common.logits(cfg, state['target'], enc, dec_in, targets),
                  hf_logits(model, enc, dec_in), targets)
  print(f'max |logit difference| vs transformers ({"1.1" if v11 else "1.0"}, '
        f'{file_format}): {diff:.2e}')
  assert diff < TOL


@pytest.mark.parametrize('v11', [False, True], ids=['t5_1_0_tied', 't5_1_1_untied'])
def test_export_loads_in_transformers(tmp_path, v11):
  cfg = common.small_config(v11)
  params = common.random_params(cfg, seed=3)
  hf.write(str(tmp_path), params, cfg)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'generation_config.json',
                                          'model.safetensors']
  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  assert tied == (not v11)
  enc, dec_in, targets = common.padded_batch(100, seed=1)
  diff = max_diff(common.logits(cfg, params, enc, dec_in, targets),
                  hf_logits(model.eval(), enc, dec_in), targets)
  print(f'max |logit difference| t5tpu vs exported ({"1.1" if v11 else "1.0"}): {diff:.2e}')
  assert diff < TOL
  # and back: the same parameters, bit for bit
  again, cfg_again = hf.read_with_config(str(tmp_path), dtype='float32')
  assert cfg_again == cfg
  common.assert_trees_equal(again['target'], params)


def test_export_bfloat16(tmp_path):
  cfg = common.small_config(True)
  params = common.random_params(cfg)
  hf.write(str(tmp_path), params, cfg, dtype='bfloat16')
  assert json.loads((tmp_path / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path))
  assert model.lm_head.weight.dtype == torch.bfloat16
  again = hf.read(str(tmp_path))
  bf16 = np.asarray(flatten(again['target'])['token_embedder/embedding']).dtype
  assert str(bf16) == 'bfloat16'
  rounded = {k: np.asarray(v).astype(bf16) for k, v in flatten(params).items()}
  common.assert_trees_equal(again['target'], unflatten(rounded))


def test_config_conventions():
  """transformers 4.x configs (hub files) say tie/scale with tie_word_embeddings alone."""
  t5_small = {'model_type': 't5', 'd_model': 512, 'd_kv': 64, 'd_ff': 2048, 'num_layers': 6,
              'num_heads': 8, 'vocab_size': 32128}
  cfg, scale = hf.config_from_hf(t5_small)
  assert scale and cfg.logits_via_embedding and cfg.mlp_activations == ('relu',)
  assert cfg.num_decoder_layers == 6 and cfg.relative_attention_max_distance == 128
  flan = dict(t5_small, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
              num_decoder_layers=8, d_ff=1024)
  cfg, scale = hf.config_from_hf(flan)
  assert not scale and not cfg.logits_via_embedding
  assert cfg.mlp_activations == ('gelu', 'linear') and cfg.num_decoder_layers == 8
  with pytest.raises(ValueError, match='only T5'):
    hf.config_from_hf(dict(t5_small, model_type='bart'))


def test_export_with_tokenizer_tokenizes_like_seqio(tmp_path):
  """The exported T5Tokenizer gives seqio's ids (plus EOS), sentinels and NFKC included."""
  import seqio
  spm = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                     'sentencepiece.model')  # a Unigram, nmt_nfkc model like T5's
  hf.write_tokenizer(str(tmp_path), spm, extra_ids=3)
  vocab = seqio.SentencePieceVocabulary(spm, extra_ids=3)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert len(tokenizer) == vocab.vocab_size
  for text in ['this is a test', 'the fox <extra_id_0> ran <extra_id_2>', 'ﬁne  TEXT, x²!']:
    ids = tokenizer(text).input_ids
    assert ids == list(vocab.encode(text)) + [vocab.eos_id], text
  assert tokenizer.convert_tokens_to_ids('<extra_id_0>') == vocab.vocab_size - 1
  assert tokenizer.decode(vocab.encode('this is a test')) == vocab.decode(
      vocab.encode('this is a test'))


def test_tokenizer_export_refuses_bpe_before_writing(tmp_path):
  """transformers' T5Tokenizer is Unigram only: a BPE vocabulary would split text differently."""
  from t5tpu.formats import convert
  from tasks import knowledge  # its shipped SentencePiece model is BPE
  with pytest.raises(ValueError, match='BPE SentencePiece model'):
    hf.load_sentencepiece(knowledge.SPM_PATH)
  cfg = common.small_config(True)
  hf.write(str(tmp_path / 'src'), common.random_params(cfg), cfg)
  with pytest.raises(SystemExit):
    convert.main([f'--from={tmp_path / "src"}', f'--to={tmp_path / "out"}', '--to_format=hf',
                  f'--vocab={knowledge.SPM_PATH}'])
  assert not (tmp_path / 'out').exists()


def _read_error(path) -> str:
  """The UserError INITIAL_CHECKPOINT_PATH=path gives (the same reader t5tpu convert uses)."""
  with pytest.raises(errors.UserError) as info:
    initial_checkpoint.read_state_dict(str(path))
  assert isinstance(info.value, CheckpointReadError)
  return str(info.value)


def test_models_that_are_not_t5_are_refused_by_their_config(tmp_path):
  supported = ("t5tpu reads only T5 checkpoints in the T5ForConditionalGeneration layout: "
               "T5 1.0 (t5-small ...), T5 1.1 and Flan-T5 (model_type 't5'; mT5's 'mt5' has "
               'the same layout)')
  torch.manual_seed(0)  # a tiny random BERT, weights and all
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=16))
  bert.save_pretrained(tmp_path / 'bert')
  assert _read_error(tmp_path / 'bert') == (
      f"{tmp_path / 'bert' / 'config.json'} is a Hugging Face 'bert' model (BertModel), not "
      f'T5. {supported}: point INITIAL_CHECKPOINT_PATH (or t5tpu convert --from) at a T5 '
      'model directory')
  # a config alone is enough: the weights are never opened
  transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / 'gpt2')
  assert "config.json is a Hugging Face 'gpt2' model, not T5." in _read_error(tmp_path / 'gpt2')
  # T5 without its decoder / LM head
  config = hf_model(v11=False).config.to_dict()
  config['architectures'] = ['T5EncoderModel']
  (tmp_path / 'encoder').mkdir()
  (tmp_path / 'encoder' / 'config.json').write_text(json.dumps(config))
  assert _read_error(tmp_path / 'encoder').startswith(
      f"{tmp_path / 'encoder' / 'config.json'} is a T5EncoderModel, not a "
      'T5ForConditionalGeneration (an encoder, a decoder and its LM head).')


def test_truncated_weights_and_garbage_config_name_the_file(tmp_path):
  hf_model(v11=True).save_pretrained(tmp_path)
  weights = tmp_path / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  assert _read_error(tmp_path).startswith(f'cannot read {weights} (SafetensorError: ')
  assert 'the file is truncated or damaged' in _read_error(tmp_path)
  (tmp_path / 'config.json').write_text('{"model_type": "t5", ')
  assert _read_error(tmp_path).startswith(
      f"{tmp_path / 'config.json'} is not valid JSON (Expecting property name")
