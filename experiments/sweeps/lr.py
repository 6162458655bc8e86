"""Learning rate x seed on the tiny config (4 runs), trained from scratch on the Kant corpus.

  python experiments/sweep.py experiments/sweeps/lr.py --workdir=runs/lr --parallel=2
  python experiments/report.py runs/lr
"""

base = "configs/tiny.py"
fixed = {
    "data.path": "../shared/data/kant/critique_of_pure_reason.txt",
    "train.steps": 200,
    "train.warmup_steps": 20,
    "train.val_every": 50,
    "train.sample_every": 0,
    "train.log_every": 10,
}
product = {"train.learning_rate": [1e-3, 3e-3], "seed": [0, 1]}
