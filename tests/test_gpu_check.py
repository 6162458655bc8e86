"""experiments/gpu_check.py runs end to end on tiny shapes on the CPU, so a GPU session only has to
run it; its batch search and peak table are checked on their own."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_gpu_check():
  spec = importlib.util.spec_from_file_location("gpu_check", REPO / "experiments" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_peak_table_matches_device_kinds():
  gc = load_gpu_check()
  assert gc.peak_flops(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3"), False)[0] == 989.4e12
  assert gc.peak_flops(SimpleNamespace(device_kind="NVIDIA H100 PCIe"), False)[0] == 756e12
  assert gc.peak_flops(SimpleNamespace(device_kind="NVIDIA H200"), False)[0] == 989.4e12


def test_largest_batch_is_the_largest_that_fits_the_compiled_memory(monkeypatch):
  gc = load_gpu_check()
  shape, fields = (1, 32, 2, 16), {"attention_impl": "xla"}
  compile_bytes = gc.train_bytes
  at = {}

  def train_bytes(shape, remat, batch, fields):
    """Each batch's train step compiled once (several seconds each), when first asked: the
    premise below and the searches share them, and batch 16 is compiled only if a search asks."""
    if batch not in at:
      at[batch] = compile_bytes(shape, remat, batch, fields)
    return at[batch]

  monkeypatch.setattr(gc, "train_bytes", train_bytes)
  assert train_bytes(shape, "none", 1, fields) < train_bytes(shape, "none", 2, fields) < \
      train_bytes(shape, "none", 4, fields) < train_bytes(shape, "none", 8, fields)  # the search's premise
  assert gc.largest_batch(shape, "none", at[4], 16, fields)[0] == 4
  assert gc.largest_batch(shape, "none", at[4] - 1, 16, fields)[0] == 2
  assert gc.largest_batch(shape, "none", at[1] - 1, 16, fields)[0] == 0
  assert gc.largest_batch(shape, "none", None, 16, fields) == (16, 0)


@pytest.mark.slow
def test_script_runs_end_to_end_on_tiny_shapes(shared_dir, capsys):
  gc = load_gpu_check()
  rows = gc.main(["--tiny", f"--data_dir={shared_dir / 'data'}"])
  sections = [r[0] for r in rows]
  assert sections == ["train"] * 3 + ["decode"] * 4 + ["eval"]
  for row in rows:
    assert row[3] not in ("", "skipped"), row
  out = capsys.readouterr().out
  assert "| section | model | setting |" in out and out.count("| decode |") == 4
