"""Why torch's train step varies run to run here, and which settings give it its best, steadiest speed.

  python experiments/torch_faults.py                               # 30m, every setting, 3 rounds
  python experiments/torch_faults.py --shape=chapter --settings=default,thp --rounds=3
  python experiments/torch_faults.py --impl=nanogpt-f32 --steps=4

bench_train's torch rows measured 855 and 714 tokens/s on the 30m shape in one session and 320-561
in the next, with ~3M minor page faults and 12-24 s of system time per run, while the jax row
stayed within 10%. torch's CPU allocator (c10's alloc_cpu) takes every tensor straight from
malloc (posix_memalign) and frees it at once: glibc serves blocks above its mmap threshold with
mmap and returns them with munmap, so the step's large activations and gradients come back as
fresh 4 KB pages each step, one fault and one page-zeroing each, and a VM that pages memory out
behind the process's back (this one runs a DAMON pageout scheme) makes that cost vary.

Allocator and threading settings are read when a process starts (LD_PRELOAD, torch's
THP_MEM_ALLOC_ENABLE, OpenMP's wait policy), so each (setting, round) is a fresh process running
bench_train's torch row: a warm-up step, then `--steps` steps, each with its wall time, minor page
faults and system/user CPU seconds (getrusage of the whole process). Settings are interleaved
round by round so the machine's load drifts over all of them alike; the table reports, per
setting, the medians over rounds of each round's per-step medians, and the tokens/s spread.

Settings (each on top of bench_train's OMP_WAIT_POLICY=PASSIVE unless it sets the policy):
  default    glibc malloc, as users run torch (bench_train's torch rows)
  ompactive  OMP_WAIT_POLICY=ACTIVE (threads spin between parallel regions)
  ompunset   no OMP_WAIT_POLICY (libgomp's default: spin a while, then sleep)
  thp        THP_MEM_ALLOC_ENABLE=1: torch asks for transparent huge pages on large blocks
  jemalloc   LD_PRELOAD=libjemalloc.so.2 (torch's docs' performance guide suggests it)
  tcmalloc   LD_PRELOAD=libtcmalloc_minimal.so.4 (idem)
  keepfreed  gpt.host_memory.keep_freed_memory(): glibc keeps freed memory (bench_train's
             `keepfreed` rows)
  mmapoff    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=... glibc's own env knobs:
             no mmap for large blocks, no trimming (what a user can set without code)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
# name -> environment changes (None: remove the variable)
SETTINGS = {
    "default": {},
    "ompactive": {"OMP_WAIT_POLICY": "ACTIVE"},
    "ompunset": {"OMP_WAIT_POLICY": None},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "jemalloc": {"LD_PRELOAD": str(LIBDIR / "libjemalloc.so.2")},
    "tcmalloc": {"LD_PRELOAD": str(LIBDIR / "libtcmalloc_minimal.so.4")},
    "keepfreed": {"GPT_TORCH_FAULTS_KEEPFREED": "1"},
    "mmapoff": {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                "MALLOC_TOP_PAD_": str(64 << 20)},
}


def worker(impl: str, shape_name: str, steps: int) -> None:
  """Runs one torch row in this process and prints one JSON line of per-step measurements."""
  if os.environ.get("GPT_TORCH_FAULTS_KEEPFREED") == "1":
    from gpt import host_memory
    host_memory.keep_freed_memory()  # before torch starts its threads
  sys.path.insert(0, str(ROOT))
  from experiments import torch_peers
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  _, run = torch_peers.make_row(torch, impl, torch_peers.SHAPES[shape_name],
                                torch_peers.train_section(shape_name))
  run()  # warm-up (and compile, for -compile rows)
  rows = []
  for _ in range(steps):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    rows.append([wall, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime,
                 r1.ru_utime - r0.ru_utime])
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps({"steps": rows, "maxrss_mb": maxrss}), flush=True)


def run_setting(setting: str, impl: str, shape: str, steps: int) -> dict:
  """One fresh process for `setting`; its per-step medians (or an error line)."""
  env = dict(os.environ)
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # bench_train's default for its torch rows
  for key, value in SETTINGS[setting].items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, __file__, "--worker", f"--impl={impl}", f"--shape={shape}",
         f"--steps={steps}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
  if line is None:
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
  data = json.loads(line[len("RESULT "):])
  med = [statistics.median(r[k] for r in data["steps"]) for k in range(4)]
  return {"wall": med[0], "minflt": med[1], "sys": med[2], "user": med[3],
          "maxrss_mb": data["maxrss_mb"], "load": os.getloadavg()[0]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--impl", default="torch-f32", help="a bench_train torch row name")
  parser.add_argument("--shape", default="30m")
  parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
  args = parser.parse_args()
  if args.worker:
    return worker(args.impl, args.shape, args.steps)
  sys.path.insert(0, str(ROOT))
  from experiments import machine
  from experiments.train_shapes import SHAPES
  L, D, H, T, B = SHAPES[args.shape]
  settings = args.settings.split(",")
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown:
    sys.exit(f"error: unknown settings {unknown}; choose from {list(SETTINGS)}")
  print(f"{machine.cpu_model()}; {os.cpu_count()} cores; {machine.vector_flags()}; "
        f"Python {platform.python_version()}; load average {machine.load_average()}")
  print(f"{args.impl} at {args.shape}; {args.rounds} rounds x {len(settings)} settings, "
        f"{args.steps} timed steps per process, interleaved", flush=True)
  results = {s: [] for s in settings}
  for r in range(args.rounds):
    for s in settings:
      res = run_setting(s, args.impl, args.shape, args.steps)
      results[s].append(res)
      desc = res.get("error") or (f"{B * T / res['wall']:.0f} tok/s, {res['minflt']:.0f} faults, "
                                  f"sys {res['sys']:.2f} s, user {res['user']:.2f} s, "
                                  f"load {res['load']:.1f}")
      print(f"round {r} {s}: {desc}", flush=True)
  print("\n| setting | faults/step | sys s/step | user s/step | tok/s median | tok/s min-max "
        "| peak RSS MB | load |")
  print("|---|---|---|---|---|---|---|---|")
  for s, rs in results.items():
    ok = [x for x in rs if "error" not in x]
    if not ok:
      print(f"| {s} | error: {rs[0]['error']} | | | | | | |")
      continue
    med = lambda k: statistics.median(x[k] for x in ok)
    toks = [B * T / x["wall"] for x in ok]
    print(f"| {s} | {med('minflt'):.0f} | {med('sys'):.2f} | {med('user'):.2f} | "
          f"{statistics.median(toks):.0f} | {min(toks):.0f}-{max(toks):.0f} | "
          f"{med('maxrss_mb'):.0f} | {min(x['load'] for x in ok):.1f}-{max(x['load'] for x in ok):.1f} |")


if __name__ == "__main__":
  main()
