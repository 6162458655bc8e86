"""Decode speed: new tokens/s of gpt's sampler beside Hugging Face generate() and the roofline.

  python experiments/bench_decode.py                    # 117M, batch 1 and 8, float32, bfloat16, int8
  python experiments/bench_decode.py --dtype=int8,int8a8 --batch=1,8 --ct2=int8   # int8 activations too
  python experiments/bench_decode.py --model=1542M --new=256 --batch=1,8
  python experiments/bench_decode.py --profile          # + where one decode step spends its time
  python experiments/bench_decode.py --einsum_attention # + the decoder without decode_attention
  python experiments/bench_decode.py --small_pages      # + ours with its weights on 4 KB pages
  python experiments/bench_decode.py --fused            # + ours with the fused gemv calls
  python experiments/bench_decode.py --ab GPT_GEMV_BF16DOT=0 --ab GPT_GEMV_THREADS=1  # + ours under each

Random weights (speed does not depend on them). Weights "int8" are model.quantize=int8 (gpt.quantize:
int8 weights with per-output scales, float32 activations) beside CTranslate2's int8 column; "int8a8"
adds model.int8_activations (each activation row quantized to int8 too, multiplied on AVX-512 VNNI:
what CTranslate2's int8 does); "int8a16" adds model.int16_activations (float activations quantized
per row to int16 from gemv.a16_min_rows() rows, multiplied with VNNI's vpdpwssd).
Every configuration samples `--new` tokens (top-k 40) after a one-token prompt, timed end to end (prefill + decode loop), after one untimed warm-up
run that compiles. Columns:
  ours         gpt.sample.Generator: gpt.sampling's while_loop over the model prepared for
               decoding (gpt.decoding.prepare_for_decoding: per-layer weights and cache, laid out by
               row for gpt.kernels.gemv where it runs)
  matmuls      only the weight matmuls of each step (see MatmulsOnly), as the prepared model
               runs them (gemv where it wins, else XLA): the matmul ceiling
  ours einsum  (--einsum_attention) "ours" traced with GPT_DECODE_ATTENTION=0: the attention over
               the cache as XLA's einsum formulation instead of gpt.kernels.decode_attention's
               one call per layer (the same-run A/B of that kernel)
  ours 4k      (--small_pages) "ours" on its own copy of the weights with GPT_GEMV_HUGEPAGES=0 at
               every call: gpt.kernels.gemv never advises them onto 2 MB pages (the same-run A/B
               of that advice)
  ours fused   (--fused) "ours" traced with GPT_GEMV_FUSE=1: each block's tail (attn c_proj, ln_2,
               MLP) as one gemv.layer_tail call, where "ours" (the default) makes every matrix its own
               gemv call with XLA's residual, LayerNorm and GELU between (int8 weights; the A/B)
  ours mlp     (--fused) the same with GPT_GEMV_FUSE=mlp: only the MLP as one call (gemv.mlp)
  ours N=V     (--ab N=V, repeatable) "ours" on its own weights with the environment variable N set
               to V while it is traced and at every call (a kernel switch read per call or at
               trace time, e.g. GPT_GEMV_BF16DOT=0: bf16 activations through the widening loop
               instead of vdpbf16ps; GPT_GEMV_THREADS=1; GPT_DECODE_ATTENTION=0): the same-run A/B
  GPT.decode   the same sampler over the unprepared model (lax.scan over the stacked layers)
  HF           transformers GPT2LMHeadModel.generate(do_sample=True, top_k=40), PyTorch, KV cache
               (skipped with a note when torch/transformers are not installed: pip install .[hf])
  CT2 <type>   CTranslate2's Generator (generate_batch, sampling_topk=40, exactly `--new` tokens) on
               the same weights exported to Hugging Face form and converted by its converter, one
               column per `--ct2` compute type (float32, int8, ...; skipped with a note when
               ctranslate2 is not installed: pip install .[bench])
  roofline     batch / (bytes read per step / bandwidth): every weight once per step plus each
               row's filled KV cache (averaged over the run), at two measured bandwidths: "copy"
               (best of a numpy copy and an XLA in-place update, read + write bytes counted, as the
               issue defines it) and "read" (best of an XLA sum and numpy and XLA matrix-vector
               products: kernels that only read, like a decode step).
The runners behind the columns are experiments/decode_runners.py's. All methods run round-robin in every repeat, so machine load hits them alike; the table gives the
median over repeats (best in brackets).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import machine, xla_trace  # noqa: E402
from gpt import host_memory  # noqa: E402

if "--profile" in sys.argv:  # per-op trace events must be switched on before XLA starts
  xla_trace.enable_op_events()

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax
import jax.numpy as jnp
import numpy as np

from experiments.decode_runners import (CTranslate2, HuggingFace, MatmulsOnly, Ours, UnderEnv,
                                        ct2_available, fused, hf_available, on_small_pages,
                                        without_decode_attention)
from gpt import sample
from gpt.config import MODEL_SIZES, canonical_model_name
from gpt.model import GPTConfig


def measure_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
  """Bytes moved per second by memory-bound kernels, best of 5.

  "copy": read + write counted (what the issue's roofline uses). "read": kernels that only read,
  matrix-vector products among them (what a batch-1 decode step is).
  """
  n = nbytes // 4
  a, b = np.ones(n, np.float32), np.empty(n, np.float32)
  x = jnp.ones(n, jnp.float32)
  mat = np.random.default_rng(0).standard_normal((n // 4 // 768, 768), np.float32)
  vec = np.ones(768, np.float32)
  jmat, jvec = jnp.asarray(mat), jnp.asarray(vec)
  bump = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  total, matvec = jax.jit(jnp.sum), jax.jit(jnp.matmul)
  held = [bump(x)]  # the in-place update donates its input: keep the newest buffer here

  def add_in_place():
    held[0] = bump(held[0])
    held[0].block_until_ready()

  total(held[0]).block_until_ready()
  matvec(jmat, jvec).block_until_ready()
  kernels = {
      "copy: numpy copy (1 thread)": (lambda: np.copyto(b, a), 2 * a.nbytes),
      "copy: XLA in-place add": (add_in_place, 2 * a.nbytes),
      "read: XLA sum": (lambda: total(held[0]).block_until_ready(), a.nbytes),
      "read: numpy matvec": (lambda: mat @ vec, mat.nbytes),
      "read: XLA matvec": (lambda: matvec(jmat, jvec).block_until_ready(), mat.nbytes),
  }
  try:
    import torch
    tmat, tvec = torch.from_numpy(mat), torch.from_numpy(vec)
    kernels["read: torch matvec"] = (lambda: tmat @ tvec, mat.nbytes)
  except ImportError:
    pass
  best = dict.fromkeys(kernels, 0.0)
  for _ in range(5):
    for name, (run, moved) in kernels.items():
      start = time.perf_counter()
      run()
      best[name] = max(best[name], moved / (time.perf_counter() - start))
  return best


def roofline(cfg: GPTConfig, batch: int, new: int, bandwidth: float) -> float:
  """Tokens/s if each step only had to read every weight once and each row's filled cache."""
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  weights = (cfg.num_params() - cfg.n_ctx * cfg.n_embd) * itemsize  # wpe: one row per step
  if cfg.quantize == "int8":  # the matrices at 1 byte (biases, LayerNorms, scales are ~1%)
    weights = (cfg.num_params() - cfg.n_ctx * cfg.n_embd) * 1
  mean_filled = 1 + (new - 1) / 2
  cache = 2 * cfg.n_layer * mean_filled * cfg.n_embd * itemsize * batch
  return batch * bandwidth / (weights + cache)


def profile_step(runner: Ours, top: int = 10) -> None:
  """Prints where one generate call spends its time, by XLA op kind and by instruction."""
  runner()
  wall, totals = xla_trace.traced_op_times(runner)
  state = runner.decoder.start(runner.params, runner.prompt, np.ones_like(runner.prompt, bool),
                               jax.random.key(0), cache_length=runner.cache_length,
                               max_new=sample.bucket(runner.new))
  text = runner.decoder.lower_advance(runner.params, state).compile().as_text()
  hlo = xla_trace.hlo_summaries(text)
  steps = runner.new
  print(f"\nWall {1e3 * wall / steps:.1f} ms per token; XLA op time "
        f"{sum(totals.values()) / 1e6 / steps:.1f} ms per token (ops on the 2 threads overlap).")
  xla_trace.print_breakdown(totals, hlo, per=steps, unit="ms/token", top=top)
  # The FFI calls by kernel (gemv's matmuls, decode_attention's attention), which "ffi_call" lumps.
  targets = dict(re.findall(r'%([\w.-]+) = .*?custom_call_target="(\w+)"', text))
  by_target = collections.Counter()
  for name, ns in totals.items():
    if name in targets:
      by_target[targets[name]] += ns
  print("By custom-call target:")
  for target, ns in by_target.most_common():
    print(f"  {ns / 1e6 / steps:8.2f} ms/token  {target}")


def main():
  # As gpt.main does (train-alloc, session 7), before jax starts its backend (not at import, which
  # the tests do); GPT_KEEP_FREED_MEMORY=0 turns it off.
  host_memory.keep_freed_memory()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="117M", help="released size whose shape to use")
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--dtype", default="float32,bfloat16,int8",
                      help="weights and compute dtype; int8 = int8 weights, float32 compute; "
                      "int8a8 = int8 weights and int8 activations (model.int8_activations); "
                      "int8a16 = int8 weights, activations int16 from gemv.a16_min_rows() rows (model.int16_activations)")
  parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_model_decode", action="store_true", help="skip the GPT.decode column")
  parser.add_argument("--profile", action="store_true", help="trace one run of each config")
  parser.add_argument("--no_hf", action="store_true", help="skip the Hugging Face column")
  parser.add_argument("--einsum_attention", action="store_true",
                      help="add 'ours einsum': ours without the decode-attention kernel")
  parser.add_argument("--small_pages", action="store_true",
                      help="add 'ours 4k': ours with gemv's 2 MB-page advice off (GPT_GEMV_HUGEPAGES=0)")
  parser.add_argument("--fused", action="store_true",
                      help="add 'ours fused' and 'ours mlp': ours with a block's tail or its MLP as "
                      "one gemv call (GPT_GEMV_FUSE=1, mlp)")
  parser.add_argument("--ab", action="append", default=[], metavar="NAME=VALUE",
                      help="add 'ours NAME=VALUE': ours with that environment variable set (repeatable)")
  parser.add_argument("--ct2", default="float32,int8",
                      help="CTranslate2 compute types, one column each ('' = none)")
  args = parser.parse_args()

  n_layer, n_embd, n_head = MODEL_SIZES[canonical_model_name(args.model)]
  skip_hf = "HF column skipped: --no_hf" if args.no_hf else hf_available()
  ct2_types = [t for t in args.ct2.split(",") if t]
  skip_ct2 = ct2_available() if ct2_types else None
  if ct2_types and (skip_ct2 or hf_available()):  # its converter needs transformers too
    skip_ct2, ct2_types = skip_ct2 or "CTranslate2 columns skipped: its converter needs [hf]", []
  bandwidth = measure_bandwidth()
  copy_bw = max(v for k, v in bandwidth.items() if k.startswith("copy"))
  read_bw = max(v for k, v in bandwidth.items() if k.startswith("read"))
  configs = [(d, int(b)) for d in args.dtype.split(",") for b in args.batch.split(",")]
  runners = {}
  for dtype, batch in configs:
    int8 = dtype in ("int8", "int8a8", "int8a16")
    float_dtype = "float32" if int8 else dtype
    cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, dtype=float_dtype,
                    param_dtype=float_dtype, quantize="int8" if int8 else "none",
                    int8_activations=dtype == "int8a8", int16_activations=dtype == "int8a16")
    methods = {"ours": Ours(cfg, batch, args.new), "matmuls": MatmulsOnly(cfg, batch, args.new)}
    if args.einsum_attention:
      methods["ours einsum"] = without_decode_attention(Ours(cfg, batch, args.new))
    if args.small_pages:
      methods["ours 4k"] = on_small_pages(Ours(cfg, batch, args.new))
    if args.fused:
      methods["ours fused"] = fused(Ours(cfg, batch, args.new))
      methods["ours mlp"] = fused(Ours(cfg, batch, args.new), "mlp")
    for ab in args.ab:
      name, value = ab.split("=", 1)
      methods[f"ours {ab}"] = UnderEnv(Ours(cfg, batch, args.new), name, value, every_call=True)
    if not args.no_model_decode:
      methods["GPT.decode"] = Ours(cfg, batch, args.new, model_decode=True)
    if not skip_hf:
      methods["HF"] = HuggingFace(cfg, batch, args.new)
    for compute_type in ct2_types:
      methods[f"CT2 {compute_type}"] = CTranslate2(cfg, batch, args.new, compute_type)
    for name, run in methods.items():  # warm-up: compile, and check the shapes
      expected = (batch, 1, n_embd) if name == "matmuls" else (batch, args.new)
      assert run().shape == expected, name
    runners[(dtype, batch)] = (cfg, methods)
    print(f"ready: {dtype} batch {batch}", file=sys.stderr, flush=True)

  times = {(key, name): [] for key, (_, methods) in runners.items() for name in methods}
  for repeat in range(args.repeats):
    for key, (_, methods) in runners.items():
      order = list(methods) if repeat % 2 == 0 else list(methods)[::-1]
      for name in order:
        start = time.perf_counter()
        methods[name]()
        times[(key, name)].append(time.perf_counter() - start)

  names = ["ours", "matmuls"] + (["ours einsum"] if args.einsum_attention else []) + (["ours 4k"] if args.small_pages else []) + (["ours fused", "ours mlp"] if args.fused else []) + [f"ours {ab}" for ab in args.ab] + ([] if args.no_model_decode else ["GPT.decode"]) + ([] if skip_hf else ["HF"])
  names += [f"CT2 {t}" for t in ct2_types]
  rate = lambda key, name: [key[1] * args.new / t for t in times[(key, name)]]
  print(f"\n{args.model} architecture, {args.new} new tokens after a 1-token prompt, top-k 40, "
        f"median of {args.repeats} (best). Device: {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, {machine.cpu_model()} ({machine.vector_flags()}); load average "
        f"{machine.load_average()}.")
  print("Bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidth.items()) +
        f". Rooflines use the best copy ({copy_bw / 1e9:.1f} GB/s) and the best read-only kernel "
        f"({read_bw / 1e9:.1f} GB/s).\n")
  head = " | ".join(f"{n} tok/s" for n in names)
  print(f"| weights | batch | {head} | roofline (copy) | ours / roofline (copy) | roofline (read) | "
        f"ours / roofline (read) |" + (" ours / HF |" if not skip_hf else "")
        + "".join(f" ours / CT2 {t} |" for t in ct2_types)
        + (" ours / ours einsum |" if args.einsum_attention else "")
        + (" ours / ours 4k |" if args.small_pages else "")
        + (" ours / ours fused | ours / ours mlp |" if args.fused else "")
        + "".join(f" ours / ours {ab} |" for ab in args.ab))
  print("|---|---|" + "---|" * (len(names) + 4 + (not skip_hf) + len(ct2_types) + args.einsum_attention
                              + args.small_pages + 2 * args.fused + len(args.ab)))
  for key, (cfg, _) in runners.items():
    cells = [f"{statistics.median(rate(key, n)):.1f} ({max(rate(key, n)):.1f})" for n in names]
    ours = statistics.median(rate(key, "ours"))
    line = f"| {key[0]} | {key[1]} | " + " | ".join(cells)
    for bw in (copy_bw, read_bw):
      top = roofline(cfg, key[1], args.new, bw)
      line += f" | {top:.1f} | {100 * ours / top:.0f}%"
    line += " |"
    if not skip_hf:
      line += f" {ours / statistics.median(rate(key, 'HF')):.2f}x |"
    for t in ct2_types:
      line += f" {ours / statistics.median(rate(key, f'CT2 {t}')):.2f}x |"
    if args.einsum_attention:
      line += f" {ours / statistics.median(rate(key, 'ours einsum')):.2f}x |"
    if args.small_pages:
      line += f" {ours / statistics.median(rate(key, 'ours 4k')):.2f}x |"
    if args.fused:
      line += f" {ours / statistics.median(rate(key, 'ours fused')):.2f}x |"
      line += f" {ours / statistics.median(rate(key, 'ours mlp')):.2f}x |"
    for ab in args.ab:
      line += f" {ours / statistics.median(rate(key, f'ours {ab}')):.2f}x |"
    print(line)
  for note in (skip_hf, skip_ct2):
    if note:
      print(f"\n{note}")
  if args.profile:
    for key, (_, methods) in runners.items():
      print(f"\n## {key[0]} batch {key[1]}: ours")
      profile_step(methods["ours"])


if __name__ == "__main__":
  main()
