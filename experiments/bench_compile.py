"""Compile mode's tables for the four GPT-2 sizes on v5e and v4 slices (BENCHMARKS.md, "Will it fit?").

  python experiments/bench_compile.py                 # every case below
  python experiments/bench_compile.py --cases=0,3     # some of them

Each case is what `python -m gpt.main --config=<config> --config.mode=compile` does with the
overrides shown (train step only), run in this one process so libtpu loads once. Prints a Markdown
row per case as it finishes, with the compile's wall and CPU seconds (the machine's CPU and load
average are printed first: compile time is CPU-bound and scales with the load).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from experiments.machine import cpu_model, load_average  # noqa: E402

# (config file, topology, overrides): a fitting setting per size and chip, and one that does not fit.
CASES = [
    ("configs/124m.py", "v5e:2x2", dict(batch_size=16, fsdp=1, remat="none")),
    ("configs/355m.py", "v5e:2x2", dict(batch_size=16, fsdp=4, remat="full")),
    ("configs/774m.py", "v5e:4x4", dict(batch_size=32, fsdp=16, remat="full")),
    ("configs/1542m.py", "v5e:4x4", dict(batch_size=32, fsdp=16, remat="full")),
    ("configs/1542m.py", "v5e:4x4", dict(batch_size=32, fsdp=16, remat="none")),
    ("configs/124m.py", "v4:2x2x1", dict(batch_size=16, fsdp=1, remat="none")),
    ("configs/355m.py", "v4:2x2x1", dict(batch_size=16, fsdp=4, remat="dots")),
    ("configs/355m.py", "v4:2x2x1", dict(batch_size=16, fsdp=4, remat="full")),
    ("configs/774m.py", "v4:2x2x2", dict(batch_size=32, fsdp=8, remat="full")),
    ("configs/1542m.py", "v4:2x2x4", dict(batch_size=32, fsdp=16, remat="full")),
]

_CASES = flags.DEFINE_string("cases", "", "Comma-separated case indices (default: all).")


def case_config(path: str, topology: str, o: dict):
  from experiments.sweep_spec import load_config

  c = load_config(path)
  c.model.dtype, c.model.remat = "bfloat16", o["remat"]
  c.train.batch_size, c.train.seq_len = o["batch_size"], 1024
  c.mesh.fsdp, c.mesh.topology = o["fsdp"], topology
  return c


def command(path: str, topology: str, o: dict) -> str:
  return (f"python -m gpt.main --config={path} --config.mode=compile --config.mesh.topology={topology} "
          f"--config.mesh.fsdp={o['fsdp']} --config.train.batch_size={o['batch_size']} "
          f"--config.train.seq_len=1024 --config.model.remat={o['remat']} --config.model.dtype=bfloat16")


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv: list[str]) -> None:
  del argv
  from gpt import compile as aot
  from gpt.chips import devices_for
  from gpt.compile_tables import human_bytes, human_rate

  print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average at start {load_average()}")
  picked = [int(i) for i in _CASES.value.split(",")] if _CASES.value else range(len(CASES))
  print("| model | slice | mesh | batch | remat | params+opt/chip | temporaries/chip | total/chip "
        "| HBM | fits | est. tokens/s (50% MFU) | compile wall | compile CPU | load |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for i in picked:
    path, topology, o = CASES[i]
    config = case_config(path, topology, o)
    planner = aot.Planner(config, devices_for(topology), topology)
    wall, cpu = time.perf_counter(), cpu_seconds()
    row = planner.compile(planner.configured(), ("train",))[0]
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    pc, mesh = row["per_chip"], row["mesh"]
    total = pc.get("total") or row.get("oom", {}).get("needed")
    print(f"| {row['model']['params'] / 1e6:.0f}M | {topology} ({row['chips']} chips, {row['hosts']} "
          f"host{'s' if row['hosts'] > 1 else ''}) | data={mesh['data']} fsdp={mesh['fsdp']} "
          f"| {o['batch_size']} x 1024 | {o['remat']} | {human_bytes(pc['params'] + pc['opt_state'])} "
          f"| {human_bytes(pc.get('temporaries'))} | {human_bytes(total)}"
          f"{'' if 'total' in pc else ' (compiler: OOM)'} | {human_bytes(row['hbm'])} "
          f"| {'yes' if row['fits'] else 'no'} | {human_rate(row['tokens_per_s'])} | {wall:.0f} s "
          f"| {cpu:.0f} s | {os.getloadavg()[0]:.1f} |", flush=True)
  print("\ncommands (one per row):")
  for i in picked:
    print("  " + command(*CASES[i]))


if __name__ == "__main__":
  app.run(main)
