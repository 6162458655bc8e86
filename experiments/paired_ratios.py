"""Paired step-time ratios between rows of one `bench_train.py --times-json` run.

  python experiments/paired_ratios.py times.json jax-f32-scan

For every shape, each row's ratio to the named base row is taken round by round (base time / row
time in the same round: above 1 means the row is faster), then the median and the min-max over
rounds are printed, so load that drifts between rounds cancels out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("times", help="the JSON file bench_train.py --times-json wrote")
  parser.add_argument("base", help="the row every other row is compared with, e.g. jax-f32-scan")
  args = parser.parse_args()
  try:
    data = json.loads(open(args.times).read())
  except (OSError, ValueError) as e:
    sys.exit(f"error: cannot read {args.times} ({e}); give the file bench_train.py --times-json wrote")
  base = args.base
  missing = [shape for shape, times in data["times"].items() if base not in times]
  if missing:
    sys.exit(f"error: no row {base!r} in shapes {missing}; rows: "
             f"{sorted({i for t in data['times'].values() for i in t})}")
  print(f"# paired ratios vs {base}; load at the end {data['load']}")
  print("| shape | implementation | median step ms | base / row (median, min-max over rounds) |")
  print("|---|---|---|---|")
  for shape, times in data["times"].items():
    ref = times[base]
    for impl, ts in times.items():
      ratios = [r / t for r, t in zip(ref, ts)]
      print(f"| {shape} | {impl} | {1e3 * statistics.median(ts):.0f} | "
            f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
  main()
