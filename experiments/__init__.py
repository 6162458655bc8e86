"""Experiment tooling: config sweeps (`sweep.py`, `sweeps/`, `engines/`), run reports (`report.py`)
and benchmarks. Run the scripts from the repository root, e.g. `python experiments/sweep.py ...`."""
