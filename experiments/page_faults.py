"""Page faults and system time per train step, step by step: does a host-memory route hold?

  python experiments/page_faults.py --shape=30m --steps=20                 # gpt.host_memory on
  GPT_KEEP_FREED_MEMORY=0 python experiments/page_faults.py --shape=30m    # glibc's defaults
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 GPT_KEEP_FREED_MEMORY=0 python experiments/page_faults.py
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 GPT_KEEP_FREED_MEMORY=0 python ...

Runs bench_train's jax row (the train mode's own program, float32, scanned layers) and prints, per
step, wall time, minor page faults, system and user CPU seconds (getrusage of the whole process),
then the medians over the steps after the first two and the peak RSS. The route is whatever the
environment selects; gpt.host_memory.keep_freed_memory() runs first unless GPT_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt import host_memory  # noqa: E402

REASON = host_memory.keep_freed_memory()  # before jax starts its threads

from experiments import bench_train as bt  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="30m", help=f"one of {sorted(bt.SHAPES)}")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  route = ("keep_freed_memory" if REASON is None else f"off ({REASON})")
  env = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ}
  print(f"shape {args.shape}; host_memory: {route}; env {env}; load {os.getloadavg()[0]:.1f}",
        flush=True)
  _, run = bt.jax_runner(bt.SHAPES[args.shape], "float32", True, train=bt.train_section(args.shape))
  rows = []
  for i in range(args.steps):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    row = (wall, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime)
    rows.append(row)
    print(f"step {i}: {row[0]:.2f} s, minflt {row[1]}, sys {row[2]:.2f} s, user {row[3]:.2f} s",
          flush=True)
  steady = rows[2:] or rows
  med = [statistics.median(r[k] for r in steady) for k in range(4)]
  print(f"median of steps 2+: {med[0]:.2f} s, minflt {med[1]:.0f} (max {max(r[1] for r in steady)}),"
        f" sys {med[2]:.2f} s, user {med[3]:.2f} s; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
  main()
