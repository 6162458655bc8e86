"""Speed of one sampling step (gpt.sampling.sample_logits) at GPT-2's vocabulary, per option.

  python experiments/bench_sampling.py --batch=8 --repeats=20

A batch-8 decode step of 117M takes ~5-40 ms here, so what picks the next token matters. Times
the jitted `sample_logits` on float32 logits [B, 50257] for greedy, plain temperature, top-k 40
and top-p 0.9 (gpt.sampling.nucleus: a bisection, no sort), and beside them temperature and top-p
0.9 as they were done before (`one_stage`: a Gumbel variate per column; `sorted_top_p`: a stable
sort of every row, then the cumulative mass), interleaved in
every repeat so the machine's load hits all alike. Two kinds of logits: "peaked" (normal * 4) and
"flat" (standard normal).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpt.sampling import SamplingOptions, sample_logits  # noqa: E402

V = 50257


def sorted_top_p(key, logits, options):
  """The sort-based top-p that gpt.sampling used before gpt.sampling.nucleus (the peer here)."""
  scores = logits / options.temperature
  iota = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
  neg, ids = jax.lax.sort((-scores, iota), dimension=-1, num_keys=1)
  probs = jax.nn.softmax(-neg, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  choice = jax.random.categorical(key, jnp.where(mass_before < options.top_p, -neg, -jnp.inf), axis=-1)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def one_stage(key, logits, options):
  """Temperature alone as gpt.sampling drew it before its two-stage `draw`: a Gumbel per column."""
  return jax.random.categorical(key, logits / options.temperature, axis=-1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  load_before = load_average()
  normal = np.asarray(jax.random.normal(jax.random.key(0), (args.batch, V)))
  logits = {"peaked": jax.numpy.asarray(4 * normal), "flat": jax.numpy.asarray(normal)}
  methods = {
      "greedy": (SamplingOptions(temperature=0.0), sample_logits),
      "temperature 1, one stage (before)": (SamplingOptions(), one_stage),
      "temperature 1, two stages (now)": (SamplingOptions(), sample_logits),
      "top-k 40": (SamplingOptions(top_k=40), sample_logits),
      "top-p 0.9, sorted (before)": (SamplingOptions(top_p=0.9), sorted_top_p),
      "top-p 0.9, bisection (now)": (SamplingOptions(top_p=0.9), sample_logits),
  }
  runs = {}
  for kind, x in logits.items():
    for name, (options, how) in methods.items():
      fn = jax.jit(lambda key, x, o=options, how=how: how(key, x, o))
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
