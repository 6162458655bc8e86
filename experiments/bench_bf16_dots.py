"""XLA:CPU's bf16 dot by operand layout: why gpt.matmul.bf16_matmul makes its dW the way it does.

  python experiments/bench_bf16_dots.py                # the 30m and chapter shapes' products
  python experiments/bench_bf16_dots.py --rounds=5
  python experiments/bench_bf16_dots.py --head --shapes="30m head,chapter head"   # dh's layouts

On a CPU with AVX512-BF16, XLA:CPU's bf16 x bf16 -> f32 dot (YNNPACK) runs about 2x its float32
dot, but only when the left operand contracts its last, row-major axis; a dot contracting the rows
(x^T dy, the weight gradient) is converted to a float32 dot first. Each row is one product of a
training step, as JAX's autodiff would write it and as bf16_matmul writes it (a row-major
transposed copy of the left operand, gathered). GFLOP/s, best of `--steps` per round, median over
rounds, rows interleaved round by round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402

BF16 = jnp.bfloat16
# name -> (rows M, inner K, outer N): a step's dense layer and its tied head.
SHAPES = {"30m mlp": (2048, 384, 1536), "30m head": (2048, 384, 50257),
          "chapter mlp": (1024, 768, 3072), "chapter head": (1024, 768, 50257)}


def _dot(a, b, contract, out=jnp.float32):
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=out)


def _row_major_t(a):
  return a.T[jnp.arange(a.shape[1])]


def programs(M, K, N):
  """{name: (jitted fn, args, GFLOP)} for one shape."""
  x = jnp.ones((M, K), BF16)
  w = jnp.ones((K, N), BF16)
  dy = jnp.ones((M, N), BF16)
  gf = 2 * M * K * N / 1e9
  f32 = lambda a: a.astype(jnp.float32)
  return {
      "y=xw f32": (jax.jit(lambda a, b: _dot(a, b, (1, 0))), (f32(x), f32(w)), gf),
      "y=xw bf16->bf16": (jax.jit(lambda a, b: _dot(a, b, (1, 0), BF16)), (x, w), gf),
      "y=xw bf16->f32": (jax.jit(lambda a, b: _dot(a, b, (1, 0))), (x, w), gf),
      "dx=dy w^T bf16->f32": (jax.jit(lambda a, b: _dot(a, b, (1, 1))), (dy, w), gf),
      "dW=x^T dy contract rows": (jax.jit(lambda a, b: _dot(a, b, (0, 0))), (x, dy), gf),
      "dW=x^T dy row-major copy": (jax.jit(lambda a, b: _dot(_row_major_t(a), b, (1, 0))),
                                   (x, dy), gf),
  }


def head_programs(M, K, N):
  """{name: (jitted fn, args, GFLOP)}: the tied head's dh = dlogits wte in the step's own layout
  (wte [V, D]: here N = V, K = D) and the orientations train-head (session 10) weighed for it.
  (dh^T transposed back into dh is not here: XLA folds the transpose into the dot's output
  layout, and its bf16 DotThunk then fails at run time.)"""
  dl = jnp.ones((M, N), BF16)
  dl_t = jnp.ones((N, M), BF16)  # the loss pass writes this transpose too (gemm.softmax_xent_bf16)
  wte = jnp.ones((N, K), BF16)
  wte_t = _row_major_t(wte)  # [D, V], a copy made once per step
  gf = 2 * M * K * N / 1e9
  return {
      "dh=dl wte (session 9)": (jax.jit(lambda a, b: _dot(a, b, (1, 0))), (dl, wte), gf),
      "dh=dl (wte^T copy), contract last": (jax.jit(lambda a, b: _dot(a, b, (1, 1))), (dl, wte_t), gf),
      "dh^T=(wte^T copy) dl^T": (jax.jit(lambda a, b: _dot(a, b, (1, 0))), (wte_t, dl_t), gf),
      "dh, 4 chunks of V summed": (jax.jit(lambda a, b: sum(
          _dot(a[:, i:i + N // 4 + 1], b[i:i + N // 4 + 1], (1, 0))
          for i in range(0, N, N // 4 + 1))), (dl, wte), gf),
      "the wte^T copy alone (GFLOP of dh)": (jax.jit(_row_major_t), (wte,), gf),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--head", action="store_true",
                      help="the tied head's dh orientations (head_programs) instead")
  args = parser.parse_args()
  print(f"cpu: {cpu_model()}; {vector_flags()}; jax {jax.__version__}")
  print(f"load average at start: {load_average()}; command: python {' '.join(sys.argv)}")
  print("\n| shape (M x K x N) | product | GFLOP/s |\n|---|---|---|")
  for name in args.shapes.split(","):
    M, K, N = SHAPES[name]
    progs = head_programs(M, K, N) if args.head else programs(M, K, N)
    rates = {k: [] for k in progs}
    for f, a, _ in progs.values():
      jax.block_until_ready(f(*a))
    for _ in range(args.rounds):
      for k, (f, a, gf) in progs.items():
        best = float("inf")
        for _ in range(args.steps):
          t0 = time.perf_counter()
          jax.block_until_ready(f(*a))
          best = min(best, time.perf_counter() - t0)
        rates[k].append(gf / best)
    for k, r in rates.items():
      print(f"| {name} ({M} x {K} x {N}) | {k} | {statistics.median(r):.0f} |")
  print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
  main()
