"""The bfloat16 products (train-bf16, session 9): gpt.matmul.bf16_matmul, model.matmul_dtype and
the bf16 route of the fused output loss.

bf16_matmul rounds its operands (and, in the backward, the cotangent) to bfloat16 and accumulates
in float32, so it is held to a float64 reference of the same rounded numbers (tight), and to the
float32 product within bfloat16's tolerance. The compiled gradient's dots are checked to stay
bf16 x bf16 (XLA:CPU silently upcasts some layouts to float32 dots, the slow path this route
exists to avoid). The model with model.matmul_dtype=bfloat16 (torch autocast's recipe) and with
model.dtype=bfloat16 is compared with the float32 model, loss and every gradient.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt import matmul as mm
from gpt import output_loss
from gpt.errors import GPTError
from gpt.kernels import gelu as kgelu
from gpt.kernels import gemm
from gpt.kernels import transpose as ktr
from gpt.model import GPTConfig
from gpt.output_loss import tied_cross_entropy
from tests import bf16_cases as cases

BF16 = jnp.bfloat16


def _operands(M, K, N, transpose_w, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  w = jnp.asarray(rng.standard_normal((N, K) if transpose_w else (K, N)), dtype)
  dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
  return x, w, dy


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bf16_matmul_and_its_gradients_match_float64_on_the_rounded_operands(transpose_w):
  x, w, dy = _operands(9, 24, 40, transpose_w)
  y, vjp = jax.vjp(lambda x, w: mm.bf16_matmul(x, w, transpose_w), x, w)
  dx, dw = vjp(dy)
  x64, w64, dy64 = cases.rounded64(x), cases.rounded64(w), cases.rounded64(dy)
  wk = w64.T if transpose_w else w64  # [K, N]
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(y, x64 @ wk, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dy64 @ wk.T, rtol=1e-5, atol=1e-5)
  want_dw = x64.T @ dy64
  np.testing.assert_allclose(dw, want_dw.T if transpose_w else want_dw, rtol=1e-5, atol=1e-5)


def test_bf16_matmul_gives_gradients_in_the_operands_dtypes_and_leading_axes():
  x, w, dy = _operands(6, 8, 5, False, dtype=BF16)
  x3 = x.reshape(2, 3, 8)
  y, vjp = jax.vjp(lambda x, w: mm.bf16_matmul(x, w), x3, w.astype(jnp.float32))
  dx, dw = vjp(dy.reshape(2, 3, 5))
  assert y.shape == (2, 3, 5) and y.dtype == jnp.float32
  assert dx.dtype == BF16 and dx.shape == (2, 3, 8) and dw.dtype == jnp.float32


@pytest.mark.parametrize("vjp", [False, True])
@pytest.mark.parametrize("spec", ["...d,df->...f", "...d,vd->...v"])
def test_matmul_routes_bf16_products_and_stays_near_float32(spec, vjp, monkeypatch):
  monkeypatch.setattr(mm, "BF16_VJP", vjp)
  transpose_w = spec == "...d,vd->...v"
  x, w, dy = _operands(2 * 7, 16, 33, transpose_w, seed=3)
  x = x.reshape(2, 7, 16)

  def grads(f):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * dy.reshape(2, 7, 33)), argnums=(0, 1))(x, w)

  want = grads(lambda x, w: mm.matmul(x, w, spec))
  bf16_in = lambda x, w: mm.matmul(x.astype(BF16), w.astype(BF16), spec)  # model.dtype=bfloat16
  for f in (lambda x, w: mm.matmul(x, w, spec, impl="bf16"), bf16_in):  # and matmul_dtype
    for g, r in zip(grads(f), want):
      scale = np.abs(np.asarray(r)).max()
      np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=0.03 * scale)
  jaxpr = str(jax.make_jaxpr(lambda x, w: mm.matmul(x, w, spec, impl="bf16"))(x, w))
  assert "custom_vjp_call" in jaxpr
  assert ("custom_vjp_call" in str(jax.make_jaxpr(bf16_in)(x, w))) == vjp  # BF16_VJP, opt-in


@pytest.mark.parametrize("transpose_w", [False, True])
def test_the_compiled_gradient_keeps_every_dot_bf16(transpose_w):
  """All three products stay bf16 x bf16 -> f32 dots in XLA:CPU's compiled program: a dW made by
  contracting the rows of a non-transposed operand would be upcast to a float32 dot."""
  if jax.default_backend() != "cpu":
    pytest.skip("XLA:CPU's dot rewriting")
  x, w, dy = _operands(64, 32, 48, transpose_w)
  step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(mm.bf16_matmul(x, w, transpose_w) * dy),
                          argnums=(0, 1)))
  dots = cases.dot_operand_types(step.lower(x, w).compile().as_text())
  assert len(dots) == 3 and all(t == ("bf16", "bf16") for t in dots), dots


def test_matmul_dtype_is_validated():
  with pytest.raises(GPTError, match="model.matmul_dtype='fp8'; choose one of"):
    GPTConfig(matmul_dtype="fp8")
  assert GPTConfig(matmul_dtype="bfloat16").product_impl == "bf16"
  assert GPTConfig(matmul="mkl").product_impl == "mkl"


@pytest.mark.parametrize("impl", ["xla", "mkl"])
def test_bf16_output_loss_matches_the_float32_reference(impl):
  if impl == "mkl" and not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")
  rng = np.random.default_rng(5)
  h = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
  wte = jnp.asarray(0.3 * rng.standard_normal((53, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 53, (2, 9)), jnp.int32)

  def reference(h, w):
    logits = jnp.einsum("...d,vd->...v", h, w)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  got = jax.jit(jax.value_and_grad(
      lambda h, w: tied_cross_entropy(h, w, targets, impl=impl, bf16=True), argnums=(0, 1)))(h, wte)
  want = jax.value_and_grad(reference, argnums=(0, 1))(h, wte)
  assert got[1][0].dtype == got[1][1].dtype == jnp.float32
  np.testing.assert_allclose(got[0], want[0], rtol=0.01)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, atol=0.02 * np.abs(np.asarray(r)).max())
  jaxpr = str(jax.make_jaxpr(lambda h, w: tied_cross_entropy(h, w, targets, impl=impl, bf16=True))(
      h, wte))
  # The C++ pass (mkl) runs as one VJP writing the bf16 gradients (output_loss._bf16_head);
  # without it bf16_matmul's and _xent's.
  assert jaxpr.count("custom_vjp_call") == (1 if impl == "mkl" and output_loss.BF16_HEAD else 2)


@pytest.mark.parametrize("fields", [dict(matmul_dtype="bfloat16"),
                                    dict(matmul_dtype="bfloat16", output_loss="fused"),
                                    dict(dtype="bfloat16", output_loss="fused"),
                                    dict(dtype="bfloat16")])
def test_the_models_bf16_products_stay_near_float32(fields):
  """Loss and every parameter's gradient of the train step with bf16 products against the
  float32 model (same weights): within bfloat16's rounding, relative to each gradient's size."""
  loss, grads = cases.train_loss_and_grads(**fields)
  want_loss, want = cases.train_loss_and_grads()
  np.testing.assert_allclose(loss, want_loss, rtol=0.01)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32, path  # float32 master weights get float32 gradients
    np.testing.assert_allclose(g, r, atol=0.05 * np.abs(np.asarray(r)).max(), err_msg=str(path))


def test_bf16_vjp_switch_changes_only_the_backward_route(monkeypatch):
  """model.dtype=bfloat16 with and without bf16_matmul's VJP (gpt.matmul.BF16_VJP): the same loss,
  gradients within bfloat16's rounding of each other."""
  monkeypatch.setattr(mm, "BF16_VJP", False)
  old_loss, old = cases.train_loss_and_grads(dtype="bfloat16", output_loss="fused")
  monkeypatch.setattr(mm, "BF16_VJP", True)
  loss, grads = cases.train_loss_and_grads(dtype="bfloat16", output_loss="fused")
  np.testing.assert_allclose(loss, old_loss, rtol=1e-3)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(old)):
    np.testing.assert_allclose(g, r, atol=0.05 * np.abs(np.asarray(r)).max())


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_bf16_gelu_matmul_is_the_gelu_then_bf16_matmul(lead, kernel, monkeypatch):
  """bf16_gelu_matmul(h, w) against bf16_matmul(gelu(h), w) differentiated apart: the same value,
  the same dW (gelu(h) rounded alike; with gelu.cc's pass (GELU_T_KERNEL) gelu(h) may round one
  bfloat16 step apart where XLA's tanh and the pass's differ in float32), dh within float32 rounding
  (it recomputes the GELU's slope from h); and against float64 of the rounded operands."""
  if kernel and not kgelu.available():
    pytest.skip(f"gelu kernel not built: {kgelu.why_unavailable()}")
  monkeypatch.setattr(mm, "GELU_T_KERNEL", kernel)
  h, w, dy = _operands(6, 24, 40, False, seed=5)
  h = h.reshape(*lead, 24)
  dy = dy.reshape(*lead, 40)
  gelu = lambda h: jax.nn.gelu(h, approximate=True)
  y, vjp = jax.vjp(mm.bf16_gelu_matmul, h, w)
  y0, vjp0 = jax.vjp(lambda h, w: mm.bf16_matmul(gelu(h), w), h, w)
  assert y.shape == h.shape[:-1] + (40,) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
  (dh, dw), (dh0, dw0) = vjp(dy), vjp0(dy)
  assert dh.shape == h.shape and dh.dtype == dw.dtype == jnp.float32
  # One bfloat16 step of gelu(h) (2^-7 relative) at a few elements moves dW by at most that much
  # of sum |gelu(h)| |dy| over the rows.
  g64 = cases.rounded64(gelu(h)).reshape(-1, 24)
  dw_tol = 2.0 ** -7 * np.abs(g64).T @ np.abs(cases.rounded64(dy).reshape(-1, 40)) if kernel else 1e-6
  assert np.all(np.abs(np.asarray(dw) - np.asarray(dw0)) <= dw_tol + 1e-6 * np.abs(np.asarray(dw0)))
  np.testing.assert_allclose(dh, dh0, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(dh0)).max())
  np.testing.assert_allclose(y.reshape(-1, 40), g64 @ cases.rounded64(w), rtol=1e-5, atol=1e-5)


needs_gelu_kernel = pytest.mark.skipif(not kgelu.available(),
                                       reason=f"gelu kernel not built: {kgelu.why_unavailable()}")


@needs_gelu_kernel
@pytest.mark.parametrize("n,m", [(1024, 96), (37, 45), (5, 130), (1, 1)])
def test_gelu_bf16t_pass_against_float64_and_xla(n, m):
  """gelu.cc's GptGeluBwdBf16T: dh = dg gelu'(h) within float32 rounding of float64 (as tight as
  the float32 pass, tighter than XLA's tanh); gelu(h)^T laid out [M, N], within one bfloat16 step of
  XLA's rounded gelu(h) and within half a step (plus float32 error) of float64's; sizes not
  multiples of the pass's 32 x 64 tiles."""
  rng = np.random.default_rng(n + m)
  h = jnp.asarray(3 * rng.standard_normal((n, m)), jnp.float32)
  dg = jnp.asarray(rng.standard_normal((n, m)), jnp.float32)
  dh, g_t = jax.jit(kgelu.gelu_backward_bf16t)(h, dg)
  assert dh.shape == (n, m) and dh.dtype == jnp.float32
  assert g_t.shape == (m, n) and g_t.dtype == BF16
  h64, dg64 = np.asarray(h, np.float64), np.asarray(dg, np.float64)
  c, a = np.sqrt(2 / np.pi), 0.044715
  z = c * (h64 + a * h64 ** 3)
  t = np.tanh(z)
  g64 = h64 / (1 + np.exp(-2 * z))  # 0.5 h (1 + t) without 1 + t's cancellation at h << 0
  slope = 0.5 * (1 + t) + 0.5 * h64 * (1 - t * t) * c * (1 + 3 * a * h64 * h64)
  np.testing.assert_allclose(dh, dg64 * slope, rtol=2e-6, atol=2e-6)
  got = np.asarray(g_t.astype(jnp.float32), np.float64).T
  step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(g64), 1e-30))) - 7)  # bf16 spacing at g
  assert np.all(np.abs(got - g64) <= 0.5 * step + 1e-6 * np.abs(g64) + 1e-38)
  xla = np.asarray(jax.nn.gelu(h, approximate=True).astype(BF16).astype(jnp.float32), np.float64)
  # (XLA's 0.5 h (1 + tanh) loses gelu's tiny values at h << 0: absolute float32 error there.)
  assert np.all(np.abs(got - xla) <= step + 1e-6)


@needs_gelu_kernel
def test_gelu_bf16t_pass_rounds_as_xla_bit_for_bit():
  """Where gelu(h) = h exactly in float32 (h >= 10: the tanh is 1), the pass's bfloat16 is XLA's
  convert of h, bit for bit: random mantissas, ties to even both ways, NaN (kept, quiet)."""
  rng = np.random.default_rng(3)
  bits = (rng.integers(0x41200000, 0x47000000, (64, 80), dtype=np.int64)).astype(np.uint32)
  bits[0, :4] = [0x41208000, 0x41218000, 0x41207fff, 0x41218001]  # ties: down, up; below, above
  h = bits.view(np.float32).copy()
  h[1, :3] = [np.nan, np.inf, 1e30]
  h = jnp.asarray(h)
  _, g_t = jax.jit(kgelu.gelu_backward_bf16t)(h, jnp.ones_like(h))
  got, want = np.asarray(g_t).view(np.uint16).T, np.asarray(h.astype(BF16)).view(np.uint16)
  nan = np.isnan(np.asarray(h))
  assert np.array_equal(got[~nan], want[~nan])
  assert np.all(np.isnan(np.asarray(g_t.astype(jnp.float32)).T[nan]))


@pytest.mark.parametrize("kernel", [False, True])
def test_bf16_gelu_matmul_gathers_gelu_h_only_without_the_pass(kernel, monkeypatch):
  """The compiled gradient of bf16_gelu_matmul: with gelu.cc's pass (GELU_T_KERNEL) it calls the
  pass and holds no gather (the transposed gelu(h) comes from the pass) and no tanh; without it,
  XLA's tanh and its gather of the rounded gelu(h)^T, which is what the pass removes."""
  if kernel and not kgelu.available():
    pytest.skip(f"gelu kernel not built: {kgelu.why_unavailable()}")
  monkeypatch.setattr(mm, "GELU_T_KERNEL", kernel)
  h, w, dy = _operands(48, 64, 40, False, seed=2)
  grad = jax.jit(jax.grad(lambda h, w: jnp.sum(mm.bf16_gelu_matmul(h, w) * dy), argnums=(0, 1)))
  hlo = grad.lower(h, w).compile().as_text()
  assert (re.search(r"\bgather\(", hlo) is None) == kernel
  assert (kgelu.BACKWARD_BF16T in hlo) == kernel
  # (The gradient alone drops the forward's GELU: any tanh left is the backward's recomputation.)
  assert (re.search(r"\btanh\(", hlo) is None) == kernel


needs_transpose_kernel = pytest.mark.skipif(
    not ktr.available(), reason=f"transpose kernel not built: {ktr.why_unavailable()}")


@needs_transpose_kernel
@pytest.mark.parametrize("m,n", [(37, 300), (64, 256), (1, 1), (300, 17), (33, 513)])
def test_bf16_with_t_is_xlas_convert_and_transpose_bit_for_bit(m, n):
  """transpose.cc's pass: a rounded to bfloat16 as XLA's convert rounds it, bit for bit (random
  values, ties to even both ways, infinities, -0), and its transpose laid out [N, M]; sizes not
  multiples of its 32 x 256 tiles; NaN stays NaN."""
  rng = np.random.default_rng(m * n)
  a = (rng.standard_normal((m, n)) * 10.0 ** rng.integers(-3, 4, (m, n))).astype(np.float32)
  specials = np.array([0x3f808000, 0x3f818000, 0x3f807fff, 0x3f818001], np.uint32).view(np.float32)
  flat = a.reshape(-1)
  flat[:4] = specials[:flat.size]
  if flat.size > 8:
    flat[4:8] = [np.inf, -np.inf, -0.0, np.nan]
  a = jnp.asarray(a)
  b, b_t = jax.jit(ktr.bf16_with_t)(a)
  assert b.shape == (m, n) and b_t.shape == (n, m) and b.dtype == b_t.dtype == BF16
  want = np.asarray(a.astype(BF16)).view(np.uint16)
  nan = np.isnan(np.asarray(a))
  got, got_t = np.asarray(b).view(np.uint16), np.asarray(b_t).view(np.uint16)
  assert np.array_equal(got[~nan], want[~nan]) and np.array_equal(got_t.T, got)
  assert np.all(np.isnan(np.asarray(b.astype(jnp.float32))[nan]))


def _grad_hlo_and_values(transpose_w, x, w, dy):
  # dy an argument, not a constant: XLA would fold its rounding and transpose away.
  f = lambda x, w, dy: jnp.sum(mm.bf16_matmul(x, w, transpose_w) * dy)
  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  return grad.lower(x, w, dy).compile().as_text(), grad(x, w, dy)


@needs_transpose_kernel
@pytest.mark.parametrize("transpose_w,switch", [(True, "DY_T_KERNEL"), (False, "X_T_FORWARD")])
def test_the_transpose_pass_removes_bf16_matmuls_gather_and_changes_no_bit(transpose_w, switch,
                                                                           monkeypatch):
  """With a transposed weight (the tied head) DY_T_KERNEL, with a [K, N] weight (the layers)
  X_T_FORWARD take dW's row-major transposed operand from transpose.cc's pass: the compiled
  gradient then calls the pass and holds no gather, and both gradients are the same bits as
  XLA's convert and gather give (the same rounding, the same dots)."""
  x, w, dy = _operands(48, 64, 40, transpose_w, seed=4)
  monkeypatch.setattr(mm, "DY_T_KERNEL", False)
  monkeypatch.setattr(mm, "X_T_FORWARD", False)
  hlo_off, (dx0, dw0) = _grad_hlo_and_values(transpose_w, x, w, dy)
  monkeypatch.setattr(mm, switch, True)
  hlo_on, (dx, dw) = _grad_hlo_and_values(transpose_w, x, w, dy)
  assert re.search(r"\bgather\(", hlo_off) and ktr.TARGET not in hlo_off
  assert re.search(r"\bgather\(", hlo_on) is None and ktr.TARGET in hlo_on
  np.testing.assert_array_equal(dx, dx0)
  np.testing.assert_array_equal(dw, dw0)


def _mixed_step_hlo(**fields) -> str:
  """The compiled gradient of the train loss with model.matmul_dtype=bfloat16 (layer scan)."""
  from flax import nnx

  from gpt.model import init_model
  from gpt.train_step import loss_fn

  windows = jnp.zeros((2, 13), jnp.int32)  # 24 rows: no weight's shape
  model = init_model(GPTConfig(n_vocab=61, n_ctx=16, n_embd=32, n_head=2, n_layer=2,
                               matmul_dtype="bfloat16", **fields))
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.jit(jax.grad(lambda p: loss_fn(p, graphdef, windows, None, 0.0, False))).lower(
      params).compile().as_text()


def test_the_mixed_scan_stacks_no_bf16_weight_copy_nor_gelu_output(monkeypatch):
  """Under the layer scan the mixed step keeps no bf16 copy of a layer's weight for the backward
  (bf16_matmul rounds the weight again there: ROUND_W_AGAIN) and no rounded gelu(h) [layers, rows,
  4D] (the MLP's c_proj is bf16_gelu_matmul, keeping h alone); each switch off brings its stack
  back, which is what this would catch."""
  from gpt import layers
  weights = ("bf16[2,32,96]", "bf16[2,32,32]", "bf16[2,32,128]", "bf16[2,128,32]")
  gelu_out = "bf16[2,24,128]"
  hlo = _mixed_step_hlo()
  assert not [s for s in weights + (gelu_out,) if s in hlo]
  monkeypatch.setattr(mm, "ROUND_W_AGAIN", False)
  hlo = _mixed_step_hlo()
  # (the MLP's c_proj keeps its weight either way: bf16_gelu_matmul rounds it in its backward)
  assert all(s in hlo for s in weights[:3]) and weights[3] not in hlo and gelu_out not in hlo
  monkeypatch.setattr(mm, "ROUND_W_AGAIN", True)
  monkeypatch.setattr(layers, "GELU_IN_MATMUL", False)
  assert gelu_out in _mixed_step_hlo()


def test_bench_bf16_dots_products_agree():
  """experiments/bench_bf16_dots.py times each product in two layouts: both compute the same."""
  from experiments import bench_bf16_dots

  progs = bench_bf16_dots.programs(8, 4, 6)
  contract, copy = (np.asarray(f(*a)) for f, a, _ in
                    (progs["dW=x^T dy contract rows"], progs["dW=x^T dy row-major copy"]))
  np.testing.assert_array_equal(contract, copy)
  np.testing.assert_array_equal(contract, np.full((4, 6), 8.0))
