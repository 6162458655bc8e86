"""Where a TPU compile's time goes: one compile-mode program under one variant, lower and compile
timed apart (BENCHMARKS.md, "Where the compile time goes").

  JAX_PLATFORMS=cpu python experiments/compile_variants.py base train,eval
  JAX_PLATFORMS=cpu python experiments/compile_variants.py jax_exec_time_optimization_effort=-1
  JAX_PLATFORMS=cpu python experiments/compile_variants.py cfg.train.optimizer=sgd

The program is the done-when command's (configs/1542m.py on v5e:4x4, fsdp=16, batch 32 x 1024,
remat=full, bf16), built by gpt.compile.Planner as compile mode builds it. A variant is `base`, a
jax config flag (`jax_<name>=<value>`), a config override (`cfg.<section>.<key>=<value>`), or an
XLA compile option (`<name>=<value>`), joined with `+`. Run each variant in its own process, so no
cache is shared. Prints CPU seconds (user + system of the process; what compares on a loaded
machine), wall seconds, the load average and the compiler's memory figures, which a speed trick
must leave unchanged.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def config_for(variant: str):
  """The done-when config with `variant`'s overrides applied; returns (config, compile options)."""
  from experiments.sweep_spec import load_config

  c = load_config(str(Path(__file__).resolve().parent.parent / "configs/1542m.py"))
  c.model.dtype, c.model.remat = "bfloat16", "full"
  c.train.batch_size, c.train.seq_len = 32, 1024
  c.mesh.fsdp, c.mesh.topology = 16, "v5e:4x4"
  options = {}
  for item in variant.split("+"):
    if item == "base":
      continue
    key, value = item.split("=", 1)
    if key.startswith("cfg."):
      section, name = key[4:].split(".")
      old = c[section][name]
      c[section][name] = (value == "true") if isinstance(old, bool) else type(old)(value)
    elif key.startswith("jax_"):
      try:
        jax.config.update(key, float(value))
      except (TypeError, ValueError):
        jax.config.update(key, value)
    else:
      options[key] = value
  return c, options


def main() -> None:
  variant = sys.argv[1] if len(sys.argv) > 1 else "base"
  programs = sys.argv[2].split(",") if len(sys.argv) > 2 else ["train"]
  from gpt import compile as aot
  from gpt.chips import devices_for

  config, options = config_for(variant)
  planner = aot.Planner(config, devices_for("v5e:4x4"), "v5e:4x4")
  for program in programs:
    t0, w0 = cpu(), time.time()
    # The lowering compile mode does (train/eval: build_programs; decode: the sampler's loop).
    [job] = planner.lower(planner.configured(), [program])
    lowered = job.lowered
    t1, w1 = cpu(), time.time()
    try:
      ma = lowered.compile(compiler_options=options or None).memory_analysis()
      mem = (f"arguments {ma.argument_size_in_bytes} temporaries {ma.temp_size_in_bytes} "
             f"code {ma.generated_code_size_in_bytes}")
    except Exception as e:  # noqa: BLE001 - an out-of-memory compile is a result too
      mem = str(e).splitlines()[0][:200]
    t2, w2 = cpu(), time.time()
    print(f"[{variant}] {program}: lower {t1 - t0:.1f} s CPU ({w1 - w0:.1f} s wall); compile "
          f"{t2 - t1:.1f} s CPU ({w2 - w1:.1f} s wall); {mem}; load {os.getloadavg()[0]:.1f}",
          flush=True)


if __name__ == "__main__":
  main()
