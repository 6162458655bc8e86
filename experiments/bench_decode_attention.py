"""Attention over a KV cache alone: gpt.kernels.decode_attention beside the einsum formulation.

  python experiments/bench_decode_attention.py                        # 117M heads, batch 1 and 8
  python experiments/bench_decode_attention.py --queries=1,4,16,64 --filled=64,1024

Why: a decode step's attention (one query row per head against that head's filled cache slots) is
10-12% of a batch-8 117M step as XLA's einsum formulation (two batched dots around a masked
softmax). This times one layer's attention, `--layers` times chained in one jitted fori_loop so
that dispatch does not count, for both formulations round-robin in every repeat (a shared
machine's load hits both alike), and prints the median paired ratio. Rows: batch B, queries T per
row (1 = a decode step; more = a prefill chunk), cache slots S filled (the cache holds
`--cache` slots; the mask hides the rest, as gpt.kv_cache.attention_inputs builds it). It also
decides MAX_QUERIES: up to how many queries per call the kernel beats XLA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import machine  # noqa: E402
from gpt.attention import attention  # noqa: E402
from gpt.kernels import decode_attention  # noqa: E402


def chained(impl: str, mask, k, v, layers: int):
  """A jitted function running `layers` attentions over one cache, each query the last output:
  "kernel" calls decode_attention.attention directly (also past MAX_QUERIES), "einsum" XLA's."""
  if impl == "kernel":
    step = lambda _, q: decode_attention.attention(q, k, v, mask)
  else:
    step = lambda _, q: attention(q, k, v, mask, impl=impl)
  return jax.jit(lambda q: jax.lax.fori_loop(0, layers, step, q))


def case(B, H, T, S, filled, K, dtype, cache_dtype):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, H, T, K)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, H, S, K)), cache_dtype) for _ in range(2))
  slots = np.arange(S)
  rows = filled - T + np.arange(T)  # the queries are the last T filled slots
  mask = jnp.asarray((slots[None, :] <= rows[:, None])[None, None].repeat(B, 0))
  return q, k, v, mask


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--queries", default="1,4,16")
  parser.add_argument("--filled", default="64,512")
  parser.add_argument("--cache", type=int, default=1024, help="cache slots (S)")
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", help="queries' dtype (bfloat16: float32 cache)")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--scores_ab", action="store_true",
                      help="also time the kernel scoring one slot at a time "
                      "(GPT_DECODE_ATTENTION_SCORES=1, read per call) instead of four")
  args = parser.parse_args()
  if not decode_attention.available():
    sys.exit("error: gpt.kernels.decode_attention did not build here (see the warning above)")
  rows = []
  for B in map(int, args.batch.split(",")):
    for T in map(int, args.queries.split(",")):
      for filled in map(int, args.filled.split(",")):
        q, k, v, mask = case(B, args.heads, T, args.cache, filled, args.head_dim, args.dtype, "float32")
        fns = {impl: chained(impl, mask, k, v, args.layers) for impl in ("kernel", "einsum")}
        outs = {impl: jax.block_until_ready(fn(q)) for impl, fn in fns.items()}
        err = float(jnp.abs(outs["kernel"].astype(jnp.float32) - outs["einsum"].astype(jnp.float32)).max())
        names = ["kernel", "einsum"] + (["kernel 1-slot"] if args.scores_ab else [])
        times = {name: [] for name in names}
        for r in range(args.repeats):
          for name in (names if r % 2 == 0 else names[::-1]):
            if name == "kernel 1-slot":
              os.environ["GPT_DECODE_ATTENTION_SCORES"] = "1"
            start = time.perf_counter()
            jax.block_until_ready(fns[name.split()[0]](q))
            times[name].append(time.perf_counter() - start)
            os.environ.pop("GPT_DECODE_ATTENTION_SCORES", None)
        paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
        us = lambda name: 1e6 * statistics.median(times[name]) / args.layers
        row = (f"| {B} | {T} | {filled} | {us('kernel'):.1f} | {us('einsum'):.1f} | "
               f"{paired('einsum', 'kernel'):.2f}x | {err:.1e} |")
        if args.scores_ab:
          row += f" {us('kernel 1-slot'):.1f} | {paired('kernel 1-slot', 'kernel'):.2f}x |"
        rows.append(row)
        print(f"done: B={B} T={T} filled={filled}", file=sys.stderr, flush=True)
  print(f"\nOne layer's attention over a {args.cache}-slot cache ({args.heads} heads x {args.head_dim}, "
        f"{args.dtype} queries, float32 cache), median of {args.repeats}, microseconds per layer.")
  print(f"CPU: {machine.cpu_model()} ({machine.vector_flags()}); load {machine.load_average()}.")
  print(f"Command: python {' '.join(sys.argv)}\n")
  extra = " kernel 1-slot us | 1-slot / kernel (paired) |" if args.scores_ab else ""
  print("| batch | queries T | filled S | kernel us | einsum us | einsum / kernel (paired) | max abs diff |"
        + extra)
  print("|---|---|---|---|---|---|---|" + "---|---|" * args.scores_ab)
  print("\n".join(rows))


if __name__ == "__main__":
  main()
