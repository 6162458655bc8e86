"""gpt.output_loss.tied_cross_entropy (the fused output layer and loss of the train step) against
the unfused reference: optax's cross-entropy of the float32 logits h wte^T, differentiated by JAX.

Values and both gradients, with one chunk, several chunks and an uneven last chunk; bfloat16
compute against the float32 reference; and that the train step's loss is the reference's. The
MKL route (`impl="mkl"`: sgemm and gemm.cc's one-pass softmax cross-entropy) against the same
reference, its pass alone at GPT-2's vocabulary, and its fallbacks (skipped without MKL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt.kernels import gemm
from gpt.output_loss import tied_cross_entropy


@pytest.fixture
def mkl(monkeypatch):
  """The kernel, with MKL's products pinned (gemm.products() would take XLA's dot on a CPU other
  than Intel's)."""
  if not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")
  monkeypatch.delenv("GPT_GEMM_PRODUCTS", raising=False)
  monkeypatch.setattr(gemm, "PRODUCTS", "mkl")


def _reference(h, wte, targets):
  logits = jnp.einsum("...d,vd->...v", h, wte.astype(h.dtype), preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _inputs(B, T, D, V, dtype, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
  wte = jnp.asarray(0.3 * rng.standard_normal((V, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  return h, wte, targets


@pytest.mark.parametrize("rows", [64, 5, 3])  # one chunk; 4 chunks (uneven); 6 chunks
def test_values_and_gradients_match_the_reference(rows):
  h, wte, targets = _inputs(2, 8, 16, 37, jnp.float32)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, wte, targets)
  got = grad(lambda h, w, t: tied_cross_entropy(h, w, t, rows=rows))
  want = grad(_reference)
  for name, g, w in zip(("loss", "dh", "dwte"), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6, err_msg=name)
  value = jax.jit(lambda h, w, t: tied_cross_entropy(h, w, t, rows=rows))(h, wte, targets)
  np.testing.assert_allclose(value, want[0], rtol=2e-6)  # the value alone (no gradient made)


def test_the_cotangent_scales_the_gradients():
  h, wte, targets = _inputs(1, 6, 8, 11, jnp.float32, seed=1)
  g1 = jax.grad(lambda h: tied_cross_entropy(h, wte, targets, rows=4))(h)
  g3 = jax.grad(lambda h: 3.0 * tied_cross_entropy(h, wte, targets, rows=4))(h)
  np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-6)


def test_bfloat16_stays_close_to_the_float32_reference():
  h, wte, targets = _inputs(2, 8, 16, 37, jnp.bfloat16, seed=2)
  got = jax.value_and_grad(lambda h, w: tied_cross_entropy(h, w, targets, rows=5),
                           argnums=(0, 1))(h, wte)
  want = jax.value_and_grad(lambda h, w: _reference(h.astype(jnp.float32), w, targets),
                            argnums=(0, 1))(h, wte)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.02, rtol=0.05)


def test_the_train_steps_loss_and_gradients_are_the_same_with_either_output_loss():
  """gpt.train_step.loss_fn with model.output_loss=fused equals the whole-logits path (value and
  every parameter's gradient, the tied wte included)."""
  from flax import nnx

  from gpt.model import GPTConfig, init_model
  from gpt.train_step import loss_fn

  windows = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 13)), jnp.int32)

  def value_and_grads(output_loss):
    cfg = GPTConfig(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=2, output_loss=output_loss)
    model = init_model(cfg, seed=1)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jaxpr = str(jax.make_jaxpr(lambda p: loss_fn(p, graphdef, windows, None, 0.0, False))(params))
    calls = jaxpr.count("custom_vjp_call")
    return calls, jax.value_and_grad(loss_fn)(params, graphdef, windows, None, 0.0, False)

  (fused_calls, got), (calls, want) = value_and_grads("fused"), value_and_grads("logits")
  assert fused_calls == calls + 1  # the fused head really runs (beside the attention's own VJP)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("products", ["mkl", "xla"])  # who multiplies (gemm.products())
@pytest.mark.parametrize("shape", [(2, 8, 16, 37), (3, 7, 24, 50)])  # ragged: 21 rows, V % 16 != 0
def test_mkl_route_values_and_gradients_match_the_reference(mkl, monkeypatch, products, shape):
  monkeypatch.setattr(gemm, "PRODUCTS", products)
  h, wte, targets = _inputs(*shape, jnp.float32, seed=5)
  fused = lambda h, w, t: tied_cross_entropy(h, w, t, impl="mkl")
  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, wte, targets)
  want = jax.value_and_grad(_reference, argnums=(0, 1))(h, wte, targets)
  for name, g, w in zip(("loss", "dh", "dwte"), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6, err_msg=name)
  value = jax.jit(fused)(h, wte, targets)  # the value alone: logits and the pass, no gradients
  np.testing.assert_allclose(value, want[0], rtol=2e-6)
  hlo = jax.jit(jax.grad(fused, argnums=(0, 1))).lower(h, wte, targets).as_text()
  assert hlo.count(gemm.XENT_TARGET) == 1
  assert hlo.count(gemm.TARGET) == (3 if products == "mkl" else 0)
  g3 = jax.grad(lambda h: 3.0 * fused(h, wte, targets))(h)  # the cotangent scales the gradients
  np.testing.assert_allclose(g3, 3.0 * want[1][0], rtol=2e-5, atol=6e-6)


def test_mkl_route_accumulates_gradients_like_the_reference(mkl):
  """Two micro-batches summed under jax.lax.scan (the train step's gradient accumulation)."""
  h, wte, targets = _inputs(2, 9, 16, 41, jnp.float32, seed=6)

  def accumulated(loss):
    def body(carry, xs):
      value, grads = jax.value_and_grad(loss, argnums=(0, 1))(xs[0], wte, xs[1])
      return jax.tree.map(jnp.add, carry, (value, grads[1])), grads[0]
    zero = (jnp.zeros(()), jnp.zeros_like(wte))
    return jax.jit(lambda: jax.lax.scan(body, zero, (h, targets)))()

  got = accumulated(lambda h, w, t: tied_cross_entropy(h, w, t, impl="mkl"))
  want = accumulated(_reference)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("portable", [False, True])  # the AVX-512 sweeps; MKL's vsExp route
def test_softmax_xent_pass_at_the_gpt2_vocabulary(mkl, monkeypatch, portable):
  """gemm.softmax_xent alone over 50257 logits per row, large magnitudes included (the row max
  keeps exp finite), rows not a multiple of the kernel's 8-row blocks; an out-of-range target
  gives NaN (as jnp.take_along_axis's fill) and no one-hot. Both routes of the pass."""
  monkeypatch.setattr(gemm, "XENT_PORTABLE", portable)
  rng = np.random.default_rng(7)
  V = 50257
  logits = jnp.asarray(rng.standard_normal((11, V)) * np.linspace(1, 60, 11)[:, None], jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, 11), jnp.int32)
  dlogits, loss = jax.jit(lambda x, t: gemm.softmax_xent(x, t, 1 / 11))(logits, targets)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  want_grad = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).mean())(logits)
  np.testing.assert_allclose(loss, want, rtol=2e-6, atol=2e-5)
  np.testing.assert_allclose(dlogits, want_grad, rtol=2e-5, atol=1e-9)
  bad = targets.at[3].set(V)
  dlogits, loss = gemm.softmax_xent(logits, bad, 1.0)
  assert np.isnan(loss[3]) and np.isfinite(np.delete(np.asarray(loss), 3)).all()
  np.testing.assert_allclose(np.asarray(dlogits[3]).sum(), 1.0, rtol=1e-4)  # softmax, no one-hot


def test_mkl_route_falls_back_to_xla(mkl):
  """bfloat16 operands, or impl="xla" (GPU/TPU/meshes resolve model.matmul so), take the XLA
  version: no MKL call in the program, the same numbers as before."""
  h, wte, targets = _inputs(2, 8, 16, 37, jnp.float32, seed=8)
  for hh, impl in ((h.astype(jnp.bfloat16), "mkl"), (h, "xla")):
    f = lambda h, w: tied_cross_entropy(h, w, targets, impl=impl)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hh, wte).as_text()
    assert gemm.XENT_TARGET not in hlo and gemm.TARGET not in hlo
    np.testing.assert_array_equal(f(hh, wte), tied_cross_entropy(hh, wte, targets))


@pytest.mark.parametrize("output_loss,matmul,xent", [("auto", "mkl", True), ("auto", "xla", False),
                                                     ("logits", "mkl", False),
                                                     ("fused", "mkl", True)])
def test_heads_loss_chooses_the_output_layer(mkl, output_loss, matmul, xent):
  """heads.loss: `auto` is the MKL one-pass loss where the step's matmuls are MKL's, the whole
  logits elsewhere; and its value is the reference's either way."""
  from gpt import heads
  from gpt.model import GPTConfig, init_model

  cfg = GPTConfig(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=1, output_loss=output_loss,
                  matmul=matmul)
  model = init_model(cfg, seed=2)
  h, _, targets = _inputs(2, 5, 16, 61, jnp.float32, seed=9)
  hlo = jax.jit(lambda h: heads.loss(model, h, targets)).lower(h).as_text()
  assert (gemm.XENT_TARGET in hlo) == xent
  want = _reference(h, model.wte[...], targets)
  np.testing.assert_allclose(heads.loss(model, h, targets), want, rtol=2e-6)


def test_softmax_xent_pass_keeps_nan_and_infinities_as_optax():
  """Rows holding a NaN, +inf or -inf logit (a diverged step; a masked word): the AVX-512 pass's
  clamped exp would hide them, so such rows take the portable route and give optax's numbers
  (NaN loss and gradient for NaN/+inf; a finite loss with a zero gradient at a -inf word)."""
  if not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")
  rng = np.random.default_rng(11)
  V = 1000
  logits = rng.standard_normal((5, V)).astype(np.float32)
  logits[0, 17], logits[1, 999], logits[2, 500] = np.nan, np.inf, -np.inf  # 999: the 16-lane tail
  targets = jnp.asarray([3, 4, 5, 6, 7], jnp.int32)
  dlogits, loss = jax.jit(lambda x, t: gemm.softmax_xent(x, t, 1 / 5))(jnp.asarray(logits), targets)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  want_grad = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).mean())(
      jnp.asarray(logits))
  assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isnan(dlogits[0]).all()
  np.testing.assert_allclose(loss[2:], want[2:], rtol=2e-6)
  np.testing.assert_allclose(dlogits[2:], want_grad[2:], rtol=2e-5, atol=1e-9)
  assert dlogits[2, 500] == 0
