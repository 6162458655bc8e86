"""The model's layer primitives: parameters with logical axes, LayerNorm, the embeddings' row
gather and OpenAI's dense layer `Conv1D` (with its optional low-rank adapter and quantized form).

These are the pieces every block and the embeddings are built from (gpt/model.py puts them
together into GPT-2). They are kept apart from the model so that each one's choices — float32
statistics, the dtype it computes in, which matmul kernel runs (XLA, MKL's GEMM for training on a
CPU, the gemv kernels for decoding) — sit in one short place, next to their reasons.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gpt.attention import apply_dropout
from gpt.kernels import gelu as kgelu
from gpt.kernels import gemm, gemv
from gpt.kernels import layernorm as kln
from gpt.matmul import bf16_gelu_matmul, matmul

# The MLP's GELU inside MKL's c_proj product (gemm.gelu_matmul) where the step's matmuls are MKL's;
# experiments/bench_train.py's `-geluxla` variant turns it off to measure it.
GELU_IN_MATMUL = True
LN_EPS = 1e-5
# LayerNorm of a one-row batch [1, T, D] as [T, D] (`layer_norm`); experiments/bench_train.py's
# `-ln3d` variant turns it off to measure it.
LN_FLAT = True


def param(rngs: nnx.Rngs | None, shape, axes, init: str, std: float, stack: int, dtype) -> nnx.Param:
  """A parameter of `shape` (with a leading [stack] axis when stack > 0) and logical `axes`."""
  if stack:
    shape, axes = (stack, *shape), ("layers", *axes)
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
  """LayerNorm over the last axis, computed in float32 and returned in x's dtype.

  A batch of one row, [1, T, D], goes in as [T, D]: the backward's sums of g's and b's gradients
  over the rows are then one reduce over dimension 0, which XLA:CPU runs as fast as a bias
  gradient, where over [1, T, D] (the chapter's shape) it compiled to a middle-axis reduce that made
  the whole LayerNorm forward + backward 3.7x slower. Batches of several rows keep their shape:
  flattening them measured 0.94-0.95x (BENCHMARKS.md, "train-layers, session 6")."""
  if LN_FLAT and x.ndim == 3 and x.shape[0] == 1:
    return layer_norm(x.reshape(x.shape[1:]), g, b).reshape(x.shape)
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
  return (y * g.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  """`jnp.take(table, ids, axis=0, mode="clip")`: rows of an embedding table.

  XLA:CPU gathers bfloat16 through a float32 convert of the table; inside the decode loop its
  loop-invariant code motion hoists that convert out as a float32 copy of the whole table (wte:
  154 MB written per decode call: BENCHMARKS.md, "decoding outside the matmuls"). Passing the table
  through one optimization barrier with the (loop-varying) ids keeps the convert inside, fused
  into the gather: only the rows taken are converted. Same values and derivative as jnp.take.
  """
  if table.dtype == jnp.bfloat16:
    table, ids = jax.lax.optimization_barrier((table, ids))
  return jnp.take(table, ids, axis=0, mode="clip")


def dense(x: jax.Array, w: jax.Array, b: jax.Array, *, scale: jax.Array | None = None,
          by_row: bool = False, int8_activations: bool = False, impl: str = "xla",
          int16_activations: bool = False) -> jax.Array:
  """x @ w + b accumulated in float32, returned in x's dtype. w is [n_in, n_out] in x's dtype
  (cast here) or int8 with per-output `scale`; `by_row`: w is [n_out, n_in] (`gemv.auto_matmul`,
  which also takes `int8_activations` / `int16_activations`); `impl`: gpt.matmul's (a resolved `model.matmul`)."""
  if w.dtype != jnp.int8:
    w = w.astype(x.dtype)
  y = (gemv.auto_matmul(x, w, scale=scale, int8_activations=int8_activations,
                        int16_activations=int16_activations) if by_row
       else matmul(x, w, scale=scale, impl=impl))
  return (y + b.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with OpenAI's names `g` (scale) and `b` (bias); computed in float32.

  `kernel`: run it by gpt.kernels.layernorm (one C++ pass per direction) where that takes the
  inputs (float32, library built); gpt.model sets it where the model's matmuls resolved to MKL's
  (a training program on one CPU device). Otherwise, and always for other dtypes, `layer_norm`."""

  def __init__(self, d: int, *, stack: int = 0, dtype=jnp.float32, kernel: bool = False):
    self.g = param(None, (d,), ("embed",), "ones", 0.0, stack, dtype)
    self.b = param(None, (d,), ("embed",), "zeros", 0.0, stack, dtype)
    self.kernel = kernel

  def __call__(self, x: jax.Array) -> jax.Array:
    g, b = self.g[...], self.b[...]
    if self.kernel and kln.takes(x, g, b):
      return kln.layer_norm(x, g, b, LN_EPS)
    return layer_norm(x, g, b)


class Conv1D(nnx.Module):
  """OpenAI's 'conv1d', the model's one dense layer: `w` [n_in, n_out], `b` [n_out], and with
  `lora_rank` > 0 a low-rank adapter (Hu et al. 2021): `lora_a` [n_in, r], `lora_b` [r, n_out], so that

      y = x w + b + (alpha / r) * dropout(x) lora_a lora_b.

  `lora_b` starts at zero, so a fresh adapter leaves the layer exactly as it was; `lora_a` starts
  as PEFT's does (Kaiming-uniform, bound 1/sqrt(n_in)). The adapter's axes are the layer's own on
  the outer dimensions and unnamed (replicated) on the rank, so gpt.sharding lays it out like `w`.
  """

  def __init__(self, n_in: int, n_out: int, axes: tuple[str | None, str | None], *, std: float,
               rngs: nnx.Rngs, stack: int = 0, dtype=jnp.float32, lora_rank: int = 0,
               lora_alpha: float = 16.0, lora_dropout: float = 0.0, quantize: str = "none",
               by_row: bool = False, int8_activations: bool = False, matmul: str = "xla",
               int16_activations: bool = False):
    # Quantized (gpt.quantize): `w` int8 and `w_scale` [n_out] float32, w = w_int8 * w_scale.
    # by_row (gpt.decoding.prepare_for_decoding, for gpt.kernels.gemv): `w` is stored [n_out, n_in].
    self.by_row = by_row
    self.matmul = matmul  # GPTConfig.matmul: "mkl" runs gpt.kernels.gemm (training, resolved)
    self.int8_activations = by_row and int8_activations  # GPTConfig.int8_activations
    self.int16_activations = by_row and int16_activations  # GPTConfig.int16_activations
    shape, w_axes = ((n_out, n_in), axes[::-1]) if by_row else ((n_in, n_out), axes)
    quantized = quantize == "int8"
    self.w = param(rngs, shape, w_axes, "zeros" if quantized else "normal", std, stack,
                    jnp.int8 if quantized else dtype)
    if quantized:
      self.w_scale = param(None, (n_out,), axes[1:], "ones", 0.0, stack, jnp.float32)
    self.b = param(None, (n_out,), axes[1:], "zeros", 0.0, stack, dtype)
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    self.lora_dropout = lora_dropout
    if lora_rank:
      bound = 1.0 / math.sqrt(n_in)
      shape = (stack, n_in, lora_rank) if stack else (n_in, lora_rank)
      a = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
      self.lora_a = nnx.Param(a.astype(dtype), axes=(("layers",) if stack else ()) + (axes[0], None))
      self.lora_b = param(None, (lora_rank, n_out), (None, axes[1]), "zeros", 0.0, stack, dtype)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """`rng` turns the adapter's input dropout on (training); None means deterministic."""
    scale = self.w_scale[...] if hasattr(self, "w_scale") else None
    y = dense(x, self.w[...], self.b[...], scale=scale, by_row=self.by_row, impl=self.matmul,
              int8_activations=self.int8_activations, int16_activations=self.int16_activations)
    if not self.lora_scale:
      return y
    h = apply_dropout(x, self.lora_dropout, rng) @ self.lora_a[...].astype(x.dtype)
    return y + (self.lora_scale * (h @ self.lora_b[...].astype(x.dtype))).astype(y.dtype)

  def plain_mkl(self, x: jax.Array) -> bool:
    """Whether this layer is a plain MKL product for x: its matmul resolved to MKL's, float32 x,
    no adapter, not quantized, not laid out by row."""
    return (self.matmul == "mkl" and not self.lora_scale and not hasattr(self, "w_scale")
            and not self.by_row and x.dtype == jnp.float32)

  def plain_bf16(self) -> bool:
    """Whether this layer is a plain bf16 product (model.matmul_dtype=bfloat16): no adapter, not
    quantized, not laid out by row."""
    return (self.matmul == "bf16" and not self.lora_scale and not hasattr(self, "w_scale")
            and not self.by_row)

  def after_gelu(self, h: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """self(gelu(h)): as MKL's product with the GELU inside its VJP (gemm.gelu_matmul: the scan
    keeps h alone, one [rows, n_in] residual fewer) where this layer's matmul is MKL's and plain
    (float32, no adapter, not quantized, not laid out by row), or as gpt.matmul.bf16_gelu_matmul
    (the same for the bf16 products) where it is a plain bf16 product; else the GELU, then the
    layer."""
    if GELU_IN_MATMUL and self.plain_mkl(h):
      y = gemm.gelu_matmul(h, self.w[...].astype(h.dtype)) + self.b[...].astype(jnp.float32)
      return y.astype(h.dtype)
    if GELU_IN_MATMUL and self.plain_bf16():
      y = bf16_gelu_matmul(h, self.w[...]) + self.b[...].astype(jnp.float32)
      return y.astype(h.dtype)
    return self(jax.nn.gelu(h, approximate=True), rng)


def fused_mlp(fc: Conv1D, proj: Conv1D, x: jax.Array) -> jax.Array | None:
  """proj(gelu(fc(x))) with fc's bias, the GELU's backward and fc's bias gradient in one kernel pass
  (gpt.kernels.gelu.bias_gelu_matmul) between MKL's products, where both layers are plain MKL
  products (`Conv1D.plain_mkl`: training on one CPU device) and the kernel takes the inputs; None
  elsewhere (the caller then runs the layers as they are)."""
  if not (GELU_IN_MATMUL and fc.plain_mkl(x) and proj.plain_mkl(x)):
    return None
  w_fc, b_fc, w_proj = fc.w[...], fc.b[...], proj.w[...]
  if not kgelu.takes(x, b_fc, w_proj) or w_fc.dtype != jnp.float32:
    return None
  u = matmul(x, w_fc, impl="mkl")
  return kgelu.bias_gelu_matmul(u, b_fc, w_proj) + proj.b[...].astype(jnp.float32)
