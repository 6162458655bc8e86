"""Evaluation throughput: our scorer vs lm-evaluation-harness's `hf` backend, same model, same run.

  python experiments/bench_eval.py --examples=64 --batches=8,16,32 --reps=2

Builds the 117M GPT-2 architecture with random weights, exports it to a Hugging Face folder
(gpt.weights.export_hf) and loads that in lm-eval's HFLM (PyTorch, float32, CPU). Both then score
the same zero-shot prompts of HellaSwag (4 endings per item) and LAMBADA: ours through
gpt.evals.runner.evaluate (tokenizing, packing, scoring, metrics), lm-eval through
HFLM.loglikelihood (tokenizing, batching, scoring). Runs are interleaved (ours, lm-eval, ours, ...)
so that load from other processes hits both alike; the table reports the best rep of each, after a
warm-up pass that compiles our shapes (its time is reported as "first pass"). Prints a Markdown table.

Needs the [hf] extra and lm-eval: pip install torch transformers lm-eval accelerate.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--examples", type=int, default=64, help="items per task")
  p.add_argument("--batches", default="8,16,32", help="batch sizes (ours: rows; lm-eval: requests)")
  p.add_argument("--reps", type=int, default=2, help="timed repetitions per setting")
  p.add_argument("--tasks", default="hellaswag,lambada")
  p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
  p.add_argument("--scan_layers", type=int, default=0, help="1 = lax.scan over blocks (faster compile)")
  p.add_argument("--max_buckets", type=int, default=4, help="padded lengths per run (eval.max_buckets)")
  return p.parse_args()


def time_task(name: str, data_dir: Path, examples: int, batch: int, model, tokenizer, harness,
              reps: int, max_buckets: int) -> dict:
  """Zero-shot examples/s of task `name`: ours (gpt.evals.runner.evaluate) and lm-eval's `harness`
  (HFLM.loglikelihood) on the same first `examples` items, best of `reps` interleaved runs, after
  an untimed pass of ours that compiles. Also the largest |log-likelihood difference|."""
  from lm_eval.api.instance import Instance
  from gpt.evals import get_task
  from gpt.evals.base import Format, assemble
  from gpt.evals.runner import evaluate
  from gpt.evals.scoring import Scorer

  task, fmt = get_task(name), Format()
  data = task.load(data_dir)
  docs = data.docs[:examples]
  instances = [Instance("loglikelihood", {}, (assemble(req.demos, req.query, fmt), cont), 0)
               for doc in docs for req in task.requests(doc, [], fmt) for cont in req.continuations]
  scorer = Scorer(model, batch_size=batch, max_buckets=max_buckets)
  start = time.perf_counter()
  result = evaluate(task, data, scorer, tokenizer, 0, fmt, limit=examples, keep_examples=True)
  first = time.perf_counter() - start
  ours, theirs = [], []
  for _ in range(reps):
    start = time.perf_counter()
    evaluate(task, data, scorer, tokenizer, 0, fmt, limit=examples)
    ours.append(time.perf_counter() - start)
    harness.batch_size_per_gpu = batch
    start = time.perf_counter()
    their_scores = harness.loglikelihood(instances, disable_tqdm=True)
    theirs.append(time.perf_counter() - start)
  mine = [c["logprob"] for e in result.examples for r in e["scores"] for c in r]
  diff = float(np.max(np.abs(np.array(mine) - [ll for ll, _ in their_scores])))
  return {"ours": len(docs) / min(ours), "theirs": len(docs) / min(theirs), "first": first,
          "compiles": scorer.compiles, "max_diff": diff}


def main() -> None:
  args = parse_args()
  try:
    import torch
    from lm_eval.models.huggingface import HFLM
  except ImportError as e:
    raise SystemExit(f"error: needs torch, transformers and lm-eval ({e}); "
                     f"pip install torch transformers lm-eval accelerate")
  from gpt.model import GPTConfig, init_model
  from gpt.tokenizer import get_tokenizer
  from gpt.weights import export_hf

  cfg = GPTConfig(scan_layers=bool(args.scan_layers))  # 117M: 12 layers, 768 wide, 1024 context
  model, tokenizer = init_model(cfg, seed=0), get_tokenizer()
  folder = Path(tempfile.mkdtemp(prefix="bench_eval_hf_"))
  export_hf(model, tokenizer, folder)
  harness = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=8)
  batches = [int(b) for b in args.batches.split(",")]

  rows, checks = [], []
  for name in args.tasks.split(","):
    for batch in batches:
      r = time_task(name, Path(args.data_dir), args.examples, batch, model, tokenizer, harness,
                    args.reps, args.max_buckets)
      checks.append(r["max_diff"])
      rows.append((name, batch, r["ours"], r["theirs"], r["first"], r["compiles"]))
      print(f"{name} batch {batch}: ours {r['ours']:.2f} ex/s, lm-eval {r['theirs']:.2f} ex/s "
            f"(first pass {r['first']:.1f} s, {r['compiles']} compiles)", flush=True)

  print(f"\nMachine: {platform.machine()}, {torch.get_num_threads()} torch threads; model: 117M "
        f"architecture, random weights, float32, scan_layers={cfg.scan_layers}, max_buckets="
        f"{args.max_buckets}; {args.examples} items "
        f"per task, zero-shot; best of {args.reps} interleaved reps; max |loglik ours - lm-eval| "
        f"{max(checks):.2e}\n")
  print("| task | batch | ours ex/s | lm-eval hf ex/s | speed-up | our first pass (compiles) |")
  print("|---|---|---|---|---|---|")
  for name, batch, ours, theirs, first, compiles in rows:
    print(f"| {name} | {batch} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {first:.1f} s ({compiles}) |")
  for name in args.tasks.split(","):
    mine = max((r for r in rows if r[0] == name), key=lambda r: r[2])
    best = max((r for r in rows if r[0] == name), key=lambda r: r[3])
    print(f"| {name} | best: ours {mine[1]}, lm-eval {best[1]} | {mine[2]:.2f} | {best[3]:.2f} | "
          f"{mine[2] / best[3]:.2f}x | |")


if __name__ == "__main__":
  main()
