"""Sweeps: sweep files, point names and resolved configs, device slots, retries, failures, skipping
finished points, an interrupted sweep resumed, and the engines (local pool and a real local Ray
cluster). Most tests run a fake program in place of gpt.main (fast, scriptable); the acceptance
test runs experiments/sweeps/lr.py for real with gpt.main on Ray (see test_report.py for local).

Ray is optional (`pip install -e '.[sweep]'`); its tests skip without it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments import sweep as sweep_cli  # noqa: E402
from experiments.engines import make_engine  # noqa: E402
from experiments.engines.local import device_slots  # noqa: E402
from experiments.engines.point import Pin, StopRequest  # noqa: E402
from experiments.sweep_spec import build_points, load_sweep, point_name  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from sweep_helpers import NAMES, SHRINK, calls, use_compile_cache, write_fake_sweep  # noqa: E402

@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # sweeps resolve configs/... relative to where they are started


def test_sweep_file_points_names_and_resolved_configs(tmp_path):
  sweep = tmp_path / "s.py"
  sweep.write_text(textwrap.dedent("""
      base = "configs/tiny.py"
      fixed = {"train.steps": 7}
      points = [{"model.n_layer": 1}, {"model.n_layer": 2}]
      product = {"train.learning_rate": [0.1], "attention.prepend_eot": [True, False]}
      stages = [{"mode": "train"}, {"mode": "attention", "init": "{workdir}"}]
  """))
  spec = load_sweep(str(sweep), {"train.batch_size": "16"})
  points, infos = build_points(spec, str(tmp_path / "runs"))
  assert [p.name for p in points] == [
      "n_layer=1,learning_rate=0.1,prepend_eot=true", "n_layer=1,learning_rate=0.1,prepend_eot=false",
      "n_layer=2,learning_rate=0.1,prepend_eot=true", "n_layer=2,learning_rate=0.1,prepend_eot=false"]
  p, info = points[2], infos[2]
  assert p.workdir == str(tmp_path / "runs" / p.name) and p.cwd == str(REPO)
  train, attention = p.stages
  assert (train.name, attention.name) == ("0-train", "1-attention")
  assert train.command[:5] == ["{python}", "-m", "gpt.main", "--config=configs/tiny.py",
                               f"--workdir={p.workdir}"]
  assert {"--config.train.steps=7", "--config.train.batch_size=16", "--config.model.n_layer=2",
          "--config.train.learning_rate=0.1", "--config.attention.prepend_eot=true",
          "--config.mode=train"} == set(train.command[5:])
  assert f"--config.init={p.workdir}" in attention.command
  cfg = info["stages"][0]["config"]  # resolved: the base config with the overrides, typed
  assert (cfg["train"]["steps"], cfg["train"]["batch_size"], cfg["model"]["n_layer"]) == (7, 16, 2)
  assert cfg["model"]["n_embd"] == 256 and info["stages"][1]["config"]["init"] == p.workdir
  assert info["overrides"] == {"model.n_layer": 2, "train.learning_rate": 0.1,
                               "attention.prepend_eot": True}


@pytest.mark.parametrize("body, message", [
    ('base = "configs/tiny.py"\nproduct = {"train.lr": [1]}', "train.lr: no such config key"),
    ('base = "configs/tiny.py"\nproduct = {"train.steps": ["many"]}', "expected a int"),
    ('base = "configs/tiny.py"\nproduct = {"train.steps": [1.5]}', "train.steps=1.5"),
    ('base = "configs/nope.py"', "base config configs/nope.py does not exist"),
    ('product = {}', "must set base"),
    ('base = "configs/tiny.py"\nprodcut = {}', "unknown sweep setting"),
    ('base = "configs/tiny.py"\npoints = [{"seed": 1}, {"seed": 1}]', "several points are named"),
    ('base = "configs/tiny.py"\nproduct = {"seed": 1}', "product must map config keys to lists"),
    ('base = "configs/tiny.py"\npoints = {"seed": 1}', "points must be a list"),
])
def test_sweep_file_mistakes_are_one_line_errors(tmp_path, body, message):
  (tmp_path / "s.py").write_text(body)
  with pytest.raises(GPTError, match=message):
    build_points(load_sweep(str(tmp_path / "s.py")), str(tmp_path / "runs"))


def test_point_names_keep_ambiguous_keys_whole_and_are_path_safe():
  keys = ["seed", "sampling.seed", "data.path"]
  assert point_name({"seed": 1, "sampling.seed": 2}, keys) == "seed=1,sampling.seed=2"
  assert point_name({"data.path": "../x/y z.txt"}, keys) == "path=.._x_y_z.txt"


def test_lr_sweep_file_is_two_learning_rates_by_two_seeds(tmp_path):
  points, infos = build_points(load_sweep("experiments/sweeps/lr.py"), str(tmp_path))
  assert [p.name for p in points] == NAMES
  assert {i["stages"][0]["config"]["train"]["learning_rate"] for i in infos} == {1e-3, 3e-3}


def test_lr_eval_sweep_trains_the_lr_points_then_evaluates_each():
  lr, lr_eval = load_sweep("experiments/sweeps/lr.py"), load_sweep("experiments/sweeps/lr_eval.py")
  assert (lr_eval.base, lr_eval.fixed, lr_eval.grid) == (lr.base, lr.fixed, lr.grid)
  assert [s["mode"] for s in lr_eval.stages] == ["train", "eval"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments" / "sweeps").glob("*.py")))
def test_every_shipped_sweep_file_resolves(tmp_path, name):
  points, infos = build_points(load_sweep(f"experiments/sweeps/{name}"), str(tmp_path))
  assert len(points) >= 2 and all(p.stages for p in points)
  for p, info in zip(points, infos):  # each stage's command says what its resolved config says
    for stage, resolved in zip(p.stages, info["stages"]):
      assert f"--config.mode={resolved['config']['mode']}" in stage.command or (
          resolved["config"]["mode"] == "train" and not any("config.mode" in c for c in stage.command))


def test_device_slots_split_devices_between_parallel_runs():
  assert [s.env for s in device_slots("gpu:0-3", 2)] == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                         {"CUDA_VISIBLE_DEVICES": "2,3"}]
  assert [s.cpus for s in device_slots("cpu:0,1,2", 2)] == [(0,), (1, 2)]
  assert device_slots("none", 3) == [Pin(), Pin(), Pin()]
  auto = device_slots("auto", 1)[0]  # this machine: its GPUs if any, else all its cores
  assert auto.env.get("CUDA_VISIBLE_DEVICES") or set(auto.cpus) == os.sched_getaffinity(0)
  with pytest.raises(GPTError, match="need at least 3 devices"):
    device_slots("gpu:0,1", 3)
  with pytest.raises(GPTError, match="--devices"):
    device_slots("tpu:0", 1)


def _overlap(a: dict, b: dict) -> bool:
  return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.mark.slow
def test_local_engine_pins_retries_isolates_failures_and_skips_finished(tmp_path):
  sweep, _ = write_fake_sweep(tmp_path, {NAMES[0]: {"fail": 1, "sleep": 0.5},
                                         NAMES[1]: {"fail": 9}, NAMES[2]: {"sleep": 0.5},
                                         NAMES[3]: {"sleep": 0.5}})
  root = tmp_path / "runs"
  engine = make_engine("local", parallel=2, devices="gpu:0-3")
  outcomes = {o.name: o for o in sweep_cli.run_sweep(str(sweep), str(root), engine)}
  assert {n: (o.status, o.attempts, o.retries) for n, o in outcomes.items()} == {
      NAMES[0]: ("done", 2, 1), NAMES[1]: ("failed", 2, 1), NAMES[2]: ("done", 1, 0),
      NAMES[3]: ("done", 1, 0)}
  assert "attempt 2 exited with code 1" in outcomes[NAMES[1]].detail
  log = (root / NAMES[1] / "sweep" / "0-train.log").read_text()
  assert log.count("=== attempt") == 4 and "--config.seed=1" in log
  recs = calls(root)
  assert len(recs) == 6 and {r["cuda"] for r in recs} == {"0,1", "2,3"}
  assert any(_overlap(a, b) for a in recs for b in recs if a is not b)  # 2 ran at once...
  for a in recs:  # ... never on the same GPUs
    assert all(a["cuda"] != b["cuda"] for b in recs if b is not a and _overlap(a, b))
  assert all(r["args"]["config.train.steps"] == "3" for r in recs)
  assert json.loads((root / NAMES[0] / "sweep" / "point.json").read_text())["overrides"] == {
      "train.learning_rate": 0.001, "seed": 0}
  summary = (root / "sweep_summary.md").read_text()
  assert "| learning_rate=0.001,seed=1 | failed | 2 | 1 |" in summary and "3 done, 1 failed" in summary

  # Rerun: only the failed point runs again. Changing a fixed override reruns everything.
  again = sweep_cli.run_sweep(str(sweep), str(root), engine)
  assert [o.status for o in again] == ["skipped", "failed", "skipped", "skipped"]
  assert len(calls(root)) == 8
  changed = sweep_cli.run_sweep(str(sweep), str(root), engine, sets={"train.steps": "4"})
  assert [o.status for o in changed] == ["done", "failed", "done", "done"]


@pytest.mark.slow
def test_cpu_slots_pin_affinity(tmp_path):
  core = sorted(os.sched_getaffinity(0))[-1]
  sweep, _ = write_fake_sweep(tmp_path, {})
  engine = make_engine("local", parallel=1, devices=f"cpu:{core}")
  outcomes = sweep_cli.run_sweep(str(sweep), str(tmp_path / "runs"), engine)
  assert all(o.status == "done" for o in outcomes)
  assert {tuple(r["cpus"]) for r in calls(tmp_path / "runs")} == {(core,)}


@pytest.mark.slow
def test_interrupted_sweep_rerun_runs_only_what_is_left(tmp_path):
  sweep, plan = write_fake_sweep(tmp_path, {NAMES[1]: {"sleep": 60}})
  root = tmp_path / "runs"
  driver = subprocess.Popen([sys.executable, "experiments/sweep.py", str(sweep), f"--workdir={root}",
                             "--parallel=1", "--devices=none"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while not (root / NAMES[1] / "attempts").exists():  # point 2 is running
    assert driver.poll() is None and time.time() < deadline
    time.sleep(0.05)
  driver.send_signal(signal.SIGTERM)
  out, _ = driver.communicate(timeout=60)
  assert driver.returncode == 130, out
  assert "SIGTERM: stopping the sweep" in out and "1 done, 3 interrupted" in out
  first = calls(root)
  assert [r["name"] for r in first] == NAMES[:2] and first[1]["stopped"]  # got SIGTERM, exited 0
  assert not (root / NAMES[1] / "sweep" / "0-train.done").exists()  # ... and is not done

  plan.write_text("{}")
  outcomes = sweep_cli.run_sweep(str(sweep), str(root), make_engine("local", devices="none"))
  assert [o.status for o in outcomes] == ["skipped", "done", "done", "done"]
  assert [r["name"] for r in calls(root)[2:]] == NAMES[1:]


@pytest.mark.slow
def test_stop_event_stops_running_points_without_marking_them(tmp_path):
  sweep, _ = write_fake_sweep(tmp_path, {n: {"sleep": 60} for n in NAMES})
  stop = StopRequest()
  threading.Timer(1.0, stop.graceful.set).start()
  outcomes = sweep_cli.run_sweep(str(sweep), str(tmp_path / "runs"),
                                 make_engine("local", parallel=2, devices="none"), stop=stop)
  assert [o.status for o in outcomes] == ["interrupted"] * 4
  assert all(r["stopped"] for r in calls(tmp_path / "runs"))


@pytest.mark.slow
def test_second_stop_kills_runs_that_ignore_sigterm(tmp_path):
  sweep, _ = write_fake_sweep(tmp_path, {n: {"sleep": 60, "ignore_term": True} for n in NAMES})
  root = tmp_path / "runs"
  stop = StopRequest()

  def stop_twice():
    while len(list(root.glob("*/attempts"))) < 2:
      time.sleep(0.05)
    stop.graceful.set()
    time.sleep(1.0)
    stop.kill.set()

  threading.Thread(target=stop_twice, daemon=True).start()
  start = time.time()
  outcomes = sweep_cli.run_sweep(str(sweep), str(root), make_engine("local", parallel=2, devices="none"),
                                 stop=stop)
  assert [o.status for o in outcomes] == ["interrupted"] * 4 and time.time() - start < 30
  assert calls(root) == []  # killed before they could record anything


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
  ray = pytest.importorskip("ray", reason="the ray engine needs Ray: pip install -e '.[sweep]'")
  with pytest.MonkeyPatch.context() as mp:
    use_compile_cache(mp)  # before ray.init: the workers inherit the environment from here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_runs_retries_and_isolates_failures(tmp_path, ray_cluster):
  sweep, _ = write_fake_sweep(tmp_path, {NAMES[0]: {"fail": 1}, NAMES[3]: {"fail": 9}})
  root = tmp_path / "runs"
  outcomes = sweep_cli.run_sweep(str(sweep), str(root), make_engine("ray", parallel=2))
  assert [(o.status, o.attempts) for o in outcomes] == [("done", 2), ("done", 1), ("done", 1),
                                                        ("failed", 2)]
  assert sorted(r["name"] for r in calls(root)) == sorted([NAMES[0]] * 2 + NAMES[1:3] + [NAMES[3]] * 2)
  again = sweep_cli.run_sweep(str(sweep), str(root), make_engine("ray", parallel=2))
  assert [o.status for o in again] == ["skipped", "skipped", "skipped", "failed"]


@pytest.mark.slow
def test_lr_sweep_for_real_on_ray_then_report(tmp_path, ray_cluster, shared_dir):
  from conftest import require_shared
  from experiments import report

  require_shared("data", "kant", "critique_of_pure_reason.txt")
  root = tmp_path / "lr"
  outcomes = sweep_cli.run_sweep("experiments/sweeps/lr.py", str(root), make_engine("ray", parallel=2),
                                 sets={**SHRINK, "data.cache_dir": str(tmp_path / "data_cache")})
  assert [(o.name, o.status) for o in outcomes] == [(n, "done") for n in NAMES], outcomes
  for name in NAMES:
    saved = json.loads((root / name / "config.json").read_text())  # written by gpt.main train
    lr, seed = name.split(",")
    assert saved["train"]["learning_rate"] == float(lr.split("=")[1])
    assert saved["seed"] == int(seed.split("=")[1]) and saved["train"]["steps"] == 2
  runs = report.collect_runs(root)
  assert [r.name for r in runs] == NAMES and all(r.final("train/loss") > 0 for r in runs)


@pytest.mark.slow
def test_ray_engine_stop_cancels_tasks_and_their_runs_get_sigterm(tmp_path, ray_cluster):
  sweep, _ = write_fake_sweep(tmp_path, {n: {"sleep": 60} for n in NAMES})
  root = tmp_path / "runs"
  stop = StopRequest()

  def stop_when_running():
    deadline = time.time() + 60
    while time.time() < deadline and len(list(root.glob("*/attempts"))) < 2:
      time.sleep(0.05)
    stop.graceful.set()

  threading.Thread(target=stop_when_running, daemon=True).start()
  start = time.time()
  outcomes = sweep_cli.run_sweep(str(sweep), str(root), make_engine("ray", parallel=2), stop=stop)
  assert [o.status for o in outcomes] == ["interrupted"] * 4 and time.time() - start < 50
  deadline = time.time() + 20
  while len(calls(root)) < 2 and time.time() < deadline:  # the runs record their SIGTERM
    time.sleep(0.05)
  assert [r["stopped"] for r in calls(root)] == [True, True]
  assert not list(root.glob("*/sweep/*.done"))


def test_progress_shows_each_running_points_newest_log_line(tmp_path):
  """While points run, the sweep prints each one's newest log line (a progress bar's newest redraw
  included), once per change, and nothing for points that have not started or have finished."""
  from experiments.engines.point import Point, Stage
  from experiments.progress import PointProgress, last_line

  points = [Point(n, str(tmp_path / n), str(tmp_path), [Stage("0-train", []), Stage("1-eval", [])])
            for n in ("a", "b", "c")]
  progress = PointProgress(points, clock=lambda: 0.0)
  assert progress.poll() == []  # nothing has started
  for p in points:
    (Path(p.workdir) / "sweep").mkdir(parents=True)
  points[0].log(points[0].stages[0]).write_text("=== attempt 1\nstep 10 | loss 5.1\n")
  points[1].log(points[1].stages[0]).write_text("done training\n")
  points[1].log(points[1].stages[1]).write_text("lambada: 12%|#   | 3/25\r lambada: 40%|####  | 10/25")
  assert progress.poll() == ["  a [0-train] step 10 | loss 5.1", "  b [1-eval] lambada: 40%|####  | 10/25"]
  assert progress.poll() == []  # unchanged: not repeated
  with open(points[0].log(points[0].stages[0]), "a") as f:
    f.write("step 20 | loss 4.7\n\n")
  progress.finished("b")
  points[1].log(points[1].stages[1]).write_text("lambada: 100%")
  assert progress.poll() == ["  a [0-train] step 20 | loss 4.7"]
  assert last_line(tmp_path / "missing.log") == ""
  assert (Path(points[0].workdir) / "sweep" / "0-train.log").exists()  # the names README gives
