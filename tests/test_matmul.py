"""matmul.project: the batched einsum's values and gradients, as one 2-D matmul."""
import jax
import jax.numpy as jnp
import numpy as np

from t5tpu import matmul


def _inputs(dtype=jnp.float32):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 16, 32), dtype)
  kernel = jnp.asarray(rng.randn(32, 48) * 0.1, dtype)
  return x, kernel


def test_values_and_gradients_equal_the_einsum_bit_for_bit():
  x, kernel = _inputs()
  einsum = lambda x, k: jnp.einsum('...i,io->...o', x, k)
  loss = lambda f: lambda x, k: jnp.sum(jnp.tanh(f(x, k)) ** 2)
  np.testing.assert_array_equal(jax.jit(matmul.project)(x, kernel), jax.jit(einsum)(x, kernel))
  got = jax.jit(jax.grad(loss(matmul.project), argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.grad(loss(einsum), argnums=(0, 1)))(x, kernel)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_array_equal(g, w)


def test_output_dtype_and_mixed_inputs():
  x, kernel = _inputs(jnp.bfloat16)
  y = matmul.project(x, kernel, jnp.float32)
  assert y.shape == (4, 16, 48) and y.dtype == jnp.float32
  # Mixed inputs promote as einsum does.
  y = matmul.project(x.astype(jnp.float32), kernel)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, jnp.einsum('...i,io->...o', x.astype(jnp.float32),
                                           kernel.astype(jnp.float32)), rtol=1e-6)


def _dot_lhs_ranks(fn, *args):
  """The rank of each dot_general's left operand, nested jaxprs included."""
  ranks = []
  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == 'dot_general':
        ranks.append(e.invars[0].aval.ndim)
      for sub in jax.core.jaxprs_in_params(e.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return ranks


def _mesh_on(platform):
  device = jax.sharding.AbstractDevice(device_kind=platform, num_cores=None, platform=platform)
  return jax.sharding.AbstractMesh((1,), ('data',), abstract_device=device)


def test_the_form_follows_the_platform_traced_for():
  x, kernel = _inputs()
  project = jax.jit(matmul.project)
  assert _dot_lhs_ranks(project, x, kernel) == [2]  # no mesh: this host's platform, CPU
  with jax.sharding.use_abstract_mesh(_mesh_on('tpu')):  # as `t5tpu plan` traces for a TPU
    assert _dot_lhs_ranks(project, x, kernel) == [3]  # the batched einsum: less TPU memory
  with jax.sharding.use_abstract_mesh(_mesh_on('cpu')):
    assert _dot_lhs_ranks(project, x, kernel) == [2]
