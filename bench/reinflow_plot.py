"""Plots the PickCube ReinFlow fine-tuning eval curves (reinflow.py's runs/<run>/eval_curve.csv, copied to
results/reinflow/pickcube_ft_*.csv) into results/reinflow/pickcube.png.

usage: python bench/reinflow_plot.py  (from the repo root)
"""

import csv
import glob

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for path in sorted(glob.glob("results/reinflow/pickcube_ft_*.csv")):
    rows = list(csv.DictReader(open(path)))
    x = [int(r["env_steps"]) for r in rows]
    label = path.split("pickcube_")[1][:-4]
    ax[0].plot(x, [float(r["eval_success_once"]) for r in rows], "o-", label=label)
    ax[1].plot(x, [float(r["eval_return"]) for r in rows], "o-", label=label)
ax[0].set(xlabel="fine-tuning env steps", ylabel="eval success_once (20 eps)")
ax[1].set(xlabel="fine-tuning env steps", ylabel="eval return (100 steps)")
ax[0].legend(fontsize=7)
fig.suptitle("ReinFlow on PickCube-v1 from BC on 100 MP demos (CPU, deterministic 4-step ODE eval)")
fig.tight_layout()
fig.savefig("results/reinflow/pickcube.png", dpi=80)
print("results/reinflow/pickcube.png")
