"""gpt.kernels.gemv's fused calls for decoding: the MLP (c_fc, GELU, c_proj) and a block's whole tail
after the attention (c_proj + residual, ln_2, the MLP + residual) in one kernel call each, against
the same arithmetic in XLA, for every weight kind, with their thread and fallback paths and the
portable build (no AVX-512)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.kernels import gemv
from tests.gemv_cases import MLP_SHAPES, mlp_case, quantized, tail_case

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="the kernels are built with the system C++ compiler")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int8a8"])
@pytest.mark.parametrize("rows,K,N1,N2", MLP_SHAPES)
def test_fused_mlp_equals_two_products_with_gelu_between(dtype, rows, K, N1, N2):
  """gemv.mlp (c_fc, bias, GELU, c_proj, bias in one call) against mlp_reference (XLA: two
  products, jax.nn.gelu): rows 1..16, ragged K, N1, N2 (blocks and 16-lane tails), every loop."""
  a8 = dtype == "int8a8"
  if a8 and not gemv.vnni():
    pytest.skip("the int8-activation kernel needs AVX-512 VNNI (elsewhere mlp is mlp_reference)")
  x, ((w1, b1, s1), (w2, b2, s2)) = mlp_case(dtype, rows, K, N1, N2)
  assert gemv.uses_kernel(rows, w1)
  run = jax.jit(lambda x: gemv.mlp(x, w1, b1, w2, b2, scale1=s1, scale2=s2, int8_activations=a8))
  assert "GptGemvMlp" in run.lower(x).as_text()
  got = run(x)
  f32 = lambda w: w if w.dtype == jnp.int8 else w.astype(jnp.float32)
  want = gemv.mlp_reference(x, f32(w1), b1, f32(w2), b2, scale1=s1, scale2=s2, int8_activations=a8)
  assert got.shape == (rows, N2) and got.dtype == jnp.float32
  atol = 1e-5 * float(jnp.abs(want).max())
  if a8:  # a hidden value at a rounding tie may quantize one step apart: one step of w2's row
    h = gemv.gelu(gemv.reference(x, w1, scale=s1, int8_activations=True) + b1)
    step = jnp.abs(h).max(-1, keepdims=True) / 127
    atol += float((step * (jnp.abs(w2.astype(jnp.float32)).max(-1) * s2)).max())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_fused_mlp_keeps_leading_axes_runs_in_a_while_loop_and_on_one_thread(monkeypatch):
  x, ((w1, b1, s1), (w2, b2, s2)) = mlp_case("int8", 2, 64, 320, 64)
  x = x.reshape(2, 1, 64)
  step = lambda x: jnp.tanh(gemv.mlp(x, w1, b1, w2, b2, scale1=s1, scale2=s2))
  ref = lambda x: jnp.tanh(gemv.mlp_reference(x, w1, b1, w2, b2, scale1=s1, scale2=s2))
  loop = lambda f: jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda _, x: f(x), x))
  got = np.asarray(loop(step)(x))
  assert got.shape == (2, 1, 64)
  np.testing.assert_allclose(got, loop(ref)(x), rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("GPT_GEMV_THREADS", "1")  # every phase on the calling thread: same numbers
  np.testing.assert_array_equal(np.asarray(loop(step)(x + 0.0)), got)


def test_fused_mlp_falls_back_to_xla_where_the_kernel_does_not_run(monkeypatch):
  x, ((w1, b1, s1), (w2, b2, s2)) = mlp_case("int8", gemv.MAX_ROWS + 1, 32, 64, 32)
  text = jax.jit(lambda x: gemv.mlp(x, w1, b1, w2, b2, scale1=s1, scale2=s2)).lower(x).as_text()
  assert "GptGemvMlp" not in text  # more rows than the kernel takes: XLA's products
  want = gemv.mlp_reference(x, w1, b1, w2, b2, scale1=s1, scale2=s2)
  np.testing.assert_allclose(gemv.mlp(x, w1, b1, w2, b2, scale1=s1, scale2=s2), want, rtol=1e-6)
  with gemv.off():  # programs for another platform
    assert "GptGemvMlp" not in jax.jit(lambda x: gemv.mlp(x[:1], w1, b1, w2, b2)).lower(x).as_text()


def test_decoding_fuses_for_int8_weights_at_one_row(monkeypatch):
  """fuses_mlp / fuses_layer_tail: nothing by default (GPT_GEMV_FUSE unset or 0: separate calls
  measured as fast); with GPT_GEMV_FUSE=1, int8 weights at one row (FUSE_ROWS); not at 8 rows, not
  float32/bf16, not where int16 activations would take their own loop; GPT_GEMV_FUSE=mlp fuses the
  MLP only."""
  w8, _ = quantized(np.ones((8, 4), np.float32))
  monkeypatch.delenv("GPT_GEMV_FUSE", raising=False)
  assert not gemv.fuses_mlp(1, w8) and not gemv.fuses_layer_tail(1, w8)  # the default
  monkeypatch.setenv("GPT_GEMV_FUSE", "1")
  assert gemv.fuses_mlp(1, w8) and gemv.fuses_layer_tail(1, w8)
  assert not gemv.fuses_mlp(8, w8) and not gemv.fuses_layer_tail(8, w8)
  assert not gemv.fuses_mlp(1, jnp.ones((8, 4), jnp.float32))
  assert not gemv.fuses_mlp(1, jnp.ones((8, 4), jnp.bfloat16))
  # the float loop at 1 row (fused) unless int16 activations start at 1 row here (AVX512-BF16)
  assert gemv.fuses_mlp(1, w8, int16_activations=True) == (gemv.a16_min_rows() > 1 or not gemv.vnni())
  monkeypatch.setattr(gemv, "FUSE_ROWS", {jnp.dtype(jnp.int8): gemv.MAX_ROWS})
  assert gemv.fuses_mlp(8, w8) and not gemv.fuses_mlp(gemv.MAX_ROWS + 1, w8)
  assert gemv.fuses_mlp(gemv.A16_MIN_ROWS, w8, int16_activations=True) == (not gemv.vnni())
  monkeypatch.setenv("GPT_GEMV_FUSE", "mlp")
  assert gemv.fuses_mlp(1, w8) and not gemv.fuses_layer_tail(1, w8)
  monkeypatch.setenv("GPT_GEMV_FUSE", "0")
  assert not gemv.fuses_mlp(1, w8) and not gemv.fuses_layer_tail(1, w8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int8a8"])
@pytest.mark.parametrize("rows,D,N1", [(1, 64, 256), (1, 768, 3072), (2, 70, 37), (3, 33, 130),
                                       (8, 96, 384), (16, 17, 65)])
def test_layer_tail_equals_its_xla_reference(dtype, rows, D, N1):
  """gemv.layer_tail (attn c_proj + residual, ln_2, c_fc, GELU, c_proj + residual in one call)
  against the same in XLA: rows 1..16, ragged widths, every loop."""
  a8 = dtype == "int8a8"
  if a8 and not gemv.vnni():
    pytest.skip("the int8-activation kernel needs AVX-512 VNNI")
  (a, x), kw = tail_case(dtype, rows, D, N1)
  run = jax.jit(lambda a, x: gemv.layer_tail(a, x, **kw, int8_activations=a8))
  assert "GptGemvTail" in run.lower(a, x).as_text()
  got = run(a, x)
  ref = {k: (v.astype(jnp.float32) if k in ("w_o", "w1", "w2") and v.dtype != jnp.int8 else v)
         for k, v in kw.items()}
  want = gemv.layer_tail_reference(a, x, **ref, int8_activations=a8)
  assert got.shape == (rows, D) and got.dtype == jnp.float32
  atol = 1e-5 * float(jnp.abs(want).max())
  if a8:  # an activation at a rounding tie may quantize one step apart (three quantized inputs)
    atol += 3 * float(jnp.abs(want).max()) / 127 / np.sqrt(N1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_layer_tail_on_one_thread_and_its_fallback(monkeypatch):
  (a, x), kw = tail_case("int8", 3, 64, 320)
  run = jax.jit(lambda a, x: gemv.layer_tail(a, x, **kw))
  got = np.asarray(run(a, x))
  monkeypatch.setenv("GPT_GEMV_THREADS", "1")  # every phase on the calling thread: same numbers
  np.testing.assert_array_equal(np.asarray(run(a + 0.0, x)), got)
  big = jnp.tile(a, (gemv.MAX_ROWS, 1))  # more rows than the kernel takes: XLA
  text = jax.jit(lambda a: gemv.layer_tail(a, a, **kw)).lower(big).as_text()
  assert "GptGemvTail" not in text
  np.testing.assert_allclose(gemv.layer_tail(big, big, **kw), gemv.layer_tail_reference(big, big, **kw),
                             rtol=1e-6)


PORTABLE_MLP = """
import jax, jax.numpy as jnp, numpy as np
from gpt.kernels import gemv
gemv.FLAGS = tuple(f for f in gemv.FLAGS if not f.startswith(("-march", "-mprefer"))) + ("-march=x86-64",)
assert gemv.available() and not gemv.vnni() and not gemv.bf16_dot()
rng = np.random.default_rng(0)
xh, wh = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((3, 70), (37, 70)))
want = gemv.reference(xh.astype(jnp.float32), wh.astype(jnp.float32))
np.testing.assert_allclose(gemv.matmul(xh, wh), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
from tests.gemv_cases import mlp_case, tail_case
for dtype in ("float32", "bfloat16", "int8"):
  for rows, K, N1, N2 in [(1, 64, 256, 64), (3, 70, 37, 45), (8, 33, 130, 17)]:
    x, ((w1, b1, s1), (w2, b2, s2)) = mlp_case(dtype, rows, K, N1, N2)
    run = jax.jit(lambda x: gemv.mlp(x, w1, b1, w2, b2, scale1=s1, scale2=s2))
    assert "GptGemvMlp" in run.lower(x).as_text()
    f32 = lambda w: w if w.dtype == jnp.int8 else w.astype(jnp.float32)
    want = gemv.mlp_reference(x, f32(w1), b1, f32(w2), b2, scale1=s1, scale2=s2)
    np.testing.assert_allclose(run(x), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    (a, x), kw = tail_case(dtype, rows, K, N1)
    tail = jax.jit(lambda a, x: gemv.layer_tail(a, x, **kw))
    assert "GptGemvTail" in tail.lower(a, x).as_text()
    ref = {k: (v.astype(jnp.float32) if k in ("w_o", "w1", "w2") and v.dtype != jnp.int8 else v)
           for k, v in kw.items()}
    want = gemv.layer_tail_reference(a, x, **ref)
    np.testing.assert_allclose(tail(a, x), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
print("portable ok")
"""


@pytest.mark.slow  # spawns a process that builds the library without AVX-512
def test_fused_calls_portable_build_without_avx512(tmp_path):
  """The fused MLP's and layer tail's portable loops and scalar GELU, and bf16 activations widened
  for the portable loop (no vdpbf16ps) (built with -march=x86-64 in a fresh process: a
  process registers one library per FFI target name) against XLA."""
  import os
  import subprocess
  import sys

  from conftest import REPO
  env = {**os.environ, "GPT_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", PORTABLE_MLP], env=env, capture_output=True, text=True,
                       timeout=600, cwd=str(REPO))
  assert out.returncode == 0 and "portable ok" in out.stdout, out.stderr[-2000:]


def test_bench_gemv_block_tail_variants_compute_the_same_step():
  """experiments/bench_gemv.py --against=unfused times two programs of the same arithmetic: the
  block tail in one gemv.layer_tail call and as separate calls with XLA between."""
  import importlib.util
  import sys

  from conftest import REPO
  spec = importlib.util.spec_from_file_location("bench_gemv", REPO / "experiments" / "bench_gemv.py")
  bench = importlib.util.module_from_spec(spec)
  sys.modules["bench_gemv"] = bench
  spec.loader.exec_module(bench)
  mats, _ = bench.weights(2, 64, 300, jnp.int8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64)), jnp.float32)
  fused, unfused = bench.step_fn(64, bench.kernel("int8"), "tail"), bench.step_fn(64, bench.kernel("int8"), "unfused")
  assert "GptGemvTail" in fused.lower(mats, x).as_text()
  assert "GptGemvTail" not in unfused.lower(mats, x).as_text()
  np.testing.assert_allclose(fused(mats, x), unfused(mats, x), rtol=1e-4, atol=1e-4)
