"""Throughput of lm-eval's three request types: our model `gpt` (gpt/harness.py) beside lm-eval's `hf`.

  python experiments/bench_harness.py --rounds 3

Both models get the same weights (a GPT-2 of the shape asked for, randomly initialised with a fixed
seed, since no released checkpoint can be downloaded here; speed does not depend on the values) and
the same requests, built from ../shared/data: `loglikelihood` (LAMBADA passages and their last
words, plus PIQA's two solutions per goal), `loglikelihood_rolling` (WikiText-2 articles) and
`generate_until` (LAMBADA passages, `--max_gen_toks` new tokens, stop at "\\n\\n"). Each round
runs every (request type, model) pair once, in a shuffled order; round 0 is a warm-up (our compiles,
torch's first calls) and is not counted. The table gives the median seconds per call over the
timed rounds, requests per second, and the median of the per-round ratios hf time / gpt time, with
the largest log-likelihood difference and whether every generated string agreed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
  p.add_argument("--n_layer", type=int, default=12)
  p.add_argument("--n_embd", type=int, default=768)
  p.add_argument("--n_head", type=int, default=12)
  p.add_argument("--n_ctx", type=int, default=1024)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--loglikelihood", type=int, default=48, help="LAMBADA requests (+ as many PIQA)")
  p.add_argument("--rolling", type=int, default=4, help="WikiText articles")
  p.add_argument("--generate", type=int, default=16, help="generate_until requests")
  p.add_argument("--max_gen_toks", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
  return p.parse_args(argv)


def requests(args):
  """{request type: [Instance]} from ../shared/data."""
  from lm_eval.api.instance import Instance

  from gpt.evals.perplexity import split_articles, wikitext_detokenize
  data = Path(args.data_dir)
  lambada = [json.loads(l)["text"] for l in
             (data / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()]
  piqa = [json.loads(l) for l in (data / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
  ll = [(t.rpartition(" ")[0], " " + t.rpartition(" ")[2]) for t in lambada[:args.loglikelihood]]
  for row in piqa[:args.loglikelihood // 2]:
    ll += [(f"Question: {row['goal']}\nAnswer:", " " + row[s]) for s in ("sol1", "sol2")]
  articles = split_articles((data / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8"))
  rolling = [(wikitext_detokenize(a),) for a in articles[:args.rolling]]
  gen_kwargs = {"until": ["\n\n"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
  gen = [(t.rpartition(" ")[0], gen_kwargs) for t in lambada[1000:1000 + args.generate]]
  make = lambda kind, items: [Instance(kind, {}, a, i) for i, a in enumerate(items)]  # noqa: E731
  return {"loglikelihood": make("loglikelihood", ll),
          "loglikelihood_rolling": make("loglikelihood_rolling", rolling),
          "generate_until": make("generate_until", gen)}


def models(args, folder: Path):
  """{'gpt': GPTLM, 'hf': HFLM} on the same weights, exported to `folder`."""
  from lm_eval.models.huggingface import HFLM

  from gpt.config import base_config
  from gpt.harness import GPTLM
  from gpt.weights import export_hf, load_model
  config = base_config()
  config.init = "scratch"
  m = config.model
  m.n_layer, m.n_embd, m.n_head, m.n_ctx = args.n_layer, args.n_embd, args.n_head, args.n_ctx
  loaded = load_model(config)
  export_hf(loaded.model, loaded.tokenizer, folder)
  return {"gpt": GPTLM(init=str(folder), batch_size=args.batch_size),
          "hf": HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size)}


def call(lm, kind, reqs):
  return getattr(lm, kind)(reqs, disable_tqdm=True)


def main(argv):
  args = parse_args(argv)
  reqs = requests(args)
  with tempfile.TemporaryDirectory() as tmp:
    lms = models(args, Path(tmp) / "hf")
  pairs = [(kind, name) for kind in reqs for name in lms]
  times = {p: [] for p in pairs}
  outputs = {}
  rng = random.Random(0)
  for round_ in range(args.rounds + 1):
    rng.shuffle(pairs)
    for kind, name in pairs:
      start = time.perf_counter()
      outputs[kind, name] = call(lms[name], kind, reqs[kind])
      if round_:
        times[kind, name].append(time.perf_counter() - start)
    print(f"round {round_} done", file=sys.stderr)
  import jax
  import torch
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({vector_flags()}); "
        f"jax {jax.__version__}, torch {torch.__version__}; load average {load_average()}")
  print(f"model: {args.n_layer} layers x {args.n_embd}, n_ctx {args.n_ctx}, float32, batch_size "
        f"{args.batch_size}; {args.rounds} timed rounds")
  print()
  print("| request type | requests | model | median s | requests/s | hf time / gpt time | agreement |")
  print("|---|---:|---|---:|---:|---:|---|")
  for kind in reqs:
    ours, theirs = outputs[kind, "gpt"], outputs[kind, "hf"]
    if kind == "generate_until":
      agree = f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)} strings equal"
    else:
      get = (lambda r: r[0]) if kind == "loglikelihood" else (lambda r: r)  # noqa: E731
      agree = f"max abs Δ log-lik {max(abs(get(a) - get(b)) for a, b in zip(ours, theirs)):.1e}"
    ratio = statistics.median(h / g for h, g in zip(times[kind, "hf"], times[kind, "gpt"]))
    for name in ("gpt", "hf"):
      t = statistics.median(times[kind, name])
      print(f"| {kind} | {len(reqs[kind])} | {name} | {t:.2f} | {len(reqs[kind]) / t:.3g} | "
            f"{ratio:.2f} | {agree} |" if name == "gpt" else
            f"| {kind} | {len(reqs[kind])} | {name} | {t:.2f} | {len(reqs[kind]) / t:.3g} | 1.00 | |")


if __name__ == "__main__":
  main(sys.argv[1:])
