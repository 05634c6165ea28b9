"""Seconds per SAC update: sac_flow.py's flow policy (g, t, naive; K steps) vs a Gaussian-policy SAC update
(CleanRL's sac_continuous_action.py actor) with the same twin critic, widths, batch and optimisers.

One update = critic step (target uses a' ~ π(·|s')) + actor step + α step + target lerp, as in sac_flow.py.
Variants are timed round-robin (so load changes on a shared machine hit them alike); the median is reported.
usage: OMP_NUM_THREADS=1 python bench/sac_flow_speed.py [--K 4] [--batch 256] [--hidden 256] [--compile]
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sac_flow_mujoco import GaussianPolicy  # noqa: E402  (CleanRL's SAC actor)

import sac_flow as sf  # noqa: E402


def make_update(actor, obs_dim, act_dim, hidden, gamma=0.8, tau=0.01):
    qf, qf_target = sf.SoftQ(obs_dim, act_dim, hidden), sf.SoftQ(obs_dim, act_dim, hidden)
    qf_target.load_state_dict(qf.state_dict())
    log_alpha = torch.zeros((), requires_grad=True)
    opt_pi = torch.optim.Adam(actor.parameters(), 3e-4, fused=True)  # as sac_flow.py
    opt_q = torch.optim.Adam(qf.parameters(), 1e-3, fused=True)
    opt_a = torch.optim.Adam([log_alpha], 1e-3, fused=True)

    def update(s, a, r, s2, d):
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = actor(s2)
            y = sf.soft_q_target(r, d, gamma, *qf_target(s2, a2), logp2, alpha)
        q_loss = sf.critic_loss(*qf(s, a), y)
        opt_q.zero_grad(), q_loss.backward(), opt_q.step()
        qf.requires_grad_(False)
        a_pi, logp = actor(s)
        pi_loss = sf.actor_loss(logp, *qf(s, a_pi), alpha)
        opt_pi.zero_grad(), pi_loss.backward(), opt_pi.step()
        qf.requires_grad_(True)
        a_loss = sf.alpha_loss(log_alpha, logp, -float(act_dim))
        opt_a.zero_grad(), a_loss.backward(), opt_a.step()
        with torch.no_grad():
            for p, p_t in zip(qf.parameters(), qf_target.parameters(), strict=True):
                p_t.lerp_(p, tau)

    return update


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--obs-dim", type=int, default=42)  # PickCube-v1 state
    ap.add_argument("--act-dim", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5, help="updates per timed block")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd actors")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    a = ap.parse_args()
    torch.manual_seed(0)
    o, d, h = a.obs_dim, a.act_dim, a.hidden
    actors = {"gaussian (CleanRL)": GaussianPolicy(o, d, None, 0, h, 0, np.ones(d), np.zeros(d))}
    for v in ("g", "t", "naive"):
        actors[f"flow-{v} K={a.K}"] = sf.FlowPolicy(o, d, v, a.K, h, 64, np.ones(d), np.zeros(d))
    if a.compile:
        for name in list(actors):
            actors[name + " compiled"] = torch.compile(actors[name])
    updates = {name: make_update(actor, o, d, h) for name, actor in actors.items()}
    batch = (
        torch.randn(a.batch, o),
        torch.rand(a.batch, d) * 2 - 1,
        torch.rand(a.batch),
        torch.randn(a.batch, o),
        torch.zeros(a.batch),
    )
    for u in updates.values():  # warm-up (and compilation) excluded from timing
        for _ in range(3):
            u(*batch)
    times = {name: [] for name in updates}
    for _ in range(a.rounds):
        for name, u in updates.items():
            t = time.perf_counter()
            for _ in range(a.reps):
                u(*batch)
            times[name].append((time.perf_counter() - t) / a.reps)
    base = statistics.median(times["gaussian (CleanRL)"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {a.batch}, hidden {h}, obs/act {o}/{d}"
    )
    print("| policy | ms / SAC update (median) | × Gaussian |\n|-|-|-|")
    rows = []
    for name, ts in times.items():
        m = statistics.median(ts)
        rows.append({"policy": name, "ms_per_update": round(1e3 * m, 2), "ratio": round(m / base, 2)})
        print(f"| {name} | {1e3 * m:.1f} | {m / base:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
