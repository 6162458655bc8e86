"""The training step's float32 matmuls on a CPU through Intel MKL: gemm.cc behind JAX's FFI, with a VJP.

Why: on the Xeon this project is measured on, XLA:CPU's GEMM runs the step's matmul shapes at ~0.8x
torch's speed (torch's is MKL's sgemm), and the matmuls are most of a training step; XLA's flags
(oneDNN, XNNPACK, Eigen instead of YNNPACK) did not close it (BENCHMARKS.md, "Training speed
routes"). `matmul` multiplies x [..., K] by a weight w [K, N] (Conv1D's layout) or [N, K]
(`transpose_w`: the tied output layer's wte) with one FFI kernel, `gemm`, whose transpose flags also
serve the backward pass (custom VJP: dx = dy w^T, dw = x^T dy, each one `gemm` call).

The products themselves need not be MKL's: `products()` picks MKL's sgemm on Intel CPUs and
XLA's own float32 dot elsewhere (MKL does not run its fast sgemm on AMD's CPUs; see PRODUCTS), in
the same VJPs, so the route's other parts (the one-pass loss, the GELU inside c_proj's VJP, the
named residuals) stay whoever multiplies.

MKL comes from PyPI (`pip install 'gpt[mkl]'`, the `mkl` wheel's libmkl_rt) and is found at run
time (`find_mkl`; GPT_MKL_LIBRARY names the file explicitly): nothing links against it. The small
FFI library is compiled from gemm.cc with the system C++ compiler the first time it is needed
(a few seconds) and cached beside gemv's (gpt.kernels.native), keyed by the source, the
flags, jax's version and the CPU (-march=native: the loss pass's exp is AVX-512 where it can be). The model uses the kernel where `model.matmul` resolves to "mkl"
(`resolve`): "auto" does so for a training program on one CPU device when the library loads
(measured faster there), and keeps XLA's einsum on GPU/TPU, on multi-device meshes (the custom call
has no sharding rule), in bfloat16 (no AVX512-BF16 to gain from here) and without MKL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gpt.errors import GPTError
from gpt.kernels import native

MATMULS = ("auto", "xla", "mkl")
SOURCE = Path(__file__).with_name("gemm.cc")
# -O3: GCC 12's -O2 leaves the loss pass's loops (run-time lengths) scalar, 2.4x slower there.
# -march=native: the loss pass's exp is AVX-512 in registers (simd_exp.h) where the CPU has it; the
# library is then built per CPU (cpu_specific), as gemv's and attention's.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
TARGET = "GptGemmF32"
XENT_TARGET = "GptSoftmaxXentF32"  # the output layer's loss pass (`softmax_xent`)
XENT_BF16_TARGET = "GptSoftmaxXentBf16"  # the same pass writing bf16 dlogits and their transpose
# The name `matmul` gives its products (jax.ad_checkpoint.checkpoint_name): a custom call is no dot,
# so gpt.model's "dots" remat policies save these by name, as they save XLA's dots.
CHECKPOINT_NAME = "gpt_gemm"
# True: the loss pass (`softmax_xent`) takes its portable route (MKL's vsExp, plain loops) even where
# the AVX-512 one is built: the session-5 pass, kept for same-run comparisons (bench_train's
# `-xentvml`) and for the tests that hold both routes to optax.
XENT_PORTABLE = False
# Who multiplies in `gemm` (and so in every VJP of this module: the dense layers', the MLP's
# GELU-in-c_proj, the fused loss's three): "mkl" (cblas_sgemm by the FFI call), "xla" (XLA's own
# float32 dot in the same place), or "auto": MKL on Intel CPUs, XLA's dot on others. Why: MKL does
# not run its fastest sgemm on AMD CPUs; on a Zen 4 EPYC it measured 145-167 GFLOP/s at the step's
# shapes against XLA's 170-210 (119 vs 168 for the logits), and the whole float32 step ran 1.18x
# (chapter) and 1.21x (30m) with XLA's products inside the same VJPs (BENCHMARKS.md "The lead,
# session 11"). On the Xeon this project measured before, MKL's were ~1.2x XLA's. The environment
# variable GPT_GEMM_PRODUCTS (mkl, xla or auto) overrides this, read when a program is traced.
PRODUCTS = "auto"
PRODUCT_CHOICES = ("auto", "mkl", "xla")


def find_mkl() -> str | None:
  """The path of MKL's single dynamic library (libmkl_rt), or None: $GPT_MKL_LIBRARY, then the
  `mkl` wheel's files under this Python's prefix (it installs into <prefix>/lib), then the
  system's library path."""
  explicit = os.environ.get("GPT_MKL_LIBRARY")
  if explicit:
    return explicit
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX") or "")):
    if prefix:
      found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
      if found:
        return found[0]
  return ctypes.util.find_library("mkl_rt")


def _load_with_mkl(load):
  """`load()` (build, load, register) once MKL is found, then the library's GptGemmLoad: no build
  where there is no MKL to call."""
  mkl = find_mkl()
  if not mkl:
    raise RuntimeError("MKL's libmkl_rt was not found (pip install 'gpt[mkl]', or set "
                       "GPT_MKL_LIBRARY to its path)")
  lib = load()  # Registered before MKL loads: a target is only called once `available()` says True.
  error = ctypes.create_string_buffer(512)
  if lib.GptGemmLoad(mkl.encode(), error, len(error)):
    raise RuntimeError(f"cannot load MKL from {mkl}: {error.value.decode(errors='replace')}")
  return lib


KERNEL = native.Kernel(SOURCE, FLAGS, (TARGET, XENT_TARGET, XENT_BF16_TARGET),
                       libraries=("-ldl",), setup=_load_with_mkl,
                       fallback="training uses XLA's matmul")


def available() -> bool:
  """True when MKL was found and the kernel is registered with XLA (building it now if needed)."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


def resolve(choice: str, devices) -> str:
  """What `model.matmul=choice` means for a program on `devices` (a mesh's devices): "mkl" or
  "xla". "auto" is "mkl" on one CPU device where the kernel loads, else "xla"; an explicit "mkl"
  where it cannot run is a GPTError saying why."""
  if choice not in MATMULS:
    raise GPTError(f"model.matmul={choice!r}; choose one of {MATMULS}")
  if choice == "xla":
    return "xla"
  why = native.cannot_run_on(devices, available, why_unavailable)
  if why is None:
    return "mkl"
  if choice == "mkl":
    raise GPTError(f"model.matmul=mkl cannot be used: {why}; use model.matmul=auto or xla")
  return "xla"


def products() -> str:
  """Who runs `gemm`'s products in programs traced now: "mkl" or "xla" (PRODUCTS, overridden by
  $GPT_GEMM_PRODUCTS; "auto" is MKL on an Intel CPU, XLA's dot elsewhere). A bad value is a
  GPTError."""
  choice = os.environ.get("GPT_GEMM_PRODUCTS") or PRODUCTS
  if choice not in PRODUCT_CHOICES:
    raise GPTError(f"GPT_GEMM_PRODUCTS={choice!r}; choose one of {PRODUCT_CHOICES}")
  if choice == "auto":
    return "mkl" if native.cpu_vendor() == "GenuineIntel" else "xla"
  return choice


def gemm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
         engine: str | None = None) -> jax.Array:
  """op(a) @ op(b) for 2-D float32 arrays (op transposes where asked), accumulated in float32: the
  FFI call to MKL's sgemm, or XLA's own dot, as `engine` ("mkl" or "xla") or else `products()`
  says. Call only where `available()`."""
  M = a.shape[1] if transpose_a else a.shape[0]
  N = b.shape[0] if transpose_b else b.shape[1]
  if (engine or products()) == "xla":
    dims = (((0,) if transpose_a else (1,)), ((1,) if transpose_b else (0,)))
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32),
                          vmap_method="sequential")
  return call(a, b, transpose_a=int(transpose_a), transpose_b=int(transpose_b))


def softmax_xent(logits: jax.Array, targets: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy of float32 logits [N, V] at int targets [N] in one threaded pass per
  row (gemm.cc's SoftmaxXent; exp in AVX-512 registers where built, see XENT_PORTABLE):
  (dlogits [N, V] = (softmax - onehot) * scale, loss [N] =
  logsumexp - the target's logit). dlogits takes the logits' buffer (aliased: the logits are dead
  afterwards in the fused loss). A target outside [0, V) gives a NaN loss and no one-hot. No
  gradient of its own: gpt.output_loss's custom VJP uses dlogits as the gradient. Call only where
  `available()`."""
  N, V = logits.shape
  call = jax.ffi.ffi_call(XENT_TARGET, (jax.ShapeDtypeStruct((N, V), jnp.float32),
                                        jax.ShapeDtypeStruct((N,), jnp.float32)),
                          vmap_method="sequential", input_output_aliases={0: 0})
  return call(logits.astype(jnp.float32), targets.astype(jnp.int32), scale=np.float32(scale),
              portable=int(XENT_PORTABLE))


def softmax_xent_bf16(logits: jax.Array, targets: jax.Array,
                      scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`softmax_xent`'s pass with its gradient written in bfloat16, twice: (dlogits [N, V],
  dlogits^T [V, N] laid out row by row, loss [N]). The float32 values are softmax_xent's, bit for
  bit, rounded to nearest even (XLA's convert), so the model.matmul_dtype=bfloat16 head's two
  backward products read them as XLA:CPU's fast bf16 dot wants its left operand, with no convert
  or transposing gather of their own (gpt.output_loss). Call only where `available()`."""
  N, V = logits.shape
  call = jax.ffi.ffi_call(XENT_BF16_TARGET, (jax.ShapeDtypeStruct((N, V), jnp.bfloat16),
                                             jax.ShapeDtypeStruct((V, N), jnp.bfloat16),
                                             jax.ShapeDtypeStruct((N,), jnp.float32)),
                          vmap_method="sequential")
  return call(logits.astype(jnp.float32), targets.astype(jnp.int32), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul2d(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
  return gemm(x, w, transpose_b=transpose_w)


def _matmul2d_fwd(x, w, transpose_w):
  return gemm(x, w, transpose_b=transpose_w), (x, w)


def _matmul2d_bwd(transpose_w, residuals, dy):
  x, w = residuals
  dy = dy.astype(jnp.float32)
  if transpose_w:  # y = x w^T, w [N, K]: dx = dy w, dw = dy^T x
    return gemm(dy, w), gemm(dy, x, transpose_a=True)
  return gemm(dy, w, transpose_b=True), gemm(x, dy, transpose_a=True)  # w [K, N]


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False) -> jax.Array:
  """x [..., K] @ w [K, N] (or w [N, K] transposed, `transpose_w`) in float32 by MKL, with its
  gradient (both backward products by MKL too). Float32 x and w only; where the kernel is not
  available, or for other dtypes, this is `reference` (XLA's einsum)."""
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or not available():
    return reference(x, w, transpose_w=transpose_w)
  K = x.shape[-1]
  out = checkpoint_name(_matmul2d(x.reshape(math.prod(x.shape[:-1]), K), w, transpose_w),
                        CHECKPOINT_NAME)
  return out.reshape(*x.shape[:-1], out.shape[-1])


def gelu_and_slope(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """jax.nn.gelu(h, approximate=True) and its derivative, from one tanh."""
  c = math.sqrt(2.0 / math.pi)
  t = jnp.tanh(c * (h + 0.044715 * h ** 3))
  slope = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * h * h)
  return jax.nn.gelu(h, approximate=True), slope


@jax.custom_vjp
def _gelu_matmul2d(h: jax.Array, w: jax.Array) -> jax.Array:
  return gemm(jax.nn.gelu(h, approximate=True), w)


def _gelu_matmul2d_fwd(h, w):
  return gemm(jax.nn.gelu(h, approximate=True), w), (h, w)


def _gelu_matmul2d_bwd(residuals, dy):
  h, w = residuals
  g, slope = gelu_and_slope(h)  # recomputed: cheaper than saving two more [rows, 4D] buffers
  return gemm(dy, w, transpose_b=True) * slope, gemm(g, dy, transpose_a=True)


_gelu_matmul2d.defvjp(_gelu_matmul2d_fwd, _gelu_matmul2d_bwd)


def gelu_matmul(h: jax.Array, w: jax.Array) -> jax.Array:
  """gelu(h) [..., K] @ w [K, N] in float32 by MKL (tanh-approximate GELU, as the MLP's), whose
  backward saves only h and recomputes the GELU and its slope from it.

  Why: differentiated by JAX, the MLP keeps three [rows, 4D] buffers per layer for its backward
  (h, GELU's tanh, gelu(h) as the product's input); under the layer scan each is a stacked
  [layers, rows, 4D] buffer that XLA fills with zeros, writes per layer and reads back (the 30m
  step's profile: broadcast fills 4.1%, the scan's updates and slices 5.7% of op time). This saves
  one. Float32 only, where `available()`; otherwise `reference(gelu(h), w)`."""
  if h.dtype != jnp.float32 or w.dtype != jnp.float32 or not available():
    return reference(jax.nn.gelu(h, approximate=True), w)
  K = h.shape[-1]
  out = checkpoint_name(_gelu_matmul2d(h.reshape(math.prod(h.shape[:-1]), K), w), CHECKPOINT_NAME)
  return out.reshape(*h.shape[:-1], out.shape[-1])


def reference(x: jax.Array, w: jax.Array, *, transpose_w: bool = False) -> jax.Array:
  """`matmul` in XLA (accumulated in float32): the fallback, and what the tests hold it to."""
  spec = "...k,nk->...n" if transpose_w else "...k,kn->...n"
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
