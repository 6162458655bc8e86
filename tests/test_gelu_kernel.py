"""The MLP's bias + GELU backward kernel (gpt.kernels.gelu: one C++ pass for du, gelu(h) and c_fc's
bias gradient between MKL's products) against XLA's differentiation of the same MLP and a float64
reference, at odd sizes, under a layer scan and remat; and that training's model runs it (only there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import layers
from gpt.kernels import gelu as kgelu
from gpt.kernels import gemm
from gpt.model import GPTConfig, init_model

pytestmark = pytest.mark.skipif(not (kgelu.available() and gemm.available()),
                                reason=f"gelu or gemm kernel not built: {kgelu.why_unavailable()} "
                                f"{gemm.why_unavailable()}")


def reference64(u, b, w, dy):
  """y = gelu(u + b) w and the gradients of sum(y * dy) in float64 (numpy), from the formulas."""
  u, b, w, dy = (np.asarray(a, np.float64) for a in (u, b, w, dy))
  c, a = np.sqrt(2 / np.pi), 0.044715
  h = u + b
  t = np.tanh(c * (h + a * h ** 3))
  g = 0.5 * h * (1 + t)
  slope = 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * a * h * h)
  du = (dy @ w.T) * slope
  return g @ w, du, du.sum(0), g.T @ dy


def xla_mlp(u, b, w):
  return jnp.einsum("nk,km->nm", jax.nn.gelu(u + b, approximate=True), w,
                    preferred_element_type=jnp.float32)


def rel_err(a, ref):
  ref = np.asarray(ref, np.float64)
  return np.max(np.abs(np.asarray(a, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30)


@pytest.mark.parametrize("n,k,m", [(37, 19, 5), (64, 1536, 384), (3, 33, 17), (1, 16, 1)])
def test_matches_xla_and_float64(n, k, m):
  rng = np.random.default_rng(n)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  u, b, w, dy = 2 * f(n, k), f(k), f(k, m), f(n, m)
  run = lambda fn: jax.jit(lambda u, b, w: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(fn, u, b, w)))
  got, xla, ref = run(kgelu.bias_gelu_matmul)(u, b, w), run(xla_mlp)(u, b, w), reference64(u, b, w, dy)
  for name, k_, x_, r in zip(("y", "du", "db", "dw"), got, xla, ref):
    assert k_.shape == x_.shape, name
    # Within a few float32 roundings of the float64 value, as XLA's (its tanh is not ours).
    assert rel_err(k_, r) <= max(4 * rel_err(x_, r), 4e-6), (name, rel_err(k_, r), rel_err(x_, r))


def test_extreme_inputs_saturate():
  """Large |h| saturates the tanh (no NaN from exp's overflow): gelu(h) = h or 0, slope 1 or 0."""
  u = jnp.asarray([[-200.0, -30.0, -5.0, 0.0, 5.0, 30.0, 200.0, 1e-3]], jnp.float32)
  b = jnp.zeros(8, jnp.float32)
  du, g, db = jax.jit(kgelu.bias_gelu_backward)(u, b, jnp.ones_like(u))
  want_g, want_du, _, _ = reference64(u, b, np.eye(8), np.ones((1, 8)))  # float64: gelu, slope
  assert np.all(np.isfinite(np.asarray(du))) and np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(g, want_g, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(du, want_du, rtol=1e-6, atol=5e-7)
  np.testing.assert_allclose(db, du[0])


@pytest.mark.parametrize("remat", [False, True])
def test_under_scan_and_remat(remat):
  L, n, d = 2, 24, 16
  rng = np.random.default_rng(7)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x, w1, b1, w2 = f(n, d), 0.3 * f(L, d, 4 * d), f(L, 4 * d), 0.3 * f(L, 4 * d, d)

  def loss(mlp):
    def layer(h, p):
      w1, b1, w2 = p
      return h + mlp(gemm.matmul(h, w1), b1, w2), None
    layer = jax.checkpoint(layer) if remat else layer
    return lambda x, w1, b1, w2: jnp.sum(jnp.sin(jax.lax.scan(layer, x, (w1, b1, w2))[0]))

  got = jax.jit(jax.value_and_grad(loss(kgelu.bias_gelu_matmul), argnums=(0, 1, 2, 3)))(x, w1, b1, w2)
  want = jax.jit(jax.value_and_grad(loss(xla_mlp), argnums=(0, 1, 2, 3)))(x, w1, b1, w2)
  for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(c))))


def tiny(matmul):
  return GPTConfig(n_vocab=97, n_ctx=16, n_embd=32, n_head=2, n_layer=2, matmul=matmul)


def test_model_uses_it_where_matmul_is_mkl(monkeypatch):
  """The model's MLPs take the kernel where model.matmul resolved to "mkl" (training on one CPU
  device), not with XLA's matmuls, nor with USE_KERNEL off (then
  gemm.gelu_matmul, as before); loss and gradients equal the XLA model's. Fails if the route
  silently stops being used. (Both switches are off by default: this turns the kernel on.)"""
  tokens = jnp.arange(24).reshape(2, 12) % 97
  monkeypatch.setattr(kgelu, "USE_KERNEL", True)  # opt-in since the lead's quiet retake, session 8
  program = lambda m: jax.jit(lambda m, t: nnx.value_and_grad(lambda m: jnp.mean(m(t) ** 2))(m))
  text = lambda m: program(m).lower(m, tokens).as_text()
  mkl, xla = init_model(tiny("mkl")), init_model(tiny("xla"))
  assert kgelu.BACKWARD in text(mkl)
  assert kgelu.BACKWARD not in text(xla)
  monkeypatch.setattr(kgelu, "USE_KERNEL", False)
  assert kgelu.BACKWARD not in text(mkl)
  monkeypatch.setattr(layers, "GELU_IN_MATMUL", False)
  assert kgelu.BACKWARD not in text(mkl)
  monkeypatch.setattr(kgelu, "USE_KERNEL", True)
  monkeypatch.setattr(layers, "GELU_IN_MATMUL", True)
  (l1, g1), (l2, g2) = program(mkl)(mkl, tokens), program(xla)(xla, tokens)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, c in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(c)))))
