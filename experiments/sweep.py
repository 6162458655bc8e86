"""Runs a config sweep: every point of a sweep file as `gpt.main` in its own workdir.

  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr
  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --parallel=2
  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --engine=ray
  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --set=train.steps=50
  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --check_fit=v5e:4x4

Points already finished are skipped (see experiments/engines/point.py for what "finished" means),
so rerunning an interrupted sweep runs only what is left. A failed stage is retried once
(--retries); a point that still fails does not stop the others. Ctrl-C (or SIGTERM) stops the
sweep: running trainings get SIGTERM and save a checkpoint, and are not marked done; a second
Ctrl-C kills them. A summary (also in <workdir>/sweep_summary.{md,json}) ends every sweep; the exit
code is 0 only when every point finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from experiments.engines import ENGINES, make_engine  # noqa: E402
from experiments.engines.point import Outcome, StopRequest  # noqa: E402
from experiments.progress import PointProgress  # noqa: E402
from experiments.sweep_spec import build_points, load_sweep  # noqa: E402
from gpt.errors import GPTError, print_error  # noqa: E402
from gpt.stop_signals import StopSignals  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Root folder of the sweep; each point runs in <workdir>/<name>.")
_ENGINE = flags.DEFINE_enum("engine", "local", list(ENGINES), "Where the points run.")
_PARALLEL = flags.DEFINE_integer("parallel", None, "Runs at once (local: default 1; ray: default "
                                 "all the cluster fits).")
_DEVICES = flags.DEFINE_string("devices", "auto", "local engine: auto | none | gpu:0,1,.. | cpu:0-7; "
                               "split evenly between the --parallel runs.")
_RETRIES = flags.DEFINE_integer("retries", 1, "Extra attempts for a failed stage.")
_PROGRESS = flags.DEFINE_float("progress_every", 10, "Seconds between progress lines (each running "
                               "point's newest log line).")
_SET = flags.DEFINE_multi_string("set", [], "key=value added to the sweep's fixed overrides (repeatable).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", "", "ray engine: cluster address ('auto' = the "
                                   "cluster started by `ray start`; '' = a local one for this sweep).")
_CPUS = flags.DEFINE_float("cpus_per_run", 1, "ray engine: CPUs reserved per run.")
_GPUS = flags.DEFINE_float("gpus_per_run", 0, "ray engine: GPUs per run (Ray pins them).")
_CHECK_FIT = flags.DEFINE_string("check_fit", "", "Compile every point's train step for this TPU "
                                 "topology (e.g. v5e:4x4; gpt.compile) first; stop if any does not fit.")
_RESOURCES = flags.DEFINE_string("resources_per_run", "", "ray engine: other resources per run as "
                                 "JSON, e.g. '{\"TPU\": 4}'.")


def parse_sets(items: list[str]) -> dict[str, str]:
  """['train.steps=50'] -> {'train.steps': '50'} (typed later against the base config)."""
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise GPTError(f"--set={item!r}: use --set=key=value, e.g. --set=train.steps=50")
    out[key.removeprefix("config.")] = value
  return out


class StopOnSignal(StopSignals):
  """First SIGINT/SIGTERM: a graceful stop (no new points; running ones get SIGTERM and time to
  save). Second: running ones are killed. Third: the driver exits at once."""

  def __init__(self):
    self.stop = StopRequest()

  def on_signal(self, signum: int) -> None:
    name = signal.Signals(signum).name
    if self.stop.kill.is_set():
      raise KeyboardInterrupt
    if self.stop.graceful.is_set():
      print(f"\n{name} again: killing the running points", flush=True)
      self.stop.kill.set()
      return
    print(f"\n{name}: stopping the sweep; running points get SIGTERM and save (again to kill them)",
          flush=True)
    self.stop.graceful.set()


def summary_table(outcomes: list[Outcome]) -> str:
  """The sweep's outcome as a Markdown table."""
  rows = ["| point | status | runs | retries | time | devices | note |", "|---|---|---|---|---|---|---|"]
  for o in outcomes:
    note = f"stage {o.stage}" + (f": {o.detail.splitlines()[-1]}" if o.detail else "") if o.stage else ""
    rows.append(f"| {o.name} | {o.status} | {o.attempts} | {o.retries} | {o.seconds:.0f}s | {o.devices} | "
                f"{note.replace('|', '/')[:120]} |")
  counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "interrupted")}
  return "\n".join(rows) + "\n\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def run_sweep(sweep_file: str, workdir: str, engine, retries: int = 1,
              sets: dict | None = None, stop: StopRequest | None = None,
              progress_every: float = 10.0) -> list[Outcome]:
  """Loads, writes out and runs the sweep; returns one Outcome per point (in sweep order). While
  it runs, each running point's newest log line is printed (at most every `progress_every` s)."""
  sweep = load_sweep(sweep_file, sets)
  points, infos = build_points(sweep, workdir)
  root = Path(workdir).expanduser().resolve()
  for p, info in zip(points, infos):
    (Path(p.workdir) / "sweep").mkdir(parents=True, exist_ok=True)
    _write_json(Path(p.workdir) / "sweep" / "point.json", info)
  left = [p for p in points if not p.finished()]
  print(f"sweep {sweep_file}: {len(points)} points, {len(points) - len(left)} already finished, "
        f"{len(left)} to run in {root}", flush=True)
  counter = iter(range(1, len(points) + 1))
  progress = PointProgress(left, every=progress_every)

  def on_done(o: Outcome) -> None:
    progress.finished(o.name)
    extra = f" (stage {o.stage})" if o.stage else ""
    print(f"[{next(counter)}/{len(points)}] {o.name}: {o.status}{extra}, {o.attempts} run(s) "
          f"({o.retries} retried), {o.seconds:.0f}s", flush=True)
    if o.status == "failed" and o.detail:
      print("  " + o.detail.replace("\n", "\n  "), flush=True)

  with progress:
    outcomes = engine.run(points, retries, stop or StopRequest(), on_done)
  table = summary_table(outcomes)
  (root / "sweep_summary.md").write_text(table + "\n", encoding="utf-8")
  _write_json(root / "sweep_summary.json", [dataclasses.asdict(o) for o in outcomes])
  print("\n" + table, flush=True)
  return outcomes


# Config fields that change a train step's memory; points equal in all of them share one compile.
FIT_KEYS = ("init", "model", "mesh", "train.batch_size", "train.seq_len", "train.grad_accum",
            "train.optimizer", "train.momentum", "train.only_train_transformer_layers")


def _dotted(tree: dict, key: str) -> Any:
  for part in key.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def check_fit(sweep_file: str, workdir: str, topology: str, sets: dict | None = None) -> list[str]:
  """Compiles the train stage of every point for TPU `topology` (gpt.compile: no TPU needed) and
  prints each verdict; returns the names of the points that do not fit."""
  import ml_collections

  from gpt import compile as aot
  from gpt.compile_tables import human_bytes

  sweep = load_sweep(sweep_file, sets)
  _, infos = build_points(sweep, workdir)
  verdicts: dict[str, dict] = {}
  bad = []
  for i, info in enumerate(infos, 1):
    for stage in info["stages"]:
      if stage["config"].get("mode") != "train":
        continue
      config = ml_collections.ConfigDict(stage["config"])
      key = json.dumps([_dotted(stage["config"], k) for k in FIT_KEYS], sort_keys=True, default=str)
      if key not in verdicts:
        verdicts[key] = aot.fit(config, topology)
      row = verdicts[key]
      total = row["per_chip"].get("total") or row.get("oom", {}).get("needed")
      print(f"[fit {i}/{len(infos)}] {info['name']}: {'fits' if row['fits'] else 'DOES NOT FIT'} "
            f"on {topology} ({human_bytes(total)} of {human_bytes(row['hbm'])} per chip)",
            flush=True)
      if not row["fits"]:
        bad.append(info["name"])
  return bad


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    raise app.UsageError("usage: python experiments/sweep.py <sweep file> --workdir=<folder> [flags]")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  sets = parse_sets(_SET.value)
  if _CHECK_FIT.value:
    bad = check_fit(argv[1], _WORKDIR.value, _CHECK_FIT.value, sets)
    if bad:
      print(f"{len(bad)} point(s) do not fit on {_CHECK_FIT.value}: {', '.join(bad)}; nothing was "
            f"launched (see --config.mode=compile --config.compile.search=true for settings that fit)")
      return 1
  if _DRY_RUN.value:
    points, _ = build_points(load_sweep(argv[1], sets), _WORKDIR.value)
    for p in points:
      for s in p.stages:
        print(f"{p.name} [{'done' if p.stage_finished(s) else 'todo'}]: {' '.join(s.command)}")
    return 0
  parallel = _PARALLEL.value
  engine = make_engine(_ENGINE.value, parallel=parallel or (1 if _ENGINE.value == "local" else 0),
                       devices=_DEVICES.value, ray_address=_RAY_ADDRESS.value,
                       cpus_per_run=_CPUS.value, gpus_per_run=_GPUS.value,
                       resources_per_run=_RESOURCES.value)
  start = time.time()
  with StopOnSignal() as signals:
    outcomes = run_sweep(argv[1], _WORKDIR.value, engine, _RETRIES.value, sets, signals.stop,
                         _PROGRESS.value)
  print(f"sweep took {time.time() - start:.0f}s")
  if any(o.status == "interrupted" for o in outcomes):
    return 130
  return 0 if all(o.status in ("done", "skipped") for o in outcomes) else 1


def run() -> None:
  def entry(argv):
    try:
      sys.exit(main(argv))
    except GPTError as e:
      sys.exit(print_error(e))

  app.run(entry)


if __name__ == "__main__":
  run()
