"""The mixed mode's bf16 tied head (train-head, session 10): gemm.softmax_xent_bf16, the pass
that writes bf16 dlogits and their transpose, and gpt.output_loss's bf16 head against session 9's
route, float64 and float32; split from test_bf16_matmul.py."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt import matmul as mm
from gpt import output_loss
from gpt.kernels import gemm
from gpt.kernels import transpose as ktr
from gpt.output_loss import tied_cross_entropy
from tests import bf16_cases as cases

BF16 = jnp.bfloat16


@pytest.fixture
def mkl():
  if not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")


def _bits(a):
  return np.asarray(a).view(np.uint16)


@pytest.mark.parametrize("N,V", [(45, 50257), (3, 1000), (64, 77)])
def test_softmax_xent_bf16_is_the_float32_pass_rounded(mkl, N, V):
  """gemm.softmax_xent_bf16: its dlogits and their transpose are softmax_xent's float32 gradient
  rounded to bfloat16 as XLA rounds it (bit for bit), and its loss is softmax_xent's; rows not a
  multiple of its 32-row tiles, vocabularies not a multiple of its 64-column tiles, large
  magnitudes; and optax's numbers within bfloat16's rounding."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((N, V)) * np.linspace(1, 40, N)[:, None], jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
  dl, dl_t, loss = jax.jit(lambda x, t: gemm.softmax_xent_bf16(x, t, 1 / N))(logits, targets)
  want, want_loss = jax.jit(lambda x, t: gemm.softmax_xent(x, t, 1 / N))(logits, targets)
  assert dl.dtype == dl_t.dtype == BF16 and dl_t.shape == (V, N)
  np.testing.assert_array_equal(_bits(dl), _bits(want.astype(BF16)))
  np.testing.assert_array_equal(_bits(dl_t), _bits(want.astype(BF16).T))
  np.testing.assert_array_equal(loss, want_loss)
  grad = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).mean())(logits)
  np.testing.assert_allclose(np.asarray(dl, np.float32), grad, rtol=2 ** -8, atol=1e-9)
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                             rtol=2e-6, atol=2e-5)


def test_softmax_xent_bf16_keeps_nan_infinities_and_bad_targets():
  """Rows with a NaN or +inf logit give NaN (loss and gradient), a -inf logit a zero gradient
  there (the scalar route, as softmax_xent's portable one), an out-of-range target a NaN loss and
  no one-hot; the other rows stay softmax_xent's, rounded."""
  if not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")
  rng = np.random.default_rng(12)
  V = 1000
  logits = rng.standard_normal((6, V)).astype(np.float32)
  logits[0, 17], logits[1, 999], logits[2, 500] = np.nan, np.inf, -np.inf
  targets = jnp.asarray([3, 4, 5, 6, V, 7], jnp.int32)
  dl, dl_t, loss = gemm.softmax_xent_bf16(jnp.asarray(logits), targets, 1 / 6)
  assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[4])
  assert np.isnan(np.asarray(dl[0], np.float32)).all() and np.isnan(np.asarray(dl[1], np.float32)).all()
  assert float(dl[2, 500]) == 0
  want, want_loss = gemm.softmax_xent(jnp.asarray(logits), targets, 1 / 6)
  rows = np.array([2, 3, 5])
  np.testing.assert_allclose(np.asarray(loss)[rows], np.asarray(want_loss)[rows], rtol=2e-6)
  for r in (2, 3, 4, 5):
    np.testing.assert_allclose(np.asarray(dl[r], np.float32), np.asarray(want[r].astype(BF16), np.float32),
                               rtol=2 ** -7, atol=1e-12)
  np.testing.assert_array_equal(_bits(dl_t), _bits(dl).T)
  np.testing.assert_allclose(np.asarray(dl[4], np.float32).sum(), 1 / 6, rtol=1e-2)  # no one-hot


def _head_grads(h, wte, targets, impl="mkl"):
  f = lambda h, w: tied_cross_entropy(h, w, targets, impl=impl, bf16=True)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, wte)


@pytest.mark.parametrize("switches", [{}, {"SEQUENTIAL": False}, {"DH_ROUTE": "wte_t"}])
def test_bf16_head_matches_the_session9_route_and_float64(mkl, monkeypatch, switches):
  """output_loss's bf16 head (one VJP; the pass writes the bf16 gradient and its transpose) gives
  the loss and both gradients of the route it replaces (bf16_matmul around the float32 pass: the
  same rounded operands into the same dots), and float64's of the rounded h and wte within
  bfloat16's rounding of dlogits; the cotangent scales them."""
  rng = np.random.default_rng(6)
  h = jnp.asarray(rng.standard_normal((3, 23, 24)), jnp.float32)
  wte = jnp.asarray(0.3 * rng.standard_normal((301, 24)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 301, (3, 23)), jnp.int32)
  for name, value in switches.items():
    monkeypatch.setattr(output_loss, name, value)
  monkeypatch.setattr(output_loss, "BF16_HEAD", True)
  loss, (dh, dw) = _head_grads(h, wte, targets)
  monkeypatch.setattr(output_loss, "BF16_HEAD", False)
  old_loss, (old_dh, old_dw) = _head_grads(h, wte, targets)
  np.testing.assert_allclose(loss, old_loss, rtol=1e-6)
  np.testing.assert_allclose(dh, old_dh, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(dw, old_dw, rtol=1e-5, atol=1e-8)
  h64, w64 = cases.rounded64(h).reshape(-1, 24), cases.rounded64(wte)
  t = np.asarray(targets).reshape(-1)
  logits = h64 @ w64.T
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want_loss = -np.log(p[np.arange(len(t)), t]).mean()
  p[np.arange(len(t)), t] -= 1
  p /= len(t)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(dh.reshape(-1, 24), p @ w64, atol=2 ** -8 * np.abs(p @ w64).max())
  np.testing.assert_allclose(dw, p.T @ h64, atol=2 ** -8 * np.abs(p.T @ h64).max())
  monkeypatch.setattr(output_loss, "BF16_HEAD", True)
  scaled = jax.grad(lambda h: 3.0 * tied_cross_entropy(h, wte, targets, impl="mkl", bf16=True))(h)
  np.testing.assert_allclose(scaled, 3.0 * dh, rtol=1e-6)
  value = jax.jit(lambda h: tied_cross_entropy(h, wte, targets, impl="mkl", bf16=True))(h)
  np.testing.assert_allclose(value, loss, rtol=1e-6)


@pytest.mark.parametrize("on,dy_t", [(True, False), (False, False), (False, True)])
def test_bf16_head_compiles_without_a_gather_of_dlogits(mkl, monkeypatch, on, dy_t):
  """With the bf16 head on, the compiled gradient holds the bf16 pass and no gather (the
  transposed dlogits come from the pass); off, the float32 pass and bf16_matmul's gather, or with
  gpt.matmul.DY_T_KERNEL transpose.cc's pass and no gather."""
  if dy_t and not ktr.available():
    pytest.skip(f"transpose kernel not built: {ktr.why_unavailable()}")
  monkeypatch.setattr(output_loss, "BF16_HEAD", on)
  monkeypatch.setattr(mm, "DY_T_KERNEL", dy_t)
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
  wte = jnp.asarray(rng.standard_normal((97, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 97, 40), jnp.int32)
  f = lambda h, w: tied_cross_entropy(h, w, targets, impl="mkl", bf16=True)
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, wte).compile().as_text()
  assert (gemm.XENT_BF16_TARGET in hlo) == on and (ktr.TARGET in hlo) == dy_t
  assert (re.search(r"\bgather\(", hlo) is None) == (on or dy_t)
  dots = cases.dot_operand_types(hlo)
  assert len(dots) == 3 and all(t == ("bf16", "bf16") for t in dots), dots


def test_bf16_head_falls_back_without_the_kernel(monkeypatch):
  """Without gemm's library (here: no MKL to load) the bf16 route with impl="mkl" is XLA's
  (bf16_matmul around XLA's softmax cross-entropy): no call of gemm's library (transpose.cc's
  pass may round the dlogits: gpt.matmul.DY_T_KERNEL), the same numbers as impl="xla"."""
  monkeypatch.setattr(gemm, "KERNEL", gemm.KERNEL.untried())
  monkeypatch.setenv("GPT_MKL_LIBRARY", "/nonexistent/libmkl_rt.so.2")
  monkeypatch.setattr(output_loss, "BF16_HEAD", True)
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
  wte = jnp.asarray(rng.standard_normal((53, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 53, (2, 7)), jnp.int32)
  f = lambda h, w: tied_cross_entropy(h, w, targets, impl="mkl", bf16=True)
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, wte).as_text()
  assert not [t for t in gemm.KERNEL.targets if t in hlo]
  assert "custom_call" not in hlo.replace(f"custom_call @{ktr.TARGET}", "")
  got, want = _head_grads(h, wte, targets), _head_grads(h, wte, targets, impl="xla")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def test_the_train_steps_bf16_head_stays_near_float32(mkl, monkeypatch):
  """The train step with model.matmul_dtype=bfloat16 and MKL resolved (the bf16 head runs): loss
  and every gradient near the float32 model's."""
  monkeypatch.setattr(output_loss, "BF16_HEAD", True)
  loss, grads = cases.train_loss_and_grads(matmul_dtype="bfloat16", matmul="mkl")
  want_loss, want = cases.train_loss_and_grads()
  np.testing.assert_allclose(loss, want_loss, rtol=0.01)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32, path
    np.testing.assert_allclose(g, r, atol=0.05 * np.abs(np.asarray(r)).max(), err_msg=str(path))


def test_bench_bf16_dots_head_orientations_agree():
  """experiments/bench_bf16_dots.py --head times dh in several orientations: each computes
  dlogits wte (its transpose for the dh^T rows), the copy row wte^T."""
  from experiments import bench_bf16_dots

  M, K, N = 8, 4, 13
  progs = bench_bf16_dots.head_programs(M, K, N)
  want = np.full((M, K), float(N))
  for name, (f, a, _) in progs.items():
    got = np.asarray(f(*a), np.float32)
    if name.startswith("the wte^T copy"):
      np.testing.assert_array_equal(got, np.ones((K, N)))
    elif name == "dh^T=(wte^T copy) dl^T":
      np.testing.assert_array_equal(got, want.T)
    else:
      np.testing.assert_array_equal(got, want, err_msg=name)


def test_bench_head_routes_compute_the_same_head(mkl):
  """experiments/bench_head.py's routes are one function: the same loss and gradients (within
  the float32 sums' order) from each route's compiled program."""
  from experiments import bench_head

  results = {}
  for route, switches in bench_head.ROUTES.items():
    f, args = bench_head.program(8, 16, switches)
    results[route] = jax.tree.map(np.asarray, f(*args))
  for route, got in results.items():
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(results["xent"])):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9, err_msg=route)
