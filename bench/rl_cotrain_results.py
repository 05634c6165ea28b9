"""Collects rl_cotrain.py result logs into results/rl_cotrain/{runs.csv,summary.csv,success.png}.

usage: python bench/rl_cotrain_results.py LOG_DIR [OUT_DIR]   (OUT_DIR defaults to results/rl_cotrain)
LOG_DIR holds {mode}_s{seed}.log, the stdout of `python rl_cotrain.py --mode MODE --seed SEED ...` followed
by a line "DONE rc=0 ..."; the last "eval step ..." line of each log is its result. rl-co and rl-sim-only
either resume Stage II from the sft-cotrain checkpoint of the same seed (their shared Stage I), or run both
stages: then their "eval step 0:" line (after Stage I, the same as --mode sft-cotrain) is also the sft-cotrain
result of that seed, unless LOG_DIR has an sft-cotrain log for it.
"""

import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

EVAL = re.compile(r"^eval step[= ](\d+):? (.*)$")  # "eval step 0: ..." (and older logs' "eval step=0 ...")
ENV = re.compile(r"--env-id (\S+)")  # searched in a log's first line, the command
DOMAINS = ("sim", "real", "eval_shift")
METHODS = ("real-only", "sft-cotrain", "rl-co", "rl-sim-only")


def evals(text: str):
    """The (step, {domain: success}) of every "eval step ..." line of a log."""
    out = []
    for line in text.splitlines():
        m = EVAL.match(line)
        if m:
            out.append((int(m[1]), {k: float(v) for k, v in (kv.split("=") for kv in m[2].split())}))
    return out


def mean_std(runs) -> dict:
    """{domain}_mean and {domain}_std of the runs' success, over seeds."""
    out = {}
    for d in DOMAINS:
        v = np.array([r[d] for r in runs])
        out[f"{d}_mean"], out[f"{d}_std"] = round(v.mean(), 3), round(v.std(), 3)
    return out


def write_csv(path, rows, cols=None):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols or list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(log_dir: Path, out_dir=Path("results/rl_cotrain")):
    rows, env_ids = [], set()
    for log in sorted(log_dir.glob("*_s*.log")):
        mode, seed = log.stem.rsplit("_s", 1)
        text = log.read_text()
        ev = evals(text)
        if not ev or "DONE rc=0" not in text:
            print(f"skipping unfinished {log.name}")
            continue
        step, final = ev[-1]
        rows.append({"method": mode, "seed": int(seed), "rl_steps": step, **final})
        if mode == "rl-co" and ev[0][0] == 0 and not (log_dir / f"sft-cotrain_s{seed}.log").exists():
            rows.append({"method": "sft-cotrain", "seed": int(seed), "rl_steps": 0, **ev[0][1]})
        env_ids.add(ENV.search(text.splitlines()[0] + " --env-id PickCube-v1")[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    write_csv(out_dir / "runs.csv", rows, ["method", "seed", "rl_steps", *DOMAINS])
    summary = []
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            summary.append({"method": m, "seeds": len(rs), **mean_std(rs)})
    write_csv(out_dir / "summary.csv", summary)
    for s in summary:
        print(s)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(summary))
    for i, d in enumerate(DOMAINS):
        ax.bar(x + (i - 1) * 0.27, [s[f"{d}_mean"] for s in summary], 0.27,
               yerr=[s[f"{d}_std"] for s in summary], label=d, capsize=2)  # fmt: skip
    ax.set_xticks(x, [f"{s['method']}\n(n={s['seeds']})" for s in summary])
    ax.set_ylabel("success rate (deterministic policy)")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"{', '.join(sorted(env_ids))}: sim / shifted 'real' / unseen shift success, mean ± std over seeds"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "success.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python bench/rl_cotrain_results.py LOG_DIR [OUT_DIR]")
    main(Path(sys.argv[1]), *map(Path, sys.argv[2:]))
