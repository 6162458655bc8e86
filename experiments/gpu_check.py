"""GPU check: one prepared script that measures the README's GPU claims, in minutes, on one GPU.

  python experiments/gpu_check.py                # one H100/H200: the full table, < 8 minutes
  python experiments/gpu_check.py --tiny         # tiny shapes on any device (tests run it on CPU)
  python experiments/gpu_check.py --skip=eval    # leave out a section (train, decode, eval)

No GPU has been lent to this project in most sessions, so everything a GPU session needs is in
this one script: it prints one Markdown table and nothing else is needed to fill BENCHMARKS.md.
  train   tokens/s and MFU for 124M (context 1024, bf16 compute, cuDNN attention, the largest
          batch that fits, with and without remat) and 1542M (remat full). MFU is against the
          GPU's published dense bf16 peak (gpt.chips.GPU_PEAK_BF16), on a CPU against a measured
          bf16 matmul.
  decode  new tokens/s for 124M and 1542M at batch 1 and 16: ours (gpt's Generator, the code
          `--config.mode=sample` runs) beside transformers `generate` on the same device.
  eval    HellaSwag zero-shot examples/s: ours (gpt.evals) beside lm-eval's `hf` model on the
          exported weights (needs the task files in --data_dir; skipped with a note otherwise).
Goals (issue 14): 124M >= 50% MFU, 1542M >= 55%, decoding >= 2x transformers at both batches.

The largest batch that fits is found by compiling, not by running out of memory: one compile at a
small batch gives XLA's memory analysis (arguments + temporaries), temporaries grow linearly with
the batch, so the prediction is checked with one more compile and halved until it fits.
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Let XLA take most of the GPU (its default is 75%): the batch search measures against this.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_train  # noqa: E402
from experiments.machine import cpu_model  # noqa: E402
from gpt import chips  # noqa: E402
from gpt.compile import memory_figures  # noqa: E402

# name -> (n_layer, n_embd, n_head, context); --tiny replaces them with small shapes.
MODELS = {"124M": (12, 768, 12, 1024), "1542M": (48, 1600, 25, 1024)}
TINY_MODELS = {"124M": (2, 64, 2, 64), "1542M": (3, 96, 3, 64)}
VOCAB = 50257


def peak_flops(device, tiny: bool) -> tuple[float, str]:
  """(bf16 FLOP/s, where the figure comes from) for `device`."""
  peak = chips.gpu_peak_flops(device.device_kind)  # the published figure (gpt.chips' GPU table)
  if peak:
    return peak, f"{device.device_kind} data sheet"
  measured = bench_train.matmul_peak_jax(jnp.bfloat16, n=512 if tiny else 2048)
  return measured, f"measured bf16 matmul on {device.device_kind}"


def train_bytes(shape, remat: str, batch: int, fields: dict) -> int:
  """Device bytes of the bf16 train step at `shape` and `batch`, from compiling it abstractly: the
  compiler's total, as compile mode counts it (gpt.compile.memory_figures)."""
  L, D, H, T = shape
  step, *args = bench_train.train_program((L, D, H, T, batch), "bfloat16", scan=True,
                                          train=bench_train.train_section("chapter"),
                                          abstract=True, remat=remat, **fields)
  return memory_figures(step.lower(*args).compile())["total"]


def largest_batch(shape, remat: str, limit: int | None, cap: int, fields: dict) -> tuple[int, int]:
  """(largest power-of-two batch <= cap whose train step fits `limit` bytes, compiles it took).

  0 when batch 1 does not fit; `cap` when there is no limit (a CPU).
  """
  if limit is None:
    return cap, 0
  one = train_bytes(shape, remat, 1, fields)
  if one > limit:
    return 0, 1
  two = train_bytes(shape, remat, 2, fields)
  slope, batch, compiles = max(1, two - one), 1, 2
  while batch * 2 <= cap and one + slope * (batch * 2 - 1) <= limit:
    batch *= 2
  while batch > 2:  # the linear prediction, checked
    compiles += 1
    if train_bytes(shape, remat, batch, fields) <= limit:
      break
    batch //= 2
  return batch, compiles


def timed_median(run, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def train_rows(models, peak: float, limit, args, fields) -> list[tuple]:
  """Training rows: 124M without and with remat, 1542M with remat, each at its largest batch."""
  from gpt.model import GPTConfig

  rows = []
  for name, remat, cap in (("124M", "none", 64), ("124M", "full", 128), ("1542M", "full", 32)):
    L, D, H, T = models[name]
    cap = min(cap, args.max_batch) if args.max_batch else cap
    batch, compiles = largest_batch((L, D, H, T), remat, limit, cap, fields)
    setting = f"ctx {T}, bf16, remat={remat}"
    goal = 0.5 if name == "124M" else 0.55
    if batch == 0:
      rows.append(("train", name, setting, "does not fit at batch 1", "", "", f">= {goal:.0%} MFU", "no"))
      continue
    _, run = bench_train.jax_runner((L, D, H, T, batch), "bfloat16", scan=True,
                                    train=bench_train.train_section("chapter"), remat=remat, **fields)
    run()  # warm-up
    step_s = timed_median(run, args.steps)
    del run
    gc.collect()
    flops = GPTConfig(n_vocab=VOCAB, n_ctx=T, n_embd=D, n_head=H, n_layer=L).flops_per_token(T)
    tok_s = batch * T / step_s
    mfu = tok_s * flops / peak
    rows.append(("train", name, f"{setting}, batch {batch} (largest that fits; {compiles} compiles)",
                 f"{tok_s:,.0f} tok/s", "", f"{mfu:.1%} MFU", f">= {goal:.0%} MFU",
                 "yes" if mfu >= goal else "no"))
    print(f"train {name} remat={remat} batch {batch}: {tok_s:,.0f} tok/s, MFU {mfu:.1%}",
          file=sys.stderr, flush=True)
  return rows


def decode_rows(models, args, torch_device: str | None) -> list[tuple]:
  """Decoding rows: ours (gpt.sample.Generator) beside transformers generate, batch 1 and 16."""
  from experiments.decode_runners import EOT, HuggingFace
  from gpt.sample import Generator
  from gpt.model import GPTConfig, init_model
  from gpt.sampling import SamplingOptions
  from gpt.tokenizer import get_tokenizer

  rows, tokenizer = [], get_tokenizer()
  options = SamplingOptions(temperature=1.0, top_k=40)
  for name in models:
    L, D, H, T = models[name]
    cfg = GPTConfig(n_ctx=T, n_embd=D, n_head=H, n_layer=L, dtype=args.decode_dtype,
                    param_dtype=args.decode_dtype)
    gen = Generator(init_model(cfg), tokenizer, options, stop_at_eot=False)
    for batch in (1, 16):
      seed = iter(range(1, 1000))
      ours = lambda: gen.generate([[EOT]] * batch, args.new, jax.random.key(next(seed)))
      runners = {"ours": ours}
      if torch_device is not None:
        runners["hf"] = HuggingFace(cfg, batch, args.new, device=torch_device)
      for run in runners.values():  # warm-up (compiles)
        run()
      times = {k: [] for k in runners}
      for _ in range(args.reps):  # interleaved, so drifting load hits both
        for k, run in runners.items():
          start = time.perf_counter()
          run()
          times[k].append(time.perf_counter() - start)
      rate = {k: batch * args.new / statistics.median(v) for k, v in times.items()}
      ratio = rate["ours"] / rate["hf"] if "hf" in rate else None
      rows.append(("decode", name, f"{args.decode_dtype}, batch {batch}, {args.new} new tokens",
                   f"{rate['ours']:,.0f} tok/s", f"{rate['hf']:,.0f} tok/s" if "hf" in rate else "n/a",
                   f"{ratio:.2f}x" if ratio else "", ">= 2x transformers",
                   ("yes" if ratio >= 2 else "no") if ratio else "n/a"))
      print(f"decode {name} batch {batch}: {rows[-1][3]} vs {rows[-1][4]}", file=sys.stderr, flush=True)
      del runners
    del gen
    gc.collect()
  return rows


def eval_rows(models, args, torch_device: str | None) -> list[tuple]:
  """HellaSwag zero-shot examples/s: ours beside lm-eval's hf model on the exported weights."""
  import tempfile

  from experiments.bench_eval import time_task
  from gpt.model import GPTConfig, init_model
  from gpt.tokenizer import get_tokenizer
  from gpt.weights import export_hf

  task_dir = Path(args.data_dir) / "hellaswag"
  if torch_device is None or not task_dir.exists():
    why = "torch/lm-eval not installed" if torch_device is None else f"no task files in {task_dir}"
    return [("eval", "124M", "hellaswag 0-shot", "skipped", "", "", "", why)]
  from lm_eval.models.huggingface import HFLM

  L, D, H, T = models["124M"]
  model, tokenizer = init_model(GPTConfig(n_ctx=T, n_embd=D, n_head=H, n_layer=L)), get_tokenizer()
  folder = Path(tempfile.mkdtemp(prefix="gpu_check_hf_"))
  export_hf(model, tokenizer, folder)
  harness = HFLM(pretrained=str(folder), device=torch_device, dtype="float32", batch_size=args.eval_batch)
  r = time_task("hellaswag", Path(args.data_dir), args.examples, args.eval_batch, model, tokenizer,
                harness, args.reps, max_buckets=4)
  return [("eval", "124M", f"hellaswag 0-shot, {args.examples} items, batch {args.eval_batch}, f32",
           f"{r['ours']:.1f} ex/s", f"{r['theirs']:.1f} ex/s", f"{r['ours'] / r['theirs']:.2f}x",
           "", f"largest loglik difference {r['max_diff']:.1e}")]


def torch_device_name() -> str | None:
  """'cuda' when torch sees the GPU jax uses, 'cpu' on a CPU run, None without torch."""
  try:
    import torch
  except ImportError:
    return None
  if jax.default_backend() == "gpu":
    return "cuda" if torch.cuda.is_available() else None
  torch.set_num_threads(os.cpu_count() or 1)
  return "cpu"


def main(argv: list[str] | None = None) -> list[tuple]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU run of the script)")
  parser.add_argument("--skip", default="", help="comma list of sections to leave out")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps (median)")
  parser.add_argument("--reps", type=int, default=3, help="timed decode/eval runs (median/best)")
  parser.add_argument("--new", type=int, default=128, help="new tokens per decode run")
  parser.add_argument("--max_batch", type=int, default=0, help="cap the train batch search")
  parser.add_argument("--examples", type=int, default=256, help="HellaSwag items")
  parser.add_argument("--eval_batch", type=int, default=32)
  parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
  parser.add_argument("--decode_dtype", default="", help="default: bfloat16 on a GPU, else float32")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  if args.tiny:
    args.steps, args.reps, args.new, args.examples = min(args.steps, 2), min(args.reps, 1), 8, 4
    args.max_batch, args.eval_batch = args.max_batch or 2, 2
  args.decode_dtype = args.decode_dtype or ("bfloat16" if on_gpu else "float32")
  models = TINY_MODELS if args.tiny else MODELS
  fields = {"attention_impl": "cudnn" if on_gpu else "xla"}
  skip = set(filter(None, args.skip.split(",")))
  peak, peak_source = peak_flops(device, args.tiny)
  limit = chips.device_memory(device)
  torch_device = torch_device_name()
  started = time.perf_counter()

  rows = []
  if "train" not in skip:
    rows += train_rows(models, peak, limit, args, fields)
  if "decode" not in skip:
    rows += decode_rows(models, args, torch_device)
  if "eval" not in skip:
    rows += eval_rows(models, args, torch_device)

  import_versions = f"jax {jax.__version__}"
  try:
    import torch
    import_versions += f", torch {torch.__version__}"
  except ImportError:
    pass
  memory = f"{limit / 2**30:.1f} GiB for XLA" if limit else "host memory"
  print(f"\nDevice: {device.device_kind} ({device.platform}), {memory}; {import_versions}; "
        f"{cpu_model()} host, load average {os.getloadavg()[0]:.1f}; "
        f"bf16 peak {peak / 1e12:.3g} TFLOP/s ({peak_source}); shapes: "
        f"{'tiny' if args.tiny else 'real'}; {time.perf_counter() - started:.0f} s in all.\n")
  print("| section | model | setting | ours | transformers / lm-eval | ratio or MFU | goal | met |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  return rows


if __name__ == "__main__":
  main()
