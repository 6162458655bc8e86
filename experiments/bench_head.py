"""The tied output head of model.matmul_dtype=bfloat16 alone: loss and both gradients, by route.

  python experiments/bench_head.py                         # 30m and chapter shapes, every route
  python experiments/bench_head.py --shapes=30m --rounds=5 --routes=xent,head

Why its own script: the head (logits, loss pass, dh, d(wte) over GPT-2's 50257 words) is about
half of the mixed-precision 30m step (train-bf16's profile, BENCHMARKS.md session 9), and a whole
step on a shared 2-core machine varies by more than the head's routes differ. Each row is
jax.value_and_grad of gpt.output_loss.tied_cross_entropy(bf16=True, impl="mkl") at a step's shape
with float32 h and wte, under the module switches that pick the route; rows interleaved round by
round, best of `--steps` per round, median over rounds, and each round's ratio to the first row.

Routes: `xent`: session 9's (bf16_matmul around the float32 C++ pass: XLA rounds dlogits to bf16
and gathers their transpose); `head`: output_loss's bf16 head (the pass writes bf16 dlogits and
their transpose, gemm.softmax_xent_bf16); `head-wte_t`: the head with dh in the other
orientation (output_loss.DH_ROUTE); `head-par`: the head with its dh and d(wte) products free
to run at once (output_loss.SEQUENTIAL off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import xla_trace  # noqa: E402
from gpt import host_memory  # noqa: E402
from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()
host_memory.keep_freed_memory()  # as gpt.main and bench_train: XLA's temp buffer keeps its pages
if "--profile" in sys.argv:  # before jax starts its backend: XLA's per-op trace events
  xla_trace.enable_op_events()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402
from gpt import output_loss  # noqa: E402
from gpt.kernels import gemm  # noqa: E402

VOCAB = 50257
SHAPES = {"30m": (2048, 384), "chapter": (1024, 768)}  # rows (batch x ctx), width
# route -> the output_loss switches it is traced with
ROUTES = {"xent": {"BF16_HEAD": False},
          "head": {"BF16_HEAD": True, "DH_ROUTE": "dl_wte", "SEQUENTIAL": True},
          "head-wte_t": {"BF16_HEAD": True, "DH_ROUTE": "wte_t", "SEQUENTIAL": True},
          "head-par": {"BF16_HEAD": True, "DH_ROUTE": "dl_wte", "SEQUENTIAL": False}}


def program(rows: int, width: int, switches: dict):
  """(compiled value_and_grad of the head, its arguments), traced under `switches`."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((rows, width)), jnp.float32)
  wte = jnp.asarray(0.02 * rng.standard_normal((VOCAB, width)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, rows), jnp.int32)
  saved = {k: getattr(output_loss, k) for k in switches}
  try:
    for k, v in switches.items():
      setattr(output_loss, k, v)
    f = jax.value_and_grad(lambda h, w: output_loss.tied_cross_entropy(
        h, w, targets, impl="mkl", bf16=True), argnums=(0, 1))
    compiled = jax.jit(f).lower(h, wte).compile()
  finally:
    for k, v in saved.items():
      setattr(output_loss, k, v)
  return compiled, (h, wte)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--routes", default=",".join(ROUTES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--profile", action="store_true",
                      help="instead of timing: where one call of each route spends its time")
  args = parser.parse_args()
  if not gemm.available():
    sys.exit(f"error: gpt.kernels.gemm is unavailable ({gemm.why_unavailable()}); the routes "
             "compared here need its loss pass")
  routes = args.routes.split(",")
  print(f"cpu: {cpu_model()}; {vector_flags()}; jax {jax.__version__}")
  print(f"load average at start: {load_average()}; command: python {' '.join(sys.argv)}")
  print(f"\n| shape (rows x D x V) | route | ms (median) | GFLOP/s (3 products) | "
        f"{routes[0]} / route, per round |\n|---|---|---|---|---|")
  for name in args.shapes.split(","):
    rows, width = SHAPES[name]
    progs = {r: program(rows, width, ROUTES[r]) for r in routes}
    if args.profile:
      for r, (f, a) in progs.items():
        print(f"\n{name}, route {r}:")
        jax.block_until_ready(f(*a))
        wall, totals = xla_trace.traced_op_times(lambda: jax.block_until_ready(f(*a)))
        print(f"wall {1e3 * wall:.0f} ms, XLA op time {sum(totals.values()) / 1e6:.0f} ms")
        xla_trace.print_breakdown(totals, xla_trace.hlo_summaries(f.as_text()), top=12)
      continue
    times = {r: [] for r in routes}
    for f, a in progs.values():
      jax.block_until_ready(f(*a))
    for _ in range(args.rounds):
      for r, (f, a) in progs.items():
        best = float("inf")
        for _ in range(args.steps):
          t0 = time.perf_counter()
          jax.block_until_ready(f(*a))
          best = min(best, time.perf_counter() - t0)
        times[r].append(best)
    gf = 3 * 2 * rows * width * VOCAB / 1e9
    for r in routes:
      ratios = [b / t for b, t in zip(times[routes[0]], times[r])]
      med = statistics.median(times[r])
      print(f"| {name} ({rows} x {width} x {VOCAB}) | {r} | {1e3 * med:.0f} | {gf / med:.0f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
  print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
  main()
