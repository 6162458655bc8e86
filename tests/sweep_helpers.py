"""Shared by test_sweep.py and test_report.py: a fake gpt.main for fast sweep tests, and the
overrides that shrink experiments/sweeps/lr.py to a seconds-long real run."""

import json
import textwrap
from pathlib import Path

# The lr sweep's tiny config made tinier: 1 layer, width 32, 2 steps, one CPU device per run.
SHRINK = {
    "train.steps": "2", "model.n_layer": "1", "model.n_embd": "32", "model.n_head": "2",
    "model.n_ctx": "64", "train.seq_len": "32", "train.batch_size": "4", "train.val_every": "2",
    "train.val_batches": "1", "train.log_every": "1", "train.warmup_steps": "1",
    "train.peak_flops": "1e12", "train.save_every": "0", "mesh.data": "1",
}

NAMES = ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1", "learning_rate=0.003,seed=0",
         "learning_rate=0.003,seed=1"]

# Stands in for gpt.main: records each call (env, pinning, timing) in <root>/calls.jsonl, sleeps
# and fails as the plan says, and like training exits 0 after saving when sent SIGTERM.
FAKE = textwrap.dedent("""
  import json, os, signal, sys, time
  args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
  workdir = args["workdir"]
  name = os.path.basename(workdir)
  plan = json.load(open(os.environ["FAKE_PLAN"])).get(name, {})
  os.makedirs(workdir, exist_ok=True)
  counter = os.path.join(workdir, "attempts")
  n = (int(open(counter).read()) if os.path.exists(counter) else 0) + 1
  open(counter, "w").write(str(n))
  stopped = []
  signal.signal(signal.SIGTERM, signal.SIG_IGN if plan.get("ignore_term") else
                lambda *a: stopped.append(1))
  start = time.time()
  while time.time() - start < plan.get("sleep", 0) and not stopped:
    time.sleep(0.02)
  rec = {"name": name, "attempt": n, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
         "cpus": sorted(os.sched_getaffinity(0)), "start": start, "end": time.time(),
         "stopped": bool(stopped), "args": args}
  with open(os.path.join(os.path.dirname(workdir), "calls.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\\n")
  sys.exit(1 if n <= plan.get("fail", 0) else 0)
""")


def write_fake_sweep(tmp_path: Path, plan: dict) -> tuple[Path, Path]:
  """A 2 x 2 sweep over configs/tiny.py run by the fake program; (sweep file, plan file)."""
  (tmp_path / "fake_main.py").write_text(FAKE)
  plan_file = tmp_path / "plan.json"
  plan_file.write_text(json.dumps(plan))
  sweep = tmp_path / "fake_sweep.py"
  sweep.write_text(textwrap.dedent(f"""
      base = "configs/tiny.py"
      program = ["{{python}}", {str(tmp_path / 'fake_main.py')!r}]
      fixed = {{"train.steps": 3}}
      product = {{"train.learning_rate": [1e-3, 3e-3], "seed": [0, 1]}}
      env = {{"FAKE_PLAN": {str(plan_file)!r}}}
  """))
  return sweep, plan_file


def calls(root: Path) -> list[dict]:
  path = root / "calls.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []




def use_compile_cache(monkeypatch) -> None:
  """Real runs share JAX's persistent compilation cache: runs with the same shapes (the lr sweep's
  seeds, and the same sweep on the second engine) skip most of their compile time. When the
  session already has one (conftest's COMPILE_CACHE), its environment already carries it."""
  import tempfile

  from conftest import COMPILE_CACHE

  if COMPILE_CACHE:
    return

  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gpt-tests-jax-cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
