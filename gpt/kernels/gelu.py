"""The MLP for CPU float32 training with c_fc's bias, the GELU's backward and c_fc's bias gradient in
one C++ pass (gelu.cc behind JAX's FFI) between MKL's products (gpt.kernels.gemm).

Why: after c_fc's product u = x w_fc, JAX's differentiation of (u + b) -> gelu -> w_proj keeps
h = u + b for the backward (a [rows, 4D] write the forward makes only for that), and its backward
is a fusion over h and dg writing dh and gelu(h), then a separate reduce that reads dh again for
b's gradient. `bias_gelu_matmul(u, b, w)` = gelu(u + b) @ w keeps u (MKL's output, which exists
anyway) and does the backward's elementwise work and the bias gradient in one pass
(BENCHMARKS.md, "train-fuse, session 8").

gpt.layers.fused_mlp runs it where both MLP layers are plain MKL layers (`model.matmul` resolved
to "mkl": a training program on one CPU device; float32, no adapter, not quantized), USE_KERNEL
is on and the library builds (`available`); elsewhere the MLP is as before. The library is compiled
from gelu.cc with the system C++ compiler at first use (-march=native) and cached (gpt.kernels.native).

`gelu_backward_bf16t` is the same GELU backward for the mixed mode's MLP c_proj
(model.matmul_dtype=bfloat16: gpt.matmul.bf16_gelu_matmul): it writes dh and gelu(h)^T rounded to
bfloat16, the row-major transposed operand that c_proj's dW product needs on XLA:CPU, where XLA
otherwise recomputes the tanh and gathers the rounded transpose in passes of its own
(BENCHMARKS.md, "mixed-transposes, session 11").
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt.kernels import gemm, native

SOURCE = Path(__file__).with_name("gelu.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
BACKWARD = "GptBiasGeluBwdF32"
BACKWARD_BF16T = "GptGeluBwdBf16T"
# Off by default: alone the pass is ~1.4x XLA's, but in the lead's quiet whole-step A/Bs (session 8)
# the MLP with it ran 0.93x its XLA form at 30m (BENCHMARKS "The lead's quiet retake, session 8").
# True (experiments/bench_train.py's `gelukernel` variant) takes it where it runs; read by `takes`.
USE_KERNEL = False
KERNEL = native.Kernel(SOURCE, FLAGS, (BACKWARD, BACKWARD_BF16T), env="GPT_GELU_KERNEL",
                       fallback="the MLP's GELU stays XLA's")


def available() -> bool:
  """True when the kernel library is built and registered with XLA (building it now if needed).
  GPT_GELU_KERNEL=0 turns it off."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


def takes(u: jax.Array, b: jax.Array, w: jax.Array) -> bool:
  """Whether `bias_gelu_matmul` runs for these inputs: USE_KERNEL, float32, both libraries built."""
  return (USE_KERNEL and all(a.dtype == jnp.float32 for a in (u, b, w)) and available()
          and gemm.available())


def bias_gelu_backward(u: jax.Array, b: jax.Array, dg: jax.Array):
  """(du, gelu(u + b), db) for u, dg [N, M] and b [M]: du = dg * gelu'(u + b), db = du summed over
  rows, in one kernel pass (du takes dg's buffer). No gradient of its own. Call where `available()`."""
  N, M = u.shape
  call = jax.ffi.ffi_call(BACKWARD, (jax.ShapeDtypeStruct((N, M), jnp.float32),
                                     jax.ShapeDtypeStruct((N, M), jnp.float32),
                                     jax.ShapeDtypeStruct((M,), jnp.float32)),
                          vmap_method="sequential", input_output_aliases={2: 0})
  return call(u, b, dg)


def gelu_backward_bf16t(h: jax.Array, dg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dh, gelu(h)^T) for float32 h, dg [N, M]: dh = dg * gelu'(h) float32 [N, M] (taking dg's
  buffer), gelu(h)^T [M, N] rounded to bfloat16 (to nearest even, as XLA's convert), in one kernel
  pass; the GELU is the tanh form's, as `bias_gelu_backward`'s. No gradient of its own. Call where
  `available()`."""
  N, M = h.shape
  call = jax.ffi.ffi_call(BACKWARD_BF16T, (jax.ShapeDtypeStruct((N, M), jnp.float32),
                                           jax.ShapeDtypeStruct((M, N), jnp.bfloat16)),
                          vmap_method="sequential", input_output_aliases={1: 0})
  return call(h, dg)


@jax.custom_vjp
def _bias_gelu_matmul2d(u, b, w):
  return gemm.gemm(jax.nn.gelu(u + b, approximate=True), w)


def _fwd(u, b, w):
  return _bias_gelu_matmul2d(u, b, w), (u, b, w)


def _bwd(res, dy):
  u, b, w = res
  dy = dy.astype(jnp.float32)
  du, g, db = bias_gelu_backward(u, b, gemm.gemm(dy, w, transpose_b=True))
  return du, db, gemm.gemm(g, dy, transpose_a=True)


_bias_gelu_matmul2d.defvjp(_fwd, _bwd)


def bias_gelu_matmul(u: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  """gelu(u + b) [..., K] @ w [K, N] (tanh-approximate GELU, the MLP's), float32, by MKL, with a
  backward whose elementwise work and b's gradient are one kernel pass; it keeps u, b and w. For
  inputs `takes` accepts."""
  K = u.shape[-1]
  out = checkpoint_name(_bias_gelu_matmul2d(u.reshape(math.prod(u.shape[:-1]), K), b, w),
                        gemm.CHECKPOINT_NAME)
  return out.reshape(*u.shape[:-1], out.shape[-1])
