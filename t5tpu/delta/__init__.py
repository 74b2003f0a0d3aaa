"""Delta tuning: the methods' configs, which parameters train, and the frozen/trainable split.

A delta method adds a few parameters to the T5 network (network.py calls `delta.modules` at
the places each method hooks in) and trains only those; the base stays frozen. Each method is
a frozen dataclass configured by its gin file (gin/delta/<method>.gin) and set on
`T5Config.delta`:

  LoRA     low-rank A·B beside chosen projections      .../query/lora_a, lora_b
  Adapter  bottleneck after attention and/or the MLP   .../attention_adapter/down, up
  Prefix   learned keys and values in every attention  .../attention/prefix/...
  Prompt   soft tokens before the encoder input        encoder/prompt/embedding
  BitFit   a zero bias on chosen projections           .../query/bias (+ layer norm scales)

Several methods combine (include two gin files). `DeltaConfig.trainable(path)` decides which
parameter trains; `split` / `merge` separate the parameter tree into (trainable, frozen) and
join it back, so the trainer differentiates, optimizes and checkpoints only the trainable part.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

from flax import traverse_util

from t5tpu import errors

# Projection names as users know them from Hugging Face / PEFT, mapped to t5x's.
HF_ALIASES = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
PROJECTIONS = ('query', 'key', 'value', 'out', 'wi.*', 'wo')  # wi, or T5 1.1's wi_0, wi_1


def _matches(targets: Sequence[str], path: str) -> bool:
  """A Dense module path ('encoder/layers_0/attention/query') against targets: each is a
  module name ('query', PEFT's 'q') or a regex matching the whole name ('wi.*') or the whole
  path ('decoder/.*/query')."""
  name = path.rsplit('/', 1)[-1]
  for target in targets:
    target = HF_ALIASES.get(target, target)
    if target == name or re.fullmatch(target, name) or re.fullmatch(target, path):
      return True
  return False


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adaptation (Hu et al. 2021): y = x W + dropout(x) A B · alpha/rank.

  A [in, rank] starts as PEFT's (uniform, ±1/sqrt(in)); B [rank, out] starts at zero, so the
  model at step 0 is exactly the base model.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Sequence[str] = ('query', 'value')
  init_from: Optional[str] = None  # a PEFT LoRA adapter directory to start from

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))  # gin may give a list

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def applies_to(self, path: str) -> bool:
    return _matches(self.targets, path)

  def owns(self, names: Sequence[str]) -> bool:
    return names[-1] in ('lora_a', 'lora_b')


@dataclasses.dataclass(frozen=True)
class Adapter:
  """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output, before the residual.

  'houlsby': after every attention sublayer and after the MLP; 'pfeiffer': after the MLP only.
  `up` starts at zero (the adapter is the identity at step 0), `down` small and random.
  """
  dim: int = 64
  placement: str = 'houlsby'
  activation: str = 'relu'
  init_scale: float = 1e-2

  def __post_init__(self):
    if self.placement not in ('houlsby', 'pfeiffer'):
      raise ValueError(f"Adapter.placement={self.placement!r}: use 'houlsby' or 'pfeiffer'")

  def after(self, sublayer: str) -> bool:
    return sublayer == 'mlp' or self.placement == 'houlsby'

  def owns(self, names: Sequence[str]) -> bool:
    return any(n.endswith('_adapter') for n in names)


@dataclasses.dataclass(frozen=True)
class Prefix:
  """Prefix tuning (Li & Liang 2021): `length` learned keys and values before every
  attention's own (encoder, decoder self- and cross-attention).

  Prefix positions get no relative position bias and are never masked. With
  `reparameterize`, training learns them through an MLP of a smaller embedding
  (`prefix/embedding` [length, hidden] -> `mlp_in`, tanh, `mlp_out` -> 2·heads·head_dim);
  `delta.fold_prefix` replaces the MLP by the keys and values it computes, for inference.
  """
  length: int = 16
  reparameterize: bool = True
  hidden: int = 64
  init_scale: float = 0.5

  def owns(self, names: Sequence[str]) -> bool:
    return 'prefix' in names


@dataclasses.dataclass(frozen=True)
class Prompt:
  """Prompt tuning (Lester et al. 2021): `length` soft tokens before the encoder input.

  init 'vocab' (default) copies the embeddings of tokens sampled from the first
  `init_vocab_size` ids (the frequent pieces of a SentencePiece vocabulary); `init_text`
  copies (and repeats) the embeddings of those words' tokens; 'random' keeps N(0, init_scale).
  """
  length: int = 20
  init: str = 'vocab'
  init_text: Optional[str] = None
  init_vocab_size: int = 5000
  init_scale: float = 0.5

  def __post_init__(self):
    if self.init not in ('vocab', 'random'):
      raise ValueError(f"Prompt.init={self.init!r}: use 'vocab' or 'random' (or init_text)")

  def owns(self, names: Sequence[str]) -> bool:
    return names[:2] == ('encoder', 'prompt')


@dataclasses.dataclass(frozen=True)
class BitFit:
  """T5 has no biases: add a zero bias to the chosen projections and train only those
  (plus the RMSNorm scales with `layer_norms`)."""
  targets: Sequence[str] = PROJECTIONS
  layer_norms: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))

  def applies_to(self, path: str) -> bool:
    return _matches(self.targets, path)

  def owns(self, names: Sequence[str]) -> bool:
    if names[-1] == 'bias':
      return True
    return self.layer_norms and names[-1] == 'scale' and names[-2].endswith('_norm')


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
  """The delta methods of a run (any that are set) and how the frozen base is stored.

  base_dtype: the frozen base's dtype in memory ('bfloat16' halves it; it never changes, so
  nothing is lost but the base's own float32 precision in the matmuls, which run in the
  activation dtype anyway).
  """
  lora: Optional[LoRA] = None
  adapter: Optional[Adapter] = None
  prefix: Optional[Prefix] = None
  prompt: Optional[Prompt] = None
  bitfit: Optional[BitFit] = None
  base_dtype: str = 'float32'

  @property
  def methods(self) -> dict:
    return {name: m for name in ('lora', 'adapter', 'prefix', 'prompt', 'bitfit')
            for m in [getattr(self, name)] if m is not None}

  def trainable(self, names: Sequence[str]) -> bool:
    """Whether the parameter at this path (a tuple of names) is trained."""
    names = tuple(names)
    return any(m.owns(names) for m in self.methods.values())

  def added(self, names: Sequence[str]) -> bool:
    """Whether the parameter is one the methods add (a plain T5 does not have it): all
    trainable ones but BitFit's layer norm scales."""
    names = tuple(names)
    return self.trainable(names) and names[-1] != 'scale'

  def describe(self) -> str:
    return ' + '.join(self.methods) or 'none'

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> 'DeltaConfig':
    kinds = {'lora': LoRA, 'adapter': Adapter, 'prefix': Prefix, 'prompt': Prompt,
             'bitfit': BitFit}
    return cls(**{k: (kinds[k](**v) if k in kinds and v is not None else v)
                  for k, v in d.items()})


def config_of(model) -> Optional[DeltaConfig]:
  """The model's DeltaConfig, or None for full fine-tuning (also when it sets no method)."""
  cfg = getattr(model.config, 'delta', None)
  return cfg if cfg is not None and cfg.methods else None


def trainable_mask(cfg: Optional[DeltaConfig], params) -> dict:
  """{path tuple: trains?} for every leaf of `params` (everything, without a delta)."""
  flat = traverse_util.flatten_dict(params)
  return {k: cfg is None or cfg.trainable(k) for k in flat}


def split(cfg: Optional[DeltaConfig], params) -> tuple:
  """(trainable, frozen) nested dicts; without a delta, (params, {}) unchanged."""
  if cfg is None:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if cfg.trainable(k)}
  frozen = {k: v for k, v in flat.items() if not cfg.trainable(k)}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
  """The whole parameter tree again (the trainable tree itself when nothing is frozen)."""
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


class DeltaError(errors.UserError):
  """A delta configuration that cannot work (the message says what to change)."""


def check_data(cfg: Optional[DeltaConfig], dataset_cfgs) -> None:
  """Prompt tuning cannot read packed rows (each example needs its own prompt)."""
  if cfg is None or cfg.prompt is None:
    return
  for ds in dataset_cfgs:
    if ds is not None and ds.pack:
      raise DeltaError(
          f'prompt tuning needs unpacked inputs, but the {ds.split!r} data of '
          f'{ds.mixture_or_task_name!r} is packed (a packed row holds several examples, each '
          'needing its own prompt): set data.DatasetConfig.pack = False, as '
          'gin/delta/prompt.gin does for train/ and train_eval/')


def check_targets(cfg: Optional[DeltaConfig], params) -> None:
  """Every LoRA/BitFit target names at least one projection; else the ones that exist."""
  if cfg is None:
    return
  flat = traverse_util.flatten_dict(params)
  modules = sorted({'/'.join(k[:-1]) for k in flat if k[-1] == 'kernel'})
  for name, method in (('LoRA', cfg.lora), ('BitFit', cfg.bitfit)):
    if method is None:
      continue
    for target in method.targets:
      if not any(_matches([target], m) for m in modules):
        names = sorted({m.rsplit('/', 1)[-1] for m in modules})
        raise errors.UserError(
            f'{name} target {target!r} matches no projection of this model. Module names: '
            f'{names} (or PEFT\'s q, k, v, o); a regex must match a whole path such as '
            f"{modules[0]!r}.")
