"""Plots reinflow.py's eval curves (runs/<run>/eval_curve.csv, copied to results/reinflow/): PickCube-v1
success/return into results/reinflow/pickcube.png, MuJoCo (Hopper-v5, Walker2d-v5) return into
results/reinflow/mujoco.png. The point at 0 env steps is the BC-pretrained policy.

usage: python bench/reinflow_plot.py  (from the repo root)
"""

import csv
import glob

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(pattern):
    for path in sorted(glob.glob(pattern)):
        rows = list(csv.DictReader(open(path)))
        label = path.split("/")[-1][:-4]
        yield label, [int(r["env_steps"]) for r in rows], rows


fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for label, x, rows in curves("results/reinflow/pickcube_ft_*.csv"):
    label = label.removeprefix("pickcube_")
    ax[0].plot(x, [float(r["eval_success_once"]) for r in rows], "o-", label=label)
    ax[1].plot(x, [float(r["eval_return"]) for r in rows], "o-", label=label)
ax[0].set(xlabel="fine-tuning env steps", ylabel="eval success_once (20 eps)")
ax[1].set(xlabel="fine-tuning env steps", ylabel="eval return (100 steps)")
ax[0].legend(fontsize=7)
fig.suptitle("ReinFlow on PickCube-v1 from BC on 100 MP demos (CPU, deterministic 4-step ODE eval)")
fig.tight_layout()
fig.savefig("results/reinflow/pickcube.png", dpi=80)
print("results/reinflow/pickcube.png")

envs = [("hopper", "Hopper-v5"), ("walker", "Walker2d-v5")]
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for a, (prefix, env_id) in zip(ax, envs, strict=True):
    for label, x, rows in curves(f"results/reinflow/{prefix}_ft_*.csv"):
        a.plot(x, [float(r["eval_return"]) for r in rows], "o-", label=label.removeprefix(f"{prefix}_ft_"))
    a.axvline(4e5, ls=":", c="gray")  # seed-1 runs were resumed from their 400k checkpoint (README)
    a.set(title=env_id, xlabel="fine-tuning env steps", ylabel="eval return (deterministic ODE)")
    a.legend(fontsize=7)
fig.suptitle("ReinFlow on MuJoCo from BC on local medium demos (CPU); step 0 = BC; dotted: seed 1 resumed")
fig.tight_layout()
fig.savefig("results/reinflow/mujoco.png", dpi=80)
print("results/reinflow/mujoco.png")
