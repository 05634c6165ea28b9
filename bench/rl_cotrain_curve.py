"""Real-data-efficiency curve of rl_cotrain.py: number of real demos vs success in the shifted "real" domain.

usage: python bench/rl_cotrain_curve.py LOG_DIR
LOG_DIR holds {mode}_n{N}_s{seed}.log, the stdout of
    python rl_cotrain.py --mode real-only --seed S --real-demos N ...
    python rl_cotrain.py --mode rl-co --seed S --real-demos N --total-timesteps 12000 --eval-freq 12000 ...
each ending with a line "DONE rc=0 ...". An rl-co run does Stage I (SFT on the sim/real mixture, exactly what
--mode sft-cotrain does) and prints "eval step 0: ..." before Stage II: that line is the sft-cotrain result,
its last eval line the rl-co result. The 20-demo points come from results/rl_cotrain/runs.csv (the table's
runs). Writes results/rl_cotrain/{curve_runs.csv, curve_summary.csv, real_demos_curve.png}.
"""

import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rl_cotrain_results import DOMAINS, evals, mean_std, write_csv  # noqa: E402  (bench/ is on sys.path)

NAME = re.compile(r"^(?P<mode>[a-z-]+)_n(?P<n>\d+)_s(?P<seed>\d+)$")
METHODS = ("real-only", "sft-cotrain", "rl-co")
OUT = Path("results/rl_cotrain")


def rows_from_logs(log_dir: Path):
    rows = []
    for log in sorted(log_dir.glob("*_n*_s*.log")):
        m, text = NAME.match(log.stem), log.read_text()
        ev = evals(text)
        if m is None or "DONE rc=0" not in text or not ev:
            print(f"skipping unfinished {log.name}")
            continue
        base = {"real_demos": int(m["n"]), "seed": int(m["seed"]), "source": log.name}
        if m["mode"] == "rl-co":  # Stage I eval = sft-cotrain, final eval = rl-co
            step0, final = ev[0], ev[-1]
            assert step0[0] == 0 and final[0] > 0, log.name
            rows.append({"method": "sft-cotrain", "rl_steps": 0, **base, **step0[1]})
            rows.append({"method": "rl-co", "rl_steps": final[0], **base, **final[1]})
        else:
            rows.append({"method": m["mode"], "rl_steps": ev[-1][0], **base, **ev[-1][1]})
    return rows


def rows_at_20():
    with open(OUT / "runs.csv") as f:
        return [
            {**r, "real_demos": 20, "source": "runs.csv"} for r in csv.DictReader(f) if r["method"] in METHODS
        ]


def main(log_dir: Path):
    rows = rows_from_logs(log_dir) + rows_at_20()
    for r in rows:
        r["seed"], r["rl_steps"] = int(r["seed"]), int(r["rl_steps"])
        for d in DOMAINS:
            r[d] = float(r[d])
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["real_demos"], r["seed"]))
    cols = ["method", "real_demos", "seed", "rl_steps", *DOMAINS, "source"]
    write_csv(OUT / "curve_runs.csv", rows, cols)
    summary = []
    for m in METHODS:
        for n in sorted({r["real_demos"] for r in rows if r["method"] == m}):
            rs = [r for r in rows if r["method"] == m and r["real_demos"] == n]
            seeds = " ".join(str(r["seed"]) for r in rs)
            summary.append({"method": m, "real_demos": n, "seeds": seeds, **mean_std(rs)})
    write_csv(OUT / "curve_summary.csv", summary)
    for s in summary:
        print(s)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(METHODS):
        rs = [r for r in rows if r["method"] == m]
        ns = sorted({r["real_demos"] for r in rs})
        x = np.array([r["real_demos"] for r in rs]) * (1 + 0.04 * (i - 1))  # small offset per method
        ax.scatter(x, [r["real"] for r in rs], s=14, alpha=0.4, color=f"C{i}")
        means = [np.mean([r["real"] for r in rs if r["real_demos"] == n]) for n in ns]
        ax.plot(np.array(ns) * (1 + 0.04 * (i - 1)), means, "-o", color=f"C{i}", label=f"{m} (mean)")
    ax.set_xscale("log")
    ns = sorted({r["real_demos"] for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("real demos (scripted expert in the shifted domain)")
    ax.set_ylabel("real-domain success_once (20 episodes)")
    ax.set_ylim(-0.02, 1)
    ax.set_title("PickCube-v1: real-data efficiency (dots: seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "real_demos_curve.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python bench/rl_cotrain_curve.py LOG_DIR")
    main(Path(sys.argv[1]))
