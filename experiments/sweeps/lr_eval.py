"""lr.py plus a few-shot evaluation of every trained model: each point trains, then evaluates its
own workdir (`init="{workdir}"`) on LAMBADA and PIQA at 0, 1 and 3 shots.

  python experiments/sweep.py experiments/sweeps/lr_eval.py --workdir=runs/lr_eval --parallel=2
  python experiments/report.py runs/lr_eval     # adds eval columns and accuracy_vs_shots.png
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
stages = [
    {"mode": "train"},
    {"mode": "eval", "init": "{workdir}", "eval.tasks": "lambada,piqa", "eval.shots": "0,1,3",
     "eval.limit": 200, "eval.data_dir": "../shared/data"},
]
