"""Sweep engines: where and how the points of a sweep run.

  local  a process pool on this machine, each run pinned to its share of the devices (default)
  ray    Ray tasks, on a one-machine `ray.init()` cluster or a real cluster (`--ray_address`)
Both take the same list of `Point`s and return one `Outcome` per point.
"""

from __future__ import annotations

from typing import Any

ENGINES = ("local", "ray")


def make_engine(name: str, **options: Any):
  """The engine called `name`, configured by the sweep command's flags."""
  from gpt.errors import GPTError

  if name == "local":
    from experiments.engines.local import LocalEngine
    return LocalEngine(options.get("parallel", 1), options.get("devices", "auto"))
  if name == "ray":
    from experiments.engines.ray_cluster import RayEngine
    return RayEngine(options.get("parallel", 0), options.get("ray_address", ""),
                     options.get("cpus_per_run", 1), options.get("gpus_per_run", 0),
                     options.get("resources_per_run", ""))
  raise GPTError(f"unknown sweep engine {name!r}: choose one of {', '.join(ENGINES)}")
