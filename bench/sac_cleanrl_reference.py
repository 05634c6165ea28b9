"""Gaussian SAC as CleanRL's sac_continuous_action.py runs it: the reference for issue 20's Gaussian baseline.

Written from CleanRL's algorithm and defaults, not imported from sac_flow.py, so that it measures what a user
of CleanRL would get: an actor of two 256-wide ReLU layers with mean and log-std heads (log σ tanh-bounded in
[−5, 2], a = c tanh(x) + b); two separate 256-wide ReLU critics with no normalisation and target copies
(τ = 0.005); γ = 0.99; batch 256; 5000 random steps; a critic update every env step after them and, every
2nd step, two actor and α updates (policy_lr 3e-4, q_lr 1e-3 for the critics and α, α_0 = 1, H̄ = −|A|).
It evaluates as bench/sac_flow_mujoco.py does: the noise-free policy, episode i from reset(seed + 10000 + i),
every --eval-freq env steps; it also logs the mean return of the last 10 training episodes.

The switches set what sac_flow.py does differently, one at a time:
  --q-layer-norm    LayerNorm after each hidden layer of Q (ManiSkill's SAC baseline, sac_flow's critic)
  --update-every 2  a critic and one actor + α update at every 2nd env step (sac_flow's --utd 0.5)
  --tau, --learning-starts (sac_flow: 0.01, 4000)
  --exact-squash    log|det da/dx| = Σ log(c (1 − tanh² x)) without CleanRL's +1e-6 inside the log (sac_flow's
                    form): it keeps charging for saturation where the +1e-6 caps the charge near |x| = 7

  OMP_NUM_THREADS=1 python bench/sac_cleanrl_reference.py --env-id Hopper-v5 --seed 1 --out ref.csv
"""

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-id", default="Hopper-v5")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--total-timesteps", type=int, default=100_000)
    ap.add_argument("--eval-freq", type=int, default=5_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--tau", type=float, default=0.005)
    ap.add_argument("--learning-starts", type=int, default=5_000)
    ap.add_argument("--q-layer-norm", action="store_true")
    ap.add_argument("--update-every", type=int, choices=[1, 2], default=1)
    ap.add_argument("--exact-squash", action="store_true")
    ap.add_argument("--out", required=True, help="csv: step, wall_s, return, ep_len, train_return")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    if a.env_id not in gym.registry:
        raise SystemExit(f"error: unknown --env-id {a.env_id!r}: give a gymnasium id such as Hopper-v5")
    env, eval_env = gym.make(a.env_id), gym.make(a.env_id)
    env.action_space.seed(a.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    c = torch.tensor((env.action_space.high - env.action_space.low) / 2, dtype=torch.float32)
    b = torch.tensor((env.action_space.high + env.action_space.low) / 2, dtype=torch.float32)

    def q_net(h=256):
        norm = (lambda: nn.LayerNorm(h)) if a.q_layer_norm else nn.Identity
        layers = [nn.Linear(obs_dim + act_dim, h), norm(), nn.ReLU(), nn.Linear(h, h), norm(), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(h, 1))

    class Actor(nn.Module):
        def __init__(self, h=256):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(obs_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
            self.mean, self.log_std = nn.Linear(h, act_dim), nn.Linear(h, act_dim)

        def forward(self, s, deterministic=False):
            """(a, log π(a|s)), with CleanRL's +1e-6 in the squash's log-determinant (or --exact-squash)."""
            h = self.body(s)
            mean = self.mean(h)
            log_std = -5 + 3.5 * (torch.tanh(self.log_std(h)) + 1)
            x = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
            y = torch.tanh(x)
            log_p = (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
            if a.exact_squash:  # log(1 − tanh² x) = 2 (log 2 − x − softplus(−2x)), stable for large |x|
                return c * y + b, log_p - (torch.log(c) + 2 * (np.log(2) - x - F.softplus(-2 * x))).sum(-1)
            return c * y + b, log_p - torch.log(c * (1 - y**2) + 1e-6).sum(-1)

    actor, qs, qs_target = Actor(), [q_net(), q_net()], [q_net(), q_net()]
    for q, q_t in zip(qs, qs_target, strict=True):
        q_t.load_state_dict(q.state_dict())
    log_alpha = torch.zeros(1, requires_grad=True)
    alpha, target_entropy = 1.0, -float(act_dim)
    opt_q = torch.optim.Adam([p for q in qs for p in q.parameters()], lr=1e-3)
    opt_pi = torch.optim.Adam(actor.parameters(), lr=3e-4)
    opt_alpha = torch.optim.Adam([log_alpha], lr=1e-3)
    N = a.total_timesteps
    dims = {"s": obs_dim, "a": act_dim, "s2": obs_dim, "r": 1, "d": 1}
    buf = {k: np.zeros((N, d), np.float32) for k, d in dims.items()}

    def q_values(nets, s, act):
        return [n(torch.cat([s, act], -1)).squeeze(-1) for n in nets]

    @torch.no_grad()
    def evaluate():
        returns, lengths = [], []
        for i in range(a.eval_episodes):
            o, _ = eval_env.reset(seed=a.seed + 10_000 + i)
            ret, n, done = 0.0, 0, False
            while not done:
                act = actor(torch.as_tensor(o, dtype=torch.float32)[None], deterministic=True)[0][0].numpy()
                o, r, term, trunc, _ = eval_env.step(act)
                ret, n, done = ret + r, n + 1, term or trunc
            returns.append(ret)
            lengths.append(n)
        return np.mean(returns), np.mean(lengths)

    out = open(a.out, "w")
    out.write("step,wall_s,return,ep_len,train_return\n")
    t0 = time.time()
    o, _ = env.reset(seed=a.seed)
    ep_ret, recent = 0.0, []
    for step in range(N + 1):
        if step % a.eval_freq == 0:
            ret, ep_len = evaluate()
            train = np.mean(recent[-10:]) if recent else float("nan")
            out.write(f"{step},{time.time() - t0:.1f},{ret:.1f},{ep_len:.0f},{train:.1f}\n")
            out.flush()
            print(f"step {step}: eval return {ret:.0f} (length {ep_len:.0f}) | train episodes {train:.0f} | "
                  f"alpha {alpha:.3g} | {time.time() - t0:.0f} s", flush=True)  # fmt: skip
        if step == N:
            break
        if step < a.learning_starts:
            act = env.action_space.sample()
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(o, dtype=torch.float32)[None])[0][0].numpy()
        o2, r, term, trunc, _ = env.step(act)
        for k, v in (("s", o), ("a", act), ("s2", o2), ("r", r), ("d", float(term))):
            buf[k][step] = v  # a truncation is not a terminal: o2 is the real last observation
        ep_ret, o = ep_ret + r, o2
        if term or trunc:
            recent.append(ep_ret)
            ep_ret = 0.0
            o, _ = env.reset()
        if step > a.learning_starts and step % a.update_every == 0:
            i = np.random.randint(0, step + 1, 256)
            s, act_b, s2, r_b, d_b = (torch.as_tensor(buf[k][i]) for k in ("s", "a", "s2", "r", "d"))
            r_b, d_b = r_b[:, 0], d_b[:, 0]
            with torch.no_grad():
                a2, log_p2 = actor(s2)
                y = r_b + 0.99 * (1 - d_b) * (torch.min(*q_values(qs_target, s2, a2)) - alpha * log_p2)
            q_loss = sum(F.mse_loss(q, y) for q in q_values(qs, s, act_b))
            opt_q.zero_grad()
            q_loss.backward()
            opt_q.step()
            if step % 2 == 0:  # CleanRL's policy_frequency 2, made up for by as many actor updates
                for _ in range(2 // a.update_every):
                    a_pi, log_p = actor(s)
                    pi_loss = (alpha * log_p - torch.min(*q_values(qs, s, a_pi))).mean()
                    opt_pi.zero_grad()
                    pi_loss.backward()
                    opt_pi.step()
                    with torch.no_grad():
                        _, log_p = actor(s)
                    alpha_loss = (-log_alpha.exp() * (log_p + target_entropy)).mean()
                    opt_alpha.zero_grad()
                    alpha_loss.backward()
                    opt_alpha.step()
                    alpha = log_alpha.exp().item()
            with torch.no_grad():
                for q, q_t in zip(qs, qs_target, strict=True):
                    for p, p_t in zip(q.parameters(), q_t.parameters(), strict=True):
                        p_t.lerp_(p, a.tau)


if __name__ == "__main__":
    main()
