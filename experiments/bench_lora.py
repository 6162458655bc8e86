"""LoRA vs full fine-tuning: what a step keeps in memory, and how fast a step runs.

  python experiments/bench_lora.py                      # all three parts (a few minutes on 2 cores)
  python experiments/bench_lora.py --parts=state        # only the jax.eval_shape table (seconds)
  python experiments/bench_lora.py --parts=speed --rounds=5

Parts:
  state  for every released size, full fine-tuning vs LoRA (rank 8 on c_attn by default): trainable
         parameters, optimizer-state bytes (Adam, float32), and the training state (trainable
         params + optimizer state: what a step updates and a checkpoint stores) -- all from
         jax.eval_shape, nothing allocated. Plus XLA's own peak estimate for one 1558M step
         (compiled, never run: arguments + outputs + temporaries - donated aliases), without and
         with rematerialisation (model.remat=full).
  rss    measured peak resident memory (VmHWM) of a subprocess that builds and runs 2 steps, full
         vs LoRA, for --rss_size (default 124M; 1558M needs ~25 GB for the full step).
  speed  tokens/s of a LoRA step vs a full step for 117M on this CPU, the two measured round-robin
         (--rounds rounds of --steps timed steps each) so load hits both alike; the ratio is the
         median over rounds of the paired ratio.

A LoRA step still runs the whole backward pass through the frozen weights (the adapters of layer l
need dL/dx of every layer above l), so it saves the weight gradients (dW = x^T dy: one of the three
matmuls per layer and pass) and the optimizer update over all weights, not the activation work.
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

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.machine import cpu_model, load_average, vector_flags  # noqa: E402

VOCAB = 50257


def train_settings(lora_rank: int, targets: str):
  """config.train for the benchmark: AdamW with clipping, as the chapter's fine-tune plus decay."""
  from gpt.config import base_config

  t = base_config().train
  t.update(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1, grad_clip=1.0,
           lora_rank=lora_rank, lora_targets=targets)
  return t


def model_cfg(size: str, seq: int = 1024):
  from gpt.config import MODEL_SIZES, canonical_model_name
  from gpt.model import GPTConfig

  L, D, H = MODEL_SIZES[canonical_model_name(size)]
  return GPTConfig(n_vocab=VOCAB, n_ctx=max(seq, 1024), n_embd=D, n_head=H, n_layer=L)


def abstract_parts(cfg, t):
  """(graphdef, trainable, frozen, tx) for a run: frozen is {} for full fine-tuning."""
  from flax import nnx

  from gpt import lora, optim
  from gpt.model import abstract_model

  settings = lora.settings(t)
  if settings:
    cfg = lora.with_adapters(cfg, settings)
  model = abstract_model(cfg)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  trainable, frozen = lora.split(params) if settings else (params, {})
  return nnx.graphdef(model), trainable, frozen, optim.make_optimizer(t, trainable)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def state_table(sizes, rank: int, targets: str) -> None:
  from gpt.train_step import create_state

  print(f"## training state, full fine-tuning vs LoRA rank {rank} on {targets} (jax.eval_shape, "
        f"float32, AdamW)\n")
  print("| model | run | trainable params | optimizer state | training state (params + opt) | "
        "frozen weights | + gradients = resident before activations | state vs full |")
  print("|---|---|---|---|---|---|---|---|")
  for size in sizes:
    cfg = model_cfg(size)
    full_state = None
    for name, t in (("full", train_settings(0, targets)), ("LoRA", train_settings(rank, targets))):
      _, trainable, frozen, tx = abstract_parts(cfg, t)
      state = jax.eval_shape(lambda p: create_state(p, tx, 0), trainable)
      opt, params = nbytes(state.opt_state), nbytes(trainable)
      train_state = opt + params
      full_state = full_state or train_state
      resident = train_state + nbytes(frozen) + params  # + one gradient per trainable parameter
      print(f"| {size} | {name} | {count(trainable):,} | {opt / 2**20:,.1f} MiB | "
            f"{train_state / 2**20:,.1f} MiB | {nbytes(frozen) / 2**30:.2f} GiB | "
            f"{resident / 2**30:.2f} GiB | {100 * train_state / full_state:.2f}% |")
  print()


def xla_peak(size: str, rank: int, targets: str, seq: int, batch: int) -> None:
  """XLA's memory analysis of one compiled (never run) train step, full vs LoRA."""
  from gpt import optim
  from gpt.train_step import create_state, train_step

  print(f"## XLA's peak estimate for one {size} train step (batch {batch} x {seq} tokens, "
        f"compiled for CPU, not run)\n")
  print("| run | arguments | temporaries | peak (args + outputs + temps - donated) | compile s |")
  print("|---|---|---|---|---|")
  runs = (("full", 0, "none"), ("LoRA", rank, "none"), ("full, remat=full", 0, "full"),
          ("LoRA, remat=full", rank, "full"))
  for name, r, remat in runs:
    t = train_settings(r, targets)
    graphdef, trainable, frozen, tx = abstract_parts(model_cfg(size, seq).replace(remat=remat), t)
    state = jax.eval_shape(lambda p: create_state(p, tx, 0), trainable)
    batch_abs = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    fn = jax.jit(lambda s, b, f: train_step(
        s, b, f, graphdef=graphdef, tx=tx, schedule=optim.learning_rate_schedule(t), grad_accum=1,
        noise=0.0, dropout=False), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch_abs, frozen).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    print(f"| {name} | {m.argument_size_in_bytes / 2**30:.2f} GiB | {m.temp_size_in_bytes / 2**30:.2f} GiB"
          f" | {peak / 2**30:.2f} GiB | {seconds:.0f} |")
  print()


RSS_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from experiments.bench_lora import make_step
run = make_step(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
run(); run()
status = open("/proc/self/status").read().split("\n")
hwm = next(l for l in status if l.startswith("VmHWM")).split()[1]
print(json.dumps({"vmhwm_kib": int(hwm)}))
"""


def rss_table(size: str, rank: int, targets: str, seq: int, batch: int) -> None:
  print(f"## measured peak RSS (VmHWM) of a process that initialises {size} and runs 2 train steps "
        f"(batch {batch} x {seq})\n")
  print("| run | peak RSS |")
  print("|---|---|")
  root = str(Path(__file__).resolve().parent.parent)
  for name, r in (("full", 0), ("LoRA", rank)):
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, root, size, str(r), targets, str(seq),
                          str(batch)], capture_output=True, text=True, check=False)
    if out.returncode:
      print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode} |")
      continue
    kib = json.loads(out.stdout.strip().splitlines()[-1])["vmhwm_kib"]
    print(f"| {name} | {kib / 2**20:.2f} GiB |")
  print()


def make_step(size: str, rank: int, targets: str, seq: int, batch: int):
  """A callable running one jitted train step (state kept between calls) of `size` with LoRA
  `rank` (0 = full fine-tuning) on a randomly initialised base."""
  from flax import nnx

  from gpt import lora, optim
  from gpt.model import abstract_model, init_model
  from gpt.train_step import create_state, jit_train_step

  cfg = model_cfg(size, seq)
  t = train_settings(rank, targets)
  settings = lora.settings(t)
  base = nnx.to_pure_dict(nnx.state(init_model(cfg, 0), nnx.Param))
  if settings:
    cfg = lora.with_adapters(cfg, settings)
    trainable, frozen = lora.init_adapters(cfg, 0), base
  else:
    trainable, frozen = base, {}
  graphdef = nnx.graphdef(abstract_model(cfg))
  tx = optim.make_optimizer(t, trainable)
  dev = jax.devices()[0]
  rep = jax.sharding.SingleDeviceSharding(dev)
  state = create_state(trainable, tx, 0)
  step = jit_train_step(graphdef, tx, optim.learning_rate_schedule(t), grad_accum=1, noise=0.0,
                        dropout=False, state_sharding=jax.tree.map(lambda _: rep, state),
                        batch_sharding=rep, micro_sharding=None, scalar_sharding=rep,
                        frozen_sharding=jax.tree.map(lambda _: rep, frozen))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)), jnp.int32)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], tokens, frozen)
    metrics["loss"].block_until_ready()

  return run


def speed_table(size: str, rank: int, targets: str, seq: int, batch: int, rounds: int,
                steps: int) -> None:
  runners = {}
  for name, r in (("full", 0), (f"LoRA r{rank} {targets}", rank)):
    run = make_step(size, r, targets, seq, batch)
    t0 = time.perf_counter()
    run()  # compile + first step
    runners[name] = (time.perf_counter() - t0, run)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, (_, run) in runners.items():
      samples = []
      for _ in range(steps):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
      times[name].append(min(samples))
  print(f"## step speed, {size} (batch {batch} x {seq}), {rounds} rounds x {steps} steps, interleaved\n")
  print("| run | compile + first step s | step ms (median of rounds) | tokens/s | vs full (paired) |")
  print("|---|---|---|---|---|")
  full = times["full"]
  for name, ts in times.items():
    step_s = statistics.median(ts)
    rel = statistics.median(f / x for f, x in zip(full, ts))
    print(f"| {name} | {runners[name][0]:.1f} | {1e3 * step_s:.0f} | {batch * seq / step_s:.0f} | "
          f"{rel:.2f}x |")
  print()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="state,rss,speed")
  parser.add_argument("--sizes", default="124M,355M,774M,1558M")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--targets", default="c_attn")
  parser.add_argument("--peak_size", default="1558M", help="'' skips the compiled peak estimate")
  parser.add_argument("--peak_seq", type=int, default=1024)
  parser.add_argument("--rss_size", default="124M")
  parser.add_argument("--rss_seq", type=int, default=256)
  parser.add_argument("--speed_size", default="124M")
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  parts = args.parts.split(",")
  print(f"machine: {cpu_model()} ({vector_flags()}), {os.cpu_count()} cores; jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average at start {load_average()}")
  print(f"command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}\n")
  if "state" in parts:
    state_table(args.sizes.split(","), args.rank, args.targets)
    if args.peak_size:
      xla_peak(args.peak_size, args.rank, args.targets, args.peak_seq, 1)
  if "rss" in parts:
    rss_table(args.rss_size, args.rank, args.targets, args.rss_seq, 1)
  if "speed" in parts:
    speed_table(args.speed_size, args.rank, args.targets, args.seq, args.batch, args.rounds,
                args.steps)
  print(f"load average at end: {load_average()}")


if __name__ == "__main__":
  main()
