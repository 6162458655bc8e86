"""Weight matrix times a few activation rows, for decoding on a CPU: gemv.cc through JAX's FFI.

Batch-1 decoding reads every weight once per token, so its speed is the speed at which matrix-
vector products stream weights from memory. XLA:CPU's own kernels read slower than the memory
allows, and it has no bf16 or int8 matrix-vector kernel (it converts a bf16 matrix to float32
before multiplying). `matmul` runs gemv.cc's loops instead where they apply: a CPU backend, at most
MAX_ROWS rows, and a library that built. Weights are taken as [N, K] (one output per row, so every
output is a dot product over contiguous memory): the tied output layer already is, Conv1D weights
are transposed once by `to_rows`. The library is compiled from gemv.cc with the system
C++ compiler the first time it is needed (about 10 s; gpt.kernels.native) and cached, keyed also
by this CPU's model and flags (it is built with -march=native). Without a compiler, on a GPU/TPU, for more rows, or with
GPT_GEMV=0, `matmul` is `reference`: XLA's own einsum, same results to float32 rounding.
With int8 weights two integer loops run on AVX-512 VNNI where the CPU has it: `int8_activations`
(rows quantized to int8, vpdpbusd) and `int16_activations` (rows quantized to int16, vpdpwssd:
within half an int16 step of the float product, faster than the float loop from 2 rows).
With bf16 weights and bf16 activations (the bf16 model's: exact in bf16) the kernel multiplies on
AVX512-BF16's vdpbf16ps where the CPU has it (`bf16_dot`; 32 products per instruction, each exact
in float32, summed in float32), else it widens the activations and runs the float loop;
GPT_GEMV_BF16DOT=0 (read at each call) forces the latter, for A/Bs. Float32 activations of bf16
weights always take the float loop (rounding them to bf16 would change the product).
GPT_GEMV_THREADS=n (read by the library at each call) caps the threads one call splits its rows
over (default: all of XLA's intra-op pool); experiments/bench_gemv.py --per_call uses 1 to time the
loops apart from the hand-off to the second core. On Linux the library asks for each weight buffer
it meets to sit on 2 MB pages (gemv.cc's hugepages::Advise: fewer TLB misses while streaming);
GPT_GEMV_HUGEPAGES=0, read at each call, turns that off (bench_gemv.py --against=4k compares).
`mlp` is the MLP's c_fc, GELU and c_proj in one call, `layer_tail` everything of a decoder block
after its attention (attn c_proj, residual, ln_2, the MLP, residual) in one call: one hand-off to the
pool's threads instead of two or three (pool.h's RunPhases), the GELU and LayerNorm in the kernel.
A decoding model with int8 weights can run `layer_tail` (GPT_GEMV_FUSE=1, `fuses_layer_tail`) or
`mlp` alone (GPT_GEMV_FUSE=mlp) instead of a call per matrix, meant for int8's small matrices,
whose calls' fixed cost counts. Off by default: in the lead's quiet retake the separate calls were
as fast or faster through the whole decoder (BENCHMARKS.md, "int8-fuse, session 7" and "The lead's
quiet retake, session 7").
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from gpt.errors import GPTError
from gpt.kernels import native

MAX_ROWS = 16  # past a few rows a matrix-matrix kernel (XLA's) reuses each weight better
SOURCE = Path(__file__).with_name("gemv.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
_SUFFIX = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.bfloat16): "BF16", jnp.dtype(jnp.int8): "S8"}
_SUFFIXES = (*_SUFFIX.values(), "S8A8")
_TARGETS = tuple(f"GptGemv{suffix}" for suffix in (*_SUFFIXES, "S8A16")) + tuple(
    f"GptGemv{kind}{suffix}" for kind in ("Mlp", "Tail") for suffix in _SUFFIXES)
# FLAGS read when built: the portable check (tests/test_gemv.py) sets it first.
KERNEL = native.Kernel(SOURCE, lambda: FLAGS, _TARGETS, env="GPT_GEMV", warn=True,
                       fallback="using XLA's matmul")


def available() -> bool:
  """True when the kernels are registered with XLA (building them now if needed)."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernels are not available ("" when they are, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


# Set inside `off()`: programs lowered there are for another platform, never this CPU.
_off = contextvars.ContextVar("gemv_off", default=False)


@contextlib.contextmanager
def off():
  """Within this block the kernel is never chosen (by programs traced in it: jit caches traces,
  so a function traced before keeps its choice). For programs traced here but compiled for
  another platform: compile mode lowers TPU programs on a CPU host, where jax.default_backend()
  is still "cpu" but a CPU custom call cannot run on the target."""
  token = _off.set(True)
  try:
    yield
  finally:
    _off.reset(token)


def uses_kernel(rows: int, w: jax.Array) -> bool:
  """Whether `matmul` with this many rows and this weight runs gemv.cc."""
  return (rows <= MAX_ROWS and jnp.dtype(w.dtype) in _SUFFIX and jax.default_backend() == "cpu"
          and not _off.get() and available())


# Up to how many rows the kernel beats XLA, per weight dtype (experiments/bench_gemv.py, interleaved
# runs; BENCHMARKS.md): 0 = never. Past these, XLA's matrix-matrix kernels reuse weights better.
WIN_ROWS = {jnp.dtype(jnp.float32): MAX_ROWS, jnp.dtype(jnp.bfloat16): 8, jnp.dtype(jnp.int8): MAX_ROWS}


def max_rows(dtype) -> int:
  """The most rows for which `matmul` on `dtype` weights runs the kernel and it is the faster
  choice here (0 where the kernel does not run: GPU/TPU, no library, GPT_GEMV=0)."""
  dtype = jnp.dtype(dtype)
  if dtype not in _SUFFIX or jax.default_backend() != "cpu" or _off.get() or not available():
    return 0
  return WIN_ROWS.get(dtype, 0)


def wins(rows: int, w: jax.Array) -> bool:
  """Whether `matmul` of `rows` rows by `w` should run the kernel rather than XLA (faster here)."""
  return rows <= max_rows(w.dtype)


def to_rows(w: jax.Array) -> jax.Array:
  """A Conv1D weight [n_in, n_out] laid out as `matmul` takes it: [n_out, n_in]."""
  return jnp.transpose(jnp.asarray(w))


# With `int16_activations` (model.int16_activations), from how many rows `auto_matmul` runs the
# int16-activation VNNI loop (GptGemvS8A16) instead of the float loop. On the Xeon (no AVX512-BF16)
# both stream at the read rate at 1 row (experiments/bench_gemv_loop.cc) and the float loop keeps
# the activations exact: from 2 rows (A16_MIN_ROWS), where its converts and FMAs make it
# compute-bound and vpdpwssd does the same work in fewer uops (BENCHMARKS.md, "int16 activations").
# Where the library has AVX512-BF16 (Zen 4 here; the proxy gemv.cc's row order uses too) the float
# loop is compute-bound at 1 row already, and the int16 loop from 1 row decoded 1.13x faster in a
# quiet same-run A/B (BENCHMARKS.md, "The lead's quiet retake, session 10"). GPT_GEMV_A16_ROWS
# (read while tracing) sets another count, for same-run A/Bs (bench_decode --ab GPT_GEMV_A16_ROWS=2).
A16_MIN_ROWS = 2


def a16_min_rows() -> int:
  """From how many rows `int16_activations` takes the int16 loop: GPT_GEMV_A16_ROWS, else 1 where
  the library has AVX512-BF16 (`bf16_dot`), else A16_MIN_ROWS."""
  value = os.environ.get("GPT_GEMV_A16_ROWS", "")
  if not value:
    return 1 if bf16_dot() else A16_MIN_ROWS
  if not value.isdigit() or int(value) < 1:
    raise GPTError(f"GPT_GEMV_A16_ROWS={value!r}: give a whole number of rows, 1 or more")
  return int(value)


def hugepage_buffers() -> int:
  """How many weight buffers the library has advised onto 2 MB pages so far (0 without it): each
  weight once per process, whatever the number of calls."""
  if not available():
    return 0
  lib = KERNEL.library()
  lib.GptGemvHugepageBuffers.restype = ctypes.c_int64
  return int(lib.GptGemvHugepageBuffers())


def vnni() -> bool:
  """Whether the int8-activation kernel (`matmul(..., int8_activations=True)`) runs here: the
  library built with AVX-512 VNNI (vpdpbusd). Elsewhere that product is `reference`'s XLA one."""
  return available() and bool(KERNEL.library().GptGemvHasVnni())


def bf16_dot() -> bool:
  """Whether `matmul` of bfloat16 activations by bfloat16 weights runs the vdpbf16ps loop here (the
  library built with AVX512-BF16; GPT_GEMV_BF16DOT=0, read at each call, takes the widening loop
  instead). Float32 activations always take the widening loop (their product stays exact)."""
  return available() and bool(KERNEL.library().GptGemvHasBf16Dot())


def matmul(x: jax.Array, w: jax.Array, *, scale: jax.Array | None = None,
           int8_activations: bool = False, int16_activations: bool = False) -> jax.Array:
  """x [..., K] times w [N, K] transposed, accumulated in float32: float32 [..., N].

  w may be float32, bfloat16 or int8; `scale` [N] multiplies output n (int8 weights' per-output
  scales). `int8_activations` (int8 w only): each row of x is quantized to int8 first (see
  `quantize_rows`) and multiplied in integers with AVX-512 VNNI, where it runs (`vnni`).
  `int16_activations` (int8 w, float activations, where VNNI runs): each row is quantized to int16
  (`quantize_rows(x, 16)`) and multiplied with VNNI's vpdpwssd: the float product to within half
  an int16 step of each activation (`int16_error_bound`); the default float loop is exact to
  float32 rounding. Elsewhere it is the float loop or `reference`.
  """
  K, N = x.shape[-1], w.shape[0]
  rows = math.prod(x.shape[:-1])
  int8_w = jnp.dtype(w.dtype) == jnp.int8
  a8 = int8_activations and int8_w
  if not uses_kernel(rows, w) or (a8 and not vnni()):
    return reference(x, w, scale=scale, int8_activations=int8_activations)
  a16 = int16_activations and int8_w and not a8 and vnni()
  no_scale = jnp.zeros((0,), jnp.float32)
  target = ("GptGemvS8A8" if a8 else "GptGemvS8A16" if a16
            else f"GptGemv{_SUFFIX[jnp.dtype(w.dtype)]}")
  # bf16 activations of bf16 weights stay bf16 (exact): the kernel multiplies them with vdpbf16ps
  # where the CPU has AVX512-BF16 (`bf16_dot`), else widens them itself.
  bf16 = jnp.dtype(jnp.bfloat16)
  x_dtype = bf16 if jnp.dtype(w.dtype) == bf16 and jnp.dtype(x.dtype) == bf16 else jnp.float32
  out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, N), jnp.float32))(
      x.reshape(rows, K).astype(x_dtype), w,
      no_scale if scale is None else scale.astype(jnp.float32))
  return out.reshape(*x.shape[:-1], N)


def quantize_rows(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """(q [..., K], float32 step [..., 1]) with x ~= q * step per row: top = 2^(bits-1) - 1 (127 for
  int8, 32767 for int16), step = max|x| / top, q = round(x * (top / max|x|)) (an all-zero row gives
  zeros), the same float32 operations as gemv.cc's QuantizeRow / QuantizeRow16, so that the kernels
  and `reference` quantize identically."""
  top = {8: 127.0, 16: 32767.0}[bits]
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  inv = jnp.where(amax > 0, jnp.float32(top) / jnp.where(amax > 0, amax, 1.0), 0.0)
  q = jnp.round(x * inv).astype(jnp.int8 if bits == 8 else jnp.int16)
  return q, amax / jnp.float32(top)


def int16_error_bound(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
  """The most the int16-activation kernel's y [..., N] can differ from the float product of x and
  int8 w: each activation moves by at most half a step (max|x| / 32767 / 2) when rounded, so output
  n moves by at most 0.5 * step * sum_k |w[n, k]| * scale[n]. Each lane's int32 sum is exact
  (flushed to float every 8192 of K); only float32 rounding (the lanes' sum, the scale) adds to this."""
  _, step = quantize_rows(x, 16)
  wabs = jnp.abs(w.astype(jnp.float32)).sum(-1)
  return 0.5 * step * (wabs if scale is None else wabs * scale.astype(jnp.float32))


def reference(x: jax.Array, w: jax.Array, *, scale: jax.Array | None = None,
              int8_activations: bool = False) -> jax.Array:
  """`matmul` in XLA: the fallback, and what the tests hold the kernels to. With int8 `w` and
  `int8_activations`: the rows quantized by `quantize_rows`, an exact int32 product, then
  step * scale (the kernel's integer sums are exact too: both agree to float32 rounding)."""
  if w.dtype == jnp.int8 and int8_activations:
    q, step = quantize_rows(x)
    dot = jnp.einsum("...k,nk->...n", q, w, preferred_element_type=jnp.int32)
    factor = step if scale is None else step * scale.astype(jnp.float32)
    return dot.astype(jnp.float32) * factor
  if w.dtype == jnp.int8:
    w = w.astype(x.dtype)
  out = jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32)
  return out if scale is None else out * scale.astype(jnp.float32)


def auto_matmul(x: jax.Array, w: jax.Array, *, scale: jax.Array | None = None,
                int8_activations: bool = False, int16_activations: bool = False) -> jax.Array:
  """`matmul` where the kernel is the faster choice for this many rows (`wins`), else `reference`
  (XLA's einsum): what a model prepared for decoding (weights [N, K]) runs. `int16_activations`
  takes the int16 loop from `a16_min_rows()` rows. The kernel has no gradient: this is never part of
  a training step."""
  rows = math.prod(x.shape[:-1])
  if not wins(rows, w):
    return reference(x, w, scale=scale, int8_activations=int8_activations)
  return matmul(x, w, scale=scale, int8_activations=int8_activations,
                int16_activations=int16_activations and rows >= a16_min_rows())


# Weight dtypes whose decoding fuses its calls (`layer_tail`, or `mlp`), up to how many rows. int8 at
# 1 row: the block tail in one call measured 1.14x three calls (paired rounds, the 117M step's
# matrices; experiments/bench_gemv.py --against=unfused, BENCHMARKS.md "int8-fuse, session 7"); at 8
# rows it measured 0.78-0.93x (there int8's loops are compute-bound and each call long), so batches
# keep separate calls; rows 2-7 unmeasured: not fused. float32 and bf16 read 2-4x more bytes per call,
# so the per-call cost that fusing saves is a smaller share: not fused (unmeasured).
FUSE_ROWS = {jnp.dtype(jnp.int8): 1}


def fuses_mlp(rows: int, w: jax.Array, *, int16_activations: bool = False) -> bool:
  """Whether a decoding model's MLP of `rows` rows with weights like `w` ([N, K], by row) runs as one
  `mlp` call: where the kernel is the faster choice (`wins`), its dtype fuses (FUSE_ROWS), and the
  unfused calls would not take the int16-activation loop (which `mlp` does not have).
  Only with GPT_GEMV_FUSE=1 or mlp (read when a program is traced; unset or 0: two calls, the
  default, which measured as fast or faster): the A/B switch of experiments/bench_decode.py --fused."""
  dtype = jnp.dtype(w.dtype)
  if os.environ.get("GPT_GEMV_FUSE", "0") == "0":
    return False
  if int16_activations and dtype == jnp.int8 and rows >= a16_min_rows() and vnni():
    return False
  return rows <= FUSE_ROWS.get(dtype, 0) and wins(rows, w)


def fuses_layer_tail(rows: int, w: jax.Array, *, int16_activations: bool = False) -> bool:
  """Whether a decoding block runs everything after its attention (attn c_proj, residual, ln_2,
  the MLP, residual) as one `layer_tail` call: where the MLP fuses (`fuses_mlp`, GPT_GEMV_FUSE=1),
  not with GPT_GEMV_FUSE=mlp (read when a program is traced: the MLP alone in one call, for the A/B)."""
  return os.environ.get("GPT_GEMV_FUSE", "0") != "mlp" and fuses_mlp(
      rows, w, int16_activations=int16_activations)


def gelu(x: jax.Array) -> jax.Array:
  """GPT-2's tanh-approximate GELU (the model's, jax.nn.gelu(approximate=True))."""
  return jax.nn.gelu(x, approximate=True)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, *,
        scale1: jax.Array | None = None, scale2: jax.Array | None = None,
        int8_activations: bool = False) -> jax.Array:
  """gelu(x w1^T * scale1 + b1) w2^T * scale2 + b2 in one kernel call: x [..., K], w1 [N1, K],
  w2 [N2, N1] (by row, as `matmul` takes them), biases [N1] / [N2]; float32 [..., N2].

  The two products are `matmul`'s loops (same dtypes, `int8_activations` likewise: the hidden
  rows are quantized after the GELU, as the second of two calls would), split over the pool's
  threads in one hand-off. Equal to `mlp_reference` to float32 rounding (the GELU's exp and tanh
  differ from XLA's in the last bits; with int8 activations that can move one hidden activation by
  one step). Where the kernel does not run (`uses_kernel`), it is `mlp_reference`."""
  K, N1, N2 = x.shape[-1], w1.shape[0], w2.shape[0]
  rows = math.prod(x.shape[:-1])
  int8_w = jnp.dtype(w1.dtype) == jnp.int8 and jnp.dtype(w2.dtype) == jnp.int8
  a8 = int8_activations and int8_w
  if (not uses_kernel(rows, w1) or jnp.dtype(w1.dtype) != jnp.dtype(w2.dtype) or w2.shape[1] != N1
      or (a8 and not vnni())):
    return mlp_reference(x, w1, b1, w2, b2, scale1=scale1, scale2=scale2,
                         int8_activations=int8_activations)
  no_scale = jnp.zeros((0,), jnp.float32)
  f32 = lambda a: no_scale if a is None else a.astype(jnp.float32)
  target = "GptGemvMlpS8A8" if a8 else f"GptGemvMlp{_SUFFIX[jnp.dtype(w1.dtype)]}"
  out, _ = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct((rows, N2), jnp.float32),
                                     jax.ShapeDtypeStruct((rows, N1), jnp.float32)))(
      x.reshape(rows, K).astype(jnp.float32), w1, f32(scale1), f32(b1), w2, f32(scale2), f32(b2))
  return out.reshape(*x.shape[:-1], N2)


def mlp_reference(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, *,
                  scale1: jax.Array | None = None, scale2: jax.Array | None = None,
                  int8_activations: bool = False) -> jax.Array:
  """`mlp` in XLA (two `reference` products with the GELU between): its fallback and its test."""
  h = reference(x, w1, scale=scale1, int8_activations=int8_activations) + b1.astype(jnp.float32)
  y = reference(gelu(h), w2, scale=scale2, int8_activations=int8_activations)
  return y + b2.astype(jnp.float32)


def layer_tail(a: jax.Array, x: jax.Array, w_o: jax.Array, b_o: jax.Array, g: jax.Array, beta: jax.Array,
               w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, *,
               scale_o: jax.Array | None = None, scale1: jax.Array | None = None,
               scale2: jax.Array | None = None, int8_activations: bool = False) -> jax.Array:
  """A decoder block after its attention, in one kernel call: r = x + (a w_o^T * scale_o + b_o),
  then r + mlp(layer_norm(r, g, beta)) (`mlp`'s product). a (the attention's heads, before its
  c_proj) and x (the block's input) [..., D]; w_o [D, D], w1 [N1, D], w2 [D, N1] by row; float32
  [..., D]. Equal to `layer_tail_reference` to float32 rounding (with int8 activations, a value at a
  rounding tie may quantize one step apart). Where the kernel does not run, it is that reference."""
  D, N1 = x.shape[-1], w1.shape[0]
  rows = math.prod(x.shape[:-1])
  dtypes = {jnp.dtype(w.dtype) for w in (w_o, w1, w2)}
  a8 = int8_activations and dtypes == {jnp.dtype(jnp.int8)}
  if (not uses_kernel(rows, w1) or len(dtypes) > 1 or w_o.shape != (D, D) or w2.shape != (D, N1)
      or (a8 and not vnni())):
    return layer_tail_reference(a, x, w_o, b_o, g, beta, w1, b1, w2, b2, scale_o=scale_o, scale1=scale1,
                                scale2=scale2, int8_activations=int8_activations)
  no_scale = jnp.zeros((0,), jnp.float32)
  f32 = lambda v: no_scale if v is None else v.astype(jnp.float32)
  flat = lambda v: v.reshape(rows, D).astype(jnp.float32)
  target = "GptGemvTailS8A8" if a8 else f"GptGemvTail{_SUFFIX[jnp.dtype(w1.dtype)]}"
  shapes = [jax.ShapeDtypeStruct((rows, n), jnp.float32) for n in (D, D, D, N1)]
  out, *_ = jax.ffi.ffi_call(target, shapes)(
      flat(a), flat(x), w_o, f32(scale_o), f32(b_o), f32(g), f32(beta), w1, f32(scale1), f32(b1), w2,
      f32(scale2), f32(b2))
  return out.reshape(x.shape)


def layer_tail_reference(a, x, w_o, b_o, g, beta, w1, b1, w2, b2, *, scale_o=None, scale1=None,
                         scale2=None, int8_activations: bool = False) -> jax.Array:
  """`layer_tail` in XLA (gpt.layers.layer_norm, `reference` products, `mlp_reference`)."""
  from gpt.layers import layer_norm

  r = x.astype(jnp.float32) + (reference(a, w_o, scale=scale_o, int8_activations=int8_activations)
                               + b_o.astype(jnp.float32))
  u = layer_norm(r, g, beta)
  return r + mlp_reference(u, w1, b1, w2, b2, scale1=scale1, scale2=scale2,
                           int8_activations=int8_activations)
