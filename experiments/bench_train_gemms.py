"""The matmuls of one training step, each timed alone in XLA and in torch, side by side.

  python experiments/bench_train_gemms.py                    # the chapter shape (117M, ctx 1024, batch 1)
  python experiments/bench_train_gemms.py --shape=30m --rounds=5
  python experiments/bench_train_gemms.py --loss --shape=30m      # the loss over the logits alone

Why: a whole-step ratio against torch says how far behind we are, not where. This script lists
every GEMM class a GPT-2 train step runs (the forward x W, the backward dx = dy W^T and
dW = x^T dy of each Conv1D, and the tied output layer's three 50257-word matmuls) with the operand
layouts the step itself uses, times each in a jitted XLA program and in torch eager,
round-robin (`--rounds` rounds, the best of `--reps` calls per round), and prints the median ms,
GFLOP/s and the XLA/torch speed ratio (paired per round, so load drifting between rounds cancels).
Where gpt.kernels.gemm loads (MKL installed: `pip install '.[mkl]'`) each class is also timed through
it, the way the train step runs it with model.matmul=auto, with its own ratio against torch.
Multiply each row by its count per step (layers) to see which class costs the step the most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import machine  # noqa: E402
from experiments.bench_train import SHAPES, VOCAB  # noqa: E402
from gpt.kernels import gemm  # noqa: E402


def gemm_classes(shape) -> list[tuple[str, int, str, tuple, tuple]]:
  """(name, count per step, einsum spec, lhs shape, rhs shape) of every matmul class a step runs."""
  L, D, H, T, B = shape
  M = B * T
  out = []
  for name, k, n in (("c_attn", D, 3 * D), ("attn.c_proj", D, D), ("c_fc", D, 4 * D),
                     ("mlp.c_proj", 4 * D, D)):
    out += [(f"{name} fwd x W [{M},{k}]x[{k},{n}]", L, "mk,kn->mn", (M, k), (k, n)),
            (f"{name} bwd dx = dy W^T", L, "mn,kn->mk", (M, n), (k, n)),
            (f"{name} bwd dW = x^T dy", L, "mk,mn->kn", (M, k), (M, n))]
  out += [(f"logits fwd h wte^T [{M},{D}]x[{VOCAB},{D}]^T", 1, "md,vd->mv", (M, D), (VOCAB, D)),
          ("logits bwd dh = dlogits wte", 1, "mv,vd->md", (M, VOCAB), (VOCAB, D)),
          ("logits bwd dwte = dlogits^T h", 1, "mv,md->vd", (M, VOCAB), (M, D))]
  return out


def flops(spec: str, a: tuple, b: tuple) -> float:
  """2 x the product of all distinct dimension sizes of a two-operand einsum."""
  sizes = {}
  lhs, rhs = spec.split("->")[0].split(",")
  for letters, dims in ((lhs, a), (rhs, b)):
    sizes.update(zip(letters, dims))
  return 2.0 * float(np.prod(list(sizes.values())))


def kernel_call(spec: str):
  """The gpt.kernels.gemm call computing a two-operand, two-letter einsum `spec` ("pq,rs->uv"),
  by MKL's sgemm whatever `gemm.products()` would pick on this CPU."""
  (lhs, rhs), out = spec.split("->")[0].split(","), spec.split("->")[1]
  ta, tb = lhs[0] != out[0], rhs[1] != out[1]
  return jax.jit(lambda x, y: gemm.gemm(x, y, transpose_a=ta, transpose_b=tb, engine="mkl"))


def loss_pass(shape_name: str, rounds: int, reps: int) -> None:
  """`--loss`: the loss over the step's [B*T, 50257] float32 logits alone, its value and
  d(loss)/d(logits): XLA's value_and_grad of optax's cross-entropy, gemm.softmax_xent's AVX-512
  sweeps and its portable (MKL vsExp) route, beside a plain read-and-write pass ("copy") that
  every row also pays (each program first makes its logits as x * 1.0001, so the pass can
  overwrite them in place as it does in the step). Rows round-robin; median of the best of `reps`."""
  import optax
  L, D, H, T, B = SHAPES[shape_name]
  M = B * T
  x = jnp.asarray(np.random.default_rng(0).standard_normal((M, VOCAB), np.float32) * 4)
  t = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, M), jnp.int32)

  def xla(x, t):
    loss, g = jax.value_and_grad(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, t).mean())(x * 1.0001)
    return loss, g

  def kernel(portable):
    def run(x, t):
      saved, gemm.XENT_PORTABLE = gemm.XENT_PORTABLE, portable
      try:
        g, rl = gemm.softmax_xent(x * 1.0001, t, 1.0 / M)
      finally:
        gemm.XENT_PORTABLE = saved
      return rl.mean(), g
    return run

  progs = {"copy (x * 1.0001)": lambda x, t: (x[:, 0].sum(), x * 1.0001), "xla (optax)": xla}
  if gemm.available():
    progs["pass, AVX-512 exp"] = kernel(False)
    progs["pass, vsExp (session 5)"] = kernel(True)
  progs = {k: jax.jit(f) for k, f in progs.items()}
  want = progs["xla (optax)"](x, t)
  for name, f in progs.items():
    got = f(x, t)
    if "pass" in name:
      np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
      np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-9)
  times = {k: [] for k in progs}
  for _ in range(rounds):
    for name, f in progs.items():
      times[name].append(min(_timed(lambda: jax.block_until_ready(f(x, t))) for _ in range(reps)))
  print(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores ({machine.vector_flags()}); jax "
        f"{jax.__version__}; load average {machine.load_average()}; logits [{M}, {VOCAB}] ({shape_name})")
  copy = times["copy (x * 1.0001)"]
  print("| loss over the logits | ms | beyond the copy, ms | vs xla (paired) |")
  print("|---|---|---|---|")
  for name, ts in times.items():
    beyond = statistics.median(a - c for a, c in zip(ts, copy))
    rel = statistics.median(x_ / a for a, x_ in zip(ts, times["xla (optax)"]))
    print(f"| {name} | {1e3 * statistics.median(ts):.0f} | {1e3 * beyond:.0f} | {rel:.2f}x |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="chapter", help=f"one of {sorted(SHAPES)}")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=3, help="calls per round; the best counts")
  parser.add_argument("--only", default="", help="comma list of substrings of the class names")
  parser.add_argument("--no-kernel", action="store_true", help="skip the gpt.kernels.gemm (MKL) column")
  parser.add_argument("--loss", action="store_true",
                      help="time the loss over the logits instead (XLA vs gemm.softmax_xent's routes)")
  args = parser.parse_args()
  if args.loss:
    return loss_pass(args.shape, args.rounds, args.reps)
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  rows = []
  use_kernel = not args.no_kernel and gemm.available()
  classes = gemm_classes(SHAPES[args.shape])
  if args.only:
    classes = [c for c in classes if any(s in c[0] for s in args.only.split(","))]
  for name, count, spec, sa, sb in classes:
    a = rng.standard_normal(sa, np.float32)
    b = rng.standard_normal(sb, np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(lambda x, y, s=spec: jnp.einsum(s, x, y, preferred_element_type=jnp.float32))
    ref = f(ja, jb).block_until_ready()
    torch.einsum(spec, ta, tb)
    k = kernel_call(spec) if use_kernel else None
    if k is not None:
      np.testing.assert_allclose(k(ja, jb), ref, rtol=1e-3, atol=1e-2)
    tj, tt, tk = [], [], []
    for _ in range(args.rounds):
      tj.append(min(_timed(lambda: f(ja, jb).block_until_ready()) for _ in range(args.reps)))
      tt.append(min(_timed(lambda: torch.einsum(spec, ta, tb)) for _ in range(args.reps)))
      if k is not None:
        tk.append(min(_timed(lambda: k(ja, jb).block_until_ready()) for _ in range(args.reps)))
    fl = flops(spec, sa, sb)
    ratio = statistics.median(t / j for j, t in zip(tj, tt))
    kernel = (statistics.median(tk), statistics.median(t / m for m, t in zip(tk, tt))) if tk else None
    rows.append((name, count, statistics.median(tj), statistics.median(tt), fl, ratio, kernel))
  print(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores ({machine.vector_flags()}); jax "
        f"{jax.__version__}, torch {torch.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {machine.load_average()}; shape {args.shape}")
  kcols = " mkl ms | mkl GFLOP/s | mkl speed vs torch |" if use_kernel else ""
  print("| matmul | per step | xla ms | xla GFLOP/s | torch ms | torch GFLOP/s | xla speed vs torch |"
        + kcols)
  print("|---|---|---|---|---|---|---|" + "---|---|---|" * use_kernel)
  tot_j = tot_t = tot_k = 0.0
  for name, count, j, t, fl, ratio, kernel in rows:
    tot_j, tot_t = tot_j + count * j, tot_t + count * t
    kcell = ""
    if kernel:
      tot_k += count * kernel[0]
      kcell = f" {1e3 * kernel[0]:.1f} | {fl / kernel[0] / 1e9:.0f} | {kernel[1]:.2f}x |"
    print(f"| {name} | {count} | {1e3 * j:.1f} | {fl / j / 1e9:.0f} | {1e3 * t:.1f} | "
          f"{fl / t / 1e9:.0f} | {ratio:.2f}x |" + kcell)
  ktot = f" {1e3 * tot_k:.0f} | | {tot_t / tot_k:.2f}x |" if use_kernel else ""
  print(f"| all matmuls of one step (x count) | | {1e3 * tot_j:.0f} | | {1e3 * tot_t:.0f} | | "
        f"{tot_t / tot_j:.2f}x |" + ktot)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


if __name__ == "__main__":
  main()
