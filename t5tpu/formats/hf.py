"""Hugging Face T5ForConditionalGeneration checkpoints: import and export.

HF keeps PyTorch's [out, in] Linear layout and its own names; t5x keeps [in, out] kernels.
One table (`name_pairs`) lists, for a given config, every (HF name, t5x name, transpose)
triple, and both directions use it, so import and export cannot drift apart.

Output layer, the one place the two disagree in kind:
  T5 1.0 (t5-small ...): logits through the shared embedding, scaled by 1/sqrt(d_model)
    = t5x `logits_via_embedding=True`.
  T5 1.1 / Flan-T5: a separate `lm_head` without the scale = t5x `decoder/logits_dense`.
transformers 4.x says which with `tie_word_embeddings`; 5.x keeps that key for the scale
(`scale_decoder_outputs` after loading) and ties weights unless the file holds an `lm_head`
that differs from `shared`. We read both conventions and write one both versions load.

Reading needs `safetensors` (safetensors files) or `torch` (pytorch_model.bin); writing
needs neither torch nor transformers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Iterator, Optional

import numpy as np

from t5tpu import network, storage
from t5tpu.formats import (COPY_AGAIN, CheckpointNotFoundError, CheckpointReadError,
                           cast_floating, describe_error, flatten, make_state_dict, unflatten)

log = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
SAFETENSORS_NAME = 'model.safetensors'

# HF activation names (transformers' ACT2FN) <-> the network's (t5tpu.network._ACTIVATIONS)
_ACT_FROM_HF = {'relu': 'relu', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
                'gelu_fast': 'gelu', 'gelu': 'gelu_exact', 'gelu_python': 'gelu_exact',
                'silu': 'silu', 'swish': 'silu'}
_ACT_TO_HF = {'relu': 'relu', 'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'silu': 'silu',
              'swish': 'silu'}
# Keys some HF files carry that duplicate `shared.weight` (tied to it when loaded).
_TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
# model_type values with T5ForConditionalGeneration's weights (mT5 is T5 1.1, larger vocab),
# and the architectures that hold them (T5WithLMHeadModel: the name in the first t5-* uploads).
T5_MODEL_TYPES = ('t5', 'mt5')
T5_ARCHITECTURES = ('T5ForConditionalGeneration', 'MT5ForConditionalGeneration',
                    'T5WithLMHeadModel')
_SUPPORTED = ('t5tpu reads only T5 checkpoints in the T5ForConditionalGeneration layout: '
              "T5 1.0 (t5-small ...), T5 1.1 and Flan-T5 (model_type 't5'; mT5's 'mt5' has "
              'the same layout)')


# ----------------------------------------------------------------------------- names

def name_pairs(cfg: network.T5Config) -> Iterator[tuple[str, str, bool]]:
  """(HF name, t5x name, transpose?) for every parameter of the network `cfg` describes."""
  yield 'shared.weight', 'token_embedder/embedding', False
  gated = len(cfg.mlp_activations) > 1
  mlp = [f'wi_{i}' for i in range(len(cfg.mlp_activations))] if gated else ['wi']
  mlp.append('wo')
  attention = (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))
  stacks = (('encoder', cfg.num_encoder_layers,
             [('SelfAttention', 'attention', 'pre_attention_layer_norm')]),
            ('decoder', cfg.num_decoder_layers,
             [('SelfAttention', 'self_attention', 'pre_self_attention_layer_norm'),
              ('EncDecAttention', 'encoder_decoder_attention',
               'pre_cross_attention_layer_norm')]))
  for stack, n_layers, attentions in stacks:
    yield (f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
           f'{stack}/relpos_bias/rel_embedding', True)
    for i in range(n_layers):
      hf_block, t5x_layer = f'{stack}.block.{i}.layer', f'{stack}/layers_{i}'
      for j, (hf_att, t5x_att, norm) in enumerate(attentions):
        for hf_w, t5x_w in attention:
          yield (f'{hf_block}.{j}.{hf_att}.{hf_w}.weight',
                 f'{t5x_layer}/{t5x_att}/{t5x_w}/kernel', True)
        yield f'{hf_block}.{j}.layer_norm.weight', f'{t5x_layer}/{norm}/scale', False
      j = len(attentions)
      for w in mlp:
        yield f'{hf_block}.{j}.DenseReluDense.{w}.weight', f'{t5x_layer}/mlp/{w}/kernel', True
      yield f'{hf_block}.{j}.layer_norm.weight', f'{t5x_layer}/pre_mlp_layer_norm/scale', False
    yield f'{stack}.final_layer_norm.weight', f'{stack}/{stack}_norm/scale', False
  if not cfg.logits_via_embedding:
    yield 'lm_head.weight', 'decoder/logits_dense/kernel', True


# ----------------------------------------------------------------------------- config

def check_t5(hf: dict, where: str = CONFIG_NAME) -> None:
  """Raises CheckpointReadError unless the config.json dict describes a T5 with its LM head.

  Checked before any weight is read: a BERT or GPT-2 directory fails here with its model
  type, not later with a list of unknown weight names.
  """
  model_type = hf.get('model_type', 't5')
  architectures = hf.get('architectures') or []
  if model_type not in T5_MODEL_TYPES:
    kind = f" ({', '.join(map(str, architectures))})" if architectures else ''
    raise CheckpointReadError(
        f'{where} is a Hugging Face {model_type!r} model{kind}, not T5. {_SUPPORTED}: point '
        'INITIAL_CHECKPOINT_PATH (or t5tpu convert --from) at a T5 model directory')
  if architectures and not set(architectures) & set(T5_ARCHITECTURES):
    raise CheckpointReadError(
        f'{where} is a {", ".join(map(str, architectures))}, not a T5ForConditionalGeneration '
        f'(an encoder, a decoder and its LM head). {_SUPPORTED}: save the model as '
        'T5ForConditionalGeneration, or use the checkpoint it was fine-tuned from')


def config_from_hf(hf: dict, dtype: str = 'bfloat16',
                   where: str = CONFIG_NAME) -> tuple[network.T5Config, bool]:
  """(T5Config, scale_logits) from a config.json dict (`where` names it in errors).

  scale_logits says whether HF multiplies the decoder output by 1/sqrt(d_model) before
  the output layer (T5 1.0). Whether the output layer is `shared` itself depends on the
  weights too; see `read`.
  """
  check_t5(hf, where)
  proj = hf.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  gated = parts[0] == 'gated' and len(parts) == 2
  act = 'gelu_new' if proj == 'gated-gelu' else parts[-1]
  if act not in _ACT_FROM_HF:
    raise CheckpointReadError(f'{where}: feed_forward_proj={proj!r}: activation {act!r} is not '
                              f'supported (known: {sorted(_ACT_FROM_HF)})')
  ours = _ACT_FROM_HF[act]
  eps = float(hf.get('layer_norm_epsilon', 1e-6))
  if abs(eps - 1e-6) > 1e-12:
    raise CheckpointReadError(f'{where}: layer_norm_epsilon={eps}: the network uses 1e-6, as '
                              'every T5')
  if 'scale_decoder_outputs' in hf:  # transformers >= 5 wrote this file
    scale = bool(hf['scale_decoder_outputs'])
  else:
    scale = hf.get('tie_word_embeddings', True) is not False
  num_layers = int(hf.get('num_layers', 6))
  num_decoder_layers = hf.get('num_decoder_layers')
  cfg = network.T5Config(
      vocab_size=int(hf.get('vocab_size', 32128)), dtype=dtype,
      emb_dim=int(hf.get('d_model', 512)), num_heads=int(hf.get('num_heads', 8)),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(num_decoder_layers if num_decoder_layers is not None
                             else num_layers),
      head_dim=int(hf.get('d_kv', 64)), mlp_dim=int(hf.get('d_ff', 2048)),
      mlp_activations=(ours, 'linear') if gated else (ours,),
      dropout_rate=float(hf.get('dropout_rate', 0.1)),
      logits_via_embedding=scale,
      relative_attention_num_buckets=int(hf.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(hf.get('relative_attention_max_distance', 128)))
  return cfg, scale


def config_to_hf(cfg: network.T5Config, dtype: str = 'float32') -> dict:
  """config.json for `cfg`: loads in transformers 4.x and 5.x alike."""
  act = cfg.mlp_activations[0]
  if act not in _ACT_TO_HF:
    raise ValueError(f'activation {act!r} has no Hugging Face equivalent')
  gated = len(cfg.mlp_activations) > 1
  if gated and tuple(cfg.mlp_activations[1:]) != ('linear',):
    raise ValueError(f'mlp_activations={cfg.mlp_activations}: HF T5 gates one activation '
                     "with a linear branch only, e.g. ('gelu', 'linear')")
  hf_act = _ACT_TO_HF[act]
  if gated:
    # 'gated-gelu' is HF's name for tanh-GELU gating (T5 1.1); others spell the activation.
    proj = 'gated-gelu' if act == 'gelu' else ('gated-gelu_python' if act == 'gelu_exact'
                                              else f'gated-{hf_act}')
  else:
    proj = hf_act
  tied = bool(cfg.logits_via_embedding)
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'is_encoder_decoder': True,
      'vocab_size': cfg.vocab_size,
      'd_model': cfg.emb_dim,
      'd_kv': cfg.head_dim,
      'd_ff': cfg.mlp_dim,
      'num_layers': cfg.num_encoder_layers,
      'num_decoder_layers': cfg.num_decoder_layers,
      'num_heads': cfg.num_heads,
      'relative_attention_num_buckets': cfg.relative_attention_num_buckets,
      'relative_attention_max_distance': cfg.relative_attention_max_distance,
      'dropout_rate': (cfg.dropout_rate if isinstance(cfg.dropout_rate, (int, float))
                       else 0.1),  # a gin macro, e.g. '%DROPOUT_RATE': HF's default
      'layer_norm_epsilon': 1e-6,
      'initializer_factor': 1.0,
      'feed_forward_proj': proj,
      # 4.x: tie + scale; 5.x: scale only (the separate lm_head in the file stays separate)
      'tie_word_embeddings': tied,
      'scale_decoder_outputs': tied,
      'decoder_start_token_id': 0,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'use_cache': True,
      'torch_dtype': dtype,
      'dtype': dtype,
  }


# ----------------------------------------------------------------------------- tensors

def local_dir(path: str) -> str:
  """A local directory with the model files: a hub name's snapshot in the Hugging Face cache
  (formats.hub), gs:// copied down once to a cache, a local path as it is."""
  from t5tpu.formats import hub
  if hub.is_hub(path):
    return hub.resolve(path)
  return storage.local_copy(path.rstrip('/'))  # under $T5TPU_CACHE, as every gs:// read


def weight_files(directory: str) -> list[str]:
  """The weight files of a local HF model directory (the shards an index names, else the one
  file); CheckpointNotFoundError when it has none."""
  for index_name, single in (('model.safetensors.index.json', SAFETENSORS_NAME),
                             ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
    index = os.path.join(directory, index_name)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(directory, name) for name in files]
    if os.path.exists(os.path.join(directory, single)):
      return [os.path.join(directory, single)]
  raise CheckpointNotFoundError(f'{directory} has config.json but no model.safetensors or '
                                'pytorch_model.bin (nor a sharded index of either)')


def _load_tensors(files: list[str]) -> dict:
  """{HF name: numpy array}; bfloat16 stays bfloat16 (ml_dtypes)."""
  tensors = {}
  for path in files:
    tensors.update(_load_file(path))
  return tensors


def _load_file(path: str) -> dict:
  """One weights file; a truncated or damaged one raises CheckpointReadError naming it."""
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file
      return load_file(path)
    return _load_torch(path)
  except _damaged_file_errors() as e:
    raise CheckpointReadError(f'cannot read {path} ({describe_error(e)}): the file is '
                              f'truncated or damaged: {COPY_AGAIN}') from None


def _damaged_file_errors() -> tuple:
  """What safetensors and torch.load raise for a cut-off or garbled file."""
  import pickle
  found = [ValueError, RuntimeError, EOFError, pickle.UnpicklingError]
  try:
    from safetensors import SafetensorError  # 'Error while deserializing header: ...'
    found.append(SafetensorError)
  except ImportError:
    pass
  return tuple(found)


def _load_torch(path: str) -> dict:
  import torch
  tensors = {}
  for name, t in torch.load(path, map_location='cpu', weights_only=True).items():
    if t.dtype == torch.bfloat16:
      import ml_dtypes
      tensors[name] = t.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      tensors[name] = t.numpy()
  return tensors


# ----------------------------------------------------------------------------- read

def read(path: str) -> dict:
  """The HF model directory `path` (local or gs://) as t5x's state dict (step 0)."""
  return _read(path)[0]


def read_with_config(path: str, dtype: str = 'bfloat16'):
  """(state dict, T5Config) in one pass over the weights."""
  return _read(path, dtype)


def read_hf_config(directory: str, where: Optional[str] = None) -> dict:
  """The config.json of a local HF model directory as a dict (`where` names it in errors)."""
  name = os.path.join(directory, CONFIG_NAME)
  where = where or name
  try:
    with open(name) as f:
      hf_config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise CheckpointReadError(f'{where} is not valid JSON ({e}): it is truncated or damaged: '
                              f'{COPY_AGAIN}') from None
  if not isinstance(hf_config, dict):
    raise CheckpointReadError(f'{where} is not a Hugging Face config (a JSON object)')
  return hf_config


def read_config_json(path: str, dtype: str = 'bfloat16') -> network.T5Config:
  """The T5Config the config.json of the HF model `path` describes, without reading weights.

  Its output layer follows config.json (tie_word_embeddings / scale_decoder_outputs); only a
  T5 1.0 file with a separate lm_head differs in the weights (see `read_with_config`).
  """
  return _config_json(path, dtype)[0]


def _config_json(path: str, dtype: str):
  """(T5Config, scale_logits, local directory) of the HF model `path`."""
  directory = local_dir(path)
  where = storage.join(path.rstrip('/'), CONFIG_NAME)  # the path given, not a cache
  cfg, scale = config_from_hf(read_hf_config(directory, where), dtype, where)
  return cfg, scale, directory


def _read(path: str, dtype: str = 'bfloat16'):
  cfg, scale, directory = _config_json(path, dtype)
  tensors = _load_tensors(weight_files(directory))
  lm_head = tensors.pop('lm_head.weight', None)
  shared = tensors.get('shared.weight')
  tied = lm_head is None or (shared is not None and lm_head.shape == shared.shape and
                             np.array_equal(lm_head, shared))
  d_model = cfg.emb_dim
  if tied and scale:
    cfg = dataclasses.replace(cfg, logits_via_embedding=True)
  else:
    cfg = dataclasses.replace(cfg, logits_via_embedding=False)
    head = shared if tied else lm_head
    if scale:
      # A separate head *and* the 1.0 scale: fold the scale into the kernel (exact up to
      # rounding), since the network scales only when it attends to the embedding.
      log.warning('%s: untied lm_head with 1/sqrt(d_model) output scaling; folding the '
                  'scale into decoder/logits_dense', path)
      head = (head.astype(np.float32) / np.sqrt(d_model)).astype(head.dtype)
    tensors['lm_head.weight'] = head

  flat = {}
  for hf_name, t5x_name, transpose in name_pairs(cfg):
    if hf_name not in tensors:
      raise CheckpointReadError(f'{path}: {hf_name} is missing; the file does not match its '
                                f'config.json ({_describe(cfg)})')
    value = tensors.pop(hf_name)
    flat[t5x_name] = np.ascontiguousarray(value.T if transpose else value)
  for name in _TIED_COPIES:
    tensors.pop(name, None)
  if tensors:
    raise CheckpointReadError(f'{path}: {len(tensors)} weight(s) not in a '
                              'T5ForConditionalGeneration of its config.json: '
                              f'{sorted(tensors)[:20]}')
  log.info('read Hugging Face T5 from %s (%s)', path, _describe(cfg))
  return make_state_dict(unflatten(flat), step=0), cfg


def _describe(cfg) -> str:
  from t5tpu import model_shapes
  return model_shapes.describe(cfg)


# ----------------------------------------------------------------------------- write

def to_hf_tensors(params: dict, cfg: network.T5Config) -> dict:
  """t5x-named params -> {HF name: contiguous numpy array}."""
  flat = flatten(params)
  out = {}
  for hf_name, t5x_name, transpose in name_pairs(cfg):
    value = np.asarray(flat.pop(t5x_name))
    out[hf_name] = np.ascontiguousarray(value.T if transpose else value)
  if flat:
    raise ValueError(f'parameters the config does not describe: {sorted(flat)[:20]}')
  return out


def write(path: str, params: dict, cfg: network.T5Config, dtype: Optional[str] = None) -> str:
  """Writes config.json, generation_config.json and model.safetensors into `path`.

  `transformers.T5ForConditionalGeneration.from_pretrained(path)` loads the result. dtype
  ('float32' / 'bfloat16') casts the weights; default: as they are (float32 in t5tpu).
  """
  from safetensors.numpy import save_file
  params = cast_floating(params, dtype)
  tensors = to_hf_tensors(params, cfg)
  stored = str(next(iter(tensors.values())).dtype)
  remote = storage.is_remote(path)
  local = tempfile.mkdtemp(prefix='t5tpu-hf-') if remote else path
  os.makedirs(local, exist_ok=True)
  save_file(tensors, os.path.join(local, SAFETENSORS_NAME), metadata={'format': 'pt'})
  with open(os.path.join(local, CONFIG_NAME), 'w') as f:
    json.dump(config_to_hf(cfg, stored), f, indent=2, sort_keys=True)
  with open(os.path.join(local, 'generation_config.json'), 'w') as f:
    json.dump({'decoder_start_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}, f,
              indent=2)
  if remote:
    storage.filesystem(path).put(local.rstrip('/') + '/', path.rstrip('/') + '/',
                                 recursive=True)
  log.info('wrote Hugging Face T5 to %s (%s, %s)', path, _describe(cfg), stored)
  return path


def load_sentencepiece(path: str) -> bytes:
  """The bytes of a SentencePiece model that transformers' T5Tokenizer reproduces exactly.

  That tokenizer is always a Unigram model (as T5's vocabularies are); a BPE SentencePiece
  model would be re-read as Unigram and split words differently from training.
  """
  from sentencepiece import sentencepiece_model_pb2
  with storage.open_file(path, 'rb') as f:
    data = f.read()
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(data)
  except Exception as e:  # protobuf's DecodeError
    raise ValueError(f'{path} is not a SentencePiece model ({e})') from e
  kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
  if kind != 'UNIGRAM':
    raise ValueError(
        f'{path} is a {kind} SentencePiece model, but transformers\' T5Tokenizer is Unigram '
        'only, so the exported tokenizer would not split text as the model was trained. '
        'Export the weights without --vocab and tokenize with sentencepiece directly.')
  return data


def write_tokenizer(path: str, sentencepiece_model: str | bytes, extra_ids: int = 0) -> str:
  """Writes a `T5Tokenizer` for the model's SentencePiece vocabulary into `path`.

  `sentencepiece_model` (a file, or load_sentencepiece's bytes) and `extra_ids` are
  seqio.SentencePieceVocabulary's arguments (the model gins' `cc_all.32000.100extra` holds
  its sentinels already: extra_ids 0; the t5 library's `cc_all.32000` needs 100). Both
  libraries number extra ids from the top down, so `AutoTokenizer.from_pretrained(path)`
  gives the ids the model was trained on.
  """
  spm = (sentencepiece_model if isinstance(sentencepiece_model, bytes)
         else load_sentencepiece(sentencepiece_model))
  special = {'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>'}
  sentinels = [f'<extra_id_{i}>' for i in range(extra_ids)]
  if sentinels:
    special['additional_special_tokens'] = sentinels
  config = {'tokenizer_class': 'T5Tokenizer', 'extra_ids': extra_ids, 'model_max_length': 512,
            'legacy': True, **special}
  files = {'spiece.model': spm, 'tokenizer_config.json': json.dumps(config, indent=2).encode(),
           'special_tokens_map.json': json.dumps(special, indent=2).encode()}
  storage.makedirs(path)
  for name, data in files.items():
    with storage.open_file(storage.join(path, name), 'wb') as f:
      f.write(data)
  log.info('wrote the T5 tokenizer (extra_ids=%d) to %s', extra_ids, path)
  return path
