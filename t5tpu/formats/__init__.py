"""Checkpoint interop: read public T5 checkpoints, write ones t5x and Hugging Face can load.

Every reader returns t5x's state dict, the one layout the rest of t5tpu understands:

  {'target': {...params, t5x names...},
   'state': {'step': int, 'param_states': {...Adafactor v_row/v_col/v/m...}}}

with numpy leaves and `param_states` only where the checkpoint has an optimizer state.

  t5x_legacy   msgpack `checkpoint` file + gzip zarr folders (every public gs://.../t5x/ model)
  t5x_orbax    checkpoint_N/state, what t5x's train() and t5tpu write today
  mtf          Mesh-TensorFlow model.ckpt-N (gs://t5-data/pretrained_models/{small,...,11B})
  hf           transformers T5ForConditionalGeneration (config.json + safetensors / .bin)
  hub          hf://org/name[@revision]: a hub name, from the Hugging Face cache or downloaded
  convert      the `t5tpu convert` command
  detect       which format a path holds (detect_format), and reading any of them
  peft         PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors)

A checkpoint that cannot be read (truncated, corrupt, another kind of model, not there) is a
user error: the readers raise the classes below, which are also the builtin error they
replace (ValueError, FileNotFoundError, FileExistsError), so callers that caught those still do.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import numpy as np
from flax import traverse_util

from t5tpu import errors

SEP = '/'


class CheckpointReadError(errors.UserError, ValueError):
  """A checkpoint that is there but cannot be read: truncated, corrupt, or not a T5."""


class CheckpointNotFoundError(errors.UserError, FileNotFoundError):
  """A checkpoint path that holds no checkpoint of any supported format."""


class OutputExistsError(errors.UserError, FileExistsError):
  """A conversion would overwrite a checkpoint that is already there."""


# What a truncated or corrupt download usually needs.
COPY_AGAIN = ('copy the checkpoint again (t5tpu gcs cp, or gsutil -m cp -r) and compare its '
              'size with the source')


def describe_error(error: BaseException) -> str:
  """'Type: message' of a library's error, for the end of one of ours; tensorstore's
  kilobyte-long spec dump is cut off (the message before it says what failed)."""
  text = re.sub(r"\s*\[tensorstore_spec='.*$", '', str(error), flags=re.DOTALL).strip()
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def flatten(tree) -> dict:
  """{'a': {'b': x}} -> {'a/b': x} (empty subtrees vanish)."""
  return traverse_util.flatten_dict(tree, sep=SEP) if tree else {}


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


# ----------------------------------------------------------------------------- the state dict
#
# The one place that knows t5x's layout. Leaves may be numpy, jax arrays or ShapeDtypeStructs
# (a TrainState's abstract layout goes through the same functions).

TARGET = 'target'  # the parameters' key (an orbax partial restore names it alone)

def make_state_dict(target, step=0, param_states=None) -> dict:
  """{'target': target, 'state': {'step': step[, 'param_states': param_states]}}; the
  optimizer state is left out when there is none (None or empty)."""
  state = {'step': step}
  if param_states:
    state['param_states'] = param_states
  return {TARGET: target, 'state': state}


def params_of(state_dict: dict):
  """The parameter tree (t5x's 'target')."""
  return state_dict[TARGET]


def step_of(state_dict: dict):
  """The step as stored (a number or an array); 0 when the state dict has none."""
  return (state_dict.get('state') or {}).get('step', 0)


def param_states_of(state_dict: dict):
  """The optimizer state (per-parameter slots), or None when the checkpoint has none."""
  return (state_dict.get('state') or {}).get('param_states') or None


def with_params(state_dict: dict, target) -> dict:
  """The same state dict with other parameters (cast, merged, ...)."""
  return {**state_dict, TARGET: target}


# Full state-dict names, as in t5x's assignment maps and error messages:
# 'target/encoder/layers_0/attention/query/kernel', 'state/param_states/.../v_row'.
TARGET_PREFIX = TARGET + SEP
PARAM_STATES_PREFIX = 'state' + SEP + 'param_states' + SEP


def cast_floating(tree, dtype: Optional[str]):
  """Casts floating leaves to dtype ('float32', 'bfloat16'); others stay. numpy leaves stay
  on the host, jax arrays on their devices (and shardings)."""
  if dtype is None:
    return tree
  import jax
  import jax.numpy as jnp  # knows 'bfloat16' (via ml_dtypes)
  dt = jnp.dtype(dtype)

  def cast(x):
    x = x if hasattr(x, 'astype') else np.asarray(x)
    return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x
  return jax.tree.map(cast, tree)


def infer_config(flat_param_shapes: Mapping[str, tuple], **overrides):
  """The T5Config a parameter tree implies, including the relative-attention bucket count."""
  from t5tpu import model_shapes
  cfg = model_shapes.config_from_param_shapes(flat_param_shapes)
  buckets = flat_param_shapes['encoder/relpos_bias/rel_embedding'][1]
  return dataclasses.replace(cfg, relative_attention_num_buckets=int(buckets), **overrides)


def model_param_shapes(cfg) -> dict:
  """{'/'-name: shape} of the network `cfg` describes (abstract: nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from t5tpu import network
  ones = jnp.ones((1, 4), jnp.int32)
  variables = jax.eval_shape(
      lambda: network.Transformer(cfg).init(jax.random.PRNGKey(0), ones, ones))
  return {k: tuple(v.shape) for k, v in flatten(nn.unbox(variables['params'])).items()}
