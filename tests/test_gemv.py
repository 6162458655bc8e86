"""gpt.kernels.gemv: the FFI kernels equal XLA's matmul (float32 rounding) for every weight dtype,
row count and ragged shape, inside jit and a while_loop, and fall back to XLA where they don't apply."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.errors import GPTError
from gpt.kernels import gemv
from tests.gemv_cases import quantized

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="the kernels are built with the system C++ compiler")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rows,K,N", [(1, 64, 256), (3, 70, 37), (16, 33, 130)])
def test_kernel_equals_xla(dtype, rows, K, N):
  rng = np.random.default_rng(rows * K + N)
  w = rng.standard_normal((N, K)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((rows, K)), jnp.float32)
  scale = None
  if dtype == "int8":
    w, scale = quantized(w)
  else:
    w = jnp.asarray(w, dtype)
  assert gemv.uses_kernel(rows, w), "the kernel library did not build or register"
  got = jax.jit(lambda x, w, s: gemv.matmul(x, w, scale=s))(x, w, scale)
  want = gemv.reference(x, w.astype(jnp.float32) if dtype != "int8" else w, scale=scale)
  assert got.dtype == jnp.float32 and got.shape == (rows, N)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def cpu_has_avx512_bf16() -> bool:
  try:
    return "avx512_bf16" in open("/proc/cpuinfo").read()
  except OSError:
    return False


@pytest.mark.parametrize("dot", ["1", "0"])
@pytest.mark.parametrize("rows,K,N", [(1, 64, 256), (3, 70, 37), (8, 768, 130), (16, 33, 9)])
def test_bf16_activations_equal_xla(monkeypatch, dot, rows, K, N):
  """bf16 x by bf16 w: the vdpbf16ps loop (GPT_GEMV_BF16DOT=1, where the CPU has AVX512-BF16) and
  the widening loop (=0, or a CPU without it) both equal XLA's float32 product of the same numbers."""
  monkeypatch.setenv("GPT_GEMV_BF16DOT", dot)
  rng = np.random.default_rng(rows * K + N)
  x = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((N, K)), jnp.bfloat16)
  run = jax.jit(lambda x, w: gemv.matmul(x, w))
  assert "GptGemvBF16" in run.lower(x, w).as_text()
  got = run(x, w)
  want = gemv.reference(x.astype(jnp.float32), w.astype(jnp.float32))
  assert got.dtype == jnp.float32 and got.shape == (rows, N)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="this CPU lacks AVX512-BF16 (no vdpbf16ps loop)")
def test_bf16_dot_loop_runs_where_the_cpu_has_avx512_bf16(monkeypatch):
  """On a CPU with AVX512-BF16 the library has the vdpbf16ps loop and bf16 activations take it. Which
  loop ran shows in one sum's rounding: vdpbf16ps adds a lane's pair of products one at a time (the
  odd element first, each addition rounded), so (1 + 2^24) + (1 - 2^24) gives 1 there, where the
  widening loop's lanes hold 2^24, 1, -2^24, 1 apart and sum them to the exact 2."""
  assert gemv.bf16_dot()
  w = np.zeros((4, 32), np.float32)
  w[:, :4] = [2.0 ** 24, 1.0, -2.0 ** 24, 1.0]
  x, w = jnp.ones((1, 32), jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  np.testing.assert_array_equal(gemv.matmul(x, w), np.full((1, 4), 1.0))
  monkeypatch.setenv("GPT_GEMV_BF16DOT", "0")
  np.testing.assert_array_equal(gemv.matmul(x, w), np.full((1, 4), 2.0))
  # float32 activations keep the widening loop (rounding them to bf16 would change the product).
  monkeypatch.delenv("GPT_GEMV_BF16DOT")
  np.testing.assert_array_equal(gemv.matmul(x.astype(jnp.float32), w), np.full((1, 4), 2.0))


@pytest.mark.parametrize("rowwise", ["1", "0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int8a8", "int8a16"])
@pytest.mark.parametrize("rows,K,N", [(1, 64, 67), (1, 70, 37), (2, 70, 37), (3, 768, 130)])
def test_both_loop_orders_equal_xla(monkeypatch, rowwise, dtype, rows, K, N):
  """Below 4 rows the int8 and bf16 loops read the weights one row at a time, and float32 at 1 row
  in tiles of 8 rows, without prefetch (GPT_GEMV_ROWWISE=1, the default where the library has
  AVX512-BF16), or in prefetched tiles of 4 rows (=0): both equal XLA."""
  monkeypatch.setenv("GPT_GEMV_ROWWISE", rowwise)
  rng = np.random.default_rng(rows * K + N)
  w = rng.standard_normal((N, K)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  scale, a8, a16 = None, dtype == "int8a8", dtype == "int8a16"
  if dtype.startswith("int8"):
    w, scale = quantized(w)
  else:
    w = jnp.asarray(w, dtype)
  got = gemv.matmul(x, w, scale=scale, int8_activations=a8, int16_activations=a16)
  want = gemv.reference(x.astype(jnp.float32), w if w.dtype == jnp.int8 else w.astype(jnp.float32),
                        scale=scale, int8_activations=a8)
  atol = 1e-5 * float(jnp.abs(want).max())
  if a16 and gemv.vnni():  # the int16 loop: the float product within its rounding bound
    atol += float(gemv.int16_error_bound(x, w, scale).max())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_kernel_runs_inside_a_while_loop_with_leading_axes():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((48, 48)) / 7, jnp.bfloat16)
  x0 = jnp.asarray(rng.standard_normal((2, 1, 48)), jnp.float32)

  def chain(mm):
    return jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda _, x: jnp.tanh(mm(x, w)), x))

  got, want = chain(gemv.matmul)(x0), chain(lambda x, w: gemv.reference(x, w.astype(jnp.float32)))(x0)
  assert got.shape == (2, 1, 48)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_more_rows_and_gemv_off_use_xla(monkeypatch):
  w = jnp.ones((8, 4), jnp.float32)
  assert not gemv.uses_kernel(gemv.MAX_ROWS + 1, w)
  x = jnp.ones((gemv.MAX_ROWS + 1, 4))
  np.testing.assert_array_equal(gemv.matmul(x, w), jnp.full((gemv.MAX_ROWS + 1, 8), 4.0))
  monkeypatch.setenv("GPT_GEMV", "0")
  assert not gemv.available() and not gemv.uses_kernel(1, w)


def test_to_rows_transposes_conv1d_weights():
  w = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)  # [n_in, n_out]
  x = jnp.asarray([[1.0, -2.0]])
  np.testing.assert_allclose(gemv.matmul(x, gemv.to_rows(w)), x @ w)


def test_off_keeps_the_kernel_out_of_programs_for_another_platform():
  # Compile mode traces TPU programs on this CPU host: a CPU custom call in them cannot compile.
  x, w = jnp.ones((1, 64), jnp.float32), jnp.ones((32, 64), jnp.bfloat16)
  # A new function each time: the choice is made when a program is traced (jit caches traces).
  lower = lambda: jax.jit(lambda x, w: gemv.auto_matmul(x, w)).lower(x, w).as_text()
  assert gemv.max_rows(jnp.bfloat16) > 0 and "GptGemv" in lower()
  with gemv.off():
    assert gemv.max_rows(jnp.bfloat16) == 0 and not gemv.uses_kernel(1, w)
    assert "GptGemv" not in lower()
  assert "GptGemv" in lower()


@pytest.mark.parametrize("rows,K,N", [(1, 64, 256), (3, 70, 37), (5, 130, 9), (16, 33, 130)])
def test_int8_activations_kernel_equals_xla(rows, K, N):
  # The VNNI kernel against reference's exact int32 product of the same quantized rows; ragged K
  # (masked loads), ragged N (single-row tiles), 1-16 rows, one all-zero row.
  rng = np.random.default_rng(rows * K + N)
  w, scale = quantized(rng.standard_normal((N, K)).astype(np.float32))
  x = rng.standard_normal((rows, K)).astype(np.float32)
  x[-1] = 0.0 if rows > 1 else x[-1]
  x = jnp.asarray(x)
  if not gemv.vnni():
    pytest.skip("no AVX-512 VNNI here: int8 activations run reference")
  got = jax.jit(lambda x, w, s: gemv.matmul(x, w, scale=s, int8_activations=True))(x, w, scale)
  want = gemv.reference(x, w, scale=scale, int8_activations=True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
  if rows > 1:
    np.testing.assert_array_equal(got[-1], 0.0)
  # And it is the float product up to the activations' rounding (half a step per element).
  exact = gemv.reference(x, w, scale=scale)
  q, step = gemv.quantize_rows(x)
  bound = 0.5 * step * (jnp.abs(w.astype(jnp.float32)) * scale[:, None]).sum(1)
  assert bool(jnp.all(jnp.abs(got - exact) <= bound * 1.001 + 1e-6))
  assert float(jnp.abs(q).max()) == 127.0


def test_int8_activations_leave_float_weights_alone():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16)), jnp.float32)
  np.testing.assert_allclose(gemv.matmul(x, w, int8_activations=True), gemv.matmul(x, w), rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_thread_cap_gives_the_same_product(monkeypatch, dtype):
  # GPT_GEMV_THREADS=1 (read at each call) keeps every block on the calling thread: the same
  # numbers as the default split over XLA's pool, for a matrix of many blocks and a ragged end.
  rng = np.random.default_rng(7)
  w = rng.standard_normal((1000, 96)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((2, 96)), jnp.float32)
  w, scale = quantized(w) if dtype == "int8" else (jnp.asarray(w), None)
  assert gemv.uses_kernel(2, w)
  run = jax.jit(lambda x, w, s: gemv.matmul(x, w, scale=s))
  default = np.asarray(run(x, w, scale))
  monkeypatch.setenv("GPT_GEMV_THREADS", "1")
  np.testing.assert_array_equal(np.asarray(run(x + 0.0, w, scale)), default)
  np.testing.assert_allclose(default, gemv.reference(x, w, scale=scale), rtol=1e-5,
                             atol=1e-5 * float(np.abs(default).max()))


def int16_exact(x, w, scale):
  """The int16-activation kernel's arithmetic in numpy: the rows quantized as quantize_rows(x, 16),
  an exact integer product, then step * scale."""
  q, step = gemv.quantize_rows(jnp.asarray(x), 16)
  dot = np.asarray(q, np.int64) @ np.asarray(w, np.int64).T
  return dot.astype(np.float64) * np.asarray(step, np.float64) * np.asarray(scale, np.float64)


@pytest.mark.parametrize("rows,K,N", [(1, 64, 256), (2, 70, 37), (3, 33, 9), (5, 130, 130),
                                      (7, 768, 65), (8, 31, 4), (8, 1000, 67), (16, 96, 130)])
def test_int16_activations_kernel_is_the_float_product_within_its_bound(rows, K, N):
  # int8 weights, float activations quantized per row to int16 and multiplied with vpdpwssd. Ragged K (masked weight loads, zero-padded activations: K = 33, 70,
  # 130, 1000 are no multiple of 32), ragged N (single-row tiles), 1-16 rows, an all-zero row.
  if not gemv.vnni():
    pytest.skip("no AVX-512 VNNI here: int8 weights with float activations run the float loop")
  rng = np.random.default_rng(rows * K + N)
  w, scale = quantized(rng.standard_normal((N, K)).astype(np.float32))
  x = rng.standard_normal((rows, K)).astype(np.float32) * np.float32(3.0)
  x[-1] = 0.0 if rows > 2 else x[-1]
  x = jnp.asarray(x)
  run = jax.jit(lambda x, w, s: gemv.matmul(x, w, scale=s, int16_activations=True))
  assert "GptGemvS8A16" in run.lower(x, w, scale).as_text()
  got = np.asarray(run(x, w, scale), np.float64)
  # The same integer arithmetic, exactly: only the final float32 products round.
  want = int16_exact(x, w, scale)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  # And the float product (what the float loop computes) to within half an int16 step a value.
  exact = np.asarray(gemv.reference(x, w, scale=scale), np.float64)
  bound = np.asarray(gemv.int16_error_bound(x, w, scale), np.float64)
  assert np.all(np.abs(got - exact) <= bound * 1.001 + 1e-6 * np.abs(exact).max())
  assert np.abs(got - exact).max() > 0 or rows == 1 and K == 64  # it really did quantize
  if rows > 2:
    np.testing.assert_array_equal(got[-1], 0.0)


def test_int16_activations_flush_their_sums_before_int32_overflows():
  # K past one 8192-long int32 chunk, with the largest products there are (-128 weights, every
  # activation at +max): one chunk's lane sums reach 512 * 128 * 32767 = 2^31 - 2^16; a missing
  # flush would wrap around. Exact in float64 from the integers.
  if not gemv.vnni():
    pytest.skip("no AVX-512 VNNI here")
  K, N = 2 * 8192 + 40, 6
  w = jnp.full((N, K), -128, jnp.int8).at[1].set(127)
  scale = jnp.ones((N,), jnp.float32)
  x = jnp.ones((2, K), jnp.float32).at[1].set(-0.5)
  got = np.asarray(gemv.matmul(x, w, scale=scale, int16_activations=True), np.float64)
  want = int16_exact(x, w, scale)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0], -128.0 * K, rtol=1e-6)


def test_int8_weights_choose_their_loop(monkeypatch):
  # matmul: the float loop unless asked; auto_matmul (decoding) with int16_activations: the int16
  # VNNI loop from `a16_min_rows()` rows (1 where the library has AVX512-BF16, else 2), the float
  # loop below (GPT_GEMV_A16_ROWS moves the line); int8_activations takes the int8
  # loop at any rows.
  w, scale = quantized(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
  assert gemv.uses_kernel(1, w)

  def target(rows, mm=gemv.auto_matmul, **kw):
    text = jax.jit(lambda x: mm(x, w, scale=scale, **kw)).lower(jnp.ones((rows, 64))).as_text()
    return next(t for t in ("GptGemvS8A8", "GptGemvS8A16", "GptGemvS8") if t in text)

  a16 = "GptGemvS8A16" if gemv.vnni() else "GptGemvS8"
  assert target(1) == target(8) == target(8, gemv.matmul) == "GptGemvS8"
  # 1 row: the float loop, or the int16 loop where the library has AVX512-BF16 (a16_min_rows)
  assert target(1, int16_activations=True) == (a16 if gemv.bf16_dot() else "GptGemvS8")
  assert target(gemv.A16_MIN_ROWS, int16_activations=True) == a16
  assert target(8, int16_activations=True) == target(1, gemv.matmul, int16_activations=True) == a16
  if gemv.vnni():
    assert target(8, int8_activations=True, int16_activations=True) == "GptGemvS8A8"
  monkeypatch.setenv("GPT_GEMV_A16_ROWS", "1")
  assert target(1, int16_activations=True) == a16 and target(1) == "GptGemvS8"
  monkeypatch.setenv("GPT_GEMV_A16_ROWS", "3")
  assert target(2, int16_activations=True) == "GptGemvS8" and target(3, int16_activations=True) == a16
  monkeypatch.setenv("GPT_GEMV_A16_ROWS", "0")
  with pytest.raises(GPTError, match="GPT_GEMV_A16_ROWS='0'"):
    target(1, int16_activations=True)


def _vm_flags(address: int) -> list[str]:
  """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
  inside = False
  for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
      lo, hi = (int(v, 16) for v in head.split("-"))
      inside = lo <= address < hi
    elif inside and head == "VmFlags:":
      return line.split()[1:]
  raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not __import__("os").path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="no transparent huge pages (Linux only)")
def test_weights_are_advised_onto_huge_pages(monkeypatch):
  # The first call on a weight buffer marks its 2 MB pages MADV_HUGEPAGE ("hg" in its mapping's
  # VmFlags; a background thread then collapses them); GPT_GEMV_HUGEPAGES=0 leaves it alone.
  # 64 MB: glibc gives a buffer this large a mapping of its own, so no earlier test's advice
  # reaches it. The product is the same either way.
  w = jnp.asarray(np.random.default_rng(3).standard_normal((16384, 1024)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 1024)), jnp.float32)
  address = w.unsafe_buffer_pointer() + w.nbytes // 2
  run = jax.jit(gemv.matmul)
  assert "hg" not in _vm_flags(address)
  monkeypatch.setenv("GPT_GEMV_HUGEPAGES", "0")
  off = np.asarray(run(x, w))
  assert "hg" not in _vm_flags(address)
  monkeypatch.delenv("GPT_GEMV_HUGEPAGES")
  on = np.asarray(run(x + 0.0, w))
  assert "hg" in _vm_flags(address)
  np.testing.assert_array_equal(on, off)


@pytest.mark.skipif(not __import__("os").path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
                    or __import__("os").environ.get("GPT_GEMV_HUGEPAGES") == "0",
                    reason="no transparent huge pages (Linux only), or GPT_GEMV_HUGEPAGES=0")
def test_each_weight_is_advised_once():
  # The advice (a read of /proc/self/maps, a madvise, a background collapse) happens at a buffer's
  # first call only: calls inside a loop and later runs of the same program add no buffers.
  w = jnp.asarray(np.random.default_rng(5).standard_normal((1024, 1024)) / 32, jnp.float32)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 1024)), jnp.float32)
  run = jax.jit(lambda x, w: jax.lax.fori_loop(0, 3, lambda _, x: jnp.tanh(gemv.matmul(x, w)), x))
  before = gemv.hugepage_buffers()
  run(x, w).block_until_ready()
  seen = gemv.hugepage_buffers()
  assert seen == before + 1
  run(x + 1.0, w).block_until_ready()
  assert gemv.hugepage_buffers() == seen
