"""A float32 matrix rounded to bfloat16 together with its row-major transpose, in one C++ pass
(transpose.cc behind JAX's FFI), for the mixed mode's dW products (model.matmul_dtype=bfloat16).

Why: XLA:CPU's bf16 dot runs fast only when its left operand contracts its last, row-major axis
(gpt.matmul.row_major_t), so a dW = a^T b needs a row-major bf16 a^T; XLA makes it as a convert
pass and then a gather, its slowest copy. In the tied head's backward (gpt.matmul.bf16_matmul with
a transposed weight) that was the float32 dlogits' convert and the gather of their [V, N]
transpose, ~15% of the 30m mixed step's op time in a profile. `bf16_with_t` reads each element
once and writes both (BENCHMARKS.md, "mixed-transposes, session 11").

gpt.matmul uses it where `available()` (the library builds; GPT_TRANSPOSE_KERNEL=0 turns it off)
and its switch says so; elsewhere the convert and `row_major_t`. Compiled from transpose.cc with
the system C++ compiler at first use (-march=native) and cached (gpt.kernels.native).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from gpt.kernels import native

SOURCE = Path(__file__).with_name("transpose.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
TARGET = "GptRoundBf16T"
KERNEL = native.Kernel(SOURCE, FLAGS, (TARGET,), env="GPT_TRANSPOSE_KERNEL",
                       fallback="XLA converts and gathers the transposed bf16 copies")


def available() -> bool:
  """True when the kernel library is built and registered with XLA (building it now if needed)."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


def bf16_with_t(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(a, a.T) of a float32 [M, N] `a`, rounded to bfloat16 (to nearest even, NaN kept: XLA's
  convert, bit for bit), a.T laid out row by row [N, M]; one kernel pass. No gradient of its own.
  Call where `available()`."""
  M, N = a.shape
  call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct((M, N), jnp.bfloat16),
                                   jax.ShapeDtypeStruct((N, M), jnp.bfloat16)),
                          vmap_method="sequential")
  return call(a)
