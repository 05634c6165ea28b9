"""TensorBoard runs of flow_sde_ppo.py → one CSV of eval/* and charts/* scalars + a PNG of eval success.

python bench/flow_sde_ppo_plot.py --runs runs/PickCube-v1__fsppo_pick_s1__1__* --out results/flow_sde_ppo/x
(also reads flow_noise_ppo.py's runs: same eval/* and charts/* tags)
"""

import csv
import os
from dataclasses import dataclass

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class PlotArgs:
    runs: tuple[str, ...]
    """run directories (runs/{run_name})"""
    out: str = "results/flow_sde_ppo/pickcube"
    """output prefix: {out}.csv and {out}.png"""
    title: str = "flow_sde_ppo on PickCube-v1 (deterministic ODE evaluation, 20 episodes)"
    """figure title"""


def main(p):
    rows = []
    for run in p.runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        wall0 = None
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                wall0 = e.wall_time if wall0 is None else min(wall0, e.wall_time)
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(("eval/", "charts/")):
                for e in acc.Scalars(tag):
                    rows.append(
                        dict(
                            run=os.path.basename(run.rstrip("/")),
                            tag=tag,
                            env_step=e.step,
                            wall_s=round(e.wall_time - wall0, 1),
                            value=e.value,
                        )
                    )
    os.makedirs(os.path.dirname(p.out) or ".", exist_ok=True)
    with open(p.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "tag", "env_step", "wall_s", "value"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run in sorted({r["run"] for r in rows}):
        name = "{1} s{2}".format(*run.split("__"))
        for a, tag, style in (
            (ax, "eval/success_once", "-o"),
            (ax, "eval/success_at_end", "--x"),
            (ax2, "eval/return", "-o"),
        ):
            pts = sorted((r["env_step"], r["value"]) for r in rows if r["run"] == run and r["tag"] == tag)
            if pts:
                a.plot(*zip(*pts, strict=True), style, label=f"{name} {tag[5:]}")
    ax.set_ylabel("eval success rate")
    ax.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("eval return (the run's reward mode)")
    for a in (ax, ax2):
        a.set_xlabel("RL env steps (step 0 = after SFT)")
        a.legend(fontsize=7)
    fig.suptitle(p.title)
    fig.tight_layout()
    fig.savefig(p.out + ".png", dpi=100)
    print(f"wrote {p.out}.csv ({len(rows)} rows) and {p.out}.png")


if __name__ == "__main__":
    main(tyro.cli(PlotArgs))
