"""LayerNorm for CPU float32 training: layernorm.cc behind JAX's FFI, one threaded pass per direction.

Why: differentiated by JAX, LayerNorm is several XLA:CPU passes over its [rows, D] input each way
(row means and variances, the output; the backward's row sums, dx, and g's and b's gradients as
separate column-reduce fusions over all rows). The kernel reads x once forward (it saves the rows'
mean and 1/std, [rows] each) and x, dy once backward, summing g's and b's gradients per block of
rows while the rows are in cache (BENCHMARKS.md, "train-fuse, session 8").

`layer_norm(x, g, b)` is gpt.layers.layer_norm's float32 arithmetic (variance of x - mean, eps
inside the root) with a custom VJP whose backward is the kernel's too. gpt.layers.LayerNorm runs it
where the model's matmuls resolved to MKL's (`model.matmul` "mkl": a training program on one CPU
device, see gpt.kernels.gemm.resolve), its inputs are float32 and the library builds (`available`);
everywhere else (GPU/TPU, meshes, bfloat16, no compiler) LayerNorm stays XLA's. The library is
compiled from layernorm.cc with the system C++ compiler at first use (-march=native) and cached
(gpt.kernels.native).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt.kernels import native

SOURCE = Path(__file__).with_name("layernorm.cc")
# -fopenmp-simd: the row sums' `#pragma omp simd reduction` vectorise (float sums are not
# reassociated otherwise); no OpenMP runtime is linked. -ffp-contract=off: each product rounded as
# XLA's elementwise code rounds it (a contracted dy*g - mean(dy*g) left a row of width 1 a nonzero
# dx where XLA's is exactly 0); the passes are bound by memory, not by the extra instruction.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-ffp-contract=off",
         "-std=c++17", "-shared", "-fPIC", "-w")
FORWARD, BACKWARD = "GptLayerNormFwdF32", "GptLayerNormBwdF32"
# Set False to keep XLA's LayerNorm where the kernel would run (experiments/bench_train.py's
# `lnxla` variant); read by `takes`.
USE_KERNEL = True
KERNEL = native.Kernel(SOURCE, FLAGS, (FORWARD, BACKWARD), env="GPT_LAYERNORM_KERNEL",
                       fallback="LayerNorm stays XLA's")


def available() -> bool:
  """True when the kernel library is built and registered with XLA (building it now if needed).
  GPT_LAYERNORM_KERNEL=0 turns it off."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


def takes(x: jax.Array, g: jax.Array, b: jax.Array) -> bool:
  """Whether `layer_norm` runs for these inputs: USE_KERNEL, float32 x, g, b, the library built."""
  return (USE_KERNEL and all(a.dtype == jnp.float32 for a in (x, g, b)) and x.ndim >= 1
          and available())


def _forward_call(x, g, b, eps):
  N = x.shape[0]
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                    jax.ShapeDtypeStruct((N,), jnp.float32),
                                    jax.ShapeDtypeStruct((N,), jnp.float32)),
                          vmap_method="sequential")
  return call(x, g, b, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm2d(x, g, b, eps):
  return _forward_call(x, g, b, eps)[0]


def _layer_norm2d_fwd(x, g, b, eps):
  y, mean, rstd = _forward_call(x, g, b, eps)
  return y, (x, g, mean, rstd)


def _layer_norm2d_bwd(eps, res, dy):
  x, g, mean, rstd = res
  call = jax.ffi.ffi_call(BACKWARD, (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                     jax.ShapeDtypeStruct(g.shape, jnp.float32),
                                     jax.ShapeDtypeStruct(g.shape, jnp.float32)),
                          vmap_method="sequential")
  return call(x, g, mean, rstd, dy.astype(jnp.float32))


_layer_norm2d.defvjp(_layer_norm2d_fwd, _layer_norm2d_bwd)


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  """LayerNorm of float32 x [..., D] over its last axis with scale g [D] and bias b [D] by the
  kernel, differentiable in x, g and b (the backward is the kernel's). For inputs `takes` accepts."""
  D = x.shape[-1]
  y = _layer_norm2d(x.reshape(math.prod(x.shape[:-1]), D), g, b, float(eps))
  return y.reshape(x.shape)
