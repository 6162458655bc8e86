"""Training throughput: gpt's jitted train step beside a PyTorch reference, in one process.

  python experiments/bench_train.py                       # the chapter's 117M step, then 30M
  python experiments/bench_train.py --shapes=30m,tiny --rounds=5
  python experiments/bench_train.py --shapes=117m --rounds=3
  python experiments/bench_train.py --profile              # + where a jax step spends its time
  XLA_FLAGS=--xla_cpu_use_onednn=true python experiments/bench_train.py --shapes=30m

Every row is one (shape, implementation) pair doing the same work per step: forward, backward,
global-norm clipping at 1.0 and an AdamW update on a GPT-2 with a tied LM head and the GPT-2
vocabulary (50257). The `chapter` shape is the job the README's one command runs
(configs/117m.py: 117M, context 1024, batch 1, Adam at 2e-5 without weight decay, clipping at 1.0),
so both frameworks use that optimizer there. gpt runs the train mode's own program
(gpt.train.build_programs) on a one-device mesh; the peers (experiments/torch_peers.py) are
transformers' GPT2LMHeadModel with torch.optim's Adam/AdamW in eager mode (bf16 rows under
torch.autocast); `nanogpt-*` rows are a second torch peer written as nanoGPT's model.py
(experiments/nanogpt_torch.py: fused SDPA attention, nanoGPT's AdamW setup), and `-compile` rows
run either under torch.compile. Rows are measured round-robin (`--rounds` rounds of `--steps` timed steps each)
so a shared machine's load hits every row alike; the table reports the median step time, and
"vs torch f32" is the median over rounds of (torch f32 step time / this row's step time) measured
in the same round; "vs best torch f32" pairs each row, round by round, with the fastest float32
torch row (any torch or nanogpt variant) of that round, and "vs best torch" with the fastest torch
row of any dtype (bf16 autocast rows included: issue 14's "best dtype against torch's best"); the
lines under the table name them.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token from GPTConfig.flops_per_token
(6 x parameters + 12 x layers x context x width, the LM head included) and peak = the best
matmul rate measured in this process (a 2048^3 matmul, in JAX and in torch; the larger) in the
dtype the row's matmuls run in: bfloat16's for bf16 rows and `mmbf16` rows (bf16 products under
float32 activations, as torch's autocast), float32's for the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import machine, xla_trace  # noqa: E402
from experiments.torch_peers import (CHILD_ENV, TORCH_FRAMEWORKS, ChildRow,  # noqa: E402
                                     best_torch, make_row)
from experiments.train_shapes import SHAPES, VOCAB, train_section  # noqa: E402
from gpt import host_memory  # noqa: E402

# torch's OpenMP threads busy-wait by default; on a machine shared with other jobs that makes the
# reference several times slower than it can be (measured: 203 -> 341 tokens/s on the 30m shape),
# so the reference runs with passive waiting unless the caller says otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "--profile" in sys.argv:  # per-op trace events must be switched on before XLA starts
  xla_trace.enable_op_events()

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def matmul_peak_jax(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  return 2 * n ** 3 / min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))


def matmul_peak_torch(torch, dtype, n: int = 2048, reps: int = 5) -> float:
  a = torch.ones((n, n), dtype=dtype)
  a @ a
  return 2 * n ** 3 / min(_timed(lambda: a @ a) for _ in range(reps))


def _timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# Compiler options per variant suffix: `eigen` turns off XLA:CPU's default YNNPACK dot fusions,
# so dots run on XLA's Eigen-based kernels; `ynndot` keeps YNNPACK for dots only (reductions go to
# XLA's own loop emitter); `onednn` turns on XLA:CPU's oneDNN rewrites.
VARIANT_OPTIONS = {"eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
                   "ynndot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
                   "onednn": {"xla_cpu_use_onednn": True}}
# Model fields per variant suffix: the attention formulation (model.attention_impl; the default is
# GPTConfig's, "auto": the fused CPU kernel on one CPU device; `attnblocked` pins blocked), the output layer's loss (model.output_loss), rematerialisation and the
# matmuls (model.matmul: the default "auto" is MKL's sgemm where installed; `xladot` keeps XLA's), to
# compare training-speed routes side by side.
VARIANT_FIELDS = {"attnxla": {"attention_impl": "xla"}, "attnblocked": {"attention_impl": "blocked"},
                  "logitsloss": {"output_loss": "logits"}, "fusedloss": {"output_loss": "fused"},
                  "rematdots": {"remat": "dots"},
                  "xladot": {"matmul": "xla"}, "mkl": {"matmul": "mkl"},
                  "rematfull": {"remat": "full"},
                  # train-bf16, session 9: the products' inputs in bfloat16, f32 accumulation
                  # (model.matmul_dtype=bfloat16; on a jax-f32 row: torch autocast's recipe)
                  "mmbf16": {"matmul_dtype": "bfloat16"}}
# Train fields per variant suffix (jax rows): `held` freezes all but the blocks
# (train.only_train_transformer_layers: the step differentiates `h` alone, session 8).
VARIANT_TRAIN = {"held": {"only_train_transformer_layers": True}}


# Module switches per variant suffix, set while the step is traced: `recomputeprobs` makes the
# blocked attention's backward recompute its probabilities instead of keeping them from the forward.
# `nokernel` keeps the blocked formulation where training would resolve "auto" to the fused CPU
# attention kernel (gpt.kernels.attention.USE_KERNEL).
VARIANT_SWITCHES = {"recomputeprobs": ("gpt.attention", "SAVE_PROBABILITIES", False),
                    "geluxla": ("gpt.layers", "GELU_IN_MATMUL", False),
                    "nokernel": ("gpt.kernels.attention", "USE_KERNEL", False),
                    # train-attn, session 10: the mixed mode's attention kernel with float32
                    # products (its bf16 products are on where the CPU has AVX512-BF16)
                    "attnf32": ("gpt.kernels.attention", "BF16_PRODUCTS", False),
                    # train-attn, session 10: the float32 kernel's 64x64 tiles at every length
                    # (its default takes 128x64 from LONG_QUERIES queries on)
                    "attn64": ("gpt.kernels.attention", "LONG_QUERIES", 1 << 30),
                    # the one-pass loss's session-5 route (MKL's vsExp) instead of its AVX-512 exp
                    "xentvml": ("gpt.kernels.gemm", "XENT_PORTABLE", True),
                    # optax's own clip_by_global_norm (a clipped copy of every gradient)
                    "optaxclip": ("gpt.optim", "SCALAR_CLIP", False),
                    # train-adam, session 7: optax's Adam update where "auto" takes the one-pass kernel
                    "optaxadam": ("gpt.kernels.adam", "USE_KERNEL", False),
                    # train-layers, session 6: LayerNorm of a one-row batch over [1, T, D] as before (not [T, D])
                    "ln3d": ("gpt.layers", "LN_FLAT", False),
                    # train-fuse, session 8: XLA's LayerNorm where the one-pass kernel would run
                    "lnxla": ("gpt.kernels.layernorm", "USE_KERNEL", False),
                    # train-fuse, session 8: the MLP's bias + GELU backward in XLA (gemm.gelu_matmul)
                    # where the one-pass kernel (gpt.kernels.gelu) would run
                    "geluxlabwd": ("gpt.kernels.gelu", "USE_KERNEL", False),
                    # train-scan, session 8: two layers per iteration of the rolled layer scan
                    "unroll2": ("gpt.model", "SCAN_UNROLL", 2),
                    # the lead, session 8: made opt-in by the quiet retake
                    "gelukernel": ("gpt.kernels.gelu", "USE_KERNEL", True),
                    # train-bf16, session 9: model.dtype=bfloat16's products by gpt.matmul's
                    # bf16_matmul (all three bf16 x bf16 -> f32) instead of JAX's transpose of the
                    # einsum (the backward's products f32 or mixed), the default
                    "bf16vjp": ("gpt.matmul", "BF16_VJP", True),
                    # train-head, session 10: the bf16 head whose loss pass writes bf16 dlogits and
                    # their transpose (gpt.output_loss._bf16_head), instead of bf16_matmul around the
                    # float32 pass (XLA rounds dlogits and gathers their transpose), the default
                    "bf16head": ("gpt.output_loss", "BF16_HEAD", True),
                    # train-head, session 10: the bf16 head's dh and d(wte) products at once (XLA's
                    # choice), not one after the other (the default)
                    "headpar": ("gpt.output_loss", "SEQUENTIAL", False),
                    # the lead, session 10: bf16_matmul saves the forward's bf16 copy of the weight
                    # for its backward (a stacked residual under the layer scan) instead of the weight
                    "bf16wres": ("gpt.matmul", "ROUND_W_AGAIN", False),
                    # the lead, session 11: the float32 route's products by MKL's sgemm or by
                    # XLA's dot whatever the CPU (gemm.PRODUCTS "auto": MKL on Intel only)
                    "mklprod": ("gpt.kernels.gemm", "PRODUCTS", "mkl"),
                    "xlaprod": ("gpt.kernels.gemm", "PRODUCTS", "xla"),
                    # mixed-transposes, session 11: the mixed MLP c_proj's backward by XLA (a tanh
                    # fusion, a gather of the rounded gelu(h)^T) instead of gelu.cc's one pass
                    "gelutxla": ("gpt.matmul", "GELU_T_KERNEL", False),
                    # mixed-transposes, session 11: the head's bf16 dlogits and their transpose by
                    # XLA's convert and gather instead of transpose.cc's one pass
                    "dytxla": ("gpt.matmul", "DY_T_KERNEL", False),
                    # mixed-transposes, session 11: the layers' bf16_matmul keeps x^T made in the
                    # forward by transpose.cc's pass, not x (then gathered in the backward)
                    "xtfwd": ("gpt.matmul", "X_T_FORWARD", True)}


def train_program(shape, dtype: str, scan: bool, seed: int = 0, train=None, abstract: bool = False,
                  **model_fields):
  """(jitted step, state, batch, frozen) of gpt's train step at `shape` on one device: the program
  the train mode runs (gpt.train.build_programs), on a one-device mesh; call step(state, batch, frozen).

  `train` is the config's train section (default: train_section("")); `model_fields` go to
  GPTConfig (e.g. remat, or the attention kernel on a GPU). With `abstract`, state and batch are
  ShapeDtypeStructs: the step can be compiled (and its memory analysed) with nothing allocated.
  """
  from flax import nnx
  from gpt import sharding
  from gpt.config import base_config
  from gpt.model import GPTConfig, init_model
  from gpt.train import build_programs
  from gpt.train_step import create_state

  L, D, H, T, B = shape
  cfg = GPTConfig(n_vocab=VOCAB, n_ctx=T, n_embd=D, n_head=H, n_layer=L, dtype=dtype,
                  scan_layers=scan, **model_fields)
  config = base_config()
  config.seed = seed
  config.train = train_section("") if train is None else train
  config.mesh.data = 1
  programs = build_programs(config, cfg, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  if abstract:
    state = programs.abstract_state
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=programs.batch_sharding)
  else:
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed), nnx.Param))
    state = jax.device_put(create_state(params, programs.tx, seed), programs.state_sharding)
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (B, T + 1))
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), programs.batch_sharding)
  return programs.train_step, state, batch, programs.abstract_frozen


def jax_runner(shape, dtype: str, scan: bool, seed: int = 0, options: dict | None = None,
               train=None, switches=(), **model_fields):
  """(compile seconds, step()) for gpt's train step at `shape`, compiled with XLA `options`,
  traced with the module `switches` (VARIANT_SWITCHES values) set (other arguments as train_program)."""
  import importlib
  saved = []
  for module, name, value in switches:
    module = importlib.import_module(module)
    saved.append((module, name, getattr(module, name)))
    setattr(module, name, value)
  try:  # switches also hold while the programs are built (`nokernel` acts where training resolves)
    step, state, batch, frozen = train_program(shape, dtype, scan, seed, train, **model_fields)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch, frozen)
  finally:
    for module, name, value in saved:
      setattr(module, name, value)
  compiled = lowered.compile(compiler_options=options or None)
  compile_s = (time.perf_counter() - t0, time.process_time() - c0)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, frozen)
    metrics["loss"].block_until_ready()

  run.hlo_text = compiled.as_text  # for --profile
  return compile_s, run



def _under_glibc_defaults(run):
  """`run` with host_memory.glibc_defaults() around each call (keeps run.hlo_text)."""
  def wrapped():
    with host_memory.glibc_defaults():
      run()
  wrapped.hlo_text = getattr(run, "hlo_text", None)
  return wrapped



def profile_step(run, top: int = 30) -> None:
  """Prints where one jitted step spends its time: by XLA op kind and by instruction."""
  run()
  wall, totals = xla_trace.traced_op_times(run)
  print(f"\nOne step: wall {1e3 * wall:.0f} ms, XLA op time {sum(totals.values()) / 1e6:.0f} ms.")
  xla_trace.print_breakdown(totals, xla_trace.hlo_summaries(run.hlo_text()), top=top)


def main() -> None:
  # As gpt.main does, before jax starts its backend (train-alloc, session 7): the jax rows reuse
  # their temp buffer's pages. `freedoff` rows, and the torch rows (as users run torch), run under
  # glibc's defaults (host_memory.glibc_defaults) unless a torch row says `keepfreed`. Here, not at
  # import, so that the tests importing this module leave their process's allocator alone.
  host_memory.keep_freed_memory()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="chapter,30m", help=f"comma list of {sorted(SHAPES)}")
  # The torch peers at their best beside the plain reference (torch-peers, session 8): tcmalloc
  # preloaded (torch's CPU guide; ~5x fewer page faults per step here), the nanoGPT-style model
  # eager and under torch.compile (nanoGPT's default); torch-f32 stays as "vs torch f32"'s row.
  parser.add_argument("--impls", default="jax-f32-scan,jax-f32-unrolled,jax-f32-scan-eigen,"
                      "jax-bf16-scan,torch-f32,torch-f32-tcmalloc,nanogpt-f32,nanogpt-f32-compile,"
                      "torch-bf16",
                      help="framework-dtype[-scan|-unrolled][-eigen|-ynndot|-onednn][-attnxla|-recomputeprobs|-nokernel][-attnf32][-attn64][-geluxla][-geluxlabwd][-ln3d][-lnxla][-logitsloss|-fusedloss][-xentvml][-optaxclip][-optaxadam][-gelukernel][-unroll2][-bf16wres]"
                      "[-rematdots|-rematfull][-xladot|-mkl][-mmbf16][-bf16vjp][-bf16head][-headpar][-gelutxla][-dytxla][-xtfwd][-freedoff|-keepfreed][-held] names; torch rows: "
                      "torch|nanogpt-f32|bf16[-compile][-fusedadam|-foreachadam][-keepfreed]"
                      "[-proc|-jemalloc|-tcmalloc|-thp: in a process of its own]")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
  parser.add_argument("--times-json", default="",
                      help="also write every round's step time per (shape, implementation) here "
                      "(JSON), for paired ratios between any two rows")
  parser.add_argument("--profile", action="store_true",
                      help="afterwards, trace one step of each shape's first jax row")
  args = parser.parse_args()
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None

  peaks = {"jax f32": matmul_peak_jax(jnp.float32), "jax bf16": matmul_peak_jax(jnp.bfloat16)}
  if torch is not None:
    peaks["torch f32"] = matmul_peak_torch(torch, torch.float32)
    peaks["torch bf16"] = matmul_peak_torch(torch, torch.bfloat16)
  peak = {"f32": max(peaks["jax f32"], peaks.get("torch f32", 0.0)),
          "bf16": max(peaks["jax bf16"], peaks.get("torch bf16", 0.0))}

  rows, profiles, bests, all_times = [], [], [], {}
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    runners, missing = {}, []
    for impl in args.impls.split(","):
      framework, dt, *variant = impl.split("-")
      dtype = {"f32": "float32", "bf16": "bfloat16"}[dt]
      if framework in TORCH_FRAMEWORKS and torch is None:
        missing.append((impl, "torch not installed"))
        continue
      options, fields, switches = {}, {}, []
      for v in variant:
        options.update(VARIANT_OPTIONS.get(v, {}))
        fields.update(VARIANT_FIELDS.get(v, {}))
        switches += [VARIANT_SWITCHES[v]] if v in VARIANT_SWITCHES else []
      train = train_section(name)
      for v in variant:
        train.update(VARIANT_TRAIN.get(v, {}))
      if framework == "jax":
        runners[impl] = jax_runner(shape, dtype, scan="scan" in variant, options=options,
                                   train=train, switches=switches, **fields)
      elif any(v in CHILD_ENV for v in variant):  # settings read at a process's start
        env = {k: x for v in variant for k, x in CHILD_ENV.get(v, {}).items()}
        try:
          child = ChildRow(impl, name, env)
        except FileNotFoundError as e:  # e.g. tcmalloc not installed: the row is skipped, said so
          missing.append((impl, str(e)))
          continue
        runners[impl] = (child.compile_s, child)
        continue
      else:  # torch rows run (and compile) under glibc's defaults unless they say keepfreed
        if "keepfreed" in variant:
          runners[impl] = make_row(torch, impl, shape, train)
        else:
          with host_memory.glibc_defaults():
            runners[impl] = make_row(torch, impl, shape, train)
      if "freedoff" in variant or (framework in TORCH_FRAMEWORKS and "keepfreed" not in variant):
        runners[impl] = (runners[impl][0], _under_glibc_defaults(runners[impl][1]))
    for _, run in runners.values():  # warm-up step
      run()
    times = {impl: [] for impl in runners}
    for _ in range(args.rounds):
      for impl, (_, run) in runners.items():
        times[impl].append(min(_timed(run) for _ in range(args.steps)))
    for _, run in runners.values():  # child processes hold memory the next shape needs
      if isinstance(run, ChildRow):
        run.close()
    from gpt.model import GPTConfig
    L, D, H, T, B = shape
    flops = GPTConfig(n_vocab=VOCAB, n_ctx=T, n_embd=D, n_head=H, n_layer=L).flops_per_token(T)
    ref = times.get("torch-f32")
    best = best_torch(times)
    best_any = best_torch(times, ("f32", "bf16"))
    for impl, ts in times.items():
      step_s = statistics.median(ts)
      tok_s = B * T / step_s
      # Paired: each round's torch time over this row's time in the same round, then the median,
      # so load that drifts between rounds cancels out.
      rel = statistics.median(r / t for r, t in zip(ref, ts)) if ref else None
      rel_best = [statistics.median(b / t for (b, _), t in zip(bt, ts)) if bt else None
                  for bt in (best, best_any)]
      # A `held` row does not differentiate the embeddings (train.only_train_transformer_layers):
      # the tied head's d(wte) product, 2 x width x vocab FLOPs per token, is not in its step.
      row_flops = flops - 2 * D * VOCAB if "held" in impl.split("-") else flops
      _, dt, *variant = impl.split("-")
      row_peak = peak["bf16" if dt == "bf16" or "mmbf16" in variant else "f32"]
      rows.append((name, impl, runners[impl][0], step_s, tok_s, tok_s * row_flops / row_peak, rel,
                   row_flops, rel_best))
    for label, bt in (("f32", best), ("any dtype", best_any)):
      winners = [w for _, w in bt]
      if winners:
        bests.append(f"{name}, {label}: " + ", ".join(f"{w} {winners.count(w)}/{len(winners)}"
                                                       for w in dict.fromkeys(winners)))
    for impl, why in missing:
      rows.append((name, impl, why, None, None, None, None, flops, [None, None]))
    all_times[name] = times
    if args.profile:
      first = next((i for i in runners if i.startswith("jax")), None)
      if first:
        profiles.append((name, first, runners[first][1]))

  print(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores ({machine.vector_flags()}); "
        f"jax {jax.__version__}" + (f", torch {torch.__version__}" if torch else ", torch n/a")
        + f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}; host memory: "
        f"{'freed memory kept' if host_memory.applied() else 'glibc defaults'}; load average {os.getloadavg()[0]:.1f}")
  print("matmul peaks (2048^3, GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
        + f"; MFU uses {peak['f32'] / 1e9:.0f} (f32 rows), {peak['bf16'] / 1e9:.0f} (bf16 products)")
  print()
  print("| shape (L x D, ctx, batch) | implementation | compile s (CPU s) | step ms | tokens/s | MFU "
        "| vs torch f32 | vs best torch f32 | vs best torch |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, impl, comp, step_s, tok_s, mfu, rel, flops, rel_best in rows:
    L, D, H, T, B = SHAPES[name]
    label = f"{name} ({L} x {D}, {T}, {B}; {flops / 1e6:.0f} MFLOP/token)"
    if step_s is None:
      print(f"| {label} | {impl} | | n/a ({comp}) | | | | | |")
      continue
    comp_s = f"{comp[0]:.1f} ({comp[1]:.1f})" if comp else "-"
    print(f"| {label} | {impl} | {comp_s} | {1e3 * step_s:.0f} | {tok_s:.0f} | {100 * mfu:.0f}% | "
          f"{'' if rel is None else f'{rel:.2f}x'} | "
          + " | ".join('' if r is None else f'{r:.2f}x' for r in rel_best) + " |")
  if bests:  # which torch row was the fastest, in how many rounds
    print("\nbest torch row per round: " + "; ".join(bests))

  if args.times_json:
    import json
    Path(args.times_json).write_text(json.dumps({"load": os.getloadavg(), "times": all_times}))

  for name, impl, run in profiles:
    print(f"\n## profile: {name}, {impl}")
    profile_step(run)


if __name__ == "__main__":
  main()
