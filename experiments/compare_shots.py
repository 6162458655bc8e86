"""Zero/one/few-shot comparison: a Markdown table and a plot from one or more eval workdirs.

  python experiments/compare_shots.py runs/eval-124m runs/eval-355m [--out=shots.png]

Reads every <workdir>/eval/<task>_<shots>shot.json written by the eval mode and prints one table
row per (model, task) with the task's primary metric at each shot count (value ± stderr), then
plots accuracy against shots with one line per task and model size, as in the GPT-3 paper's
figures (perplexity tasks are in the table only), into the eval folder it read (the first one's,
given several) unless --out says where. The table needs nothing beyond Python; the plot needs
matplotlib (`pip install matplotlib`, or the package's [plots] extra), and without it the table
is still printed, followed by one line saying so. --no_plot prints the table alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+", help="eval workdirs (or their eval/ folders)")
  p.add_argument("--out", default="", help="where to save the plot (default: "
                 "compare_shots.png in the first workdir's eval folder)")
  p.add_argument("--metric", action="append", default=[],
                 help="task=metric to show instead of the task's primary metric (repeatable)")
  p.add_argument("--no_plot", action="store_true", help="print the table only")
  return p.parse_args(argv)


def model_label(record: dict) -> str:
  """'124M'-style size from the parameter count (the tied embedding counted once)."""
  n = record["model"]["n_params"]
  return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2g}M"


def eval_folder(workdir: str) -> Path:
  """A workdir's eval/ folder, or the folder itself when it is one."""
  return Path(workdir) / "eval" if (Path(workdir) / "eval").is_dir() else Path(workdir)


def load_results(workdirs: list[str]) -> list[dict]:
  """Every result record under the workdirs, labelled with its model size (and workdir if two
  workdirs hold models of the same size)."""
  records, dirs_of_label = [], defaultdict(set)
  for workdir in workdirs:
    folder = eval_folder(workdir)
    files = sorted(folder.glob("*shot.json"))
    if not files:
      raise SystemExit(f"error: no <task>_<shots>shot.json files in {folder}; run the eval mode first")
    for path in files:
      record = json.loads(path.read_text())
      record["label"], record["workdir"] = model_label(record), workdir
      dirs_of_label[record["label"]].add(workdir)
      records.append(record)
  for r in records:
    if len(dirs_of_label[r["label"]]) > 1:
      r["label"] = f"{r['label']} ({Path(r['workdir']).name})"
  return records


def series(records: list[dict], chosen: dict[str, str]) -> dict[tuple[str, str, str], dict[int, tuple]]:
  """(model label, task, metric) -> {shots: (value, stderr, n)}."""
  out: dict[tuple[str, str, str], dict[int, tuple]] = defaultdict(dict)
  for r in records:
    metric = chosen.get(r["task"], r["primary_metric"])
    if metric not in r["metrics"]:
      raise SystemExit(f"error: {r['task']} has no metric {metric!r}; it has {', '.join(r['metrics'])}")
    m = r["metrics"][metric]
    out[(r["label"], r["task"], metric)][r["shots"]] = (m["value"], m["stderr"], r["n_examples"])
  return dict(sorted(out.items(), key=lambda kv: (kv[0][1], _size(kv[0][0]))))


def _size(label: str) -> float:
  try:
    return float(label.split("M")[0])
  except ValueError:
    return 0.0


def markdown_table(data: dict[tuple[str, str, str], dict[int, tuple]]) -> str:
  shots = sorted({k for points in data.values() for k in points})
  lines = ["| task | model | metric | n | " + " | ".join(f"{k}-shot" for k in shots) + " |",
           "|---|---|---|---|" + "---|" * len(shots)]
  for (label, task, metric), points in data.items():
    n = max(p[2] for p in points.values())
    cells = [_cell(*points[k][:2]) if k in points else "" for k in shots]
    lines.append(f"| {task} | {label} | {metric} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _cell(value: float, stderr: float | None) -> str:
  scale = 100 if value <= 1 else 1  # accuracies in percent, perplexities as they are
  text = f"{value * scale:.2f}"
  return text if stderr is None else f"{text} ± {stderr * scale:.2f}"


def plot(data: dict[tuple[str, str, str], dict[int, tuple]], out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # Accuracies, and the exact match of generative tasks (gpt.evals.generative): both fractions.
  accuracy = {k: v for k, v in data.items() if k[2].startswith("acc") or k[2] == "exact_match"}
  if not accuracy:
    raise SystemExit("error: no accuracy metrics to plot (perplexity tasks are in the table only)")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  # One colour per task, one line style per model size.
  tasks = sorted({k[1] for k in accuracy})
  labels = sorted({k[0] for k in accuracy}, key=_size)
  for (label, task, metric), points in accuracy.items():
    shots = sorted(points)
    values = [100 * points[k][0] for k in shots]
    errors = [100 * (points[k][1] or 0.0) for k in shots]
    style = labels.index(label)
    ax.errorbar(shots, values, yerr=errors, capsize=3, color=f"C{tasks.index(task) % 10}",
                linestyle=("-", "--", ":", "-.")[style % 4], marker="osD^"[style % 4],
                label=f"{task} {metric}, {label}")
  all_shots = sorted({k for points in accuracy.values() for k in points})
  ax.set_xscale("symlog", linthresh=1)
  ax.set_xticks(all_shots, [str(k) for k in all_shots])
  ax.set_xlabel("demonstrations in the prompt (shots)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Zero-, one- and few-shot accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(out, dpi=150)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  chosen = dict(m.split("=", 1) for m in args.metric)
  data = series(load_results(args.workdirs), chosen)
  print(markdown_table(data))
  if args.no_plot:
    return
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    print("no plot: it needs matplotlib: pip install matplotlib (or pip install -e '.[plots]'); "
          "the table above is complete", file=sys.stderr)
    return
  out = args.out or str(eval_folder(args.workdirs[0]) / "compare_shots.png")
  plot(data, out)
  print(f"\nplot saved to {out}")


if __name__ == "__main__":
  main(sys.argv[1:])
