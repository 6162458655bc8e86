"""The chaos benchmark in small: two kill -9 at random moments of a tiny training, and the final
parameters equal an uninterrupted run's bit for bit (experiments/chaos_train.py)."""

import pytest

from experiments import chaos_train


@pytest.mark.slow
def test_two_random_kills_end_bit_identical(tmp_path, capsys):
  rc = chaos_train.main(["--kills=2", "--steps=12", "--save_every=3", "--seed=1",
                         f"--root={tmp_path}"])
  out = capsys.readouterr().out
  assert rc == 0, out
  row = [line for line in out.splitlines() if line.startswith("| 2 |")]
  assert row and "| 2/2 | 0 |" in row[0] and "| 0.0 | True | 0 |" in row[0], out
