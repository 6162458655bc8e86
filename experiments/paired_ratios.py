"""Paired step-time ratios between rows of one `bench_train.py --times-json` run.

  python experiments/paired_ratios.py times.json jax-f32-scan

For every shape, each row's ratio to the named base row is taken round by round (base time / row
time in the same round: above 1 means the row is faster), then the median and the min-max over
rounds are printed, so load that drifts between rounds cancels out.
"""

from __future__ import annotations

import json
import statistics
import sys


def main():
  data = json.loads(open(sys.argv[1]).read())
  base = sys.argv[2]
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
