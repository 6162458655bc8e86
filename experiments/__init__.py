"""Experiment tooling: config sweeps (`sweep.py`, `sweep_spec.py`, `sweeps/`, `engines/`,
`progress.py`), run reports (`report.py`, `tb_events.py`, `compare_shots.py`) and benchmarks
(`bench_*.py`, `decode_runners.py` the decode benchmark's runners, `bench_gemv_loop.cc` for gemv.cc's loops alone, `gpu_check.py`, `chaos_train.py`, `quantize_quality.py`; each states its machine
through `machine.py`, and `quick_train.py` trains the small models they and the tests compare).
Run the scripts from the repository root, e.g. `python experiments/sweep.py ...`."""
