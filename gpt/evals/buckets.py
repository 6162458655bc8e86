"""Padded lengths for batches: few distinct shapes (each one is a compile), little padding.

Rows are scored longest first in batches of a fixed size, so each batch has a maximum length. A
fixed ladder of lengths (powers of two and 1.5x) would waste about a fifth of the compute on
padding for HellaSwag and LAMBADA; instead `plan_lengths` picks, per run, the at most `max_lengths`
lengths (multiples of 8) that minimise the total padded length, preferring lengths already compiled
when that costs no padding.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

MULTIPLE = 8


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest length of the ladder 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^(k-1)) that is
  >= max(n, minimum)."""
  n = max(n, minimum)
  power = 1
  while True:
    if power >= n:
      return power
    if power >= 2 and power * 3 // 2 >= n:
      return power * 3 // 2
    power *= 2


def round_up(n: int, multiple: int = MULTIPLE) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def plan_lengths(maxima: Sequence[int], max_lengths: int, compiled: Iterable[int] = ()) -> list[int]:
  """A padded length for each batch (>= its maximum, a multiple of 8), using at most `max_lengths`
  distinct lengths: the least total padded length, and among equals the fewest lengths not in
  `compiled` (so scoring the same batches again compiles nothing).

  Dynamic programme over the candidate lengths in ascending order: choosing a length covers every
  batch whose rounded maximum lies above the previously chosen length.
  """
  if not maxima:
    return []
  if max_lengths < 1:
    raise ValueError(f"max_lengths={max_lengths} must be at least 1")
  need = [round_up(m) for m in maxima]
  free = set(compiled)
  values = sorted(set(need) | {c for c in free if c >= min(need)})
  count = {v: 0 for v in values}
  for n in need:
    count[n] += 1
  covered = [0]  # covered[i + 1] = batches with rounded maximum <= values[i]
  for v in values:
    covered.append(covered[-1] + count[v])
  # best[i][k] = (padded total, new lengths) covering values[:i + 1], values[i] being the k-th choice.
  worst = (math.inf, math.inf)
  best = [[worst] * (max_lengths + 1) for _ in values]
  back: dict[tuple[int, int], int] = {}
  for i, v in enumerate(values):
    new = int(v not in free)
    for k in range(1, max_lengths + 1):
      for j in range(-1, i):
        before = (0, 0) if j < 0 else best[j][k - 1]
        if (j < 0) != (k == 1):
          continue
        total = (before[0] + v * (covered[i + 1] - covered[j + 1]), before[1] + new)
        if total < best[i][k]:
          best[i][k], back[(i, k)] = total, j
  top = max(need)
  _, i, k = min((best[i][k], i, k) for i, v in enumerate(values) if v >= top
                for k in range(1, max_lengths + 1))
  chosen = []
  while i >= 0:
    chosen.append(values[i])
    i, k = back[(i, k)], k - 1
  chosen.sort()
  return [next(c for c in chosen if c >= n) for n in need]
