"""Run reports: the TensorBoard event reader, the table (config diffs, losses, tokens/s, eval metrics)
as Markdown and CSV, the plots' data, and a report over a real lr sweep run by the local engine.
"""

import csv
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments import report  # noqa: E402
from experiments.tb_events import read_records, read_scalars  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from sweep_helpers import NAMES, SHRINK, use_compile_cache  # noqa: E402

pytest.importorskip("matplotlib", reason="reports draw plots with matplotlib: pip install -e '.[plots]'")


def _write_events(logdir: Path, scalars: dict[str, list[tuple[int, float]]], suffix: str = "") -> None:
  from tensorboardX import SummaryWriter

  with SummaryWriter(str(logdir), filename_suffix=suffix) as w:
    for tag, points in scalars.items():
      for step, value in points:
        w.add_scalar(tag, value, step)


def test_event_reader_reads_tensorboardx_files_and_resumed_runs(tmp_path):
  _write_events(tmp_path, {"train/loss": [(1, 5.0), (2, 4.5), (3, 4.25)], "val/loss": [(2, 4.75)]})
  _write_events(tmp_path, {"train/loss": [(3, 4.0), (4, 3.5)]}, suffix=".resumed")  # later file wins
  assert read_scalars(tmp_path) == {"train/loss": [(1, 5.0), (2, 4.5), (3, 4.0), (4, 3.5)],
                                    "val/loss": [(2, 4.75)]}


def test_event_reader_skips_a_cut_tail_and_rejects_corruption(tmp_path):
  _write_events(tmp_path, {"x": [(1, 1.0), (2, 2.0)]})
  (file,) = tmp_path.glob("events.*")
  data = file.read_bytes()
  n = len(list(read_records(file)))
  file.write_bytes(data[:-3])  # the writer was interrupted mid-record
  assert len(list(read_records(file))) == n - 1 and read_scalars(tmp_path) == {"x": [(1, 1.0)]}
  (length,) = struct.unpack("<Q", data[:8])
  bad = bytearray(data)
  bad[12 + length + 16 + 5] ^= 0xFF  # a byte inside the second record's payload
  file.write_bytes(bytes(bad))
  with pytest.raises(GPTError, match="corrupt event record"):
    read_scalars(tmp_path)


def _fake_run(root: Path, lr: float, seed: int, done: bool = True) -> Path:
  """A run folder as a sweep leaves it: point.json, markers, events and eval results."""
  run = root / f"learning_rate={lr},seed={seed}"
  (run / "sweep").mkdir(parents=True)
  config = {"seed": seed, "train": {"learning_rate": lr, "steps": 4}, "model": {"n_layer": 1}}
  (run / "sweep" / "point.json").write_text(json.dumps({"stages": [{"name": "0-train", "config": config}]}))
  if done:
    (run / "sweep" / "0-train.done").write_text("{}")
  base = 5 - 100 * lr - 0.1 * seed
  _write_events(run / "tensorboard", {
      "train/loss": [(s, base - 0.25 * s) for s in range(1, 5)], "val/loss": [(4, base - 0.5)],
      "train/tokens_per_sec": [(2, 100.0), (4, 300.0)]})
  (run / "eval").mkdir()
  for shots in (0, 1, 3):
    record = {"task": "lambada", "shots": shots, "primary_metric": "acc",
              "metrics": {"acc": {"value": 0.1 * shots + lr, "stderr": 0.01}, "ppl": {"value": 9.0}}}
    (run / "eval" / f"lambada_{shots}shot.json").write_text(json.dumps(record))
  return run


@pytest.fixture
def fake_runs(tmp_path):
  for lr in (0.001, 0.01):
    for seed in (0, 1):
      _fake_run(tmp_path, lr, seed, done=(lr, seed) != (0.01, 1))
  return tmp_path


def test_table_has_config_diffs_losses_speed_and_eval_metrics(fake_runs):
  runs = report.collect_runs(fake_runs)
  assert [r.name for r in runs] == ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1",
                                    "learning_rate=0.01,seed=0", "learning_rate=0.01,seed=1"]
  header, rows = report.table_rows(runs)
  assert header == ["run", "seed", "train.learning_rate", "status", "steps", "train_loss", "val_loss",
                    "tokens_per_sec", "lambada acc 0-shot", "lambada acc 1-shot", "lambada acc 3-shot"]
  first = dict(zip(header, rows[0]))
  assert first["seed"] == 0 and first["status"] == "done" and first["steps"] == 4
  assert first["train_loss"] == pytest.approx(5 - 0.1 - 1.0) and first["val_loss"] == pytest.approx(4.4)
  assert first["tokens_per_sec"] == 200.0 and first["lambada acc 3-shot"] == pytest.approx(0.301)
  assert dict(zip(header, rows[3]))["status"] == "incomplete"
  table = report.to_markdown(header, rows)
  assert table.splitlines()[0].startswith("| run | seed | train.learning_rate | status |")
  assert "| learning_rate=0.01,seed=1 | 1 | 0.01 | incomplete | 4 | 2.9 | 3.4 | 200 |" in table
  parsed = list(csv.reader(io.StringIO(report.to_csv(header, rows))))
  assert parsed[0] == header and float(parsed[2][header.index("val_loss")]) == pytest.approx(4.3)


def test_plots_show_the_logged_values(fake_runs):
  runs = report.collect_runs(fake_runs)
  losses = report.plot_losses(runs)
  train, val = losses.axes[0].lines[:2]
  np.testing.assert_allclose(train.get_xydata(), runs[0].scalars["train/loss"])
  np.testing.assert_allclose(val.get_xydata(), runs[0].scalars["val/loss"])

  by_lr = report.plot_vs_key(runs, "train.learning_rate")
  titles = [ax.get_title() for ax in by_lr.axes]
  assert titles == ["final val loss", "lambada acc 0-shot", "lambada acc 1-shot", "lambada acc 3-shot"]
  # Seeds averaged: lr 0.001 -> mean(4.4, 4.3); lr 0.01 -> mean(3.5, 3.4); bars span min..max.
  np.testing.assert_allclose(by_lr.axes[0].lines[0].get_xydata(), [[0.001, 4.35], [0.01, 3.45]])
  assert by_lr.axes[0].get_xscale() == "log"
  assert report.plot_vs_key(runs, "seed") is not None and report.plot_vs_key(runs, "status") is None

  shots = report.plot_shots(runs)
  assert [ax.get_title() for ax in shots.axes] == ["lambada"]
  np.testing.assert_allclose(shots.axes[0].lines[2].get_xydata(), [[0, 0.01], [1, 0.11], [3, 0.31]])


def test_write_report_files_and_cli(fake_runs, capsys):
  assert report.main([str(fake_runs)]) == 0
  out = fake_runs / "report"
  assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "loss_curves.png",
                                             "vs_train_learning_rate.png", "accuracy_vs_shots.png"}
  md = (out / "report.md").read_text()
  assert "![loss_curves](loss_curves.png)" in md and "| learning_rate=0.001,seed=0 |" in md
  assert "| run | seed |" in capsys.readouterr().out
  assert report.main([str(fake_runs / "nothing")]) == 2
  assert "is not a folder of runs" in capsys.readouterr().err


# ---------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def real_lr_sweep(tmp_path_factory):
  """experiments/sweeps/lr.py (2 learning rates x 2 seeds), shrunk, run for real by the local engine."""
  from conftest import require_shared
  from experiments import sweep as sweep_cli
  from experiments.engines import make_engine

  require_shared("data", "kant", "critique_of_pure_reason.txt")
  tmp = tmp_path_factory.mktemp("real_sweep")
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)
    use_compile_cache(mp)
    outcomes = sweep_cli.run_sweep(
        "experiments/sweeps/lr.py", str(tmp / "lr"), make_engine("local", parallel=2, devices="auto"),
        sets={**SHRINK, "data.cache_dir": str(tmp / "data_cache")})
  return tmp / "lr", outcomes


@pytest.mark.slow
def test_real_lr_sweep_on_local_engine_and_its_report(real_lr_sweep):
  root, outcomes = real_lr_sweep
  assert [(o.name, o.status) for o in outcomes] == [(n, "done") for n in NAMES], outcomes
  md = report.write_report(root)
  header, rows = report.table_rows(report.collect_runs(root))
  assert header[:8] == ["run", "seed", "train.learning_rate", "status", "steps", "train_loss",
                        "val_loss", "tokens_per_sec"]
  for row in rows:
    r = dict(zip(header, row))
    assert r["status"] == "done" and r["steps"] == 2 and r["tokens_per_sec"] > 0
    # The event files agree with the metrics.jsonl the trainer wrote alongside them.
    records = [json.loads(l) for l in (root / r["run"] / "metrics.jsonl").read_text().splitlines()]
    last = {rec["split"]: rec for rec in records}
    assert r["train_loss"] == pytest.approx(last["train"]["loss"], rel=1e-6)
    assert r["val_loss"] == pytest.approx(last["val"]["loss"], rel=1e-6)
  assert {p.name for p in md.parent.glob("*.png")} == {"loss_curves.png", "vs_train_learning_rate.png"}
