"""The eval mode: zero/one/few-shot evaluation of a model on the tasks in `config.eval`.

  python -m gpt.main --config=configs/117m.py --config.mode=eval --workdir=runs/eval \
      --config.eval.tasks=lambada,hellaswag,piqa --config.eval.shots=0,1,5

Writes <workdir>/eval/<task>_<shots>shot.json (metrics with stderrs, item counts, truncation counts,
the config, data checksums, timing) and, with eval.write_examples, a .jsonl of per-item scores
beside it; then prints a table of all results. Without --workdir results go to runs/eval. Both are
written to a temporary name and renamed, the .jsonl first, so a .json always has its complete .jsonl.
Task files come from eval.data_dir, where missing ones are fetched first (from the original
releases or eval.mirror, checked: gpt.evals.fetch), or from TensorFlow Datasets (eval.source).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from absl import logging

from gpt.errors import GPTError
from gpt.evals import get_task
from gpt.evals.base import Format
from gpt.evals.fetch import ensure_tasks
from gpt.evals.runner import TaskResult, evaluate
from gpt.evals.scoring import Scorer
from gpt.evals.tfds_source import TFDS_TASKS, load_tfds

DEFAULT_WORKDIR = "runs/eval"


def parse_names(value: Any) -> list[str]:
  """'lambada, piqa' (or a list) -> ['lambada', 'piqa']."""
  items = value.split(",") if isinstance(value, str) else list(value)
  names = [str(n).strip() for n in items if str(n).strip()]
  if not names:
    raise GPTError("eval.tasks is empty; e.g. --config.eval.tasks=lambada,hellaswag")
  return names


def parse_shots(value: Any) -> list[int]:
  """'0,1,5' (or an int or a list) -> [0, 1, 5]."""
  items = value.split(",") if isinstance(value, str) else (
      [value] if isinstance(value, int) else list(value))
  problem = f"eval.shots={value!r}: give comma-separated non-negative integers, e.g. 0,1,5"
  try:
    shots = [int(str(s).strip()) for s in items if str(s).strip()]
  except ValueError:
    raise GPTError(problem) from None
  if not shots or min(shots) < 0:
    raise GPTError(problem)
  return shots


def run(config, workdir: str | None) -> None:
  """Evaluates the model `config.init` names on every task x shot count in `config.eval`."""
  from gpt.weights import load_model

  e = config.eval
  tasks = [get_task(name, e) for name in parse_names(e.tasks)]  # bad names fail before loading
  shots = parse_shots(e.shots)
  if e.batch_size < 1 or e.max_buckets < 1:
    raise GPTError(f"eval.batch_size={e.batch_size} and eval.max_buckets={e.max_buckets} must be at "
                   f"least 1")
  if e.limit < 0:  # a slice [:-n] would silently score all but the last n items
    raise GPTError(f"eval.limit={e.limit}: give the number of items to score per task, or 0 for all")
  out_dir = Path(workdir or DEFAULT_WORKDIR) / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  load_data = task_data_loader(e, tasks)  # fetches missing task files before the model loads
  loaded = load_model(config)
  logging.info("evaluating %s (%s parameters)", loaded.source, f"{loaded.cfg.num_params():,}")
  scorer = Scorer(loaded.model, e.batch_size, e.max_buckets)
  generator = None
  if any(task.generative for task in tasks):
    from gpt.evals.greedy import TextGenerator
    generator = TextGenerator(loaded.model, loaded.tokenizer, e.batch_size, seed=e.seed)
  fmt = Format(e.example_separator, e.target_delimiter)
  results = []
  for task in tasks:
    data = load_data(task)
    if not task.uses_shots and shots != [0]:
      logging.info("%s is a perplexity task: shot counts do not apply, scoring it once", task.name)
    for k in (shots if task.uses_shots else [0]):
      result = evaluate(task, data, scorer, loaded.tokenizer, k, fmt, seed=e.seed, limit=e.limit,
                        keep_examples=e.write_examples, generator=generator)
      path = write_result(out_dir, task, data, result, config, loaded)
      logging.info("wrote %s", path)
      results.append((task, result))
  print(format_table(results))
  print(f"results in {out_dir}")


def task_data_loader(e, tasks: list) -> Callable[[Any], Any]:
  """task -> its TaskData, from eval.source: files in eval.data_dir (missing ones fetched now, from
  the original hosts or eval.mirror) or TensorFlow Datasets for the tasks it carries."""
  source = e.get("source", "files")
  if source not in ("files", "tfds"):
    raise GPTError(f"eval.source={source!r}: choose files or tfds")
  data_dir = Path(e.data_dir).expanduser()
  from_tfds = {t.name for t in tasks if source == "tfds" and t.name in TFDS_TASKS}
  if source == "tfds" and len(from_tfds) < len(tasks):
    logging.info("not in TensorFlow Datasets, read from %s: %s", data_dir,
                 ", ".join(t.name for t in tasks if t.name not in from_tfds))
  ensure_tasks([t for t in tasks if t.name not in from_tfds], data_dir, e.get("mirror", ""))

  def load(task):
    if task.name in from_tfds:
      return load_tfds(task, e.get("tfds_data_dir", ""))
    return task.load(data_dir)
  return load


def write_result(out_dir: Path, task, data, result: TaskResult, config, loaded) -> Path:
  """<task>_<shots>shot.json (and .jsonl of per-item records when there are any)."""
  stem = f"{result.task}_{result.shots}shot"
  record = {
      "task": result.task, "shots": result.shots, "primary_metric": task.primary_metric,
      "metrics": {k: {"value": _finite(v), "stderr": _finite(s)}
                  for k, (v, s) in result.metrics.items()},
      "n_examples": result.n_examples, "n_available": len(data.docs),
      "truncation": vars(result.truncation), "fewshot_source": data.fewshot_source,
      "model": {"init": config.init, "source": loaded.source, "n_params": loaded.cfg.num_params(),
                "n_layer": loaded.cfg.n_layer, "n_embd": loaded.cfg.n_embd,
                "n_ctx": loaded.cfg.n_ctx, "dtype": loaded.cfg.dtype},
      "eval_config": dict(config.eval.items()),
      "data": data.files, "timing": result.timing,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if hasattr(task, "describe"):
    record["patterns"] = task.describe()
  path = out_dir / f"{stem}.json"
  if result.examples:  # first: a .json beside it means both are complete
    _write_atomic(out_dir / f"{stem}.jsonl",
                  "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in result.examples))
  _write_atomic(path, json.dumps(record, indent=2) + "\n")
  return path


def _write_atomic(path: Path, text: str) -> None:
  """Writes `text` to a temporary name and renames it over `path`, so a failure never leaves a half
  file. Characters UTF-8 cannot encode (a lone surrogate in task data) are written as \\uXXXX, which
  inside a JSON string is the same escape json.dumps would write, so the line still parses to the
  same string."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _finite(x: float) -> float | None:
  """NaN (an undefined stderr) becomes JSON null."""
  return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def format_table(results: list[tuple[Any, TaskResult]]) -> str:
  """A Markdown table with one row per task, shot count and metric."""
  lines = ["| task | shots | metric | value | stderr | n | truncated |", "|---|---|---|---|---|---|---|"]
  for task, r in results:
    t = r.truncation
    cut = f"{t.demos_dropped} demos, {t.context_cut} cut, {t.skipped} skipped"
    names = [task.primary_metric] + [m for m in r.metrics if m != task.primary_metric]
    for name in names:
      if name not in r.metrics:
        continue
      value, stderr = r.metrics[name]
      err = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
      lines.append(f"| {r.task} | {r.shots} | {name} | {value:.4f} | {err} | {r.n_examples} | {cut} |")
  return "\n".join(lines)
