"""Weight-streaming speed: gpt.kernels.gemv (gemv.cc through JAX's FFI) beside XLA's own matmul.

  python experiments/bench_gemv.py                         # 117M's matrices, f32/bf16/int8, rows 1 and 8
  python experiments/bench_gemv.py --model=1542M --rows=1 --repeats=9
  python experiments/bench_gemv.py --dtypes=int8,int8a8    # int8 weights; + int8 activations (VNNI)
  python experiments/bench_gemv.py --per_call --rows=1      # each matrix shape alone: one call's time
  python experiments/bench_gemv.py --dtypes=int8a16,int8a8 --against=int8   # int8 loops, interleaved
  python experiments/bench_gemv.py --dtypes=int8,float32 --rows=1 --against=4k  # 2 MB pages or not
  python experiments/bench_gemv.py --dtypes=int8,int8a8 --rows=1,8 --against=unfused  # block tail: 1 call or 3
  python experiments/bench_gemv.py --dtypes=bfloat16 --rows=1,2,4,8,16 --against=widen  # vdpbf16ps or not

With --per_call, each of the decoder's matrix shapes is timed alone: a chain of distinct copies of
it (about --per_call_mb of weights, so that they stream from memory, not the 48 MB cache) gives one
call's time, set beside the bound bytes / bandwidth (the bandwidth of an XLA sum over a float32
array of the same bytes, timed in the same rounds) and beside one call of a [128, K] matrix that
sits in L2 (two blocks: what a call costs apart from streaming its weights, thread hand-off included,
and the chain's one small XLA fusion per call, x + 1e-3 * y[:, :1], which measured 6-20 us of it on
its own: the FFI call alone costs ~1 us), each also with GPT_GEMV_THREADS=1 (no helper thread: the
hand-off's cost and the second core's gain).

One call multiplies `--rows` activation rows by every weight matrix of one decode step of the
model's shape (c_attn, attn c_proj, c_fc, mlp c_proj per layer, then the tied output layer
[n_vocab, n_embd]), chained inside one jitted function so that nothing can be skipped: what a
decode step's matmuls cost, without attention or sampling. "XLA" is gpt.kernels.gemv.reference
(einsum with float32 accumulation; int8 weights converted first, as XLA has no int8 dot here).
GB/s counts the weight bytes read once per call. Calls alternate between the two so the machine's
load hits both alike; the table gives the median (best in brackets). `--against=NAME` puts another
kernel variant in XLA's column (e.g. int8: the float-activation loop), so that two loops are timed
interleaved. Weight variants: float32, bfloat16, int8 (float activations, the float loop), int8a16
(float activations quantized per row to int16, VNNI vpdpwssd: model.int16_activations), int8a8
(int8 activations, VNNI vpdpbusd: model.int8_activations). `--against=4k`: the same kernel on a
second copy of the weights that it may not advise onto 2 MB pages (GPT_GEMV_HUGEPAGES=0 for its
calls; gemv.cc's hugepages::Advise), after waiting for the first copy's background collapse.
`--against=widen` (bfloat16: bf16 activations, as the bf16 model's): the same kernel with
GPT_GEMV_BF16DOT=0, the loop that widens bf16 to float32 and uses FMAs, against vdpbf16ps (AVX512-BF16).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt.config import MODEL_SIZES, canonical_model_name  # noqa: E402
from gpt.kernels import gemv  # noqa: E402


def weights(n_layer: int, d: int, vocab: int, dtype, seed: int = 0):
  """One decode step's matrices (with int8 per-column scales), and the bytes they hold."""
  rng = np.random.default_rng(seed)
  # [N, K]: outputs by inputs, as gpt.kernels.gemv.matmul takes them (Conv1D weights transposed).
  shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * n_layer + [(vocab, d)]
  mats = []
  for shape in shapes:
    w = rng.standard_normal(shape, np.float32) * 0.02
    if dtype == jnp.int8:
      scale = np.abs(w).max(axis=1) / 127  # one scale per output (row)
      q = np.round(w / scale[:, None]).astype(np.int8)
      mats.append((jnp.asarray(q), jnp.asarray(scale, jnp.float32)))
    else:
      mats.append((jnp.asarray(w, dtype), None))
  nbytes = sum(w.nbytes + (0 if s is None else s.nbytes) for w, s in mats)
  return mats, nbytes


def step_fn(d: int, matmul, mlp: str = "plain", a8: bool = False):
  """x [rows, d] through every matrix in turn, each output feeding the next input (as in a
  decode step: c_attn's first third, c_proj, c_fc's 4d into mlp c_proj, then the output layer).
  `mlp`: "plain" (each output straight into the next matrix), "unfused" (a decoding block's
  arithmetic, every matrix its own call: c_proj + bias + residual, layer_norm, c_fc + bias, GELU,
  c_proj + bias + residual), "tail" (the same after c_attn in one gemv.layer_tail call)."""
  from gpt.layers import layer_norm

  def run(mats, x):
    *layers, (head, head_scale) = mats
    for i in range(0, len(layers), 4):
      (qkv, s0), (proj, s1), (fc, s2), (out, s3) = layers[i:i + 4]
      a = matmul(x, qkv, scale=s0)[:, :d].astype(x.dtype)
      if mlp == "plain":
        x = matmul(a, proj, scale=s1).astype(x.dtype)
        x = matmul(matmul(x, fc, scale=s2).astype(x.dtype), out, scale=s3).astype(x.dtype)
        continue
      bo, g, beta = (jnp.full((d,), v, jnp.float32) for v in (0.01, 1.0, 0.0))
      b1, b2 = jnp.full((fc.shape[0],), 0.01, jnp.float32), jnp.full((d,), 0.01, jnp.float32)
      if mlp == "tail":
        x = gemv.layer_tail(a, x, proj, bo, g, beta, fc, b1, out, b2, scale_o=s1, scale1=s2,
                            scale2=s3, int8_activations=a8).astype(x.dtype)
        continue
      r = x + (matmul(a, proj, scale=s1) + bo)
      h = gemv.gelu(matmul(layer_norm(r, g, beta), fc, scale=s2) + b1)
      x = (r + (matmul(h, out, scale=s3) + b2)).astype(x.dtype)
    logits = matmul(x, head, scale=head_scale)
    return x + logits[:, :d].astype(x.dtype)

  return jax.jit(run)


def chain_fn(matmul, scales: bool):
  """Every copy in turn, each call depending on the last through one element of its output (so
  the calls run one after another, as in a decode step), x [rows, K] kept."""

  def run(mats, x):
    for w, s in mats:
      y = matmul(x, w, scale=s if scales else None)
      x = x + 1e-3 * y[:, :1].astype(x.dtype)
    return x

  return jax.jit(run)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8, "int8a8": jnp.int8,
          "int8a16": jnp.int8}


def kernel(name: str):
  """gemv.matmul for weight variant `name` (int8a8 / int8a16: the integer-activation loops)."""
  return partial(gemv.matmul, int8_activations=name == "int8a8", int16_activations=name == "int8a16")


def with_env(name: str, value: str, f):
  """f() with environment variable `name` = `value` (gemv.cc reads its switches at each call),
  then the variable as it was."""
  before = os.environ.get(name)
  os.environ[name] = value
  try:
    return f().block_until_ready()
  finally:
    if before is None:
      del os.environ[name]
    else:
      os.environ[name] = before


def one_thread(f):
  """f() with gemv.cc's calls held to the calling thread (GPT_GEMV_THREADS=1)."""
  return with_env("GPT_GEMV_THREADS", "1", f)


def widening(f):
  """f() with bf16 activations through gemv.cc's widening loop, not vdpbf16ps (GPT_GEMV_BF16DOT=0)."""
  return with_env("GPT_GEMV_BF16DOT", "0", f)


def no_hugepages(f):
  """f() with gemv.cc's huge-page advice off for the buffers it meets (GPT_GEMV_HUGEPAGES=0)."""
  return with_env("GPT_GEMV_HUGEPAGES", "0", f)


def anon_huge_mb() -> float:
  """This process's anonymous memory on transparent huge pages, MB (0 where not reported)."""
  try:
    text = Path("/proc/self/smaps_rollup").read_text()
  except OSError:
    return 0.0
  return next((int(l.split()[1]) / 1024 for l in text.splitlines() if l.startswith("AnonHugePages:")), 0.0)


def settle_hugepages(timeout: float = 60.0) -> float:
  """Waits until gemv.cc's background collapse stops adding huge pages (1 s without change)."""
  last, start = -1.0, time.perf_counter()
  while time.perf_counter() - start < timeout:
    now = anon_huge_mb()
    if now == last:
      return now
    last = now
    time.sleep(1.0)
  return last


def per_call(args, n_layer: int, d: int, vocab: int) -> None:
  """One call per matrix shape, against the bytes/bandwidth bound and a call that streams nothing."""
  shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (vocab, d)]
  results = []
  rng = np.random.default_rng(0)
  for name in args.dtypes.split(","):
    dtype = DTYPES[name]
    mm = kernel(name)
    for rows in map(int, args.rows.split(",")):
      for N, K in shapes:
        size = N * K * jnp.dtype(dtype).itemsize
        copies = max(2, math.ceil(args.per_call_mb * 1e6 / size))
        def make(n):
          if dtype == jnp.int8:
            return (jnp.asarray(rng.integers(-127, 128, (n, K), dtype=np.int8)),
                    jnp.asarray(rng.uniform(1e-4, 2e-4, n), jnp.float32))
          return jnp.asarray(rng.standard_normal((n, K), np.float32) * 0.02, dtype), None
        mats = [make(N) for _ in range(copies)]
        tiny = [make(128)] * copies  # the same small matrix: in cache after the first call
        x = jnp.asarray(rng.standard_normal((rows, K)), jnp.float32)
        flat = jnp.ones(size * copies // 4, jnp.float32)
        total = jax.jit(jnp.sum)
        run = chain_fn(mm, dtype == jnp.int8)
        fns = {"kernel": lambda: run(mats, x), "1 thread": lambda: one_thread(lambda: run(mats, x)),
               "tiny": lambda: run(tiny, x), "tiny, 1 thread": lambda: one_thread(lambda: run(tiny, x)),
               "read": lambda: total(flat)}
        for f in fns.values():
          f().block_until_ready()  # compile
        times = {k: [] for k in fns}
        for r in range(args.repeats):
          for k in (fns if r % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[k]().block_until_ready()
            times[k].append(time.perf_counter() - start)
        results.append((name, rows, N, K, size, copies, times))
        print(f"done: {name} rows {rows} {N}x{K} ({copies} copies)", file=sys.stderr, flush=True)
        del mats, flat
  print(f"\nOne call per matrix shape, {n_layer}-layer model's shapes; {_machine()}; median of "
        f"{args.repeats} (best), calls chained over distinct copies of ~{args.per_call_mb:.0f} MB.\n")
  print("| weights | rows | N x K | MB | copies | call us | GB/s | bound us (read GB/s) | call / bound | "
        "1-thread call us | 2 threads / 1 | [128, K] call us | [128, K] 1 thread us |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, rows, N, K, size, copies, times in results:
    med = {k: statistics.median(v) / copies for k, v in times.items()}
    best = {k: min(v) / copies for k, v in times.items()}
    print(f"| {name} | {rows} | {N}x{K} | {size / 1e6:.2f} | {copies} | {1e6 * med['kernel']:.0f} "
          f"({1e6 * best['kernel']:.0f}) | {size / med['kernel'] / 1e9:.1f} | {1e6 * med['read']:.0f} "
          f"({size / med['read'] / 1e9:.1f}) | {med['kernel'] / med['read']:.2f} "
          f"({best['kernel'] / best['read']:.2f}) | {1e6 * med['1 thread']:.0f} | "
          f"{med['kernel'] / med['1 thread']:.2f} | {1e6 * med['tiny']:.1f} ({1e6 * best['tiny']:.1f}) | "
          f"{1e6 * med['tiny, 1 thread']:.1f} ({1e6 * best['tiny, 1 thread']:.1f}) |")


def _machine() -> str:
  cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
              if l.startswith("model name")), platform.processor())
  bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
  return (f"{cpu}, {os.cpu_count()} CPUs, AVX512-BF16: {'yes' if bf16 else 'no'}, jax {jax.__version__}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="117M")
  parser.add_argument("--dtypes", default="float32,bfloat16,int8")
  parser.add_argument("--rows", default="1,8")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--per_call", action="store_true", help="time each matrix shape alone")
  parser.add_argument("--against", default="xla", help="the peer column: xla, or a weight variant "
                      "with the same weights (int8, int8a16, int8a8 for int8 weights), or 1thread: "
                      "the same kernel with GPT_GEMV_THREADS=1, or widen: the same kernel with GPT_GEMV_BF16DOT=0, or 4k: the same kernel on weights it "
                      "may not put on 2 MB pages (GPT_GEMV_HUGEPAGES=0), or unfused: each block's "
                      "tail (attn c_proj, ln_2, MLP) as 3 calls with XLA between, against "
                      "gemv.layer_tail's one (in the kernel column)")
  parser.add_argument("--per_call_mb", type=float, default=128.0, help="weights per chain (--per_call)")
  args = parser.parse_args()
  n_layer, d, _ = MODEL_SIZES[canonical_model_name(args.model)]
  vocab = 50257
  if not gemv.available():
    raise SystemExit("error: gpt.kernels.gemv did not build (see the warning above)")
  if args.per_call:
    per_call(args, n_layer, d, vocab)
    return
  rows_out = []
  for name in args.dtypes.split(","):
    dtype = DTYPES[name]
    if args.against not in ("xla", "1thread", "4k", "unfused", "widen") and DTYPES[args.against] != dtype:
      raise SystemExit(f"error: --against={args.against} has other weights than {name}")
    mats, nbytes = weights(n_layer, d, vocab, dtype)
    act = jnp.float32 if dtype == jnp.int8 else dtype
    for rows in map(int, args.rows.split(",")):
      x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, d)), act)
      a8 = name == "int8a8"  # int8 activations too: the VNNI kernel against XLA's int32 product
      peer = (partial(gemv.reference, int8_activations=a8) if args.against == "xla"
              else kernel(name if args.against in ("1thread", "4k", "widen") else args.against))
      fns = {"kernel": step_fn(d, kernel(name)), "XLA": step_fn(d, peer)}
      if args.against == "unfused":  # each block's tail as one gemv.layer_tail call against 3 calls
        fns = {"kernel": step_fn(d, kernel(name), "tail", a8), "XLA": step_fn(d, kernel(name), "unfused")}
      if args.against == "1thread":  # the same kernel held to the calling thread
        two = fns["XLA"]
        fns["XLA"] = lambda m, x, two=two: one_thread(lambda: two(m, x))
      if args.against == "widen":  # the same kernel, bf16 activations widened to float32 for FMAs
        dot = fns["XLA"]
        fns["XLA"] = lambda m, x, dot=dot: widening(lambda: dot(m, x))
      if args.against == "4k":  # the same kernel on its own copy of the weights, never advised
        small, _ = weights(n_layer, d, vocab, dtype)
        fns["XLA"] = lambda m, x, f=fns["XLA"], small=small: no_hugepages(lambda: f(small, x))
      outs = {k: np.asarray(f(mats, x), np.float32) for k, f in fns.items()}  # compile, and check
      if args.against == "4k":
        print(f"huge pages: {settle_hugepages():.0f} MB of this process's memory", file=sys.stderr)
      diff = float(np.max(np.abs(outs["kernel"] - outs["XLA"])) / (np.max(np.abs(outs["XLA"])) + 1e-30))
      times = {k: [] for k in fns}
      for r in range(args.repeats):
        for k in (fns if r % 2 == 0 else list(fns)[::-1]):
          start = time.perf_counter()
          fns[k](mats, x).block_until_ready()
          times[k].append(time.perf_counter() - start)
      rows_out.append((name, rows, nbytes, times, diff))
      print(f"done: {name} rows {rows}", file=sys.stderr, flush=True)

  cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
              if l.startswith("model name")), platform.processor())
  flags = Path("/proc/cpuinfo").read_text()
  bf16 = "avx512_bf16" in flags
  print(f"\n{args.model} matrices ({n_layer} layers x 4 + output layer), {cpu}, {os.cpu_count()} "
        f"CPUs, AVX512-BF16: {'yes' if bf16 else 'no'}, jax {jax.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}; median of {args.repeats} (best); paired: the median over rounds "
        f"of the round's {'XLA' if args.against == 'xla' else args.against} time / kernel time.\n")
  peer = "XLA" if args.against == "xla" else args.against
  print(f"| weights | rows | MB read | kernel ms | {peer} ms | kernel GB/s | {peer} GB/s | kernel / {peer} | "
        "paired | max rel. diff |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, rows, nbytes, times, diff in rows_out:
    k, x = statistics.median(times["kernel"]), statistics.median(times["XLA"])
    kb, xb = min(times["kernel"]), min(times["XLA"])
    paired = statistics.median(p / q for p, q in zip(times["XLA"], times["kernel"]))
    print(f"| {name} | {rows} | {nbytes / 1e6:.0f} | {1e3 * k:.1f} ({1e3 * kb:.1f}) | "
          f"{1e3 * x:.1f} ({1e3 * xb:.1f}) | {nbytes / k / 1e9:.1f} ({nbytes / kb / 1e9:.1f}) | "
          f"{nbytes / x / 1e9:.1f} ({nbytes / xb / 1e9:.1f}) | {x / k:.2f}x | {paired:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
  main()
