"""The PickCube-v1 benchmark's per-run csvs (bench/pickcube_benchmark.py) -> results/benchmark/pickcube.csv
(mean and std over seeds per row and mark), a markdown table for the README (printed) and
results/benchmark/pickcube.png (success_once against env steps and against wall-clock minutes, one line per
row with a band of ± one std over seeds).

    python bench/pickcube_benchmark_results.py [--runs results/benchmark/per_run] [--out results/benchmark]

The std is over seeds (ddof 0, so one seed shows 0); a mark missing in some seed is averaged over the seeds
that have it, and the table says how many that was.
"""

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["sac_flow_g", "sac_flow_t", "sac_flow_naive", "reinflow", "flow_noise_ppo", "flow_sde_ppo"]
LABEL = {"sac_flow_g": "sac_flow Flow-G", "sac_flow_t": "sac_flow Flow-T", "sac_flow_naive": "sac_flow naive",
         "reinflow": "reinflow (K=4)"}


def read_runs(run_dir: Path) -> dict[str, dict[int, list[dict]]]:
    """{row: {seed: [csv rows as floats]}} from files named <row>_s<seed>.csv."""
    runs = defaultdict(dict)
    for path in sorted(run_dir.glob("*_s*.csv")):
        m = re.fullmatch(r"(.+)_s(\d+)\.csv", path.name)
        with open(path) as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        runs[m.group(1)][int(m.group(2))] = rows
    if not runs:
        raise SystemExit(f"error: no <row>_s<seed>.csv in {run_dir}; run bench/pickcube_benchmark.py first")
    return runs


def summarise(runs) -> list[dict]:
    """One dict per row and mark: seeds, mean and std of success_once, success_at_end and wall minutes."""
    out = []
    for row in sorted(runs, key=lambda r: (ORDER.index(r) if r in ORDER else len(ORDER), r)):
        by_step = defaultdict(list)
        for seed_rows in runs[row].values():
            for r in seed_rows:
                by_step[int(r["step"])].append(r)
        for step in sorted(by_step):
            rs = by_step[step]
            entry = {"row": row, "step": step, "seeds": len(rs)}
            for key, col, scale in (("success_once",) * 2 + (1,), ("success_at_end",) * 2 + (1,),
                                    ("wall_min", "wall_s", 60)):  # fmt: skip
                values = np.array([r[col] / scale for r in rs])
                entry[f"{key}_mean"], entry[f"{key}_std"] = values.mean(), values.std()
            out.append(entry)
    return out


def steps_label(step: int) -> str:
    return "SFT (0)" if step == 0 else f"{step / 1000:g}k"


def n_of(seeds: int) -> str:
    return f"{seeds} seed" + "s" * (seeds != 1)


def markdown(summary) -> str:
    """Rows x marks of success_once mean ± std (seeds), and the wall minutes to the row's last mark."""
    steps = sorted({e["step"] for e in summary})
    rows = list(dict.fromkeys(e["row"] for e in summary))
    cell = {(e["row"], e["step"]): e for e in summary}
    n_seeds = {row: max(e["seeds"] for e in summary if e["row"] == row) for row in rows}
    lines = ["| method | " + " | ".join(steps_label(s) for s in steps) + " | wall min to the last mark |",
             "|---" * (len(steps) + 2) + "|"]  # fmt: skip
    for row in rows:
        cells = []
        for s in steps:
            e = cell.get((row, s))
            if e is None:
                cells.append("")
                continue
            seeds = "" if e["seeds"] == n_seeds[row] else f" ({n_of(e['seeds'])})"
            cells.append(f"{e['success_once_mean']:.2f} ± {e['success_once_std']:.2f}{seeds}")
        last = cell[(row, max(s for r, s in cell if r == row))]
        wall = f"{last['wall_min_mean']:.1f} ± {last['wall_min_std']:.1f}"
        label = f"{LABEL.get(row, row)} ({n_of(n_seeds[row])})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def plot(summary, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in dict.fromkeys(e["row"] for e in summary):
        es = [e for e in summary if e["row"] == row]
        mean = np.array([e["success_once_mean"] for e in es])
        std = np.array([e["success_once_std"] for e in es])
        for ax, x in ((axes[0], [e["step"] / 1000 for e in es]), (axes[1], [e["wall_min_mean"] for e in es])):
            (line,) = ax.plot(x, mean, marker="o", label=LABEL.get(row, row))
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("env steps (thousands)")
    axes[1].set_xlabel("wall-clock minutes from process start (mean over seeds)")
    axes[0].set_ylabel("success_once, 200 fixed initial states")
    axes[0].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle("PickCube-v1: SFT on 100 motion-planned demos, then RL (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "results" / "benchmark" / "per_run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmark")
    args = p.parse_args(argv)
    summary = summarise(read_runs(args.runs))
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(summary[0])
    with open(args.out / "pickcube.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for e in summary:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in e.items()})
    print(f"wrote {args.out / 'pickcube.csv'}")
    plot(summary, args.out / "pickcube.png")
    print(markdown(summary))


if __name__ == "__main__":
    main()
