"""Chaos benchmark: kill -9 a tiny training N times at random moments, then compare bit for bit.

  python experiments/chaos_train.py --kills=20
  python experiments/chaos_train.py --kills=2 --steps=30 --save_every=3   # a quick check

One uninterrupted run, then the same run killed with SIGKILL `--kills` times and restarted with the
same command after each kill, until it finishes. Each kill picks its moment at random among:
  startup   a random time after the process starts (import, compile, restore),
  training  a random number of steps into the life, plus a random fraction of a step,
  saving    while a checkpoint is being written (its temporary folder exists).
Afterwards the final parameters are compared with the uninterrupted run's (bit for bit: the goal
is a difference of exactly 0.0), and metrics.jsonl is checked for steps logged twice.

A kill is survived when the next life starts from the newest checkpoint that was complete on disk
at the moment of the kill (a later one, cut short, does not count: orbax never finalized it) and the
run finishes. A checkpoint is lost when a life starts from an older one than that, or reports a
damaged one. The model is configs/tiny.py shrunk to 2 layers x 64 wide, vocab 512, on a synthetic
token file, so a life is dominated by start-up (imports and a cached compile).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: import this checkout's gpt, as the runs do
  sys.path.insert(0, str(REPO))

from experiments.machine import cpu_model, load_average  # noqa: E402

VOCAB = 512
RESUMED = re.compile(r"resumed from checkpoint step (\d+)")


def write_tokens(path: Path, n: int = 20_000, seed: int = 0) -> None:
  """A learnable synthetic token file (next = 5 * prev + 3 mod VOCAB, 10% noise)."""
  import numpy as np

  from gpt import encode

  rng = np.random.default_rng(seed)
  tokens = np.empty(n, np.uint16)
  tokens[0] = 1
  noise, rand = rng.random(n) < 0.1, rng.integers(0, VOCAB, n)
  for i in range(1, n):
    tokens[i] = rand[i] if noise[i] else (5 * int(tokens[i - 1]) + 3) % VOCAB
  encode.write_tokens([encode.Piece(tokens)], path, eot_id=50256)


def command(args, workdir: Path, tokens: Path) -> list[str]:
  return [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.model.n_vocab={VOCAB}", "--config.model.n_embd=64", "--config.model.n_layer=2",
          "--config.model.n_head=4", "--config.model.n_ctx=64", "--config.train.seq_len=32",
          "--config.train.batch_size=8", f"--config.train.steps={args.steps}",
          f"--config.train.save_every={args.save_every}", f"--config.train.keep={args.keep}",
          "--config.train.warmup_steps=5", "--config.train.log_every=1",
          "--config.train.val_every=0", "--config.train.sample_every=0",
          "--config.train.peak_flops=1e12", f"--config.data.path={tokens}",
          f"--config.data.cache_dir={tokens.parent / 'cache'}"]


def environment(root: Path) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  return env


def logged_steps(workdir: Path) -> list[int]:
  """Train steps in metrics.jsonl, in file order (a line being written is skipped)."""
  try:
    text = (workdir / "metrics.jsonl").read_text()
  except OSError:
    return []
  out = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get("split") == "train":
      out.append(int(row["step"]))
  return out


def finalized_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def saving(workdir: Path) -> bool:
  folder = workdir / "checkpoints"
  try:
    return any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir())
  except OSError:
    return False


def straight_run(args, workdir: Path, tokens: Path, env: dict) -> tuple[float, float]:
  """Runs to the end; returns (seconds to the first logged step, seconds per step after it)."""
  start = time.time()
  with open(workdir.parent / "straight.log", "w") as log:
    proc = subprocess.Popen(command(args, workdir, tokens), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    first = None
    while proc.poll() is None:
      if first is None and logged_steps(workdir):
        first = time.time()
      time.sleep(0.01)
  if proc.returncode != 0:
    raise SystemExit(f"the uninterrupted run failed (rc {proc.returncode}); see "
                     f"{workdir.parent / 'straight.log'}")
  end = time.time()
  first = first or end
  return first - start, (end - first) / max(1, args.steps - 1)


def life_progress(workdir: Path, since: float) -> int | None:
  """The last train step this life has logged, or None before its first (rows in the file from
  earlier lives do not count: the file has not been touched since `since`)."""
  try:
    if (workdir / "metrics.jsonl").stat().st_mtime < since:
      return None
  except OSError:
    return None
  steps = logged_steps(workdir)
  return steps[-1] if steps else None


def kill_once(proc: subprocess.Popen, workdir: Path, mode: str, rng: random.Random,
              startup: list[float], step_time: float, target: int) -> bool:
  """Waits for the moment `mode` picks and SIGKILLs `proc`; False if it finished first.
  `startup` holds the start-up times seen so far (time to a life's first step), newest last: the
  first is the uninterrupted run's, with a cold compile; later lives hit the compile cache.

  startup: a uniform time in [0, startup); training: once this life logged step `target`, plus a
  uniform fraction of a step; saving: at the first checkpoint write after this life's first step."""
  born = time.time()
  first_step = []

  def alive() -> bool:
    return proc.poll() is None

  def progress() -> int | None:
    step = life_progress(workdir, born)
    if step is not None and not first_step:
      first_step.append(time.time() - born)
    return step

  if mode == "startup":
    deadline = born + rng.uniform(0, startup[-1])
    while alive() and time.time() < deadline:
      time.sleep(0.005)
  elif mode == "training":
    while alive() and (progress() or 0) < target:
      time.sleep(0.002)
    time.sleep(rng.uniform(0, step_time))
  else:
    while alive() and (progress() is None or not saving(workdir)):
      time.sleep(0.001)
  startup.extend(first_step)
  if not alive():
    return False
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True


def params_of(workdir: Path):
  import jax
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # orbax's read-only notices

  from gpt.checkpoint import load_params
  from gpt.model import GPTConfig

  cfg = GPTConfig(n_vocab=VOCAB, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
  return jax.tree.leaves(jax.device_get(load_params(workdir, cfg)))


def chaos(args) -> dict:
  """Runs the benchmark; returns its numbers."""
  import numpy as np

  rng = random.Random(args.seed)
  root = Path(args.root or tempfile.mkdtemp(prefix="chaos_train_"))
  root.mkdir(parents=True, exist_ok=True)
  tokens = root / "tokens.bin"
  if not tokens.exists():
    write_tokens(tokens)
  env = environment(root)
  started = time.time()
  straight, chaotic = root / "straight", root / "chaos"
  first, step_time = straight_run(args, straight, tokens, env)
  print(f"uninterrupted run: {first:.1f} s to the first step, {1000 * step_time:.0f} ms/step",
        flush=True)
  startup = [first]

  kills, lost, interrupted_saves, lives, damaged = 0, 0, 0, 0, 0
  modes = {"startup": 0, "training": 0, "saving": 0}
  newest_at_kill = None
  while True:
    lives += 1
    log_path = root / f"life_{lives:02d}.log"
    with open(log_path, "w") as log:
      proc = subprocess.Popen(command(args, chaotic, tokens), cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
      base = max(finalized_steps(chaotic), default=0)  # where this life will resume
      killed = False
      if kills < args.kills:
        mode = rng.choice(list(modes))
        budget = max(1, 2 * (args.steps - base) // (args.kills - kills + 1))
        target = min(args.steps - 1, base + rng.randint(1, budget))
        killed = kill_once(proc, chaotic, mode, rng, startup, step_time, target)
      if killed:
        kills += 1
        modes[mode] += 1
      else:
        proc.wait()
    text = log_path.read_text(errors="replace")
    damaged += text.count("is damaged")
    resumed = [int(m) for m in RESUMED.findall(text)]
    if newest_at_kill is not None and resumed and resumed[0] < newest_at_kill:
      lost += 1
    if killed:
      interrupted_saves += saving(chaotic)
      newest_at_kill = max(finalized_steps(chaotic), default=None)
      last = (logged_steps(chaotic) or [0])[-1]  # the file's last row: this life's last step
      print(f"kill {kills:2d} ({mode:8s}) at step {last:4d}, "
            f"newest checkpoint {newest_at_kill}", flush=True)
      continue
    if proc.returncode != 0:
      raise SystemExit(f"life {lives} failed (rc {proc.returncode}); see {log_path}")
    break

  a, b = params_of(straight), params_of(chaotic)
  diff = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))
  identical = all(np.array_equal(x, y) for x, y in zip(a, b))
  steps = logged_steps(chaotic)
  return {"kills": kills, "survived": kills - lost, "checkpoints_lost": lost + damaged,
          "kills_mid_save": interrupted_saves, "modes": modes, "max_param_diff": diff,
          "bit_identical": identical, "duplicate_metric_rows": len(steps) - len(set(steps)),
          "metric_steps_complete": sorted(set(steps)) == list(range(1, args.steps + 1)),
          "seconds": round(time.time() - started, 1), "root": str(root)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=200, help="training steps of the run")
  p.add_argument("--save_every", type=int, default=5)
  p.add_argument("--keep", type=int, default=3)
  p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
  p.add_argument("--root", default="", help="folder for the runs (default: a new temp folder)")
  args = p.parse_args(argv)
  r = chaos(args)
  print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; load average {load_average()}")
  print(f"command: python experiments/chaos_train.py {' '.join(argv or sys.argv[1:])}\n")
  print("| kills | survived | checkpoints lost | killed mid-save | kill moments (startup/training/"
        "saving) | max param diff | bit-identical | duplicate metric rows | wall s |")
  print("|---|---|---|---|---|---|---|---|---|")
  m = r["modes"]
  print(f"| {r['kills']} | {r['survived']}/{r['kills']} | {r['checkpoints_lost']} | "
        f"{r['kills_mid_save']} | {m['startup']}/{m['training']}/{m['saving']} | "
        f"{r['max_param_diff']} | {r['bit_identical']} | {r['duplicate_metric_rows']} | "
        f"{r['seconds']} |")
  print(f"\nruns in {r['root']}")
  ok = (r["survived"] == r["kills"] == args.kills and r["max_param_diff"] == 0.0
        and r["bit_identical"] and r["duplicate_metric_rows"] == 0 and r["metric_steps_complete"])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
