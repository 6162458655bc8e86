"""Speed of one sampling step (gpt.sampling.sample_logits) at GPT-2's vocabulary, per option.

  python experiments/bench_sampling.py --batch=8 --repeats=20

A batch-8 decode step of 117M takes ~5-40 ms here, so what picks the next token matters. Times
the jitted `sample_logits` on float32 logits [B, 50257] for greedy, plain temperature, top-k 40,
and top-p 0.9 with and without the nucleus prefilter (prefilter off = the full sort per row that
top-p alone used before), interleaved in every repeat so the machine's load hits all alike. Two
kinds of logits: "peaked" (normal * 4: the nucleus fits in the prefilter's 1024 tokens, as for a
trained model's usual next-token distribution) and "flat" (standard normal: it does not, and the
prefilter falls back to the sort).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402
from gpt.sampling import NUCLEUS_PREFILTER, SamplingOptions, sample_logits  # noqa: E402

V = 50257


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  load_before = load_average()
  normal = np.asarray(jax.random.normal(jax.random.key(0), (args.batch, V)))
  logits = {"peaked": jax.numpy.asarray(4 * normal), "flat": jax.numpy.asarray(normal)}
  methods = {
      "greedy": (SamplingOptions(temperature=0.0), NUCLEUS_PREFILTER),
      "temperature 1": (SamplingOptions(), NUCLEUS_PREFILTER),
      "top-k 40": (SamplingOptions(top_k=40), NUCLEUS_PREFILTER),
      "top-p 0.9, full sort": (SamplingOptions(top_p=0.9), V + 1),
      "top-p 0.9, prefilter": (SamplingOptions(top_p=0.9), NUCLEUS_PREFILTER),
  }
  runs = {}
  for kind, x in logits.items():
    for name, (options, prefilter) in methods.items():
      fn = jax.jit(lambda key, x, o=options, n=prefilter: sample_logits(key, x, o, prefilter=n))
      fn(jax.random.key(0), x).block_until_ready()  # compile
      runs[(kind, name)] = (fn, x)
  times = {k: [] for k in runs}
  order = list(runs)
  for repeat in range(args.repeats):
    for k in (order if repeat % 2 == 0 else order[::-1]):
      fn, x = runs[k]
      start = time.perf_counter()
      fn(jax.random.key(repeat + 1), x).block_until_ready()
      times[k].append(time.perf_counter() - start)
  print(f"sample_logits, batch {args.batch}, V {V}, median of {args.repeats} (best), ms per call. "
        f"{cpu_model()}, {vector_flags()}; load average {load_before} before, {load_average()} after.\n")
  print("| logits | " + " | ".join(methods) + " |")
  print("|---|" + "---|" * len(methods))
  for kind in logits:
    cells = [f"{1e3 * statistics.median(times[(kind, n)]):.2f} ({1e3 * min(times[(kind, n)]):.2f})"
             for n in methods]
    print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
