"""lr.py plus a few-shot evaluation of every trained model: each point trains, then evaluates its
own workdir (`init="{workdir}"`) on LAMBADA and PIQA at 0, 1 and 3 shots.

  python experiments/sweep.py experiments/sweeps/lr_eval.py --workdir=runs/lr_eval --parallel=2
  python experiments/report.py runs/lr_eval     # adds eval columns and accuracy_vs_shots.png
"""
import runpy
from pathlib import Path

# lr.py's grid, read from it (not copied), so that the two sweeps train the same points.
_lr = runpy.run_path(str(Path(__file__).with_name("lr.py")))
base, fixed, product = _lr["base"], _lr["fixed"], _lr["product"]
stages = [
    {"mode": "train"},
    {"mode": "eval", "init": "{workdir}", "eval.tasks": "lambada,piqa", "eval.shots": "0,1,3",
     "eval.limit": 200, "eval.data_dir": "../shared/data"},
]
