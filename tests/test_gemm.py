"""gpt.kernels.gemm (MKL's sgemm behind JAX's FFI) against XLA: products, gradients, the train step.

Skips with the reason when MKL is not installed (`pip install '.[mkl]'`, as CI's install does) or
no C++ compiler built the kernel; `resolve`'s fallbacks and errors are tested either way. The
module's VJPs are tested with both product engines (`gemm.products()`: MKL's sgemm or XLA's dot,
chosen by CPU vendor), whatever this CPU's default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import sharding
from gpt.errors import GPTError
from gpt.kernels import gemm, native
from gpt.model import GPTConfig, init_model
from gpt.train import build_programs
from gpt.train_step import create_state
from tests.train_utils import tiny_config


@pytest.fixture
def mkl(monkeypatch):
  """The kernel, with MKL's products pinned (the FFI call itself), whatever the CPU's default."""
  if not gemm.available():
    pytest.skip(f"gpt.kernels.gemm unavailable: {gemm.why_unavailable()}")
  monkeypatch.delenv("GPT_GEMM_PRODUCTS", raising=False)
  monkeypatch.setattr(gemm, "PRODUCTS", "mkl")


@pytest.fixture(params=["mkl", "xla"])
def products(request, mkl, monkeypatch):
  """Each product engine in turn inside the module's VJPs; yields its name."""
  monkeypatch.setattr(gemm, "PRODUCTS", request.param)
  return request.param


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


# (M, N, K): ragged sizes, one row, one column, and sizes large enough to be split into blocks
# over XLA's pool by rows (M >= N) and by columns (M < N).
SHAPES = [(37, 53, 29), (1, 70, 33), (65, 1, 40), (300, 260, 96), (96, 530, 130), (5, 6, 0)]


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_matches_float64(products, transpose_a, transpose_b):
  f = jax.jit(lambda a, b: gemm.gemm(a, b, transpose_a=transpose_a, transpose_b=transpose_b))
  for i, (M, N, K) in enumerate(SHAPES):
    a = _rand((K, M) if transpose_a else (M, K), i)
    b = _rand((N, K) if transpose_b else (K, N), 100 + i)
    want = (np.asarray(a, np.float64).T if transpose_a else np.asarray(a, np.float64)) @ (
        np.asarray(b, np.float64).T if transpose_b else np.asarray(b, np.float64))
    got = np.asarray(f(a, b))
    assert got.shape == (M, N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * max(1.0, np.sqrt(K)))


@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_and_gradients_match_xla(products, transpose_w):
  x = _rand((3, 41, 57), 0)  # a batch dimension and ragged sizes
  w = _rand((90, 57) if transpose_w else (57, 90), 1)
  probe = _rand((3, 41, 90), 2)

  def loss(mm):
    return lambda x, w: jnp.sum(jnp.sin(mm(x, w, transpose_w=transpose_w)) * probe)

  ours = jax.jit(jax.value_and_grad(loss(gemm.matmul), argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.value_and_grad(loss(gemm.reference), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  for g, r in zip(ours[1], ref[1]):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  hlo = jax.jit(jax.grad(loss(gemm.matmul), argnums=(0, 1))).lower(x, w).as_text()
  # forward, dx and dw all by the kernel, or all by XLA's dot
  assert hlo.count(gemm.TARGET) == (3 if products == "mkl" else 0)


def test_gelu_matmul_and_gradients_match_xla(products):
  """gemm.gelu_matmul (the MLP's GELU inside MKL's c_proj product, its backward recomputing the
  GELU from h) against gelu then XLA's einsum; bfloat16 falls back to exactly that."""
  h, w, probe = _rand((3, 41, 57), 5) * 2, _rand((57, 30), 6), _rand((3, 41, 30), 7)
  plain = lambda h, w: gemm.reference(jax.nn.gelu(h, approximate=True), w)
  grads = lambda mm: jax.jit(jax.grad(lambda h, w: jnp.sum(jnp.sin(mm(h, w)) * probe), argnums=(0, 1)))(h, w)
  np.testing.assert_allclose(gemm.gelu_matmul(h, w), plain(h, w), rtol=1e-5, atol=1e-4)
  for name, a, b in zip(("dh", "dw"), grads(gemm.gelu_matmul), grads(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert gemm.TARGET not in jax.jit(gemm.gelu_matmul).lower(hb, wb).as_text()
  np.testing.assert_array_equal(gemm.gelu_matmul(hb, wb), plain(hb, wb))


def test_matmul_under_vmap_and_bf16_fallback(mkl):
  x, w = _rand((4, 7, 16), 3), _rand((16, 9), 4)
  got = jax.vmap(lambda r: gemm.matmul(r, w))(x)
  np.testing.assert_allclose(got, gemm.reference(x, w), rtol=1e-5, atol=1e-5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)  # no AVX512-BF16 path: XLA's
  assert gemm.TARGET not in jax.jit(gemm.matmul).lower(xb, wb).as_text()
  np.testing.assert_array_equal(gemm.matmul(xb, wb), gemm.reference(xb, wb))


def test_resolve():
  cpu = jax.devices("cpu")
  assert gemm.resolve("xla", cpu[:1]) == "xla"
  assert gemm.resolve("auto", cpu[:1]) == ("mkl" if gemm.available() else "xla")
  if len(cpu) > 1:  # conftest's 8 host devices: a sharded program keeps XLA's dot
    assert gemm.resolve("auto", cpu) == "xla"
    with pytest.raises(GPTError, match="one device"):
      gemm.resolve("mkl", cpu)
  with pytest.raises(GPTError, match="model.matmul='blas'"):
    GPTConfig(matmul="blas")


def test_products_follow_the_cpu_vendor_and_the_environment(monkeypatch):
  """"auto" is MKL's sgemm on Intel CPUs only; GPT_GEMM_PRODUCTS overrides; a bad value is one
  GPTError line; the choice is read when a program is traced."""
  monkeypatch.delenv("GPT_GEMM_PRODUCTS", raising=False)
  monkeypatch.setattr(gemm, "PRODUCTS", "auto")
  assert gemm.products() == ("mkl" if native.cpu_vendor() == "GenuineIntel" else "xla")
  for vendor, want in (("GenuineIntel", "mkl"), ("AuthenticAMD", "xla"), ("", "xla")):
    monkeypatch.setattr(native, "cpu_vendor", lambda v=vendor: v)
    assert gemm.products() == want
  monkeypatch.setenv("GPT_GEMM_PRODUCTS", "mkl")
  assert gemm.products() == "mkl"
  monkeypatch.setenv("GPT_GEMM_PRODUCTS", "blas")
  with pytest.raises(GPTError, match="GPT_GEMM_PRODUCTS='blas'; choose one of"):
    gemm.products()


def test_xla_products_trace_to_dots(mkl, monkeypatch):
  x, w = _rand((5, 8), 0), _rand((8, 3), 1)
  lowered = lambda: jax.jit(lambda x, w: gemm.matmul(x, w)).lower(x, w).as_text()  # a new trace
  monkeypatch.setenv("GPT_GEMM_PRODUCTS", "xla")
  hlo = lowered()
  assert gemm.TARGET not in hlo and "dot_general" in hlo
  pinned = jax.jit(lambda x, w: gemm.gemm(x, w, engine="mkl")).lower(x, w).as_text()
  assert gemm.TARGET in pinned  # an explicit engine wins (bench_train_gemms' MKL column)
  monkeypatch.setenv("GPT_GEMM_PRODUCTS", "mkl")
  assert gemm.TARGET in lowered()


def test_resolve_without_mkl(monkeypatch):
  """With no libmkl_rt, auto falls back and an explicit mkl says what to install."""
  monkeypatch.setattr(gemm, "KERNEL", gemm.KERNEL.untried())  # as in a process that has not loaded it
  monkeypatch.setenv("GPT_MKL_LIBRARY", "/nonexistent/libmkl_rt.so.2")
  cpu = jax.devices("cpu")[:1]
  assert gemm.resolve("auto", cpu) == "xla"
  with pytest.raises(GPTError, match="model.matmul=mkl cannot be used: cannot load MKL"):
    gemm.resolve("mkl", cpu)
  x, w = _rand((5, 8), 0), _rand((8, 3), 1)
  assert gemm.TARGET not in jax.jit(gemm.matmul).lower(x, w).as_text()


def _one_step(config, matmul: str, lower_only: bool = False):
  """Loss and parameter update of one train step of the train mode's own program on one device."""
  cfg = GPTConfig.from_config(config.model).replace(matmul=matmul)
  config.mesh.data = 1
  programs = build_programs(config, cfg, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0), nnx.Param))
  state = jax.device_put(create_state(params, programs.tx, 0), programs.state_sharding)
  t = config.train
  tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (t.batch_size, t.seq_len + 1))
  batch = jax.device_put(jnp.asarray(tokens, jnp.int32), programs.batch_sharding)
  hlo = programs.train_step.lower(state, batch, programs.abstract_frozen).as_text()
  if lower_only:
    return hlo
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = programs.train_step(state, batch, {})
  return float(metrics["loss"]), jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), hlo


@pytest.mark.parametrize("layers,products", [(dict(scan_layers=True, remat="full"), "mkl"),
                                             (dict(scan_layers=False, remat="dots"), "mkl"),
                                             (dict(scan_layers=True, remat="none", output_loss="fused"), "mkl"),
                                             (dict(scan_layers=True, remat="dots"), "xla")])
def test_train_step_mkl_equals_xla(mkl, monkeypatch, tmp_path, layers, products):
  """The train mode's step with model.matmul=auto (MKL here) against XLA's: the same loss and the
  same update, under scan + full remat or unrolled + dots remat (which saves the kernel's products
  as it saves dots: no more kernel calls than without remat), with gradient accumulation. Plain SGD at rate 1
  without clipping makes the update the gradient itself (Adam's first step is ~sign(g): noise in
  near-zero gradients would flip it)."""
  config = tiny_config(tmp_path, grad_accum=2, optimizer="sgd", learning_rate=1.0, momentum=0.0,
                       grad_clip=0.0, warmup_steps=0, schedule="constant")
  config.model.update(**layers)
  monkeypatch.setattr(gemm, "PRODUCTS", products)  # the route's VJPs with either engine's products
  loss_x, update_x, hlo_x = _one_step(config, "xla")
  loss_m, update_m, hlo_m = _one_step(config, "auto")
  assert gemm.TARGET not in hlo_x and (gemm.TARGET in hlo_m) == (products == "mkl")
  # The output layer's one-pass loss runs with MKL's matmuls where the loss is fused or auto (the
  # default; XLA's fused version or optax's on the xla side).
  fused = config.model.output_loss in ("fused", "auto")
  assert gemm.XENT_TARGET not in hlo_x and (gemm.XENT_TARGET in hlo_m) == fused
  if layers["remat"] == "dots" and products == "mkl":
    config.model.remat = "none"
    assert hlo_m.count(gemm.TARGET) == _one_step(config, "auto", lower_only=True).count(gemm.TARGET)
  np.testing.assert_allclose(loss_m, loss_x, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(update_m), jax.tree.leaves(update_x)):
    scale = np.abs(b).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))
