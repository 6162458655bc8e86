"""The PyTorch peers of bench_train.py: the train step gpt's is measured beside, as a step() closure.

Two models, each eager or under torch.compile, in float32 or under bf16 autocast: transformers'
GPT2LMHeadModel (the reference a GPT-2 user has) and a nanoGPT-style model (nanogpt_torch.py: fused
SDPA attention, nanoGPT's AdamW setup), with the optimizer the jax row runs (train_shapes'
`train_section`). Rows are named framework-dtype[-variant...] (`make_row`). Settings read when a
process starts (an allocator preloaded, torch's THP switch) need a process of their own: ChildRow
runs this file as a child that steps its row on request, so bench_train still interleaves it with
the others round by round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (a ChildRow's process): the repository root
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from experiments.train_shapes import SHAPES, VOCAB, train_section  # noqa: E402
from gpt import host_memory  # noqa: E402


def torch_runner(torch, shape, dtype: str, seed: int = 0, train=None, device: str = "cpu",
                 variant=()):
  """(compile seconds or None, step()) for transformers' GPT2LMHeadModel at `shape`, eager (or
  torch.compile'd with `compile` in variant), with the optimizer of `train` (Adam or AdamW, as the
  jax row; default train_section(""); torch's default implementation unless variant says
  `fusedadam`/`foreachadam`)."""
  from transformers import GPT2Config, GPT2LMHeadModel

  L, D, H, T, B = shape
  torch.manual_seed(seed)
  config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = GPT2LMHeadModel(config).to(device).train()
  t = train_section("") if train is None else train
  betas, eps = (float(t.b1), float(t.b2)), float(t.eps)
  kwargs = _optimizer_kwargs(variant)
  if t.optimizer == "adamw":
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=betas, eps=eps,
                            weight_decay=t.weight_decay, **kwargs)
  else:  # configs/117m.py: plain Adam
    opt = torch.optim.Adam(model.parameters(), lr=t.learning_rate, betas=betas, eps=eps, **kwargs)
  forward = torch.compile(model) if "compile" in variant else model
  batch = torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (B, T + 1))).to(device)
  x, y = batch[:, :-1], batch[:, 1:]
  amp = dtype == "bfloat16"
  kind = "cuda" if device.startswith("cuda") else "cpu"

  def run():
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=amp):
      logits = forward(x).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if kind == "cuda":
      torch.cuda.synchronize()

  return _compiled_first_step(torch, model, run, variant)


# Torch rows' variant suffixes: `compile` wraps the model in torch.compile (inductor, nanoGPT's
# train.py default; the compile seconds are the first step's, which traces forward and backward);
# `fusedadam` / `foreachadam` pick torch's fused or multi-tensor Adam(W) kernels, which torch
# does not choose by default on a CPU (its default there is the per-tensor for-loop).
TORCH_VARIANTS = ("compile", "fusedadam", "foreachadam", "keepfreed", "freedoff")
# The torch frameworks: transformers' GPT2LMHeadModel, and the nanoGPT-style model
# (experiments/nanogpt_torch.py). "vs best torch f32" pairs each row with the fastest f32 row of
# either, round by round.
TORCH_FRAMEWORKS = ("torch", "nanogpt")


def _optimizer_kwargs(variant) -> dict:
  """torch.optim keyword arguments for a torch row's optimizer variant (none: torch's default)."""
  return ({"fused": True} if "fusedadam" in variant
          else {"foreach": True} if "foreachadam" in variant else {})


def _compiled_first_step(torch, model, run, variant):
  """(compile seconds (wall, CPU) or None, run): with `compile` in variant the model is wrapped in
  torch.compile by the caller and the first step, which compiles, is run and timed here."""
  if "compile" not in variant:
    return None, run
  t0, c0 = time.perf_counter(), time.process_time()
  run()
  return (time.perf_counter() - t0, time.process_time() - c0), run


def nanogpt_runner(torch, shape, dtype: str, seed: int = 0, train=None, variant=()):
  """(compile seconds or None, step()) for the nanoGPT-style model (experiments/nanogpt_torch.py) at
  `shape`: nanoGPT's configure_optimizers (AdamW, decay on matrices only; weight decay 0 for the
  Adam configs), eager or torch.compile'd (`compile` in variant), bf16 rows under autocast."""
  from experiments import nanogpt_torch

  L, D, H, T, B = shape
  torch.manual_seed(seed)
  model = nanogpt_torch.GPT(VOCAB, T, D, H, L).train()
  t = train_section("") if train is None else train
  wd = float(t.weight_decay) if t.optimizer == "adamw" else 0.0
  kwargs = _optimizer_kwargs(variant)
  opt = nanogpt_torch.configure_optimizer(model, t.learning_rate, (float(t.b1), float(t.b2)),
                                          float(t.eps), wd, fused=kwargs.get("fused"))
  if kwargs.get("foreach"):
    for group in opt.param_groups:
      group["foreach"] = True
  forward = torch.compile(model) if "compile" in variant else model
  batch = torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (B, T + 1)))
  x, y = batch[:, :-1], batch[:, 1:]
  amp = dtype == "bfloat16"

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
      _, loss = forward(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)

  return _compiled_first_step(torch, model, run, variant)


# Torch rows' settings that a process reads when it starts, so the row runs in a child process of
# its own (stepped by this one, round-robin with the others, timed here): `proc` alone is torch as a
# user runs it, glibc's allocator untouched (in this process the torch rows share jax's one-arena
# setup with mmap toggled back on, host_memory.glibc_defaults); `jemalloc` / `tcmalloc` preload
# those allocators (torch's CPU performance guide suggests either); `thp` sets torch's
# THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for its large blocks).
_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
CHILD_ENV = {"proc": {}, "jemalloc": {"LD_PRELOAD": str(_LIBDIR / "libjemalloc.so.2")},
             "tcmalloc": {"LD_PRELOAD": str(_LIBDIR / "libtcmalloc_minimal.so.4")},
             "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


class ChildRow:
  """A torch row stepped in a child process: call it for one step. The child is this script with
  `--child=IMPL --shape=NAME`; it answers each "step" line on stdin with "done" on stdout."""

  def __init__(self, impl: str, shape_name: str, env: dict):
    missing = [v for v in env.values() if v.endswith(".so.2") or v.endswith(".so.4")]
    missing = [v for v in missing if not Path(v).exists()]
    if missing:  # not an error of the benchmark: the allocator is not installed
      raise FileNotFoundError(f"{impl}: {missing[0]} is not installed (apt-get install "
                              "libjemalloc2 libtcmalloc-minimal4)")
    self.impl = impl
    self.proc = subprocess.Popen(
        [sys.executable, __file__, f"--child={impl}", f"--shape={shape_name}"],
        env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.compile_s = json.loads(self._read("ready ")[len("ready "):])

  def _read(self, prefix: str) -> str:
    """The child's next line starting with `prefix` (libraries may print lines of their own)."""
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line.strip()
    raise RuntimeError(f"{self.impl}: the child process exited ({self.proc.wait()})")

  def close(self) -> None:
    """Ends the child (its stdin closes; it exits) and waits for it."""
    self.proc.stdin.close()
    self.proc.wait()

  def __call__(self):
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    self._read("done")


def make_row(torch, impl: str, shape, train):
  """(compile seconds or None, step()) for the torch row named `impl` (framework-dtype[-variant...],
  e.g. nanogpt-bf16-compile) at `shape` with the optimizer of `train`, in this process."""
  framework, dt, *variant = impl.split("-")
  make = nanogpt_runner if framework == "nanogpt" else torch_runner
  dtype = {"f32": "float32", "bf16": "bfloat16"}[dt]
  return make(torch, shape, dtype, train=train, variant=variant)


def child_main(impl: str, shape_name: str) -> None:
  """The child side of ChildRow: builds the torch row `impl` and steps it on each stdin line."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  if "keepfreed" in impl.split("-"):
    host_memory.keep_freed_memory()
  compile_s, run = make_row(torch, impl, SHAPES[shape_name], train_section(shape_name))
  print("ready " + json.dumps(compile_s), flush=True)
  for _ in sys.stdin:
    run()
    print("done", flush=True)


def best_torch(times: dict, dtypes=("f32",)) -> list:
  """[(step seconds, row name)] per round: the fastest torch-framework row of that round whose dtype
  is one of `dtypes` (transformers or nanoGPT-style, any variant), or [] when there is none."""
  names = [i for i in times if i.split("-")[0] in TORCH_FRAMEWORKS and i.split("-")[1] in dtypes]
  if not names:
    return []
  return [min((times[n][r], n) for n in names) for r in range(len(times[names[0]]))]


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="a ChildRow's process (bench_train.py starts it)")
  parser.add_argument("--child", required=True, help="a torch row name, e.g. torch-f32-tcmalloc")
  parser.add_argument("--shape", required=True, help=f"one of {sorted(SHAPES)}")
  args = parser.parse_args()
  child_main(args.child, args.shape)
