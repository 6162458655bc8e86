"""Attention over the KV cache for decoding on a CPU: decode_attention.cc through JAX's FFI.

A decode step's attention is B * H tiny problems: one query row per head against that head's
filled cache slots. XLA:CPU runs them as two batched dots around a masked softmax, several passes
over [B * H, T, S] (10-12% of a batch-8 117M step). `attention` runs them as one call per layer
instead: per (row, head), one pass over its cache slice (only the slots its mask allows), a
max-subtracted float32 softmax and the probabilities times the values, split over XLA's intra-op
pool. It computes gpt.attention's "einsum" formulation (same masking, same uniform distribution
for a query that sees nothing, probabilities rounded to the compute dtype before the values) up to
the order of float32 sums.

It runs where `runs` says: a CPU backend, the library built (gpt.kernels.native, -march=native,
cached), GPT_DECODE_ATTENTION not 0, outside `off()`. gpt.attention falls back to the einsum
formulation everywhere else, and whenever the probabilities are asked for (the attention view) or
dropout is on. GPT_DECODE_ATTENTION_THREADS=n (read by the library at each call) caps the threads
a call uses.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt.kernels import native

SOURCE = Path(__file__).with_name("decode_attention.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {jnp.dtype(jnp.float32): "GptDecodeAttentionF32",
            jnp.dtype(jnp.bfloat16): "GptDecodeAttentionBF16"}
# Up to this many queries per row the kernel runs (a decode step is 1; a short prefill a few).
# Past it XLA's batched dots win: they reuse each key across many queries, the kernel takes one
# query at a time (experiments/bench_decode_attention.py: T=16 1.75-8x faster, T=64 over 512
# filled slots 0.72-0.93x; BENCHMARKS.md). Long prompts' prefill keeps the einsum formulation.
MAX_QUERIES = 16
KERNEL = native.Kernel(SOURCE, FLAGS, tuple(_TARGETS.values()), env="GPT_DECODE_ATTENTION",
                       warn=True, fallback="using XLA's attention")


def available() -> bool:
  """True when the kernel is registered with XLA (building it now if needed); GPT_DECODE_ATTENTION=0
  turns it off (the einsum formulation runs: an A/B switch for experiments/bench_decode.py)."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


# Set inside `off()`: programs lowered there are for another platform, never this CPU.
_off = contextvars.ContextVar("decode_attention_off", default=False)


@contextlib.contextmanager
def off():
  """Within this block the kernel is never chosen by programs traced in it (as gemv.off(): compile
  mode lowers TPU programs on a CPU host, where a CPU custom call cannot run on the target)."""
  token = _off.set(True)
  try:
    yield
  finally:
    _off.reset(token)


def runs(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> bool:
  """Whether `attention(q, k, v, mask)` runs the kernel for these operands: at most MAX_QUERIES
  queries per row, float32/bfloat16 queries and cache, an explicit mask [B, 1, T, S], a CPU
  backend and a built library."""
  B, H, T, K = q.shape
  S = k.shape[2]
  return (T <= MAX_QUERIES and mask is not None and tuple(mask.shape) == (B, 1, T, S)
          and jnp.dtype(k.dtype) in _TARGETS and k.dtype == v.dtype
          and jnp.dtype(q.dtype) in _TARGETS
          and jax.default_backend() == "cpu" and not _off.get() and available())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(K), masked) v through the kernel (check `runs` first).

  q [B, H, T, K]; k, v [B, H, S, K] (the cache: float32 or bfloat16); mask [B, 1, T, S] bool (True
  = may attend). Returns y [B, H, T, K] in q's dtype, equal to gpt.attention's "einsum" result to
  float32 rounding.
  """
  if not available():  # registers the handlers on first use
    raise RuntimeError("gpt.kernels.decode_attention is unavailable here: check `runs` first")
  B, H, T, K = q.shape
  S = k.shape[2]
  N = B * H
  y = jax.ffi.ffi_call(_TARGETS[jnp.dtype(k.dtype)], jax.ShapeDtypeStruct((N, T, K), jnp.float32))(
      q.reshape(N, T, K).astype(jnp.float32), k.reshape(N, S, K), v.reshape(N, S, K),
      mask.reshape(B, T, S).astype(bool), bf16_probs=np.int32(q.dtype == jnp.bfloat16))
  return y.astype(q.dtype).reshape(B, H, T, K)
