"""experiments/compare_shots.py on result files written by gpt.evaluate.write_result."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from gpt.config import base_config
from gpt.evals import get_task
from gpt.evals.base import TaskData, Truncation
from gpt.evals.runner import TaskResult
from gpt.evaluate import write_result
from gpt.model import GPTConfig

SCRIPT = REPO / "experiments" / "compare_shots.py"


def load_script():
  spec = importlib.util.spec_from_file_location("compare_shots", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fake_run(tmp_path, name, cfg, piqa):
  """An eval workdir with piqa at 0/1/5 shots (acc_norm values `piqa`) and wikitext2."""
  out = tmp_path / name / "eval"
  out.mkdir(parents=True)
  loaded = SimpleNamespace(cfg=cfg, source=f"test {name}")
  data = TaskData([None] * 100, None, {"x": "0" * 64})
  for shots, value in zip((0, 1, 5), piqa):
    result = TaskResult("piqa", shots, {"acc": (0.5, 0.05), "acc_norm": (value, 0.02)}, 100,
                        Truncation(), {}, [])
    write_result(out, get_task("piqa"), data, result, base_config(), loaded)
  result = TaskResult("wikitext2", 0, {"word_perplexity": (37.5, 1.25)}, 62, Truncation(), {}, [])
  write_result(out, get_task("wikitext2"), data, result, base_config(), loaded)
  return tmp_path / name


@pytest.fixture
def workdirs(tmp_path):
  small = fake_run(tmp_path, "small", GPTConfig(), (0.62, 0.63, 0.645))
  medium = fake_run(tmp_path, "medium", GPTConfig(n_layer=24, n_embd=1024, n_head=16), (0.67, 0.68, 0.7))
  return [str(small), str(medium)]


def test_table_has_a_row_per_model_and_task(workdirs):
  script = load_script()
  table = script.markdown_table(script.series(script.load_results(workdirs), {})).splitlines()
  assert table[0] == "| task | model | metric | n | 0-shot | 1-shot | 5-shot |"
  assert table[2] == "| piqa | 124M | acc_norm | 100 | 62.00 ± 2.00 | 63.00 ± 2.00 | 64.50 ± 2.00 |"
  assert table[3] == "| piqa | 355M | acc_norm | 100 | 67.00 ± 2.00 | 68.00 ± 2.00 | 70.00 ± 2.00 |"
  assert table[4] == "| wikitext2 | 124M | word_perplexity | 62 | 37.50 ± 1.25 |  |  |"
  chosen = script.series(script.load_results(workdirs[:1]), {"piqa": "acc"})
  assert list(chosen)[0] == ("124M", "piqa", "acc")


def test_plot_is_written(workdirs, tmp_path, capsys):
  pytest.importorskip("matplotlib", reason="the plot needs the [plots] extra (matplotlib)")
  out = tmp_path / "shots.png"
  load_script().main([*workdirs, f"--out={out}"])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "plot saved to" in capsys.readouterr().out


def test_plot_goes_into_the_eval_folder_it_read_not_the_current_directory(workdirs, tmp_path,
                                                                           monkeypatch, capsys):
  pytest.importorskip("matplotlib", reason="the plot needs the [plots] extra (matplotlib)")
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  load_script().main(workdirs)
  out = Path(workdirs[0]) / "eval" / "compare_shots.png"
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"plot saved to {out}" in capsys.readouterr().out
  assert list(cwd.iterdir()) == [] and not (Path(workdirs[1]) / "eval" / "compare_shots.png").exists()


def test_without_matplotlib_the_table_is_printed_and_the_plot_skipped_in_one_line(workdirs, tmp_path):
  code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
          f"sys.argv = ['compare_shots.py', *{workdirs!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)
  assert proc.returncode == 0
  table = proc.stdout.strip().splitlines()
  assert table[0] == "| task | model | metric | n | 0-shot | 1-shot | 5-shot |" and len(table) == 6
  assert proc.stderr.strip().splitlines() == [
      "no plot: it needs matplotlib: pip install matplotlib (or pip install -e '.[plots]'); "
      "the table above is complete"]
  assert not list(Path(workdirs[0]).rglob("*.png")) and not list(tmp_path.glob("*.png"))


def test_empty_workdir_is_one_line_error(tmp_path):
  with pytest.raises(SystemExit, match="no <task>_<shots>shot.json files"):
    load_script().load_results([str(tmp_path)])
