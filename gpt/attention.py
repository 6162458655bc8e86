"""The model's attention, one function with its formulations: softmax(q k^T / sqrt(K), masked) v.

Why a module of its own: attention is where the model's speed work lives (the blocked causal
formulation with its hand-written backward, the library kernels, the spelled-out form that runs
over a KV cache and returns weights), and gpt.model's blocks call `attention` without knowing
which formulation runs. Every mode goes through it: training and scoring (blocked by default),
decoding over the cache and the attention view's weights ("einsum").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gpt.errors import GPTError
from gpt.kernels import attention as kattn
from gpt.kernels import decode_attention

# Masked attention scores: finite, so that a fully masked (padding) row softmaxes to a uniform
# distribution instead of NaN; exp(MASK_VALUE - max) is exactly 0 in float32 elsewhere.
MASK_VALUE = -1e30

# The blocked attention splits the queries into this many blocks (of at least MIN_QUERY_BLOCK
# rows): with causal masking, block i only sees keys up to its last row, so the scores, softmax and
# backward matmuls cover ~(n+1)/2n of the [T, S] square. Measured by experiments/bench_attention.py
# (T=1024: 4 blocks 3.9x faster than jax.nn.dot_product_attention's xla; 8 blocks a little slower).
QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 64
# True (the default): the forward keeps each block's float32 probabilities for the backward.
# False: the backward recomputes them from saved softmax statistics (row max and sum), so nothing
# of size [T, S] is kept between the passes; measured slower on the loaded 2-core Xeon (chapter
# step 0.43x vs 0.50x torch in the same run, BENCHMARKS.md "Training speed routes"), kept for
# memory-bound runs and for experiments/bench_train.py's `recomputeprobs` variant. Read at trace time.
SAVE_PROBABILITIES = True


def apply_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout of `x` at `rate` with key `rng`; the identity when `rng` is None or rate 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
              impl: str = "blocked", dropout: float = 0.0, rng: jax.Array | None = None,
              return_probs: bool = False, bf16_products: bool = False):
  """The one attention: softmax(q k^T / sqrt(K), masked) v, per head.

  q [B, H, T, K]; k, v [B, H, S, K]; `mask` [B, 1, T, S] (True = may attend), or None for causal
  attention whose last query is the last key. Returns y [B, H, T, K] in q's dtype, and with
  `return_probs` also the probabilities float32 [B, H, T, S] (before dropout).
  `impl` "auto" (the default) is the fastest formulation that runs here: cuDNN's fused kernel on
  a GPU for bfloat16/float16 (cuDNN takes no float32), else "blocked"; training on one CPU device
  resolves it to "kernel" first (gpt.kernels.attention.resolve). "blocked" is `blocked_attention`:
  the training and scoring path's own formulation with a hand-written backward pass, and means
  it everywhere. "kernel" is gpt.kernels.attention's fused causal CPU kernel (FlashAttention-2
  behind the FFI: float32 and mask None; other calls run "blocked"; a GPTError where it cannot
  run; `bf16_products`, the mixed mode's, gives it bfloat16 products with float32 softmax
  statistics where the CPU has AVX512-BF16). "xla" / "cudnn" run jax.nn.dot_product_attention's
  kernels.
  "einsum" spells it out here, with batch and heads folded into one axis and float32 scores,
  softmax and accumulation; masked scores are MASK_VALUE. It is what runs over a KVCache (that
  layout is what lets XLA update the cache in place and feed it to the matmul without copies),
  and whenever dropout is on or the weights are asked for (the others return neither).
  "cache" (gpt.model's attention over a KV cache) is gpt.kernels.decode_attention's one call per
  layer where it runs (a CPU, no dropout, no weights asked for), else "einsum".
  """
  B, H, T, K = q.shape
  S = k.shape[2]
  dropping = rng is not None and dropout > 0
  if impl == "cache":  # over a KV cache (gpt.model): the decode kernel where it runs, else einsum
    if not (dropping or return_probs) and decode_attention.runs(q, k, v, mask):
      return decode_attention.attention(q, k, v, mask)
    impl = "einsum"
  if impl != "einsum" and not (dropping or return_probs):
    if impl == "auto":
      half = q.dtype in (jnp.bfloat16, jnp.float16)
      impl = "cudnn" if jax.default_backend() == "gpu" and half else "blocked"
    if impl == "kernel":  # gpt.kernels.attention's fused CPU kernel: float32, causal
      if kattn.takes(q, k, v, mask):
        if jax.default_backend() != "cpu" or not kattn.available():
          why = kattn.why_unavailable() or f"it runs on a CPU, not {jax.default_backend()}"
          raise GPTError(f"model.attention_impl=kernel cannot be used: {why}; use blocked")
        return kattn.flash_attention(q, k, v, bf16=bf16_products)
      impl = "blocked"  # an explicit mask (the eval scorer's) or bfloat16: the blocked formulation
    if impl == "blocked":
      return blocked_attention(q, k, v, mask)
    lib = lambda a: a.transpose(0, 2, 1, 3)  # the library's [B, T, H, K]
    y = jax.nn.dot_product_attention(lib(q), lib(k), lib(v), mask=mask, is_causal=mask is None,
                                     implementation=impl if impl == "xla" or mask is None else None)
    return lib(y)
  if mask is None:
    mask = jnp.tril(jnp.ones((T, S), bool), S - T)[None, None]
  N = B * H
  scores = jnp.einsum("ntk,nsk->nts", q.reshape(N, T, K), k.reshape(N, S, K),
                      preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores.reshape(B, H, T, S) / math.sqrt(K), MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  kept = apply_dropout(probs, dropout, rng) if dropping else probs
  # Probabilities in the compute dtype (q's): a float32 cache of bf16 values (gpt.decoding's on
  # XLA:CPU) then multiplies the same numbers as a bf16 cache would, in a float32 dot.
  y = jnp.einsum("nts,nsk->ntk", kept.astype(q.dtype).reshape(N, T, S), v.reshape(N, S, K),
                 preferred_element_type=jnp.float32)
  y = y.astype(q.dtype).reshape(B, H, T, K)
  return (y, probs) if return_probs else y


def query_blocks(T: int, S: int, causal: bool, blocks: int = QUERY_BLOCKS) -> list[tuple[int, int, int]]:
  """(first row, end row, keys seen) of each query block of `blocked_attention`.

  Causal (the last query is the last key): rows a..b-1 see keys 0..b-1+S-T, so later blocks see
  longer prefixes and none sees a key above the diagonal of its last row. Otherwise (an explicit
  mask, which need not be causal) one block sees all S keys.
  """
  if not causal:
    return [(0, T, S)]
  size = max(-(-T // blocks), min(MIN_QUERY_BLOCK, T))
  return [(a, min(a + size, T), min(a + size, T) + S - T) for a in range(0, T, size)]


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      blocks: int = QUERY_BLOCKS) -> jax.Array:
  """`attention` without dropout or weights, as the training step wants it on CPU.

  Same arguments and result as `attention(q, k, v, mask)`. Three things make it fast on XLA:CPU
  (experiments/bench_attention.py; profile in BENCHMARKS.md "Training speed routes"):
  - causal masking is an iota comparison fused into the scores, never a broadcast mask array;
  - the queries go in `blocks` blocks over key prefixes (`query_blocks`), skipping the scores above
    the diagonal: about 5/8 of the work of the full square at 4 blocks;
  - the backward pass is written out (a custom VJP, the FlashAttention identity): with the
    float32 probabilities P (saved, or recomputed from the softmax statistics: SAVE_PROBABILITIES)
    and D = rowsum(dy * y), dS = P * (dy v^T - D), so it never reduces over the [T, S] scores and
    never copies the softmax.
  Scores, softmax and its statistics are float32; the matmuls take q's dtype (bfloat16 compute
  feeds bf16 operands with float32 accumulation). Masked scores are MASK_VALUE, as in "einsum".
  """
  return _blocked(q, k, v, mask, blocks)


def _block_keep(mask, T, S, a, b, keys):
  """Which of the scores [.., b - a, keys] of query rows a..b-1 may attend (True = keep): the
  causal iota comparison when `mask` is None, else the mask's block."""
  if mask is not None:
    return mask[:, :, a:b, :keys]
  rows = jax.lax.broadcasted_iota(jnp.int32, (b - a, keys), 0) + (a + S - T)
  return rows >= jax.lax.broadcasted_iota(jnp.int32, (b - a, keys), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, mask, blocks):
  return _blocked_forward(q, k, v, mask, blocks)[0]


def _block_scores(q, k, mask, T, S, a, b, keys):
  """Masked, scaled float32 scores [B, H, b - a, keys] of query rows a..b-1."""
  s = jnp.einsum("bhtk,bhsk->bhts", q[:, :, a:b], k[:, :, :keys],
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
  return jnp.where(_block_keep(mask, T, S, a, b, keys), s, MASK_VALUE)


def _block_probs(s, m, l):
  """softmax of scores `s` from its row max `m` and row sum `l` of exp(s - m): the forward and
  the backward compute P with these same operations, so the backward's P is the forward's."""
  return jnp.exp(s - m) / l


def _blocked_forward(q, k, v, mask, blocks):
  """(y, residuals) of blocked_attention. The residuals keep each block's probabilities or, with
  SAVE_PROBABILITIES off, only its softmax statistics (row max and row sum, [B, H, rows, 1]):
  saved probabilities are [L, B, H, ~5/8 T, T] float32 buffers through the layer scan (377 MB at
  the chapter shape) that recomputing q k^T (~1% of the step's FLOPs) avoids."""
  T, S = q.shape[2], k.shape[2]
  ys, stats = [], []
  for a, b, keys in query_blocks(T, S, mask is None, blocks):
    s = _block_scores(q, k, mask, T, S, a, b, keys)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    p = e / l  # = _block_probs(s, m, l), as the backward recomputes it
    ys.append(jnp.einsum("bhts,bhsk->bhtk", p.astype(v.dtype), v[:, :, :keys],
                         preferred_element_type=jnp.float32))
    stats.append(p if SAVE_PROBABILITIES else (m, l))
  y = (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=2)).astype(q.dtype)
  return y, (q, k, v, mask, y, tuple(stats))


def _blocked_backward(blocks, res, dy):
  q, k, v, mask, y, stats = res
  T, S = q.shape[2], k.shape[2]
  scale = 1.0 / math.sqrt(q.shape[-1])
  # rowsum(P * dP) = rowsum(dy * y): a [T, K] reduction instead of one over the [T, S] scores.
  d = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for (a, b, keys), saved in zip(query_blocks(T, S, mask is None, blocks), stats):
    p = saved if not isinstance(saved, tuple) else _block_probs(
        _block_scores(q, k, mask, T, S, a, b, keys), *saved)
    dyb = dy[:, :, a:b]
    dv = dv.at[:, :, :keys].add(jnp.einsum("bhts,bhtk->bhsk", p.astype(dy.dtype), dyb,
                                           preferred_element_type=jnp.float32))
    dp = jnp.einsum("bhtk,bhsk->bhts", dyb, v[:, :, :keys].astype(dy.dtype),
                    preferred_element_type=jnp.float32)
    # Masked scores are constants: no gradient (a fully masked row's uniform P is not zero there).
    ds = jnp.where(_block_keep(mask, T, S, a, b, keys), p * (dp - d[:, :, a:b]) * scale, 0)
    ds = ds.astype(q.dtype)
    dq.append(jnp.einsum("bhts,bhsk->bhtk", ds, k[:, :, :keys], preferred_element_type=jnp.float32))
    dk = dk.at[:, :, :keys].add(jnp.einsum("bhts,bhtk->bhsk", ds, q[:, :, a:b],
                                           preferred_element_type=jnp.float32))
  dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(lambda q, k, v, mask, blocks: _blocked_forward(q, k, v, mask, blocks),
                _blocked_backward)
