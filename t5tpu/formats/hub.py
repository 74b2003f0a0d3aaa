"""Hugging Face hub names as checkpoint paths: `hf://google/flan-t5-base[@revision]`.

INITIAL_CHECKPOINT_PATH, eval's and infer's CHECKPOINT_PATH and `t5tpu convert --from` accept
them. `resolve` is the one place a hub name becomes a local folder: format detection
(detect.detect_format) and the Hugging Face reader (formats.hf) call it, so every
reader sees an ordinary model directory.

The local Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) comes first: a
model that transformers, `hf download` or an earlier run put there is used without touching the
network, so it works with HF_HUB_OFFLINE=1. (A cached branch is not checked for newer commits;
`hf download` refreshes it.) Otherwise the files a T5 needs are downloaded into that cache
(huggingface_hub.snapshot_download): config.json, the weights in one format (safetensors, else
pytorch_model.bin; sharded or not) and the tokenizer files. A revision (branch, tag or commit)
follows an `@`: hf://google/flan-t5-base@<commit>.

For gin (gin/models/hf.gin): `hf_config` builds the network's T5Config from config.json;
`vocab_file` and `vocab_extra_ids` give seqio.SentencePieceVocabulary the repo's SentencePiece
model and the sentinel count transformers' T5Tokenizer adds to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Optional, Sequence

from t5tpu import errors, network
from t5tpu.formats import CheckpointNotFoundError

log = logging.getLogger(__name__)

PREFIX = 'hf://'
DEFAULT_REVISION = 'main'
CONFIG_NAME = 'config.json'
SPM_NAME = 'spiece.model'  # the T5 SentencePiece model, as T5Tokenizer names it
TOKENIZER_CONFIG_NAME = 'tokenizer_config.json'
_T5_TOKENIZER_EXTRA_IDS = 100  # transformers' T5Tokenizer default
# Besides the weights: what building and serving a T5 reads.
_FILES = (CONFIG_NAME, 'generation_config.json', SPM_NAME, 'tokenizer.json',
          TOKENIZER_CONFIG_NAME, 'special_tokens_map.json')
# The weights in one format only: T5 repos often hold the same weights as safetensors,
# pytorch_model.bin, TF and Flax, four times the download. Root files only (no subfolders).
_WEIGHTS = (('model.safetensors', 'model.safetensors.index.json', 'model-*-of-*.safetensors'),
            ('pytorch_model.bin', 'pytorch_model.bin.index.json', 'pytorch_model-*-of-*.bin'))
# T5Config fields config.json decides; the rest (dtype, dropout_rate, remat_policy, ...) are
# the run's choice and come from the gin-configured base config.
SHAPE_FIELDS = ('vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers',
                'num_decoder_layers', 'head_dim', 'mlp_dim', 'mlp_activations',
                'logits_via_embedding', 'relative_attention_num_buckets',
                'relative_attention_max_distance')


class HubModelUnavailableError(CheckpointNotFoundError):
  """A hub model that is neither in the local cache nor downloadable (offline, no such repo or
  revision, gated, no network)."""


def is_hub(path) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(path: str) -> tuple[str, str]:
  """'hf://google/flan-t5-base@v2' -> ('google/flan-t5-base', 'v2'); the revision defaults
  to 'main'. Repo ids have no '@'; revisions may have '/' (refs/pr/3)."""
  from huggingface_hub.errors import HFValidationError
  from huggingface_hub.utils import validate_repo_id
  repo, at, revision = path[len(PREFIX):].partition('@')
  repo, revision = repo.rstrip('/'), revision.rstrip('/')
  try:
    validate_repo_id(repo)
    if at and not revision:
      raise HFValidationError('the revision after @ is empty.')
  except HFValidationError as e:
    raise errors.UserError(
        f'{path} is not a Hugging Face model name: {e} Write hf://<org>/<name> or '
        'hf://<name>, optionally followed by @<branch, tag or commit>, e.g. '
        'hf://google/flan-t5-base') from None
  return repo, revision or DEFAULT_REVISION


# ----------------------------------------------------------------------------- resolve

def resolve(path: str, required: Sequence[str] = ()) -> str:
  """The local folder (a snapshot in the Hugging Face cache) holding the model `path` names.

  It holds config.json and the weights, and the `required` files (e.g. spiece.model). A
  cached copy is used as it is; one missing something is completed by a download, unless
  HF_HUB_OFFLINE is set. Raises HubModelUnavailableError, a UserError saying what to do.
  """
  repo, revision = parse(path)
  from huggingface_hub import constants
  folder = _cached(repo, revision)
  missing = _missing(folder, required) if folder else None
  if folder and not missing:
    return folder
  if constants.HF_HUB_OFFLINE:
    raise HubModelUnavailableError(_offline_message(path, repo, revision, missing))
  folder = _download(path, repo, revision)
  missing = _missing(folder, required)
  if missing:
    raise HubModelUnavailableError(
        f'{path}: the Hugging Face repo {repo} (revision {revision}) has no '
        f'{", ".join(missing)}: t5tpu reads T5 models saved by transformers '
        '(T5ForConditionalGeneration.save_pretrained)')
  return folder


def _cached(repo: str, revision: str) -> Optional[str]:
  """The cached snapshot folder of repo@revision, without any network access; else None."""
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError
  try:
    # Only config.json is asked for: huggingface_hub then locates the snapshot without
    # refusing one that lacks other files (checked by _missing, which knows what T5 needs).
    return snapshot_download(repo, revision=revision, local_files_only=True,
                             allow_patterns=[CONFIG_NAME])
  except LocalEntryNotFoundError:  # also its IncompleteSnapshotError
    return None


def _missing(folder: str, required: Sequence[str] = ()) -> list[str]:
  """What `folder` lacks of config.json, the weights and `required`."""
  missing = [name for name in (CONFIG_NAME, *required)
             if not os.path.exists(os.path.join(folder, name))]
  return missing + _missing_weights(folder)


def _missing_weights(folder: str) -> list[str]:
  """[] when `folder` holds the weights (every shard an index names)."""
  from t5tpu.formats import hf
  try:
    return [os.path.basename(f) for f in hf.weight_files(folder) if not os.path.exists(f)]
  except CheckpointNotFoundError:
    return ['weights (model.safetensors or pytorch_model.bin)']


def _download(path: str, repo: str, revision: str) -> str:
  """Downloads what a T5 needs from repo@revision into the cache; returns the snapshot."""
  from huggingface_hub import snapshot_download
  log.info('downloading %s (revision %s) into the Hugging Face cache', path, revision)
  with _hub_errors(path, repo, revision):
    for weights in _WEIGHTS:  # safetensors first; pytorch_model.bin only where there is none
      folder = snapshot_download(repo, revision=revision, allow_patterns=[*_FILES, *weights])
      if not _missing_weights(folder):
        break
  return folder


@contextlib.contextmanager
def _hub_errors(path: str, repo: str, revision: str):
  """huggingface_hub's errors as one UserError each, saying what to do."""
  from huggingface_hub import errors as hub_errors
  try:
    yield
  except hub_errors.GatedRepoError:
    raise HubModelUnavailableError(
        f'{path}: {repo} is a gated model: accept its terms on https://huggingface.co/{repo} '
        'and log in (hf auth login, or set HF_TOKEN)') from None
  except hub_errors.RepositoryNotFoundError:
    raise HubModelUnavailableError(
        f'{path}: the Hugging Face hub has no model {repo} (or it is private: log in with '
        'hf auth login, or set HF_TOKEN). Check the name, e.g. google/flan-t5-base') from None
  except hub_errors.RevisionNotFoundError:
    raise HubModelUnavailableError(
        f'{path}: {repo} has no revision {revision!r} (a branch, tag or commit on '
        f'https://huggingface.co/{repo})') from None
  except hub_errors.LocalEntryNotFoundError as e:  # no connection, and not in the cache
    raise HubModelUnavailableError(
        f'{path}: {repo} (revision {revision}) is not in the Hugging Face cache and the hub '
        f'could not be reached ({_first_line(e)}): {_how_to_get(repo, revision)}') from None
  except hub_errors.HfHubHTTPError as e:
    raise HubModelUnavailableError(
        f'{path}: downloading {repo} (revision {revision}) failed: {_first_line(e)}') from None


def _offline_message(path: str, repo: str, revision: str, missing) -> str:
  from huggingface_hub import constants
  where = f'the Hugging Face cache ({constants.HF_HUB_CACHE})'
  what = (f'{repo} (revision {revision}) is not in {where}' if missing is None else
          f'the copy of {repo} (revision {revision}) in {where} lacks {", ".join(missing)}')
  return (f'{path}: {what}, and HF_HUB_OFFLINE is set, so nothing is downloaded: run once '
          f'with network access (without HF_HUB_OFFLINE), or {_how_to_get(repo, revision)}')


def _how_to_get(repo: str, revision: str) -> str:
  flag = '' if revision == DEFAULT_REVISION else f' --revision {revision}'
  return (f'download it first with `hf download {repo}{flag}` (`huggingface-cli download '
          f'{repo}{flag}` in older huggingface_hub)')


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0]}' if text else type(error).__name__


# ----------------------------------------------------------------------------- gin

def hf_config(path: str, base: Optional[network.T5Config] = None) -> network.T5Config:
  """The T5Config of the Hugging Face model at `path` (hf://..., or a local or gs:// model
  directory), from its config.json: `base` (default T5Config()) with the shape fields
  (SHAPE_FIELDS) replaced.

  In gin (gin/models/hf.gin): `network.Transformer.config = @hub.hf_config()`, with `path`
  bound to HF_MODEL (by default INITIAL_CHECKPOINT_PATH) and `base` to the gin-configured
  T5Config, which keeps the run's dtype, dropout and remat policy.
  """
  from t5tpu import model_shapes
  from t5tpu.formats import detect, hf
  if not path:
    raise errors.UserError(
        'gin/models/hf.gin takes the model from a Hugging Face config.json, but HF_MODEL (by '
        'default INITIAL_CHECKPOINT_PATH) is not set: set it to the model, e.g. '
        '--gin.HF_MODEL=\\"hf://google/flan-t5-base\\"')
  kind = detect.detect_format(path)
  if kind != 'hf':
    raise errors.UserError(
        f'gin/models/hf.gin takes the model from a Hugging Face config.json, but {path} is '
        f'a {kind} checkpoint: set HF_MODEL to the Hugging Face model it came from (e.g. '
        'hf://google/flan-t5-base), or include a model gin (models/t5_1_1/base.gin, ...) '
        'instead of models/hf.gin')
  read = hf.read_config_json(path)
  cfg = dataclasses.replace(base or network.T5Config(),
                            **{f: getattr(read, f) for f in SHAPE_FIELDS})
  log.info('model from %s config.json: %s', path, model_shapes.describe(cfg))
  return cfg


def vocab_file(path: str) -> str:
  """The local path of the SentencePiece model (spiece.model) of the Hugging Face model
  `path` (hf://..., or a model directory).

  In gin: `seqio.SentencePieceVocabulary.sentencepiece_model_file = @hub.vocab_file()`, with
  `hub.vocab_file.path` bound (models/hf.gin binds it to HF_MODEL); together with
  `seqio.SentencePieceVocabulary.extra_ids = @hub.vocab_extra_ids()`.
  """
  return os.path.join(_tokenizer_dir(path), SPM_NAME)


def vocab_extra_ids(path: str) -> int:
  """How many sentinels (<extra_id_N>) transformers' T5Tokenizer adds on top of the repo's
  spiece.model: tokenizer_config.json's `extra_ids`, else T5Tokenizer's default, 100.

  seqio.SentencePieceVocabulary numbers them as transformers does (from the top id down), so
  with this count seqio gives the ids the model was trained on, sentinels included.
  """
  import json
  name = os.path.join(_tokenizer_dir(path), TOKENIZER_CONFIG_NAME)
  if not os.path.exists(name):
    return _T5_TOKENIZER_EXTRA_IDS
  with open(name) as f:
    return int(json.load(f).get('extra_ids', _T5_TOKENIZER_EXTRA_IDS))


def _tokenizer_dir(path: str) -> str:
  """A local model folder that holds spiece.model."""
  from t5tpu.formats import hf
  folder = resolve(path, required=[SPM_NAME]) if is_hub(path) else hf.local_dir(path)
  if not os.path.exists(os.path.join(folder, SPM_NAME)):
    raise CheckpointNotFoundError(
        f'{path} has no {SPM_NAME} (the T5 SentencePiece model): bind '
        'seqio.SentencePieceVocabulary.sentencepiece_model_file to the vocabulary file')
  return folder
