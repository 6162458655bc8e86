"""The model's one float32-accumulating matmul, shared by its dense layers (gpt.model's `dense`)
and its tied output head (gpt.heads' `logits`).

Its own module so that both can import it: the head sits above the layers (gpt.model calls it at
the top of the stack) and must not import gpt.model back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, spec: str = "...d,df->...f", *,
           scale: jax.Array | None = None) -> jax.Array:
  """einsum(spec, x, w) accumulated and returned in float32, times `scale` per output when given.

  An int8 `w` (weight-only quantization) is converted to x's dtype inside the jitted program and
  its per-output `scale` applied to the float32 result (the same numbers as multiplying with the
  dequantized weight, without materialising it in the parameters).
  XLA:CPU has no bf16 matrix-vector kernel: for a single row it converts the whole bf16 weight
  matrix to float32 first (4-10x slower than reading it). Two rows take its bf16 matrix-matrix
  kernel instead, so a lone bf16 row (a batch-1 decode step) is computed as a pair.
  """
  if w.dtype == jnp.int8:
    w = w.astype(x.dtype)
  rows = math.prod(x.shape[:-1])
  if rows == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    pair = jnp.concatenate([x, x], axis=0)
    out = jnp.einsum(spec, pair, w, preferred_element_type=jnp.float32)[:1]
  else:
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
  return out if scale is None else out * scale.astype(jnp.float32)
