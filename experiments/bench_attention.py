"""Causal attention alone, forward + backward: gpt.attention.attention's formulations beside torch's.

  python experiments/bench_attention.py                         # the chapter's [1, 12, 1024, 64]
  python experiments/bench_attention.py --shape=8,6,256,64      # the 30m shape's
  python experiments/bench_attention.py --blocks=1,2,4,8        # query-block counts of "blocked"
  python experiments/bench_attention.py --tiles=64x64,32x128     # the kernel's query x key tiles
  python experiments/bench_attention.py --bf16 --no-baselines   # + its bf16 products, torch's bf16

Why: at the chapter's shape (117M, context 1024, batch 1) the attention over [12, 1024, 1024] per
layer dominated the profile of the train step. This times what one layer's attention costs in
that step (value and the gradients of q, k, v), with the rows run round-robin (`--rounds`), so a
shared machine's load hits every row alike; "vs xla" is the median over rounds of the paired
ratio (jax.nn.dot_product_attention's XLA time / this row's time, same round). The torch row is
torch.nn.functional.scaled_dot_product_attention (is_causal=True) with autograd, the fused kernel
transformers uses. The "kernel" rows are gpt.kernels.attention's fused CPU float32 kernel (one row per
query x key tile size, `--tiles`; float32 only, absent when the library does not build); "vs blocked"
is the paired ratio against the first "blocked" row. Each row's value and gradients are compared
with the xla row's (max abs difference). `--bf16` adds, per tile size, the kernel with bf16
products (`flash_attention(bf16=True)`, the mixed mode's; float32 inputs, where the CPU has
AVX512-BF16) and torch's SDPA on bf16 tensors (what it runs under autocast); their differences are
bf16 rounding's, not errors.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_train.py: torch on a shared machine

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt import attention as ga  # noqa: E402
from gpt import model as gm  # noqa: E402
from gpt.kernels import attention as kattn  # noqa: E402


def jax_row(fn, q, k, v, w):
  """A timed callable: value and (dq, dk, dv) of sum(fn(q, k, v) * w), jitted."""
  grad = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                                    argnums=(0, 1, 2)))
  out = grad(q, k, v)
  jax.block_until_ready(out)
  return (lambda: jax.block_until_ready(grad(q, k, v))), out


def torch_row(torch, q, k, v, w, dtype):
  tq, tk, tv = (torch.from_numpy(np.array(a, np.float32)).to(dtype).requires_grad_() for a in (q, k, v))
  tw = torch.from_numpy(np.array(w))

  def run():
    loss = (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True) * tw).sum()
    grads = torch.autograd.grad(loss, (tq, tk, tv))
    return loss.detach().float().numpy(), [g.float().numpy() for g in grads]

  return run, run()


def cpu_model() -> str:
  """The CPU's model name and whether it has AVX-512 / AVX512-BF16 (from /proc/cpuinfo)."""
  try:
    info = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
  flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
  return f"{name} ({', '.join(f for f in ('avx512f', 'avx512_vnni', 'avx512_bf16') if f in flags) or 'no avx512'})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="1,12,1024,64", help="B,H,T,K")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--blocks", default=str(ga.QUERY_BLOCKS), help="query-block counts to time")
  parser.add_argument("--tiles", default="default",
                      help="the kernel's query x key tile sizes to time (comma-separated; "
                      "'default': flash_attention's choice for this T)")
  parser.add_argument("--no-baselines", action="store_true",
                      help="skip the xla and einsum rows (the ratios then use the first row)")
  parser.add_argument("--bf16", action="store_true",
                      help="also the kernel's bf16 products and torch's SDPA in bf16")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  B, H, T, K = (int(x) for x in args.shape.split(","))
  rng = np.random.default_rng(0)
  dtype = gm.DTYPES[args.dtype]
  q, k, v = (jnp.asarray(rng.standard_normal((B, H, T, K)), dtype) for _ in range(3))
  w = jnp.asarray(rng.standard_normal((B, H, T, K)), jnp.float32)

  rows = {} if args.no_baselines else {
      "xla (jax.nn.dot_product_attention)": functools.partial(ga.attention, mask=None, impl="xla"),
      "einsum (spelled out)": functools.partial(ga.attention, mask=None, impl="einsum")}
  for n in (int(b) for b in args.blocks.split(",")):
    rows[f"blocked, {n} query blocks"] = functools.partial(ga.blocked_attention, mask=None, blocks=n)
  if dtype == jnp.float32 and kattn.available():
    for tile in args.tiles.split(","):
      if tile == "default":
        rows["kernel, default tiles"] = kattn.flash_attention
        continue
      bq, bk = (int(x) for x in tile.split("x"))
      rows[f"kernel, {bq}x{bk} tiles"] = functools.partial(kattn.flash_attention, block_q=bq, block_k=bk)
    if args.bf16 and kattn.bf16_products():
      for name in [n for n in rows if n.startswith("kernel")]:
        rows[name + ", bf16 products"] = functools.partial(rows[name], bf16=True)
  runners, reference = {}, None
  for name, fn in rows.items():
    runners[name], out = jax_row(fn, q, k, v, w)
    reference = out if reference is None else reference
  torch_outs = {}
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    for tdt in (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,):
      name = f"torch scaled_dot_product_attention ({'f32' if tdt == torch.float32 else 'bf16'})"
      runners[name], torch_outs[name] = torch_row(torch, q, k, v, w, tdt)
  except ImportError:
    torch = None

  f32 = lambda a: np.asarray(a, np.float32)
  errors = {}
  for name, fn in rows.items():
    out = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                                     argnums=(0, 1, 2)))(q, k, v)
    errors[name] = max(float(np.max(np.abs(f32(a) - f32(b))))
                       for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
  for name, torch_out in torch_outs.items():
    errors[name] = max(float(np.max(np.abs(f32(a) - f32(b))))
                       for a, b in zip([torch_out[0], *torch_out[1]], jax.tree.leaves(reference)))

  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  base = times[next(iter(rows))]
  blocked = times[next(name for name in rows if name.startswith("blocked"))]
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores; jax "
        f"{jax.__version__}" + (f", torch {torch.__version__}" if torch else "") +
        f"; shape [B, H, T, K] = [{B}, {H}, {T}, {K}] {args.dtype}; load average "
        f"{os.getloadavg()[0]:.1f}\n")
  first = next(iter(rows)).split(" (")[0]
  print(f"| attention (forward + backward) | ms | vs {first} | vs blocked | max abs diff vs {first} |")
  print("|---|---|---|---|---|")
  for name, ts in times.items():
    ratio = statistics.median(b / t for b, t in zip(base, ts))
    vs_blocked = statistics.median(b / t for b, t in zip(blocked, ts))
    print(f"| {name} | {1e3 * statistics.median(ts):.0f} | {ratio:.2f}x | {vs_blocked:.2f}x "
          f"| {errors[name]:.1e} |")


if __name__ == "__main__":
  main()
