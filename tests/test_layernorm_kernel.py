"""The fused LayerNorm kernel (gpt.kernels.layernorm, one C++ pass per direction) against XLA's
LayerNorm (gpt.layers.layer_norm) and a float64 reference: values and gradients of x, g and b at odd
sizes, under jit, a layer scan and remat; and that training's model runs it (and only there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import layers
from gpt.kernels import layernorm as kln
from gpt.model import GPTConfig, init_model

pytestmark = pytest.mark.skipif(not kln.available(), reason=f"layernorm kernel not built: "
                                f"{kln.why_unavailable()}")


def reference64(x, g, b, dy):
  """LayerNorm's y and the gradients of sum(y * dy) in float64 (numpy), the textbook formulas."""
  x, g, b, dy = (np.asarray(a, np.float64) for a in (x, g, b, dy))
  D = x.shape[-1]
  mean = x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + layers.LN_EPS)
  xhat = (x - mean) * rstd
  dxhat = dy * g
  dx = rstd * (dxhat - dxhat.sum(-1, keepdims=True) / D - xhat * (dxhat * xhat).sum(-1, keepdims=True) / D)
  rows = tuple(range(x.ndim - 1))
  return xhat * g + b, dx, (dy * xhat).sum(rows), dy.sum(rows)


def inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  D = shape[-1]
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return 3 * f(*shape) + 1, f(D), f(D), f(*shape)


def value_and_grads(fn, x, g, b, dy):
  y, vjp = jax.vjp(fn, x, g, b)
  return (y, *vjp(dy))


def rel_err(a, ref):
  ref = np.asarray(ref, np.float64)
  return np.max(np.abs(np.asarray(a, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30)


@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 7, 768), (2, 33, 17), (100, 384), (4, 1)])
def test_matches_xla_and_float64(shape):
  x, g, b, dy = inputs(shape)
  kernel = jax.jit(lambda *a: value_and_grads(lambda x, g, b: kln.layer_norm(x, g, b, layers.LN_EPS), *a))
  xla = jax.jit(lambda *a: value_and_grads(layers.layer_norm, *a))
  ref = reference64(x, g, b, dy)
  for name, k, c, r in zip(("y", "dx", "dg", "db"), kernel(x, g, b, dy), xla(x, g, b, dy), ref):
    assert k.shape == c.shape and k.dtype == jnp.float32, name
    # The kernel is as close to float64 as XLA's float32 is (both a few ulps of the largest value).
    assert rel_err(k, r) <= max(4 * rel_err(c, r), 1e-6), (name, rel_err(k, r), rel_err(c, r))
    np.testing.assert_allclose(k, c, rtol=1e-5, atol=2e-5 * float(np.max(np.abs(c))), err_msg=name)


def test_deterministic_and_constant_rows():
  """The same bits twice (g's and b's gradients are summed in block order, not thread order), and
  a constant row (variance 0) gives b, as XLA's: no NaN."""
  x, g, b, dy = inputs((257, 64), seed=1)
  x = x.at[5].set(2.5)
  fn = jax.jit(lambda *a: value_and_grads(lambda x, g, b: kln.layer_norm(x, g, b, layers.LN_EPS), *a))
  first, second = fn(x, g, b, dy), fn(x, g, b, dy)
  for a, c in zip(first, second):
    np.testing.assert_array_equal(a, c)
  assert np.all(np.isfinite(np.asarray(first[1])))
  np.testing.assert_allclose(first[0][5], b, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_under_scan_and_remat(remat):
  """Stacked g, b over a lax.scan of layers (as gpt.model's blocks), with and without jax.checkpoint:
  gradients as XLA's LayerNorm gives them."""
  L, shape = 3, (2, 9, 48)
  x, _, _, _ = inputs(shape, seed=2)
  rng = np.random.default_rng(3)
  gs = jnp.asarray(1 + 0.1 * rng.standard_normal((L, shape[-1])), jnp.float32)
  bs = jnp.asarray(0.1 * rng.standard_normal((L, shape[-1])), jnp.float32)

  def loss(norm):
    def layer(h, p):
      return h + jnp.tanh(norm(h, *p)), None
    layer = jax.checkpoint(layer) if remat else layer
    return lambda x, gs, bs: jnp.sum(jnp.sin(jax.lax.scan(layer, x, (gs, bs))[0]))

  kern = lambda h, g, b: kln.layer_norm(h, g, b, layers.LN_EPS)
  got = jax.jit(jax.value_and_grad(loss(kern), argnums=(0, 1, 2)))(x, gs, bs)
  want = jax.jit(jax.value_and_grad(loss(layers.layer_norm), argnums=(0, 1, 2)))(x, gs, bs)
  for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5 * float(np.max(np.abs(c))))


def tiny(matmul):
  return GPTConfig(n_vocab=97, n_ctx=16, n_embd=32, n_head=2, n_layer=2, matmul=matmul)


def lowered_text(model, tokens):
  return jax.jit(lambda m, t: nnx.value_and_grad(lambda m: jnp.mean(m(t)))(m)).lower(
      model, tokens).as_text()


def test_model_uses_it_where_matmul_is_mkl(monkeypatch):
  """The model's LayerNorms (blocks and ln_f) take the kernel where model.matmul resolved to "mkl"
  (training on one CPU device), forward and backward; XLA's elsewhere and with USE_KERNEL off; and
  the loss and gradients are XLA's LayerNorm's. Fails if the route silently stops being used."""
  tokens = jnp.arange(24).reshape(2, 12) % 97
  mkl, xla = init_model(tiny("mkl")), init_model(tiny("xla"))
  assert mkl.ln_f.kernel and mkl.h.ln_1.kernel and not xla.ln_f.kernel
  text = lowered_text(mkl, tokens)
  assert kln.FORWARD in text and kln.BACKWARD in text
  assert kln.FORWARD not in lowered_text(xla, tokens)
  monkeypatch.setattr(kln, "USE_KERNEL", False)
  assert kln.FORWARD not in lowered_text(mkl, tokens)
  monkeypatch.setattr(kln, "USE_KERNEL", True)
  # Same parameters (both seed 0): the kernel's loss and gradients are XLA's LayerNorm's.
  grads = lambda m: jax.jit(lambda m, t: nnx.value_and_grad(lambda m: jnp.mean(m(t) ** 2))(m))(m, tokens)
  (l1, g1), (l2, g2) = grads(mkl), grads(xla)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, c in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(c)))))


def test_other_dtypes_keep_xla():
  """bfloat16 inputs are not the kernel's: LayerNorm(kernel=True) falls back to XLA's, same values."""
  x, g, b, _ = inputs((2, 5, 32))
  ln = layers.LayerNorm(32, kernel=True)
  ln.g.value, ln.b.value = g, b
  xb = x.astype(jnp.bfloat16)
  assert not kln.takes(xb, g, b)
  text = jax.jit(lambda x: ln(x)).lower(xb).as_text()
  assert kln.FORWARD not in text
  np.testing.assert_array_equal(ln(xb), layers.layer_norm(xb, g, b))
