"""Plots eval curves written by sac_flow.py (runs/<run>/eval.csv, copied to results/sac_flow/*.csv).

usage: python bench/sac_flow_plot.py results/sac_flow/pickcube_*.csv --out results/sac_flow/pickcube.png
"""

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("csvs", nargs="+")
ap.add_argument("--metric", default="success_once", help="success_once, success_at_end or return")
ap.add_argument("--x", default="step", help="step or wall_s")
ap.add_argument("--out", required=True)
a = ap.parse_args()
fig, ax = plt.subplots(figsize=(6, 4))
for path in a.csvs:
    rows = list(csv.DictReader(open(path)))
    x = [float(r[a.x]) / (60 if a.x == "wall_s" else 1) for r in rows]
    ax.plot(x, [float(r[a.metric]) for r in rows], marker="o", ms=3, label=Path(path).stem)
ax.set_xlabel("wall minutes" if a.x == "wall_s" else "environment steps")
ax.set_ylabel(f"eval {a.metric}")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(a.out, dpi=110)
print(a.out)
