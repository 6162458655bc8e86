"""LayerNorm alone, forward + backward: gpt.kernels.layernorm's one-pass kernel beside XLA's LayerNorm
(gpt.layers.layer_norm) and torch's.

  python experiments/bench_layernorm.py                         # the 30m and chapter shapes
  python experiments/bench_layernorm.py --shapes=2048x384 --rounds=21

Why: LayerNorm's backward is several XLA:CPU passes (row sums, dx, g's and b's column sums);
gpt.kernels.layernorm does each direction in one threaded pass. This times what one LayerNorm
costs in a train step (y and the gradients of x, g, b of sum(y * w)), the rows run round-robin
(`--rounds`) so a shared machine's load hits each alike; "vs xla" is the median over rounds of the
paired ratio (XLA's time / this row's, same round), with the spread (min-max) beside it.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_train.py: torch on a shared machine

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import machine  # noqa: E402
from gpt import layers  # noqa: E402
from gpt.kernels import layernorm as kln  # noqa: E402


def jax_row(fn, x, g, b, w):
  """A timed callable: y and (dx, dg, db) of sum(fn(x, g, b) * w), jitted."""
  grad = jax.jit(lambda x, g, b: jax.vjp(fn, x, g, b)[1](w))
  out = grad(x, g, b)
  jax.block_until_ready(out)
  return lambda: jax.block_until_ready(grad(x, g, b)), out


def torch_row(torch, x, g, b, w):
  tx, tg, tb = (torch.from_numpy(np.array(a)).requires_grad_() for a in (x, g, b))
  tw = torch.from_numpy(np.array(w))

  def run():
    y = torch.nn.functional.layer_norm(tx, (tx.shape[-1],), tg, tb, eps=layers.LN_EPS)
    return torch.autograd.grad(y, (tx, tg, tb), tw)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="2048x384,1024x768", help="rows x D, comma-separated")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls", type=int, default=20, help="calls per timed sample")
  args = parser.parse_args()
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None
  print(f"# LayerNorm forward + backward; {machine.cpu_model()} ({machine.vector_flags()}); "
        f"load {machine.load_average()}; {' '.join(sys.argv)}")
  print("| rows x D | impl | ms / call (median) | vs xla (median, min-max) | max abs diff vs xla |")
  print("|---|---|---|---|---|")
  for spec in args.shapes.split(","):
    N, D = map(int, spec.split("x"))
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x, g, b, w = 3 * f(N, D) + 1, f(D), f(D), f(N, D)
    rows = {}
    rows["xla"], ref = jax_row(layers.layer_norm, x, g, b, w)
    diffs = {"xla": 0.0}
    if kln.available():
      rows["kernel"], out = jax_row(lambda x, g, b: kln.layer_norm(x, g, b, layers.LN_EPS), x, g, b, w)
      diffs["kernel"] = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(out, ref))
    if torch is not None:
      rows["torch"] = torch_row(torch, x, g, b, w)
      diffs["torch"] = float("nan")
    times = {k: [] for k in rows}
    for _ in range(args.rounds):
      for name, run in rows.items():
        run()
        t0 = time.perf_counter()
        for _ in range(args.calls):
          run()
        times[name].append((time.perf_counter() - t0) / args.calls)
    for name in rows:
      ratios = [a / c for a, c in zip(times["xla"], times[name])]
      print(f"| {N}x{D} | {name} | {1e3 * statistics.median(times[name]):.3f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {diffs[name]:.1e} |")
  print(f"# load after: {machine.load_average()}")


if __name__ == "__main__":
  main()
