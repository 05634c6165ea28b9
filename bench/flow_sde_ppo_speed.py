"""Cost of one PPO update of flow_sde_ppo.py: one SDE step per chunk (two-layer MDP) vs every step SDE.

With --sde-steps one the update recomputes one Gaussian transition per sample (one velocity forward);
with --sde-steps all it recomputes K. This times `flow_sde_ppo.ppo_update` side by side on the same synthetic
rollout batch (obs and chains sampled by the policy itself), for several K and network widths, and writes
results/flow_sde_ppo/update_cost.csv (+ .png). The whole update also holds the critic's forward/backward and
the Adam steps, which do not shrink with K; the actor_logprob_* columns time only the part that does.

    OMP_NUM_THREADS=1 python bench/flow_sde_ppo_speed.py
"""

import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_sde_ppo as F  # noqa: E402


@dataclass
class BenchArgs:
    denoising_steps: tuple[int, ...] = (4, 10)
    """K values to time"""
    hidden_dims: tuple[int, ...] = (256, 1024)
    """MLP widths to time (the velocity net dominates more as it grows)"""
    repeats: int = 5
    """timed updates per setting (median reported), after one warm-up"""
    out: str = "results/flow_sde_ppo/update_cost.csv"
    """CSV path (a PNG is written next to it)"""


def time_update(K, hidden, sde_steps, repeats, obs_dim=42, act_dim=4):
    args = F.Args(denoising_steps=K, hidden_dim=hidden, sde_steps=sde_steps)
    args.batch_size = args.num_envs * args.num_steps  # the script's default rollout: 200 chunk transitions
    args.minibatch_size = args.batch_size // args.num_minibatches
    torch.manual_seed(0)
    agent = F.Agent(obs_dim, act_dim, args.action_horizon, hidden)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-5)
    rng, o = np.random.default_rng(0), torch.randn(args.batch_size, obs_dim)
    ks = [F.stochastic_steps(K, sde_steps, "sde", rng) for _ in range(args.batch_size)]
    idx = torch.tensor(ks)
    chains, logps = [], []
    for i in range(args.batch_size):  # each sample with its own k*, as in a rollout of many chunk steps
        chain, logp = agent.sample(o[i : i + 1], K, ks[i], args.noise_level, "sde")
        chains.append(chain)
        logps.append(F.reduce_log_prob(logp, args.num_action_chunks, args.logprob_type))
    with torch.no_grad():
        values = agent.value(o)
    b = dict(obs=o, chain=torch.cat(chains), idx=idx, logp=torch.cat(logps), values=values)
    b["adv"], b["returns"] = torch.randn(args.batch_size), values + torch.randn(args.batch_size)
    F.ppo_update(agent, opt, b, args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.ppo_update(agent, opt, b, args)
        times.append(time.perf_counter() - t0)
    actor = []
    for _ in range(repeats):  # the part that scales with the number of recomputed steps: log-prob fwd + bwd
        t0 = time.perf_counter()
        for _ in range(args.update_epochs):
            for mb in torch.randperm(args.batch_size).split(args.minibatch_size):
                logp = agent.log_prob(o[mb], b["chain"][mb], idx[mb], K, args.noise_level, "sde")
                agent.zero_grad()
                logp.sum().backward()
        actor.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():  # rollout-side cost of sampling the same batch (K forwards either way)
        agent.sample(o, K, ks[0], args.noise_level, "sde")
    return float(np.median(times)), float(np.median(actor)), time.perf_counter() - t0


def main(bench):
    torch.set_num_threads(1)
    rows = []
    for K in bench.denoising_steps:
        for hidden in bench.hidden_dims:
            one, actor_one, sample_s = time_update(K, hidden, "one", bench.repeats)
            full, actor_all, _ = time_update(K, hidden, "all", bench.repeats)
            row = dict(
                K=K,
                hidden_dim=hidden,
                update_s_one=one,
                update_s_all=full,
                ratio_one_over_all=one / full,
                inverse_K=1 / K,
                actor_logprob_s_one=actor_one,
                actor_logprob_s_all=actor_all,
                actor_ratio=actor_one / actor_all,
                sample_batch_s=sample_s,
            )
            rows.append(row)
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    os.makedirs(os.path.dirname(bench.out), exist_ok=True)
    with open(bench.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"K={r['K']}\nwidth {r['hidden_dim']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["update_s_one"] for r in rows], 0.4, label="--sde-steps one (two-layer MDP)")
    ax.bar(x + 0.2, [r["update_s_all"] for r in rows], 0.4, label="--sde-steps all")
    for i, r in enumerate(rows):
        ax.text(
            i - 0.2,
            r["update_s_one"],
            f"{r['ratio_one_over_all']:.2f}×",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds per PPO update (CPU, 1 thread)")
    ax.set_title("flow_sde_ppo: update cost, 200 chunk transitions × 4 epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench.out.replace(".csv", ".png"), dpi=100)
    print(f"wrote {bench.out} and {bench.out.replace('.csv', '.png')}")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
