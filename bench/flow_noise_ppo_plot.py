"""TensorBoard run(s) of flow_noise_ppo.py -> one CSV of all scalars + a PNG of success vs env steps
(multi-task runs: also eval/{task}/success_once per task).

python bench/flow_noise_ppo_plot.py --runs runs/PickCube-v1__flow_noise_ppo__1__* --out results/x
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@dataclass
class Plot:
    runs: tuple[str, ...]
    """run directories (runs/{run_name})"""
    out: str = "results/flow_noise_ppo/curves"
    """output prefix: writes {out}.csv and {out}.png"""
    tags: tuple[str, ...] = ()
    """only these scalar tags go to the CSV (long runs); empty: all"""
    labels: tuple[str, ...] = ()
    """legend name per run; empty: the exp name from the run directory"""


def main(p: Plot):
    rows = []
    for run in p.runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            if not p.tags or tag in p.tags:
                rows += [(Path(run).name, tag, e.step, e.value) for e in acc.Scalars(tag)]
    Path(p.out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{p.out}.csv", "w", newline="") as f:
        csv.writer(f).writerows([("run", "tag", "env_step", "value"), *rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(p.runs):
        name = Path(run).name
        per_task = sorted(
            {t for r, t, _, _ in rows if r == name and t.endswith("/success_once") and t.count("/") == 2}
        )
        styles = [("eval/success_once", "o-"), ("charts/success_once", ".:")]
        styles += [(tag, m + "--") for tag, m in zip(per_task, "s^vD<>", strict=False)]  # multi-task runs
        for tag, style in styles:
            pts = sorted((s, v) for r, t, s, v in rows if r == name and t == tag)
            if pts:
                label = p.labels[i] if p.labels else name.split("__")[1]
                ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=f"{label} {tag}")
    ax.set_xlabel("env steps of PPO (after SFT at 0)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{p.out}.png", dpi=100)
    print(f"wrote {p.out}.csv ({len(rows)} rows) and {p.out}.png")


if __name__ == "__main__":
    main(tyro.cli(Plot))
