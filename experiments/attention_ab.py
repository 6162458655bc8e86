"""The attention kernel against an earlier revision of itself, paired in one process.

  python experiments/attention_ab.py --rev=3540a34 --layer                # one chapter layer
  python experiments/attention_ab.py --rev=3540a34 --layer --shape=8,6,256,64
  python experiments/attention_ab.py --rev=3540a34 -- --shapes=chapter \\
      --impls=jax-f32-scan-attnbase,jax-f32-scan --rounds 4 --steps 2 --times-json F

Why: a change that rewrites gpt/kernels/attention.cc's loops in place (no module switch keeps the
old ones) still needs a same-run, interleaved A/B, as every speed claim here does on a shared
machine. This builds attention.cc and its headers as of git revision `--rev` with the kernel's own
flags into a temporary directory and registers its two handlers under other FFI names. `--layer`
then times one layer's attention (value and the gradients of q, k, v; float32 and bf16 products)
with the current kernel and the earlier one, round-robin, and prints the paired ratio per round's
median (earlier / current: above 1 means the current kernel is faster) and the largest difference
between their gradients (relative to the largest entry). Otherwise the arguments after `--` go to
experiments/bench_train.py, with one more variant suffix, `attnbase`: the step traced with the
earlier kernel (gpt.kernels.attention.TARGETS pointed at it); compare rows with
experiments/paired_ratios.py.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt.kernels import attention as kattn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_TARGETS = ("GptAttentionBaseFwd", "GptAttentionBaseBwd")


def build_revision(rev: str, out: Path) -> Path:
  """attention.cc with the headers next to it, as of git revision `rev`, compiled into `out`."""
  names = subprocess.run(["git", "ls-tree", "--name-only", rev, "gpt/kernels/"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
  for name in names:
    if name.endswith((".cc", ".h")):
      text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True,
                            check=True).stdout
      (out / Path(name).name).write_bytes(text)
  lib = out / "attention_base.so"
  subprocess.run(["g++", *kattn.FLAGS, f"-I{jax.ffi.include_dir()}", str(out / "attention.cc"),
                  "-o", str(lib)], check=True)
  return lib


def register(lib_path: Path) -> None:
  lib = ctypes.cdll.LoadLibrary(str(lib_path))
  for name, symbol in zip(BASE_TARGETS, (kattn.FORWARD, kattn.BACKWARD)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def layer(shape: tuple[int, ...], rounds: int) -> None:
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
  rows = {}
  for bf16 in (False, True):
    for which, targets in (("earlier", BASE_TARGETS), ("current", kattn.TARGETS)):
      saved, kattn.TARGETS = kattn.TARGETS, targets
      try:  # traced (at the first call) with these targets
        fn = jax.jit(jax.value_and_grad(
            lambda q, k, v, bf16=bf16: jnp.sum(kattn.flash_attention(q, k, v, bf16=bf16) * w),
            argnums=(0, 1, 2)))
        out = jax.block_until_ready(fn(q, k, v))
      finally:
        kattn.TARGETS = saved
      rows[(bf16, which)] = (fn, out)
  times = {key: [] for key in rows}
  for _ in range(rounds):
    for key, (fn, _) in rows.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times[key].append(time.perf_counter() - t0)
  print(f"shape [B, H, T, K] = {list(shape)}; {rounds} rounds; load average "
        f"{os.getloadavg()[0]:.1f}\n")
  print("| products | earlier ms | current ms | earlier / current (paired) "
        "| max diff of dq, dk, dv (/ max abs) |")
  print("|---|---|---|---|---|")
  for bf16 in (False, True):
    if bf16 and not kattn.bf16_products():
      continue
    a, b = times[(bf16, "earlier")], times[(bf16, "current")]
    grads = (jax.tree.leaves(rows[(bf16, which)][1][1]) for which in ("earlier", "current"))
    diff = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x))) for x, y in zip(*grads))
    ratio = statistics.median(x / y for x, y in zip(a, b))
    print(f"| {'bf16' if bf16 else 'float32'} | {1e3 * statistics.median(a):.1f} | "
          f"{1e3 * statistics.median(b):.1f} | {ratio:.3f}x | {diff:.1e} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rev", required=True, help="the git revision of the earlier kernel")
  parser.add_argument("--layer", action="store_true", help="one layer's attention, not the step")
  parser.add_argument("--shape", default="1,12,1024,64", help="B,H,T,K (with --layer)")
  parser.add_argument("--rounds", type=int, default=15, help="rounds (with --layer)")
  args, rest = parser.parse_known_args()
  if not kattn.available():
    sys.exit(f"error: the attention kernel is not available: {kattn.why_unavailable()}")
  with tempfile.TemporaryDirectory() as tmp:
    register(build_revision(args.rev, Path(tmp)))
  if args.layer:
    layer(tuple(int(x) for x in args.shape.split(",")), args.rounds)
    return
  from experiments import bench_train
  bench_train.VARIANT_SWITCHES["attnbase"] = ("gpt.kernels.attention", "TARGETS", BASE_TARGETS)
  sys.argv = [sys.argv[0], *[a for a in rest if a != "--"]]
  bench_train.main()


if __name__ == "__main__":
  main()
