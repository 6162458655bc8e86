"""The optimizer update alone: gpt.kernels.adam's one pass beside optax's chain as XLA compiles it.

  python experiments/bench_adam.py                          # 30m and the chapter's 117M trees
  python experiments/bench_adam.py --shapes=30m --rounds=9

One call is what a training step does after its gradients exist: clipping by the global norm, then
Adam's (chapter: configs/117m.py's Adam, no decay) or AdamW's (30m: bench_train's AdamW 0.1)
update and its application, over the parameter tree of the model shape (blocks stacked under the
layer scan, as training has them), p, m and v donated as in the train step. "optax" is
gpt.optim.make_optimizer's transformation with optax's update and apply_updates; "kernel" is its
FusedOptimizer.apply (gpt.kernels.adam). Calls alternate between the two so the machine's load hits
both alike; the table gives the median (best in brackets) and GB/s counting the kernel's minimum
traffic (read p, g, m, v, write p, m, v: 28 bytes per parameter) for both columns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench_train import SHAPES, VOCAB, train_section  # noqa: E402
from machine import cpu_model, load_average, vector_flags  # noqa: E402


def parameter_tree(shape) -> dict:
  """Random float32 parameters shaped as gpt's model of `shape` (layers stacked)."""
  from flax import nnx
  from gpt.model import GPTConfig, abstract_model

  L, D, H, T, _ = shape
  cfg = GPTConfig(n_vocab=VOCAB, n_ctx=T, n_embd=D, n_head=H, n_layer=L, scan_layers=True)
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02),
                      abstract)


def runners(shape_name: str, params: dict) -> dict:
  """name -> run(): one donated update of its own copy of the state, per variant."""
  from gpt import optim

  t = train_section(shape_name)
  ref = optim.make_optimizer(t, params)
  fused = optim.make_optimizer(t, params, devices=jax.devices()[:1])
  assert isinstance(fused, optim.FusedOptimizer), "the adam kernel did not resolve here"
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 1e-3),
                       params)

  def optax_update(p, s, g):
    u, s = ref.update(g, s, p)
    return optax.apply_updates(p, u), s

  out = {}
  for name, fn, tx in (("optax", optax_update, ref),
                       ("kernel", lambda p, s, g: fused.apply(g, s, p), fused)):
    step = jax.jit(fn, donate_argnums=(0, 1))
    holder = [jax.tree.map(jnp.copy, params), tx.init(params)]

    def run(step=step, holder=holder):
      holder[0], holder[1] = step(holder[0], holder[1], grads)
      jax.block_until_ready(holder[0])

    run()  # compile
    out[name] = run
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="30m,chapter", help=f"comma list of {sorted(SHAPES)}")
  parser.add_argument("--rounds", type=int, default=7, help="timed calls per variant")
  args = parser.parse_args()
  print(f"CPU: {cpu_model()} ({vector_flags()}); {jax.device_count()} device(s)")
  print(f"command: python experiments/bench_adam.py --shapes={args.shapes} --rounds={args.rounds}")
  print(f"load average at start: {load_average()}")
  print("| shape | parameters | optax ms | kernel ms | optax GB/s | kernel GB/s | optax / kernel |")
  print("|---|---|---|---|---|---|---|")
  for shape_name in args.shapes.split(","):
    params = parameter_tree(SHAPES[shape_name])
    n = sum(x.size for x in jax.tree.leaves(params))
    run = runners(shape_name, params)
    times = {k: [] for k in run}
    for _ in range(args.rounds):
      for name, fn in run.items():  # interleaved
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    gbs = {k: 28 * n / med[k] / 1e9 for k in med}
    print(f"| {shape_name} | {n / 1e6:.1f}M | {med['optax'] * 1e3:.1f} ({best['optax'] * 1e3:.1f}) | "
          f"{med['kernel'] * 1e3:.1f} ({best['kernel'] * 1e3:.1f}) | {gbs['optax']:.1f} | "
          f"{gbs['kernel']:.1f} | {med['optax'] / med['kernel']:.2f}x |", flush=True)
    del run, params
  print(f"load average at end: {load_average()}")


if __name__ == "__main__":
  main()
