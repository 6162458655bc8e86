"""The `ray` engine: every point is a Ray task, on a local `ray.init()` cluster or a real one.

  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --engine=ray
      # starts a one-machine Ray cluster for the sweep, as the tests do
  ray start --head                      # on the head node; `ray start --address=<head>:6379` on others
  python experiments/sweep.py ... --engine=ray --ray_address=auto --gpus_per_run=1
      # connects to that cluster; Ray gives each run its GPUs (it sets CUDA_VISIBLE_DEVICES)

On a cluster the sweep's working directory (configs, data) and --workdir must be on a filesystem
every node sees at the same path, and every node needs this package installed in the Python that
Ray runs (`pip install -e '.[sweep]'`). TPU VMs: `--resources_per_run='{"TPU": 4}'` asks Ray for a
host's chips (Ray detects TPUs when started on a TPU VM).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

from experiments.engines import point as point_module
from experiments.engines.point import Outcome, Point, StopRequest, run_point
from gpt.errors import GPTError


def _import_ray():
  try:
    import ray
  except ImportError:
    raise GPTError("the ray engine needs Ray: pip install -e '.[sweep]' (or pip install ray)") from None
  return ray


class RayEngine:
  """Submits at most `parallel` points at a time as Ray tasks and collects their outcomes."""

  def __init__(self, parallel: int = 0, address: str = "", cpus_per_run: float = 1,
               gpus_per_run: float = 0, resources_per_run: str = ""):
    self.ray = _import_ray()
    self.parallel, self.address = parallel, address
    try:
      resources = json.loads(resources_per_run) if resources_per_run else {}
    except json.JSONDecodeError as e:
      raise GPTError(f"--resources_per_run={resources_per_run!r} is not JSON: {e}") from None
    self.options = {"num_cpus": cpus_per_run, "num_gpus": gpus_per_run, "resources": resources,
                    "max_retries": 0}  # run_point does its own retries

  def _connect(self) -> bool:
    """Starts/joins the cluster; True if this engine started Ray (so it must shut it down)."""
    ray = self.ray
    if ray.is_initialized():
      return False
    # The workers run run_point from this module's source, not from an installed copy.
    ray.cloudpickle.register_pickle_by_value(point_module)
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if self.address:
      ray.init(address=self.address, **kwargs)
    else:
      # A one-machine cluster sized for `parallel` runs at once (default: one per core).
      slots = self.parallel or os.cpu_count() or 1
      ray.init(num_cpus=slots * max(1, math.ceil(self.options["num_cpus"])), **kwargs)
    return True

  def run(self, points: list[Point], retries: int, stop: StopRequest,
          on_done: Callable[[Outcome], None]) -> list[Outcome]:
    """Runs the points on the cluster; once a stop is requested, pending and running tasks are
    cancelled (their runs get SIGTERM; with `stop.kill`, their workers are killed)."""
    ray = self.ray
    started = self._connect()
    try:
      ray.cloudpickle.register_pickle_by_value(point_module)
      task = ray.remote(run_point).options(**self.options)
      todo, running, outcomes = list(points), {}, {}
      limit = self.parallel or len(points)
      while (todo or running) and not stop.graceful.is_set():
        while todo and len(running) < limit:
          p = todo.pop(0)
          running[task.remote(p, retries)] = p
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in ready:
          p = running.pop(ref)
          outcomes[p.name] = self._result(ref, p)
          on_done(outcomes[p.name])
      if stop.graceful.is_set():
        self._cancel(running, outcomes, on_done, stop.kill)
      return [outcomes.get(p.name, Outcome(p.name, "interrupted")) for p in points]
    finally:
      if started:
        ray.shutdown()

  def _result(self, ref, p: Point) -> Outcome:
    try:
      return self.ray.get(ref)
    except self.ray.exceptions.TaskCancelledError:
      return Outcome(p.name, "interrupted")
    except self.ray.exceptions.RayError as e:  # the worker died, the node was lost, ...
      return Outcome(p.name, "failed", detail=str(e).strip().splitlines()[-1][:500])

  def _cancel(self, running: dict, outcomes: dict, on_done, kill) -> None:
    """Cancels running tasks: run_point gets KeyboardInterrupt and stops its run with SIGTERM. When
    `kill` is set, the workers are killed (their runs get SIGTERM through the parent-death signal
    and no grace period is waited for)."""
    for ref in running:
      self.ray.cancel(ref)
    deadline = time.time() + point_module.GRACE_SECONDS + 10
    pending, forced = dict(running), False
    while pending and time.time() < deadline:
      if kill.is_set() and not forced:
        for ref in pending:
          self.ray.cancel(ref, force=True)
        forced = True
      ready, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=0.2)
      for ref in ready:
        pending.pop(ref)
    for p in running.values():
      outcomes[p.name] = Outcome(p.name, "interrupted")
      on_done(outcomes[p.name])
