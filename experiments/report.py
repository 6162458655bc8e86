"""A report over all runs under a folder (a sweep's --workdir, or any folder of gpt.main workdirs).

  python experiments/report.py runs/lr                 # writes runs/lr/report/, prints the table
  python experiments/report.py runs/lr --out=/tmp/rep

Writes to <out> (default <folder>/report/):
  report.md / report.csv   one row per run: the config keys that differ between runs, status,
                           final train/val loss, tokens/s, steps, and each eval task's primary
                           metric per shot count (from <run>/eval/<task>_<k>shot.json)
  loss_curves.png          train (solid) and val (dashed) loss from the TensorBoard events
  vs_<key>.png             final loss and eval metrics against each swept config key (mean over
                           the other keys' seeds, with min..max bars)
  accuracy_vs_shots.png    each eval task's primary metric against the number of shots, per run
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.tb_events import read_scalars  # noqa: E402
from gpt.errors import GPTError, print_error  # noqa: E402


@dataclasses.dataclass
class Run:
  """One gpt.main workdir and what it logged."""

  name: str
  path: Path
  config: dict[str, Any]  # flattened resolved config ("train.learning_rate": 0.001, ...)
  status: str  # done | incomplete (sweep markers missing) | unknown (not started by a sweep)
  scalars: dict[str, list[tuple[int, float]]]
  evals: list[dict]  # the eval/<task>_<k>shot.json records

  def final(self, tag: str) -> float | None:
    """The last logged value of a TensorBoard tag (None if never logged)."""
    values = self.scalars.get(tag)
    return values[-1][1] if values else None

  def mean(self, tag: str) -> float | None:
    values = self.scalars.get(tag)
    return sum(v for _, v in values) / len(values) if values else None

  def eval_metrics(self) -> dict[tuple[str, int, str], float]:
    """{(task, shots, metric): value} for each eval file's primary metric."""
    out = {}
    for r in self.evals:
      metric = r.get("primary_metric")
      value = r.get("metrics", {}).get(metric, {}).get("value")
      if metric and value is not None:
        out[(r["task"], int(r["shots"]), metric)] = float(value)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _load_run(path: Path) -> Run:
  point, config_json = path / "sweep" / "point.json", path / "config.json"
  config, status = {}, "unknown"
  if point.is_file():
    info = json.loads(point.read_text())
    config = flatten(info["stages"][0]["config"]) if info.get("stages") else {}
    markers = [path / "sweep" / f"{s['name']}.done" for s in info.get("stages", [])]
    status = "done" if markers and all(m.is_file() for m in markers) else "incomplete"
  elif config_json.is_file():
    config = flatten(json.loads(config_json.read_text()))
  evals = [json.loads(f.read_text()) for f in sorted((path / "eval").glob("*shot.json"))]
  scalars = read_scalars(path / "tensorboard") if (path / "tensorboard").is_dir() else {}
  return Run(path.name, path, config, status, scalars, evals)


def collect_runs(root: str | Path) -> list[Run]:
  """Every run under `root` (sorted by name): folders with a sweep point, config.json,
  TensorBoard events or eval results. `root` itself counts when it is a run."""
  root = Path(root)
  if not root.is_dir():
    raise GPTError(f"{root} is not a folder of runs")

  def is_run(p: Path) -> bool:
    return any((p / f).exists() for f in ("sweep/point.json", "config.json", "tensorboard", "eval"))

  runs = [_load_run(p) for p in sorted(root.iterdir()) if p.is_dir() and is_run(p)]
  if not runs and is_run(root):
    runs = [_load_run(root)]
  if not runs:
    raise GPTError(f"no runs under {root} (looked for */config.json, */tensorboard, */eval)")
  return runs


def config_diffs(runs: list[Run]) -> list[str]:
  """Config keys whose values differ between runs (all swept keys, in config order)."""
  keys = list(dict.fromkeys(k for r in runs for k in r.config))
  return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
  """Column names and one row of values per run."""
  diffs = config_diffs(runs)
  evals = sorted({k for r in runs for k in r.eval_metrics()})
  header = (["run"] + diffs + ["status", "steps", "train_loss", "val_loss", "tokens_per_sec"] +
            [f"{task} {metric} {shots}-shot" for task, shots, metric in evals])
  rows = []
  for r in runs:
    steps = r.scalars.get("train/loss", [(None, None)])[-1][0]
    metrics = r.eval_metrics()
    rows.append([r.name] + [r.config.get(k) for k in diffs] +
                [r.status, steps, r.final("train/loss"), r.final("val/loss"),
                 r.mean("train/tokens_per_sec")] + [metrics.get(k) for k in evals])
  return header, rows


def _cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
  return str(v)


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v).replace("|", "/") for v in row) + " |" for row in rows]
  return "\n".join(lines)


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  return buf.getvalue()


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise GPTError("plots need matplotlib: pip install -e '.[plots]'") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _grid(plt, n: int, cols: int = 3):
  """A figure with n subplots, at most `cols` per row; (figure, flat list of the n axes)."""
  rows, cols = -(-n // cols), min(n, cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  flat = list(axes.flat)
  for ax in flat[n:]:
    ax.remove()
  return fig, flat[:n]


def plot_losses(runs: list[Run]):
  """Train (solid) and validation (dashed) loss against step, one colour per run (a Figure, or
  None when no run logged a loss)."""
  curves = [r for r in runs if r.scalars.get("train/loss")]
  if not curves:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, r in enumerate(curves):
    color = f"C{i % 10}"
    ax.plot(*zip(*r.scalars["train/loss"]), color=color, label=r.name, lw=1.2)
    if r.scalars.get("val/loss"):
      ax.plot(*zip(*r.scalars["val/loss"]), color=color, ls="--", marker="o", ms=3, lw=1)
  ax.set(xlabel="step", ylabel="loss", title="train (solid) and validation (dashed) loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def metrics_by_run(runs: list[Run]) -> dict[str, dict[str, float]]:
  """{metric label: {run name: value}}: final loss (val if logged, else train) and eval metrics."""
  out: dict[str, dict[str, float]] = {}
  for r in runs:
    loss_tag = "val/loss" if r.final("val/loss") is not None else "train/loss"
    if r.final(loss_tag) is not None:
      out.setdefault(f"final {loss_tag.replace('/', ' ')}", {})[r.name] = r.final(loss_tag)
    for (task, shots, metric), v in r.eval_metrics().items():
      out.setdefault(f"{task} {metric} {shots}-shot", {})[r.name] = v
  return out


def plot_vs_key(runs: list[Run], key: str):
  """Every metric against the values of `key` (one subplot each); runs that differ only in seed
  keys are averaged, with min..max bars. None when `key` is not numeric or there are no metrics."""
  values = [r.config.get(key) for r in runs]
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    return None
  metrics = metrics_by_run(runs)
  if not metrics:
    return None
  others = [k for k in config_diffs(runs) if k != key and not k.split(".")[-1].endswith("seed")]
  plt = _pyplot()
  fig, axes = _grid(plt, len(metrics))
  for ax, (label, by_run) in zip(axes, metrics.items()):
    groups: dict[str, dict[float, list[float]]] = {}
    for r in runs:
      if r.name in by_run:
        group = ", ".join(f"{k.split('.')[-1]}={r.config.get(k)}" for k in others) or "all runs"
        groups.setdefault(group, {}).setdefault(r.config[key], []).append(by_run[r.name])
    for i, (group, points) in enumerate(sorted(groups.items())):
      xs = sorted(points)
      mean = [sum(points[x]) / len(points[x]) for x in xs]
      err = [[m - min(points[x]) for x, m in zip(xs, mean)], [max(points[x]) - m for x, m in zip(xs, mean)]]
      ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=group)
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(positive) / min(positive) >= 10:
      ax.set_xscale("log")
    ax.set(xlabel=key, title=label)
    ax.grid(alpha=0.3)
    if len(groups) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_shots(runs: list[Run]):
  """Each task's primary metric against the shot count, one line per run (None without evals)."""
  tasks = sorted({(t, m) for r in runs for t, _, m in r.eval_metrics()})
  if not tasks:
    return None
  plt = _pyplot()
  fig, axes = _grid(plt, len(tasks))
  for ax, (task, metric) in zip(axes, tasks):
    for i, r in enumerate(runs):
      pts = sorted((s, v) for (t, s, m), v in r.eval_metrics().items() if (t, m) == (task, metric))
      if pts:
        ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=r.name)
    ax.set(xlabel="shots", ylabel=metric, title=task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
  """Writes report.md, report.csv and the plots for the runs under `root`; returns report.md."""
  runs = collect_runs(root)
  out = Path(out) if out else Path(root) / "report"
  out.mkdir(parents=True, exist_ok=True)
  header, rows = table_rows(runs)
  (out / "report.csv").write_text(to_csv(header, rows), encoding="utf-8")
  figures = {"loss_curves.png": plot_losses(runs)}
  for key in config_diffs(runs):
    if not key.split(".")[-1].endswith("seed"):  # metrics against the seed say nothing: averaged
      figures[f"vs_{key.replace('.', '_')}.png"] = plot_vs_key(runs, key)
  figures["accuracy_vs_shots.png"] = plot_shots(runs)
  images = []
  for name, fig in figures.items():
    if fig is not None:
      fig.savefig(out / name, dpi=100)
      images.append(name)
      _pyplot().close(fig)
  md = [f"# Report: {len(runs)} runs in {Path(root).resolve()}", "", to_markdown(header, rows), ""]
  md += [f"![{Path(i).stem}]({i})" for i in images]
  (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
  return out / "report.md"


def main(argv: list[str]) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", help="folder of runs (a sweep's --workdir)")
  parser.add_argument("--out", default=None, help="output folder (default <root>/report)")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.root, args.out)
  except GPTError as e:
    return print_error(e)
  print(path.read_text(encoding="utf-8"))
  print(f"wrote {path.parent}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
