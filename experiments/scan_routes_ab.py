"""Same-run, interleaved A/B of the layer scan's in-place routes (train-scan, session 8), paired per round.

bench_train.py's table gives each row's median step; on a loaded 2-core machine the rows drift
together, so this prints each round's ratio of a route-off step to the default step (both the
minimum of `--steps` steps, run back to back in the same round) and their median and spread.

  python experiments/scan_routes_ab.py --shape=30m --variants=wslice,gslice --rounds 6 --steps 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402  (experiments/ is not a package)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="30m")
  parser.add_argument("--variants", default="wslice,gslice", help="bench_train switch suffixes")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  shape = bench_train.SHAPES[args.shape]
  names = ["default"] + args.variants.split(",")
  runs = {}
  for name in names:
    switches = () if name == "default" else (bench_train.VARIANT_SWITCHES[name],)
    _, runs[name] = bench_train.jax_runner(shape, "float32", True, switches=switches,
                                           train=bench_train.train_section(args.shape))
    runs[name]()  # warm up
  times = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      times[name].append(min(bench_train._timed(runs[name]) for _ in range(args.steps)))
  print(f"{args.shape}: load average {os.getloadavg()[0]:.1f}; step ms per round (min of {args.steps})")
  for name in names:
    row = " ".join(f"{t * 1e3:.0f}" for t in times[name])
    ratio = ""
    if name != "default":
      r = [a / b for a, b in zip(times[name], times["default"])]
      ratio = (f"; off/default per round {' '.join(f'{x:.2f}' for x in r)}: median "
               f"{statistics.median(r):.3f} (min {min(r):.2f}, max {max(r):.2f})")
    print(f"  {name}: {row}; median {statistics.median(times[name]) * 1e3:.0f}{ratio}", flush=True)


if __name__ == "__main__":
  main()
