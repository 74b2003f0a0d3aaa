"""The one matmul form every projection of the network and its deltas uses."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def traced_platform() -> str:
  """The platform the program traced now is for: the mesh's (part of jax's trace context, so
  one function traced for two platforms is traced twice), else this host's. `t5tpu plan`
  traces TPU programs on a CPU host."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def flattens() -> bool:
  """Whether projections traced now are 2-D matmuls over the flattened tokens.

  Decided by `traced_platform()`. On CPU the 2-D form is faster (see `project`). The TPU
  compiler does better with the batched einsum: T5.1.1-small's train step at batch 1236
  (128/32 tokens) needed 15.03 GiB of a v5e-1's HBM with it and 23.83 GiB with the 2-D form
  (both with the full-size attention-dropout mask of the time).
  GPUs keep the 2-D form they were measured with.
  """
  return traced_platform() != 'tpu'


def project(x, kernel, output_dtype=None):
  """x [..., in] times kernel [in, out]: the same products and sums in either form.

  The 2-D form is bit-identical to the batched einsum in float32 on CPU, but autodiff then
  takes the kernel's gradient as one [tokens, out]^T [tokens, in] matmul. With the 3-D form
  XLA:CPU first transposed the activation gradient inside a fused elementwise loop: a
  T5.1.1-small gated MLP's forward and backward took 111-130 ms instead of 76-81 on a 2-core
  machine (batch 8 x 128 tokens, float32).
  """
  if not flattens():
    return jnp.einsum('...i,io->...o', x, kernel, preferred_element_type=output_dtype)
  dtype = jnp.result_type(x, kernel)  # as einsum promotes mixed inputs
  flat, kernel = x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype)
  y = jax.lax.dot_general(flat, kernel, (((1,), (0,)), ((), ())),
                          preferred_element_type=output_dtype)
  return y.reshape(x.shape[:-1] + (kernel.shape[1],))
