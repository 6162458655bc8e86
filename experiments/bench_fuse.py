"""The blocks' fused passes alone (train-fuse): LayerNorm forward + backward (gpt.kernels.layernorm)
beside XLA's LayerNorm (gpt.layers.layer_norm) and torch's, and the MLP's bias + GELU backward with
c_fc's bias gradient (gpt.kernels.gelu.bias_gelu_backward) beside XLA's fusions for the same.

  python experiments/bench_fuse.py                         # the 30m and chapter shapes
  python experiments/bench_fuse.py --shapes=2048x384 --rounds=21

Why: LayerNorm's backward is several XLA:CPU passes (row sums, dx, g's and b's column sums);
gpt.kernels.layernorm does each direction in one threaded pass. This times what one LayerNorm
costs in a train step (y and the gradients of x, g, b of sum(y * w)), the rows run round-robin
(`--rounds`) so a shared machine's load hits each alike; "vs xla" is the median over rounds of the
paired ratio (XLA's time / this row's, same round), with the spread (min-max) beside it. The GELU
rows (`--gelu-shapes`, rows x 4D) time (du, gelu(u + b), sum of du over rows) from u, b and dg:
what the step's MLP backward does between c_proj's and c_fc's products.
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
from gpt.kernels import gelu as kgelu  # noqa: E402
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
  parser.add_argument("--gelu-shapes", default="2048x1536,1024x3072", help="rows x 4D for the GELU rows")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls", type=int, default=20, help="calls per timed sample")
  args = parser.parse_args()
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None
  print(f"# LayerNorm forward + backward, then the MLP's bias + GELU backward; "
        f"{machine.cpu_model()} ({machine.vector_flags()}); load {machine.load_average()}; {' '.join(sys.argv)}")
  print("| rows x D | impl | ms / call (median) | vs xla (median, min-max) | max abs diff vs xla |")
  print("|---|---|---|---|---|")
  for spec in args.shapes.split(","):
    layernorm_rows(spec, args, torch)
  for spec in args.gelu_shapes.split(","):
    gelu_rows(spec, args)
  print(f"# load after: {machine.load_average()}")


def timed_rows(rows, args):
  """Each row's per-call times over round-robin rounds."""
  times = {k: [] for k in rows}
  for _ in range(args.rounds):
    for name, run in rows.items():
      run()
      t0 = time.perf_counter()
      for _ in range(args.calls):
        run()
      times[name].append((time.perf_counter() - t0) / args.calls)
  return times


def print_rows(spec, times, diffs):
  for name in times:
    ratios = [a / c for a, c in zip(times["xla"], times[name])]
    print(f"| {spec} | {name} | {1e3 * statistics.median(times[name]):.3f} | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {diffs[name]:.1e} |")


def xla_bias_gelu_backward(u, b, dg):
  """What XLA computes for the same: du = dg * gelu'(u + b), gelu(u + b), du's column sums."""
  g, vjp = jax.vjp(lambda u: jax.nn.gelu(u + b, approximate=True), u)
  du = vjp(dg)[0]
  return du, g, du.sum(0)


def gelu_rows(spec, args):
  N, M = map(int, spec.split("x"))
  rng = np.random.default_rng(1)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  u, b, dg = f(N, M), f(M), f(N, M)
  xla = jax.jit(xla_bias_gelu_backward)
  ref = xla(u, b, dg)
  rows, diffs = {"xla": lambda: jax.block_until_ready(xla(u, b, dg))}, {"xla": 0.0}
  if kgelu.available():
    # dg is a parameter here (not donated): XLA copies it before the call writes du over it, a
    # pass the step (where dg is an intermediate) does not make; counted against the kernel.
    kern = jax.jit(kgelu.bias_gelu_backward)
    out = kern(u, b, dg)
    diffs["kernel"] = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(out, ref))
    rows["kernel"] = lambda: jax.block_until_ready(kern(u, b, dg))
  print_rows(f"gelu {spec}", timed_rows(rows, args), diffs)


def layernorm_rows(spec, args, torch):
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
  print_rows(f"layernorm {spec}", timed_rows(rows, args), diffs)

if __name__ == "__main__":
  main()
