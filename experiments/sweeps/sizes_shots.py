"""Zero-, one- and few-shot accuracy of the four released GPT-2 sizes (each is downloaded into
models/ on first use; eval.shots runs every shot count in one process per model).

  python experiments/sweep.py experiments/sweeps/sizes_shots.py --workdir=runs/sizes --devices=auto
  python experiments/report.py runs/sizes       # accuracy_vs_shots.png: one line per size
"""

base = "configs/117m.py"
fixed = {"mode": "eval", "eval.tasks": "lambada,hellaswag,piqa,arc_easy", "eval.shots": "0,1,5"}
points = [{"init": "124M"}, {"init": "355M"}, {"init": "774M"}, {"init": "1558M"}]
