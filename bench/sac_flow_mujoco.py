"""Gaussian SAC against sac_flow's Flow-G, Flow-T and naive flow on MuJoCo, from scratch (issue 20).

Every variant is sac_flow.main with the same critic, replay buffer, update schedule and evaluation (the
noise-free policy on seeded episodes every --eval-freq env steps); the Gaussian variant swaps FlowPolicy for
CleanRL's SAC actor (sac_continuous_action.py: two 256-wide ReLU layers, mean and log-std heads, tanh
squashing) and keeps SAC's entropy target H̄ = −|A|. For the flows it also records, per evaluation
interval, the actor loss's gradient at each intermediate flow state, the batch mean of ‖∂L_π/∂x_k‖
(k = 1..K−1: x_0 does not depend on θ, x_K only enters the squash), and the actor's parameter-gradient norm:
the paper's claim is that the naive flow's gradients explode or vanish through the K steps while Flow-G's
and Flow-T's do not. Every variant also records the evaluation episodes' mean length (ep_len): Hopper and
Walker2d pay 1 per step alive, so return − ep_len is the forward-progress term (Σ v_x, less a small control
cost), which tells a policy that stands for 1000 steps (≈ 1000, ≈ 0) from one that hops. The same initial
states are also played by the stochastic policy (the chain with its noise, what training plays;
return_stochastic, ep_len_stochastic), to tell a fall of the policy from one of its noise-free evaluation.
Both also record the fraction of action components at the bounds, |a − b| / c > 0.999 (|x| > 3.8 before the
tanh; saturated, saturated_stochastic): with the exact squash the entropy term charges α (−log(1 − tanh² x))
per component, pulling x back from the bounds with a force near 2α, and CleanRL's +1e-6 (--squash-eps) lifts
that charge beyond |x| ≈ 7.

  OMP_NUM_THREADS=1 python bench/sac_flow_mujoco.py --variant g --env-id Hopper-v5 --seed 1   # one run
  python bench/sac_flow_mujoco.py --plot   # results/sac_flow/mujoco.csv, mujoco.png, mujoco_diagnostics.png
Extra sac_flow flags go after `--` (... --seed 1 -- --utd 1). A run writes its eval.csv, gradient norms,
episode lengths and the stochastic policy's returns to results/sac_flow/mujoco/<env>_<variant>_s<seed>.csv and
..._grads.csv, and ..._train.csv (α, log π, critic loss); its run directory stays under runs/.
"""

import argparse
import csv
import glob
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sac_flow as sf  # noqa: E402

VARIANTS = ["gaussian", "g", "t", "naive"]


def apply_squash_eps(eps):
    """--squash-eps ε: sf.squash's log-determinant becomes CleanRL's Σ log(c (1 − tanh² x) + ε) for every
    policy (the Gaussian and the flows' chain both take theirs from sf.squash). With ε = 1e-6 its charge for
    a saturated action stops growing beyond |x| ≈ 7, and log π becomes a lower bound of the density."""
    exact = sf.squash
    sf.squash = lambda x, c, b: (exact(x, c, b)[0], torch.log(c * (1 - torch.tanh(x) ** 2) + eps).sum(-1))


class GaussianPolicy(nn.Module):
    """CleanRL's SAC actor behind FlowPolicy's interface (K = 0: eps[0] is the Gaussian's noise)."""

    K = 0

    def __init__(self, obs_dim, act_dim, velocity, K, hidden, t_dim, c, b, log_std_min=-5.0, log_std_max=2.0):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)
        self.lo, self.hi = log_std_min, log_std_max

    def forward(self, s, eps=None, deterministic=False):
        h = self.net(s)
        mean = self.mean(h)
        std = (self.lo + 0.5 * (self.hi - self.lo) * (torch.tanh(self.log_std(h)) + 1)).exp()
        eps = torch.randn_like(mean) if eps is None else eps[0]
        x = mean if deterministic else mean + std * eps
        a, log_det = sf.squash(x, self.c, self.b)
        return a, sf.normal_log_prob(x, mean, std) - log_det


class RecordedFlow(sf.FlowPolicy):
    """FlowPolicy noting ‖∂L/∂x_k‖ of each backward pass through a rollout (only the actor loss makes one)."""

    grads: dict = defaultdict(list)
    policy = None  # the instance main() trains, for the optimiser hook

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        RecordedFlow.policy = self

    def velocity(self, t, x, e_s):
        if x.requires_grad and isinstance(t, float):  # a rollout step k (flow matching passes a tensor t)
            k = round(t * self.K)
            # × batch size: L_π is a batch mean, so this is the gradient of a sample's own loss term
            x.register_hook(
                lambda g, k=k: RecordedFlow.grads[f"dL_dx{k}"].append(len(g) * g.norm(dim=-1).mean().item())
            )
        return super().velocity(t, x, e_s)


class Stochastic:
    """The policy as evaluate() calls it, with the training chain's noise (every ε_k), not x_{k+1} = μ_k:
    the returns the official scripts report are this stochastic policy's."""

    def __init__(self, policy):
        self.policy, self.K, self.c = policy, policy.K, policy.c

    def __call__(self, s, eps, deterministic=False):
        return self.policy(s, eps, deterministic=False)


def record_actor_grad_norm(opt, args, kwargs):
    """Optimizer pre-step hook: the total parameter-gradient norm when the optimiser is the actor's."""
    if (
        RecordedFlow.policy is not None
        and opt.param_groups[0]["params"][0] is RecordedFlow.policy.f_s[0].weight
    ):
        norms = [p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        RecordedFlow.grads["actor_grad_norm"].append(torch.stack(norms).norm().item())


def run(a, extra, out_dir):
    args = tyro.cli(
        sf.Args,
        args=[
            "--env-id",
            a.env_id,
            "--seed",
            str(a.seed),
            "--total-timesteps",
            str(a.total_timesteps),
            "--eval-freq",
            str(a.eval_freq),
            "--eval-episodes",
            str(a.eval_episodes),
            "--exp-name",
            f"mujoco_{a.variant}",
            *extra,
        ],
    )
    if a.squash_eps < 0:
        raise SystemExit(f"--squash-eps must be >= 0 (0: sac_flow's exact squash), got {a.squash_eps}")
    if a.squash_eps > 0:
        apply_squash_eps(a.squash_eps)
    if a.variant == "gaussian":
        sf.FlowPolicy = GaussianPolicy
        if args.target_entropy is None:  # the Gaussian keeps SAC's −|A|, whatever sac_flow's default is
            import gymnasium as gym

            args.target_entropy = -float(gym.make(a.env_id).action_space.shape[0])
    else:
        args.velocity = a.variant
        sf.FlowPolicy = RecordedFlow
        register_optimizer_step_pre_hook(record_actor_grad_norm)
    evaluate, rows = sf.evaluate, []

    def evaluate_and_note_grads(policy, *eval_args):
        """Called at steps 0, eval_freq, 2 eval_freq, ..., the end."""
        step = min(len(rows) * args.eval_freq, args.total_timesteps)
        row = {"step": step} | {k: float(np.mean(v)) for k, v in RecordedFlow.grads.items()}
        RecordedFlow.grads.clear()
        noise_free, stochastic = [], []  # (obs, actions, return) per episode, from the same initial states
        result = evaluate(policy, *eval_args, episodes=noise_free)
        evaluate(Stochastic(policy), *eval_args, episodes=stochastic)
        c, b = policy.c.cpu().numpy(), policy.b.cpu().numpy()
        for name, episodes in (("", noise_free), ("_stochastic", stochastic)):
            row[f"return{name}"] = float(np.mean([g for _, _, g in episodes]))
            row[f"ep_len{name}"] = float(np.mean([len(obs) for obs, _, _ in episodes]))
            actions = np.concatenate([a for _, a, _ in episodes])
            row[f"saturated{name}"] = float(np.mean(abs(actions - b) / c > 0.999))
        rows.append(row)
        return result

    sf.evaluate = evaluate_and_note_grads
    sf.main(args)
    run_dir = max(glob.glob(f"runs/{a.env_id}__{args.exp_name}__{a.seed}__*"), key=os.path.getmtime)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = out_dir / f"{a.env_id}_{a.variant}_s{a.seed}"
    shutil.copy(f"{run_dir}/eval.csv", f"{name}.csv")
    write_train_scalars(run_dir, f"{name}_train.csv")
    keys = sorted({k for r in rows for k in r} - {"step"})
    with open(f"{name}_grads.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", *keys])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {name}.csv and {name}_grads.csv")


def write_train_scalars(run_dir, path):
    """α, log π and the critic loss the run logged to TensorBoard (every 1000 env steps) as a csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = ["losses/alpha", "losses/log_pi", "losses/qf_loss"]
    columns = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "alpha", "log_pi", "qf_loss"])
        w.writerows([step, *(columns[t].get(step, "") for t in tags)] for step in sorted(columns[tags[0]]))


def read(path):
    rows = list(csv.DictReader(open(path)))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]}


def plot(out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = defaultdict(list)  # (env, variant) -> eval columns of each seed
    for path in sorted(out_dir.glob("*_s*.csv")):
        if not path.stem.endswith(("_grads", "_train")):
            env, variant, _ = path.stem.rsplit("_", 2)
            runs[env, variant].append(read(path))
    envs = sorted({e for e, _ in runs})
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.6 * len(envs)), squeeze=False)
    summary = []
    for i, env in enumerate(envs):
        for variant in VARIANTS:
            seeds = runs.get((env, variant))
            if not seeds:
                continue
            n = min(len(s["step"]) for s in seeds)  # the steps every seed reached
            ret = np.stack([s["return"][:n] for s in seeds])
            step, wall = seeds[0]["step"][:n], np.mean([s["wall_s"][:n] for s in seeds], 0) / 60
            m, sd = ret.mean(0), ret.std(0)
            label = (
                "Gaussian SAC"
                if variant == "gaussian"
                else f"Flow-{variant.upper()}"
                if variant != "naive"
                else "naive flow"
            )
            for ax, x in zip(axes[i], (step, wall), strict=True):
                ax.plot(x, m, label=f"{label} ({len(seeds)} seeds)")
                ax.fill_between(x, m - sd, m + sd, alpha=0.2)
            summary.append(
                dict(
                    env=env,
                    variant=variant,
                    seeds=len(seeds),
                    steps=int(step[-1]),
                    final_mean=round(m[-1], 1),
                    final_std=round(sd[-1], 1),
                    best_mean=round(ret.max(1).mean(), 1),
                    auc_mean=round(ret.mean(), 1),
                    drop_from_best=round((ret.max(1) - ret[:, -1]).mean(), 1),
                    # collapses: evaluations below half the previous one, where that one was >= 300
                    falls=int(((ret[:, :-1] >= 300) & (ret[:, 1:] < ret[:, :-1] / 2)).sum()),
                    wall_min=round(wall[-1], 1),
                )
            )
        for ax, xl in zip(
            axes[i], ("environment steps", "wall minutes (2 cores, 2 runs at a time)"), strict=True
        ):
            ax.set(xlabel=xl, ylabel=f"{env} eval return", title=env)
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir.parent / "mujoco.png", dpi=110)
    with open(out_dir.parent / "mujoco.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print(
        "| env | policy | seeds | env steps | final return | best return (mean of seeds) | mean over evals "
        "| drop from best | falls | wall min |"
    )
    print("|-|-|-|-|-|-|-|-|-|-|")
    for r in summary:
        print(
            f"| {r['env']} | {r['variant']} | {r['seeds']} | {r['steps']} "
            f"| {r['final_mean']} ± {r['final_std']} | "
            f"{r['best_mean']} | {r['auc_mean']} | {r['drop_from_best']} | {r['falls']} | {r['wall_min']} |"
        )
    diagnostics(out_dir, envs, plt)


def diagnostics(out_dir, envs, plt):
    """mujoco_diagnostics.png: per env, α and log π (every 1000 steps) and the flows' ‖∂L/∂x_k‖ at the first
    and last intermediate state (per evaluation interval), seed means."""
    logs = defaultdict(list)  # (env, variant, kind) -> columns of each seed
    for kind in ("train", "grads"):
        for path in sorted(out_dir.glob(f"*_{kind}.csv")):
            env, variant, _ = path.stem[: -len(kind) - 1].rsplit("_", 2)
            logs[env, variant, kind].append(read(path))
    panels = [("train", "alpha", "α (log scale)"), ("train", "log_pi", "log π of a sampled chain"),
              ("grads", None, "‖∂L_π/∂x_k‖ per sample (log scale)")]  # fmt: skip
    fig, axes = plt.subplots(len(panels), len(envs), figsize=(5.5 * len(envs), 10), squeeze=False)
    for j, env in enumerate(envs):
        for row, (kind, col, ylabel) in enumerate(panels):
            ax = axes[row][j]
            for variant in VARIANTS:
                seeds = logs.get((env, variant, kind), [])
                ks = sorted({int(c[5:]) for g in seeds for c in g if c.startswith("dL_dx")})
                cols = [col] if col else [f"dL_dx{k}" for k in (ks[:1] + ks[-1:] if ks else [])]
                for c, style in zip(cols, ("-", "--"), strict=False):
                    n = min(len(g["step"]) for g in seeds) if seeds else 0
                    if n:
                        y = np.nanmean([g[c][:n] for g in seeds], 0)
                        ax.plot(
                            seeds[0]["step"][:n], y, style, label=variant + ("" if col else f" x_{c[5:]}")
                        )
            ax.set(
                xlabel="environment steps",
                ylabel=ylabel,
                title=env,
                yscale="linear" if col == "log_pi" else "log",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir.parent / "mujoco_diagnostics.png", dpi=110)
    print(f"wrote {out_dir.parent / 'mujoco.csv'}, mujoco.png, mujoco_diagnostics.png")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, default="g")
    ap.add_argument("--env-id", default="Hopper-v5")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--total-timesteps", type=int, default=100_000)
    ap.add_argument("--eval-freq", type=int, default=5_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--out-dir", default=str(ROOT / "results" / "sac_flow" / "mujoco"), help="per-run csvs")
    ap.add_argument("--plot", action="store_true", help="only summarise --out-dir (csv, table, plots)")
    ap.add_argument("--squash-eps", type=float, default=0.0, help="CleanRL's 1e-6 in the squash's log|det|")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    plot(Path(a.out_dir)) if a.plot else run(a, extra, Path(a.out_dir))
