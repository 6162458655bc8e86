"""Fused causal attention for CPU float32 training: attention.cc behind JAX's FFI, with its backward.

Why: the blocked formulation (gpt.attention.blocked_attention) leaves XLA:CPU separate softmax
reductions, exp and copies, and keeps [L, B, H, ~5/8 T, T] float32 probabilities through the layer
scan for its backward; at the chapter's shape (117M, ctx 1024, batch 1) that is ~800 ms of a
~4150 ms step torch does not pay (BENCHMARKS.md, "Training speed routes"). attention.cc is
FlashAttention-2 on a CPU core: the forward keeps only y and the rows' logsumexp, the backward
recomputes the probabilities tile by tile; no [T, S] array is ever in memory.

`flash_attention(q, k, v)` is causal attention (the last query is the last key, T <= S) of float32
[B, H, T, K] arrays, with a custom VJP. gpt.attention runs it for `model.attention_impl="kernel"`,
and training's default ("auto") resolves to it where it runs (`resolve`: one CPU device, the
library built); the calls it does not take (an explicit mask, other dtypes) keep the blocked
formulation. The library is compiled from attention.cc with the system C++ compiler at first use
(-march=native: AVX-512 micro-kernels where the CPU has them) and cached (gpt.kernels.native).

`bf16=True` (the mixed mode, `model.matmul_dtype=bfloat16`) is torch autocast's recipe for its
fused attention: q, k, v, dy and the tiles' probabilities are rounded to bfloat16 and every
product (q k^T, P v and the backward's five) is AVX512-BF16's vdpbf16ps with float32
accumulation, while the softmax statistics, the logsumexp and the outputs stay float32. Where the
CPU (the build) has no AVX512-BF16 the float32 products run instead (`bf16_products()` says
which): an emulated bf16 product would be no faster than the float32 one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt.errors import GPTError
from gpt.kernels import native

SOURCE = Path(__file__).with_name("attention.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
FORWARD, BACKWARD = "GptAttentionFwdF32", "GptAttentionBwdF32"
# Query and key rows per tile: 64 x 64 (a tile's scores, q, k^T and v are 16 KB each, well inside
# L2), with 128 query rows from LONG_QUERIES queries on (fewer tiles re-reading the keys). Measured
# by experiments/bench_attention.py --tiles (BENCHMARKS.md, "Fused causal attention kernel"): at
# [1, 12, 1024, 64] 128x64 beat 64x64, 64x128, 128x128 and 256x64; at [8, 6, 256, 64] 64x64 won.
BLOCK_Q, BLOCK_K = 64, 64
LONG_QUERIES = 512
# The bf16 products' tiles from LONG_QUERIES queries on (64 x 64 below): 128 x 128. Measured on
# the AMD EPYC with AVX512-BF16 (BENCHMARKS.md, "train-attn, session 10"; one layer at
# [1, 12, 1024, 64], paired vs blocked): 128x128 4.16x, 64x64 3.92x, 64x128 3.78x, 128x64 3.59x;
# at [8, 6, 256, 64] 2.05-2.09x for all but 128x64 (1.87x). A bf16 pair-word product contracts
# K = 64 in 32 steps, half the float32 kernel's, so a tile's fixed costs weigh more: larger tiles.
BF16_LONG_TILES = (128, 128)
# The name the forward's outputs (y and the logsumexp, what the backward needs besides q, k, v)
# carry (jax.ad_checkpoint.checkpoint_name): a custom call is no dot, so gpt.model's "dots" remat
# policies save them by name instead of rerunning the kernel in the backward pass.
CHECKPOINT_NAME = "gpt_attention"
# Set False to keep the blocked formulation where training's default would run the kernel
# (experiments/bench_train.py's `nokernel` variant); read by `resolve`.
USE_KERNEL = True
# Set False to run the float32 products under bf16=True too (bench_train's `attnf32` variant, the
# A/B of the bf16 products in the mixed mode's whole step); read when a program is traced.
BF16_PRODUCTS = True
# The FFI targets a traced program calls (forward, backward): experiments/attention_ab.py points
# them at an earlier revision's build, registered under other names, for same-run A/Bs.
TARGETS = (FORWARD, BACKWARD)
# FLAGS read when built: the portable check (tests/test_attention_kernel.py) sets it first.
KERNEL = native.Kernel(SOURCE, lambda: FLAGS, (FORWARD, BACKWARD), env="GPT_ATTENTION_KERNEL",
                       fallback="attention stays blocked")


def available() -> bool:
  """True when the kernel library is built and registered with XLA (building it now if needed).
  GPT_ATTENTION_KERNEL=0 turns it off."""
  return KERNEL.available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return KERNEL.why_unavailable()


def bf16_products() -> bool:
  """True when `flash_attention(..., bf16=True)` runs bf16 products: the library is built with
  AVX512-BF16 (the CPU has vdpbf16ps) and BF16_PRODUCTS is on."""
  return BF16_PRODUCTS and available() and bool(KERNEL.library().GptAttentionHasBf16())


def cannot_run(devices) -> str | None:
  """Why the kernel cannot run a program on `devices` (a mesh's devices), or None when it can:
  it runs on one CPU device (the custom call has no sharding rule) where the library builds."""
  return native.cannot_run_on(devices, available, why_unavailable)


def resolve(impl: str, devices) -> str:
  """What `model.attention_impl=impl` means for a training program on `devices`: "auto" (the
  default) becomes "kernel" where the kernel runs (and USE_KERNEL); an explicit "kernel" where it
  cannot is a GPTError saying why; other values are kept ("blocked" stays blocked)."""
  if impl == "auto" and USE_KERNEL and cannot_run(devices) is None:
    return "kernel"
  if impl == "kernel":
    why = cannot_run(devices)
    if why:
      raise GPTError(f"model.attention_impl=kernel cannot be used: {why}; use blocked")
  return impl


def takes(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> bool:
  """Whether `flash_attention` computes attention(q, k, v, mask): float32, causal (mask None),
  T <= S. The others (the eval scorer's masks, bfloat16) keep the blocked formulation."""
  return (mask is None and q.shape[2] <= k.shape[2]
          and all(a.dtype == jnp.float32 for a in (q, k, v)))


def _forward_call(q, k, v, block_q, block_k, bf16):
  B, H, T, _ = q.shape
  call = jax.ffi.ffi_call(TARGETS[0], (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                    jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v, block_q=block_q, block_k=block_k, bf16=bf16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, block_q, block_k, bf16):
  return _forward_call(q, k, v, block_q, block_k, bf16)[0]


def _flash_fwd(q, k, v, block_q, block_k, bf16):
  y, lse = _forward_call(q, k, v, block_q, block_k, bf16)
  y, lse = checkpoint_name(y, CHECKPOINT_NAME), checkpoint_name(lse, CHECKPOINT_NAME)
  return y, (q, k, v, y, lse)


def _flash_bwd(block_q, block_k, bf16, res, dy):
  q, k, v, y, lse = res
  call = jax.ffi.ffi_call(TARGETS[1], tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32)
                                          for a in (q, k, v)), vmap_method="sequential")
  return call(q, k, v, y, lse, dy.astype(jnp.float32), block_q=block_q, block_k=block_k,
              bf16=bf16)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None = None,
                    block_k: int | None = None, bf16: bool = False) -> jax.Array:
  """Causal softmax(q k^T / sqrt(K)) v of float32 q [B, H, T, K] and k, v [B, H, S, K] (T <= S,
  the last query is the last key), by the FFI kernel, differentiable (the backward is the kernel's
  too), in tiles of `block_q` query rows and `block_k` keys (default: BLOCK_Q x BLOCK_K; from
  LONG_QUERIES queries on twice BLOCK_Q rows, or BF16_LONG_TILES with bf16 products; even tiles
  with bf16). `bf16`: the products in bfloat16 where
  `bf16_products()`, else float32. For inputs `takes(q, k, v, None)` accepts; a GPTError where the
  library is not available."""
  if not available():
    raise GPTError(f"the attention kernel cannot be used: {why_unavailable()}")
  if not takes(q, k, v, None):
    raise ValueError(f"flash_attention takes float32 q, k, v with T <= S; got {q.dtype} "
                     f"{q.shape}, {k.dtype} {k.shape}")
  bf16 = bool(bf16) and bf16_products()
  long = q.shape[2] >= LONG_QUERIES
  if block_q is None:
    block_q = (BF16_LONG_TILES[0] if bf16 else 2 * BLOCK_Q) if long else BLOCK_Q
  if block_k is None:
    block_k = BF16_LONG_TILES[1] if bf16 and long else BLOCK_K
  return _flash(q, k, v, int(block_q), int(block_k), int(bf16))
