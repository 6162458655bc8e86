"""Same-run A/B of decode or train-step speed between two checkouts of this repository.

  git worktree add /tmp/old <commit>
  python experiments/bench_ab.py --old=/tmp/old --new=. --repeats=3             # decoding
  python experiments/bench_ab.py --old=/tmp/old --what=train --shapes=tiny,30m   # train step

Each checkout runs in its own worker process (its own `gpt` package) that builds, from its own
benchmark scripts, the runners to compare and compiles them once: for `decode`,
`experiments/decode_runners.py`'s `Ours` (the `sample` mode's decoder, random weights) per (dtype,
batch); for `train`, `experiments/bench_train.py`'s `jax_runner` (one jitted AdamW train step)
per (shape, dtype). The driver then asks the workers for one timed run at a time, alternating old
and new (and which goes first) in every repeat, so the machine's load hits both alike. Prints the
rate (median and best) per side and the new/old ratio of medians, with the load average before
and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TAG = "@@ab "


def worker(args) -> None:
  """Serves timed runs of decode_runners.Ours over stdin/stdout (one JSON line each way)."""
  sys.path.insert(0, str(Path(args.checkout).resolve()))
  runners = {}
  if args.what == "train":
    from experiments import bench_train

    for shape in args.shapes.split(","):
      for dtype in args.dtype.split(","):
        _, run = bench_train.jax_runner(bench_train.SHAPES[shape], dtype, scan=True)
        run()  # warm-up
        runners[f"{shape} {dtype}"] = run
  else:
    from experiments import decode_runners
    from gpt.config import MODEL_SIZES, canonical_model_name
    from gpt.model import GPTConfig

    n_layer, n_embd, n_head = MODEL_SIZES[canonical_model_name(args.model)]
    for dtype in args.dtype.split(","):
      for batch in map(int, args.batch.split(",")):
        # int8 = int8 weights with float32 compute, as bench_decode.py's --dtype=int8.
        float_dtype = "float32" if dtype == "int8" else dtype
        cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, dtype=float_dtype,
                        param_dtype=float_dtype, quantize="int8" if dtype == "int8" else "none")
        run = decode_runners.Ours(cfg, batch, args.new)
        assert run().shape == (batch, args.new)  # warm-up: compiles
        runners[f"{dtype} {batch}"] = run
  print(TAG + json.dumps({"ready": list(runners)}), flush=True)
  for line in sys.stdin:
    key = json.loads(line)["run"]
    start = time.perf_counter()
    runners[key]()
    print(TAG + json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def reply(proc) -> dict:
  for line in proc.stdout:
    if line.startswith(TAG):
      return json.loads(line[len(TAG):])
  raise RuntimeError(f"worker exited: {proc.wait()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old", required=True, help="checkout of the baseline")
  parser.add_argument("--new", default=".", help="checkout to compare (default: this one)")
  parser.add_argument("--what", choices=("decode", "train"), default="decode")
  parser.add_argument("--shapes", default="tiny", help="train: bench_train.py shapes")
  parser.add_argument("--model", default="117M", help="decode: released size whose shape to use")
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--dtype", default="float32,bfloat16", help="decode: float32, bfloat16, int8")
  parser.add_argument("--new_tokens", type=int, default=64, dest="new_tokens")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args, _ = parser.parse_known_args()
  if args.worker:
    args.checkout, args.new = args.worker, args.new_tokens
    return worker(args)
  # Only here, not at the top: a worker imports `experiments` from its own checkout.
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments.machine import cpu_model, load_average, vector_flags

  load_before = load_average()
  sides = {}
  for name, path in (("old", args.old), ("new", args.new)):
    path = str(Path(path).resolve())
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, __file__, f"--worker={path}", f"--what={args.what}", f"--shapes={args.shapes}",
           f"--model={args.model}", f"--batch={args.batch}",
           f"--dtype={args.dtype}", f"--new_tokens={args.new_tokens}", "--old=-"]
    sides[name] = subprocess.Popen(cmd, cwd=path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
  keys = [reply(p)["ready"] for p in sides.values()][0]
  print(f"compiled: {', '.join(keys)}", file=sys.stderr, flush=True)
  times = {(k, s): [] for k in keys for s in sides}
  for repeat in range(args.repeats):
    for key in keys:
      order = ["old", "new"] if repeat % 2 == 0 else ["new", "old"]
      for side in order:
        sides[side].stdin.write(json.dumps({"run": key}) + "\n")
        sides[side].stdin.flush()
        times[(key, side)].append(reply(sides[side])["seconds"])
  for p in sides.values():
    p.stdin.close()
    p.wait()
  load_after = load_average()

  cpu = f"{cpu_model()} ({vector_flags()})"
  what = ("train step (bench_train.py jax_runner, scan, AdamW), steps/s" if args.what == "train" else
          f"{args.model} architecture, random weights, {args.new_tokens} new tokens after a 1-token "
          f"prompt, top-k 40, new tokens/s")
  print(f"\n{what}; median of {args.repeats} interleaved repeats (best). {os.cpu_count()} CPUs, "
        f"{cpu}. Load average before {load_before}, after {load_after}.\n")
  print("| config | old | new | new / old |")
  print("|---|---|---|---|")
  for key in keys:
    work = 1 if args.what == "train" else int(key.split()[1]) * args.new_tokens
    rate = {s: [work / t for t in times[(key, s)]] for s in sides}
    med = {s: statistics.median(r) for s, r in rate.items()}
    print(f"| {key} | {med['old']:.2f} ({max(rate['old']):.2f}) | {med['new']:.2f} "
          f"({max(rate['new']):.2f}) | {med['new'] / med['old']:.3f} |")


if __name__ == "__main__":
  main()
