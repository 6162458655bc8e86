"""The model's one float32-accumulating matmul, shared by its dense layers (gpt.model's `dense`)
and its tied output head (gpt.heads' `logits`).

Its own module so that both can import it: the head sits above the layers (gpt.model calls it at
the top of the stack) and must not import gpt.model back.

`bf16_matmul` is the bfloat16 route (train-bf16, session 9): XLA:CPU's bf16 dot is fast on a CPU
with AVX512-BF16 only when it accumulates and returns float32 (bf16 x bf16 -> f32 ran ~2x its
float32 dot there; bf16 x bf16 -> bf16 no faster than float32). JAX's own transpose of the
forward einsum takes the float32 cotangent as it is, so the backward's two products ran float32 or
mixed dots; bf16_matmul's VJP casts the cotangent to bfloat16 so that all three products (y = x w,
dx = dy w^T, dw = x^T dy) are bf16 x bf16 -> f32. It serves both bfloat16 compute (model.dtype)
and the autocast-like mixed mode (model.matmul_dtype=bfloat16: float32 activations and
parameters, only the products' inputs rounded to bfloat16). For its backward it keeps the rounded
input and the weight as it is (rounded again there: under the layer scan a bf16 copy would be one
more stacked buffer per layer); `bf16_gelu_matmul` is the MLP's c_proj with its GELU inside the
VJP, keeping h alone.

Each dW product wants its left operand transposed and row-major (`row_major_t`: XLA makes it as a
gather after a convert pass). Where C++ passes can make it (mixed-transposes, session 11):
gpt.kernels.gelu writes c_proj's rounded gelu(h)^T with dh (GELU_T_KERNEL), gpt.kernels.transpose
rounds the head's float32 dlogits and writes their transpose in one pass (DY_T_KERNEL), and
optionally each layer's rounded x^T in the forward (X_T_FORWARD).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gpt.kernels import gelu as kgelu
from gpt.kernels import gemm
from gpt.kernels import transpose as ktr

# The specs gpt.kernels.gemm serves, and whether the weight is transposed ([N, K]) in each.
GEMM_SPECS = {"...d,df->...f": False, "...d,vd->...v": True}
# True: products of two bfloat16 operands (model.dtype=bfloat16) take bf16_matmul's backward (all
# three products bf16 x bf16 -> f32), and the fused loss its bf16 route; False (the default): JAX's
# transpose of the forward einsum, as before session 9. Opt-in (bench_train's `-bf16vjp`): the
# same-run A/Bs at the 30m shape did not show a gain (1.01x, then paired 0.92/1.05/0.65x;
# BENCHMARKS.md "train-bf16, session 9"). model.matmul_dtype=bfloat16 takes bf16_matmul always.
BF16_VJP = False
# True: bf16_matmul keeps the weight as it is for its backward and rounds it to bfloat16 again
# there; False: it keeps the forward's bf16 copy (bench_train's `-bf16wres`), as before session 10.
ROUND_W_AGAIN = True
# True: bf16_gelu_matmul's backward takes dh and the rounded gelu(h)^T for its dW from one C++ pass
# (gpt.kernels.gelu.gelu_backward_bf16t) where the library builds and h is float32; False
# (bench_train's `-gelutxla`): XLA's tanh fusion and its gather of the rounded transpose
# (mixed-transposes, session 11).
GELU_T_KERNEL = True
# True: bf16_matmul's backward with a transposed weight (the tied head's, session 9's route) takes
# the rounded cotangent and its row-major transpose from one C++ pass
# (gpt.kernels.transpose.bf16_with_t) where the library builds and the cotangent is float32;
# False (bench_train's `-dytxla`): XLA's convert and gather (mixed-transposes, session 11).
DY_T_KERNEL = True
# True (bench_train's `-xtfwd`): bf16_matmul's forward with a [K, N] weight rounds x and writes its
# row-major transpose in one pass (bf16_with_t) and keeps the transpose for dW = x^T dy, so the
# backward gathers nothing; False: XLA's convert in the forward, `row_major_t` in the backward.
X_T_FORWARD = False


def matmul(x: jax.Array, w: jax.Array, spec: str = "...d,df->...f", *,
           scale: jax.Array | None = None, impl: str = "xla") -> jax.Array:
  """einsum(spec, x, w) accumulated and returned in float32, times `scale` per output when given.

  An int8 `w` (weight-only quantization) is converted to x's dtype inside the jitted program and
  its per-output `scale` applied to the float32 result (the same numbers as multiplying with the
  dequantized weight, without materialising it in the parameters).
  XLA:CPU has no bf16 matrix-vector kernel: for a single row it converts the whole bf16 weight
  matrix to float32 first (4-10x slower than reading it). Two rows take its bf16 matrix-matrix
  kernel instead, so a lone bf16 row (a batch-1 decode step) is computed as a pair.
  `impl="bf16"` (model.matmul_dtype=bfloat16) runs the dense layers and the tied head as
  `bf16_matmul` whatever the operands' dtype; two bfloat16 operands take it too (BF16_VJP).
  `impl="mkl"` (a resolved `model.matmul`, gpt.kernels.gemm.resolve) runs float32 products of the
  dense layers and the tied head through MKL's sgemm, with its own backward; other dtypes, quantized
  weights and other specs stay XLA's.
  """
  if impl == "mkl" and scale is None and spec in GEMM_SPECS:
    return gemm.matmul(x, w, transpose_w=GEMM_SPECS[spec])
  if w.dtype == jnp.int8:
    w = w.astype(x.dtype)
  rows = math.prod(x.shape[:-1])
  if rows == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    pair = jnp.concatenate([x, x], axis=0)
    out = jnp.einsum(spec, pair, w, preferred_element_type=jnp.float32)[:1]
  elif spec in GEMM_SPECS and (impl == "bf16" or (
      BF16_VJP and x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16)):
    out = bf16_matmul(x, w, GEMM_SPECS[spec])
  else:
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
  return out if scale is None else out * scale.astype(jnp.float32)


def bf16_matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
  """x [..., K] @ w ([K, N], or [N, K] with `transpose_w`) -> float32 [..., N], the operands
  rounded to bfloat16 and the products accumulated in float32; differentiable, its backward's two
  products bf16 x bf16 -> f32 too (the cotangent rounded to bfloat16, as torch's autocast does).
  The gradients come back in x's and w's own dtypes (float32 master weights get a float32 dW)."""
  lead = x.shape[:-1]
  y = _bf16_matmul2d(x.reshape(-1, x.shape[-1]), w, transpose_w)
  return y.reshape(*lead, y.shape[-1])


def bf16_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a . b over a's axis contract[0] and b's axis contract[1] (2-D operands), bf16 x bf16 -> f32:
  the product bf16_matmul's three are made of (and gpt.output_loss's bf16 head's)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul2d(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
  return bf16_dot(x, w, (1, 1 if transpose_w else 0))


def _cpu_kernel(kernel) -> bool:
  """Whether a C++ pass of gpt.kernels (`kernel`: its module) can go into the program being traced:
  its library built, and the default backend a CPU (the passes are CPU custom calls; on an
  auto-sharded CPU mesh XLA's partitioner gathers their operands: correct, not fast)."""
  return jax.default_backend() == "cpu" and kernel.available()


def _x_t_route(x_dtype, transpose_w: bool) -> bool:
  """Whether bf16_matmul's forward keeps x^T (rounded, row-major) for dW instead of x (X_T_FORWARD)."""
  return X_T_FORWARD and not transpose_w and x_dtype == jnp.float32 and _cpu_kernel(ktr)


def _bf16_forward(x, w, transpose_w):
  wb = w.astype(jnp.bfloat16)
  if _x_t_route(x.dtype, transpose_w):
    # The forward's convert and the backward's gather as one pass; the residual is x^T.
    xb, xb_t = ktr.bf16_with_t(x)
    return bf16_dot(xb, wb, (1, 0)), (xb_t, w if ROUND_W_AGAIN else wb,
                                      jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  xb = x.astype(jnp.bfloat16)
  # The rounded input is a residual: half the bytes of a float32 one, and the backward's products
  # need it in bfloat16 anyway. The weight is kept as it is and rounded again in the backward
  # (ROUND_W_AGAIN): under the layer scan a weight residual is the scan's own slice of the stacked
  # parameter, which JAX does not stack again, whereas its bf16 copy would be a new stacked
  # [layers, K, N] buffer, zero-filled and written every step. A zero-size array carries x's dtype.
  return bf16_dot(xb, wb, (1, 1 if transpose_w else 0)), (xb, w if ROUND_W_AGAIN else wb,
                                                           jnp.zeros((0,), x.dtype),
                                                           jnp.zeros((0,), w.dtype))


def row_major_t(a: jax.Array) -> jax.Array:
  """a.T [N, M] of a 2-D `a` [M, N], as a copy laid out row by row.

  XLA:CPU runs a bf16 x bf16 -> f32 dot as such (YNNPACK) only when its left operand contracts
  its last, row-major axis; otherwise it converts both operands to float32 first and runs the
  float32 dot (measured here: 37-54 GFLOP/s against 85-107 with this copy, for dW's products).
  A jnp transpose stays a layout change that XLA folds into the dot, so the copy is a gather of
  rows (which no pass folds away); it moves M x N bf16 elements, a small fraction of the dot's
  work at the model's shapes."""
  return a.T[jnp.arange(a.shape[1])]


def _bf16_backward(transpose_w, res, dy):
  xb, w, x_like, w_like = res
  wb = w.astype(jnp.bfloat16)
  # dW in w's layout: x^T dy [K, N], or dy^T x [N, K] for a transposed weight, each with a
  # row-major transposed left operand (`row_major_t`, or made by gpt.kernels.transpose's pass).
  # Making dy^T x as (x^T dy)^T instead makes XLA fold the transpose into the dot's output layout,
  # which its bf16 DotThunk rejects ("UNIMPLEMENTED: Unsupported element type").
  pass_made_t = transpose_w and DY_T_KERNEL and dy.dtype == jnp.float32 and _cpu_kernel(ktr)
  if pass_made_t:
    dyb, dyb_t = ktr.bf16_with_t(dy)
  else:
    dyb = dy.astype(jnp.bfloat16)
    dyb_t = row_major_t(dyb) if transpose_w else None
  dx = bf16_dot(dyb, wb, (1, 0 if transpose_w else 1))  # dy w^T ([M, N] . [N, K] or [K, N])
  if transpose_w:
    if pass_made_t:
      # The pass makes both operands at once, so XLA:CPU would run dx and dW at once on its one
      # pool, each ~2x slower (the head's trace, BENCHMARKS.md "train-head, session 10"); as the
      # bf16 head does (output_loss.SEQUENTIAL), dW's x is made to depend on a zero from dx
      # (XLA:CPU drops optimization barriers before it schedules). NaN/inf in dx[0, 0] (a
      # diverged step) makes dW NaN too.
      xb = xb + (dx[0, 0] * 0.0).astype(xb.dtype)
    dw = bf16_dot(dyb_t, xb, (1, 0))
  else:  # xb is x^T already where the forward made it (X_T_FORWARD)
    xb_t = xb if _x_t_route(x_like.dtype, transpose_w) else row_major_t(xb)
    dw = bf16_dot(xb_t, dyb, (1, 0))
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_bf16_matmul2d.defvjp(_bf16_forward, _bf16_backward)


def bf16_gelu_matmul(h: jax.Array, w: jax.Array) -> jax.Array:
  """bf16_matmul(gelu(h), w) (tanh-approximate GELU, the MLP's) -> float32, whose backward keeps
  h alone and recomputes gelu(h) and its slope from it.

  Why: differentiated apart, the GELU keeps float32 state of its own and bf16_matmul the rounded
  gelu(h); under the layer scan each is a stacked [layers, rows, n_in] buffer, zero-filled and
  written every step. gpt.kernels.gemm.gelu_matmul does the same for MKL's float32 products."""
  lead = h.shape[:-1]
  y = _bf16_gelu_matmul2d(h.reshape(-1, h.shape[-1]), w)
  return y.reshape(*lead, y.shape[-1])


@jax.custom_vjp
def _bf16_gelu_matmul2d(h: jax.Array, w: jax.Array) -> jax.Array:
  return bf16_dot(jax.nn.gelu(h, approximate=True), w, (1, 0))


def _bf16_gelu_forward(h, w):
  return _bf16_gelu_matmul2d(h, w), (h, w)


def _bf16_gelu_backward(res, dy):
  h, w = res
  dyb = dy.astype(jnp.bfloat16)
  dg = bf16_dot(dyb, w, (1, 1))  # dy w^T
  if GELU_T_KERNEL and h.dtype == jnp.float32 and _cpu_kernel(kgelu):
    # One pass writes dh and the rounded gelu(h)^T (no XLA tanh fusion, no gather).
    dh, g_t = kgelu.gelu_backward_bf16t(h, dg)
  else:
    g, slope = gemm.gelu_and_slope(h.astype(jnp.float32))
    dh, g_t = dg * slope, row_major_t(g.astype(jnp.bfloat16))
  dw = bf16_dot(g_t, dyb, (1, 0))  # gelu(h)^T dy, as bf16_matmul's
  return dh.astype(h.dtype), dw.astype(w.dtype)


_bf16_gelu_matmul2d.defvjp(_bf16_gelu_forward, _bf16_gelu_backward)
