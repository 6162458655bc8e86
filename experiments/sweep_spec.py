"""Sweep files: a base config plus overrides, expanded into named points with resolved configs.

A sweep file is a Python file with module-level names:

  base = "configs/tiny.py"                 # a config file, as for --config (":arg" allowed)
  fixed = {"train.steps": 300}             # overrides every point gets (optional)
  product = {"train.learning_rate": [1e-3, 3e-3], "seed": [0, 1]}   # the grid (optional)
  points = [{"model.n_layer": 2}, {"model.n_layer": 4}]            # an explicit list (optional)
  stages = [{"mode": "train"},             # commands per point, in order (optional; default: one
            {"mode": "eval", "init": "{workdir}", "eval.tasks": "lambada"}]   # run of `base`)
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".45"}   # environment of every run (optional)
  program = ["{python}", "-m", "gpt.main"]  # what runs a stage (optional)

The runs are `points x product` (each explicit point combined with every grid combination). A
point is named from its swept overrides, e.g. `learning_rate=0.001,seed=0`, and runs in
`<workdir>/<name>`; "{workdir}" in a stage's string values is replaced by that folder. Keys are
checked against the base config before anything runs, so a misspelled key fails the sweep at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import runpy
from pathlib import Path
from typing import Any

import ml_collections

from experiments.engines.point import PYTHON, Point, Stage
from gpt.errors import GPTError

DEFAULT_PROGRAM = [PYTHON, "-m", "gpt.main"]
_KNOWN = {"base", "fixed", "product", "points", "stages", "env", "program"}


@dataclasses.dataclass
class Sweep:
  """A loaded sweep file."""

  path: str
  base: str
  fixed: dict[str, Any]
  grid: list[dict[str, Any]]  # the swept overrides of every point
  stages: list[dict[str, Any]]
  env: dict[str, str]
  program: list[str]


def load_sweep(path: str, extra: dict[str, Any] | None = None) -> Sweep:
  """Reads a sweep file; `extra` overrides (from --set) are added to `fixed`."""
  if not Path(path).is_file():
    raise GPTError(f"sweep file {path} does not exist")
  ns = {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_")}
  unknown = {k for k, v in ns.items() if k not in _KNOWN and not callable(v)
             and not isinstance(v, type(os))}
  if unknown:
    raise GPTError(f"{path}: unknown sweep setting(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
  if "base" not in ns:
    raise GPTError(f"{path} must set base = '<config file>'")
  product = ns.get("product", {})
  explicit = ns.get("points", [{}])
  if not isinstance(product, dict) or not all(isinstance(v, (list, tuple)) for v in product.values()):
    raise GPTError(f"{path}: product must map config keys to lists of values, e.g. "
                   f"{{'train.learning_rate': [1e-3, 3e-3]}}")
  if not isinstance(explicit, list) or not all(isinstance(p, dict) for p in explicit):
    raise GPTError(f"{path}: points must be a list of {{key: value}} dicts")
  keys = list(product)
  combos = [dict(zip(keys, values)) for values in itertools.product(*product.values())] or [{}]
  grid = [{**p, **c} for p in explicit for c in combos]
  return Sweep(path, ns["base"], {**ns.get("fixed", {}), **(extra or {})}, grid,
               list(ns.get("stages", [{}])), {k: str(v) for k, v in ns.get("env", {}).items()},
               list(ns.get("program", DEFAULT_PROGRAM)))


def load_config(base: str) -> ml_collections.ConfigDict:
  """The config of `base` ('file.py' or 'file.py:arg'), as `--config=base` would load it."""
  file, _, arg = base.partition(":")
  if not Path(file).is_file():
    raise GPTError(f"base config {file} does not exist (paths are relative to {os.getcwd()})")
  spec = importlib.util.spec_from_file_location("sweep_base_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _coerce(key: str, value: Any, current: Any) -> Any:
  """`value` (possibly a --set string) as the type of the config field it replaces."""
  if not isinstance(value, str) or isinstance(current, str) or current is None:
    return value
  try:
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    return type(current)(value)
  except ValueError:
    raise GPTError(f"override {key}={value!r}: expected a {type(current).__name__}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted keys in place, with ml_collections' type checks; unknown keys are a GPTError."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    try:
      for p in parents:
        node = node[p]
      current = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise GPTError(f"override {key}: no such config key in the base config") from None
    try:
      node[leaf] = _coerce(key, value, current)
    except TypeError as e:
      raise GPTError(f"override {key}={value!r}: {e}") from None


def cli_value(value: Any) -> str:
  """How `gpt.main` expects a value after --config.key=."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (int, str)):
    return str(value)
  raise GPTError(f"sweep values must be bool, int, float or str, not {value!r}")


def check_arg(what: str, text: str) -> str:
  """`text` unchanged if a process can be given it (in argv or the environment), else a GPTError.

  A NUL byte ends a C string, so the OS refuses it; a lone surrogate (e.g. from a bad \\udXXX escape)
  has no UTF-8 encoding. Either would fail only when the point starts, so they are refused up front.
  """
  for i, ch in enumerate(text):
    if ch == "\0" or "\ud800" <= ch <= "\udfff":
      kind = "a NUL byte" if ch == "\0" else f"a lone surrogate {ch.encode('unicode_escape').decode()}"
      raise GPTError(f"{what}={text!r} holds {kind} at character {i}, which cannot be passed to a "
                     f"process; fix the value in the sweep file or --set")
  return text


def point_name(overrides: dict[str, Any], all_keys: list[str]) -> str:
  """'learning_rate=0.001,seed=0': the last part of each key (the full key if that is ambiguous)."""
  leaves = [k.split(".")[-1] for k in all_keys]
  parts = []
  for key, value in overrides.items():
    label = key.split(".")[-1] if leaves.count(key.split(".")[-1]) == 1 else key
    parts.append(f"{label}={cli_value(value)}")
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "default"
  return name[:200]


def _substitute(value: Any, workdir: str) -> Any:
  return value.replace("{workdir}", workdir) if isinstance(value, str) else value


def build_points(sweep: Sweep, workdir: str) -> tuple[list[Point], list[dict]]:
  """The sweep's points (ready to run) and their descriptions (written to sweep/point.json)."""
  root = Path(workdir).expanduser().resolve()
  all_keys = sorted({k for g in sweep.grid for k in g})
  points, infos = [], []
  names = [point_name(g, all_keys) for g in sweep.grid]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise GPTError(f"{sweep.path}: several points are named {dup}; every point needs different overrides")
  for key, value in sweep.env.items():
    check_arg(f"env {check_arg('env name', key)}", value)
  for item in [sweep.base, *sweep.program]:
    check_arg("program" if item != sweep.base else "base", item)
  for name, overrides in zip(names, sweep.grid):
    run_dir = str(root / name)
    stages, resolved = [], []
    for i, stage_over in enumerate(sweep.stages):
      stage_over = {k: _substitute(v, run_dir) for k, v in stage_over.items()}
      merged = {**sweep.fixed, **overrides, **stage_over}
      config = load_config(sweep.base)
      apply_overrides(config, merged)
      command = list(sweep.program) + [f"--config={sweep.base}", f"--workdir={run_dir}"] + [
          f"--config.{check_arg(k, k)}={check_arg(k, cli_value(v))}" for k, v in merged.items()]
      stages.append(Stage(f"{i}-{config.get('mode', 'run')}", command))
      resolved.append(json.loads(json.dumps(config.to_dict(), default=str)))
    points.append(Point(name, run_dir, os.getcwd(), stages, dict(sweep.env)))
    infos.append({"name": name, "overrides": overrides, "fixed": sweep.fixed, "base": sweep.base,
                  "sweep_file": str(Path(sweep.path).resolve()),
                  "stages": [{"name": s.name, "command": s.command, "config": c}
                             for s, c in zip(stages, resolved)]})
  return points, infos
