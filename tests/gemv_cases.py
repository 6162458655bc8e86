"""Inputs shared by the gemv tests: per-row int8 weights, and the fused calls' cases (an MLP, a
block's tail) with float32, bfloat16 or int8 weights laid out by row, as decoding lays them out."""

import jax.numpy as jnp
import numpy as np


def quantized(w: np.ndarray):
  scale = np.abs(w).max(axis=1) / 127
  return jnp.asarray(np.round(w / scale[:, None]), jnp.int8), jnp.asarray(scale, jnp.float32)


def mlp_case(dtype: str, rows: int, K: int, N1: int, N2: int, seed: int = 0):
  """x, (w1, b1, scale1), (w2, b2, scale2) of an MLP with `dtype` weights ([N, K], by row)."""
  rng = np.random.default_rng(seed + rows * K + N1 + N2)
  x = jnp.asarray(rng.standard_normal((rows, K)), jnp.float32)
  layers = []
  for n, k in ((N1, K), (N2, N1)):
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    b = jnp.asarray(rng.standard_normal(n) * 0.5, jnp.float32)
    w, scale = quantized(w) if dtype.startswith("int8") else (jnp.asarray(w, dtype), None)
    layers.append((w, b, scale))
  return x, layers


MLP_SHAPES = [(1, 64, 256, 64), (1, 768, 3072, 768), (2, 70, 37, 45), (3, 33, 130, 17),
              (5, 130, 200, 70), (8, 96, 384, 96), (16, 17, 65, 129)]


def tail_case(dtype: str, rows: int, D: int, N1: int, seed: int = 0):
  """(a, x), the layer tail's weights as keyword arguments of gemv.layer_tail (by row)."""
  rng = np.random.default_rng(seed + rows * D + N1)
  a, x = (jnp.asarray(rng.standard_normal((rows, D)), jnp.float32) for _ in range(2))
  mats = []
  for n, k in ((D, D), (N1, D), (D, N1)):
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    mats.append(quantized(w) if dtype.startswith("int8") else (jnp.asarray(w, dtype), None))
  vec = lambda n, base=0.0: jnp.asarray(base + rng.standard_normal(n) * 0.5, jnp.float32)
  (w_o, s_o), (w1, s1), (w2, s2) = mats
  return (a, x), dict(w_o=w_o, b_o=vec(D), g=vec(D, 1.0), beta=vec(D), w1=w1, b1=vec(N1), w2=w2,
                      b2=vec(D), scale_o=s_o, scale1=s1, scale2=s2)
