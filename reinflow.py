"""ReinFlow: a flow-matching policy behaviour-cloned on demonstrations, then fine-tuned online by PPO
through a learnable noise network (Zhang et al. 2025, "ReinFlow: Fine-tuning Flow Matching Policy with
Online Reinforcement Learning", Sec. 4 and App. B; official code github.com/ReinFlow/ReinFlow).

A policy acts with chunks of Ta actions of dimension Da, flattened into a = x in R^D, D = Ta*Da, [-1, 1]^D.
The env gets low + (x + 1)(high - low)/2 with [low, high] the demos' per-dimension range (kept in the
checkpoint; the env's bounds without demos), as flow_noise_ppo and flow_sde_ppo: PickCube's motion-planned
moves span +-0.4 of the env's +-1, and scaling by their range raised SFT success from 0.105 / 0.055 to 0.265 /
0.180 (seeds 1 / 2, 200 episodes; results/benchmark/demo_scaling.md).

SFT, 1-Rectified Flow (--flow reflow):
    x_0 ~ N(0, I),  x_1 = a (a demo chunk),  t ~ U(0, 1),  x_t = t x_1 + (1 - t) x_0
    L_RF = || v_theta(x_t, t, s) - (x_1 - x_0) ||^2
SFT, Shortcut model (--flow shortcut, Frans et al. 2024): v_theta(x, t, s, d) also sees the step size d;
besides L_RF at d = 0 it learns that one step of size 2d equals two steps of size d:
    x' = x_t + d v(x_t, t, s, d),   target(2d) = stopgrad[(v(x_t, t, s, d) + v(x', t + d, s, d)) / 2]
Weights are averaged by an EMA (decay 0.995); fine-tuning starts from the EMA weights.

Sampling with K steps on ONE time grid t_k = k/K, dt = 1/K (shortcut: d = 1/K), used for rollouts,
log-prob recomputation and evaluation alike:
    x_0 ~ N(0, I)
    mu_k      = clip(x_k + v_theta(x_k, t_k, s) dt, -1, 1)
    sigma_k   = sigma_theta'(s, t_k) = exp(l/2),
    l         = log sigma_min^2 + (log sigma_max^2 - log sigma_min^2)(tanh h + 1)/2,  h = noise-net output
    x_{k+1}   = mu_k + sigma_k eps,  eps ~ N(0, I) clipped to [-3, 3];  the action is clip(x_K, -1, 1)
Evaluation runs the deterministic ODE: same grid, x_{k+1} = mu_k (x_0 still drawn from N(0, I)).

Log-likelihood of the whole denoising chain (a Markov chain with Gaussian transitions), normalised by the
(K + 1) D Gaussian terms it sums, as the official code does; the entropy is that of the same Gaussians:
    log pi(x_0:K | s) = [ log N(x_0; 0, I) + sum_k log N(x_{k+1}; mu_k, sigma_k^2) ] / ((K + 1) D)
    H = [ D/2 log(2 pi e) + sum_k sum_i 1/2 log(2 pi e sigma_{k,i}^2) ] / ((K + 1) D)
Where this is not the exact density (as in the official code): (1) eps is clipped to [-3, 3], so 0.27 % of
noise entries sit at +-3 and are scored with the Gaussian density there. (2) The chain keeps clip(x_K, -1, 1)
and scores it with the Gaussian density, although a clipped entry has the probability of the Gaussian's tail:
at initialisation 13.6 % of the entries of x_K are on the clip (9.5 % with PickCube's sigma in [0.02, 0.05];
tests/test_reinflow.py::test_clamp_fraction), and their PPO ratio is that of the density at the boundary, not
of the tail mass. Kept: the official method does this, every result below was made with it, and the sampler
and scorer agree on it exactly (tests check the sampler against the scorer on the unclipped steps).

PPO, one ratio per chunk decision: r = exp(log pi_new - log pi_old),
    L_pi = E[ max(-A r, -A clip(r, 1 - eps, 1 + eps)) ] - c_H H + c_BC ||ODE_theta(s, 0) - ODE_ref(s, 0)||^2
    L_V  = 1/2 E[(V(s) - R)^2]
with A from GAE(gamma, lambda) over chunk steps whose reward is the chunk's summed reward (of r_t - r_{t-1}
with --relative-reward), scaled by a running std of discounted returns. sigma_max decays (hold, then cosine)
as training goes on. The official code also clips the normalised log-probs to [-1, 1]; with a small sigma
(PickCube) every log-prob exceeds 1 and that clip zeroes the policy gradient, so there is none here.
"""

import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, NoReturn

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int | None = None
    """1 for a new run; with --checkpoint, the checkpoint's seed"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and CUDA exists, use it (and, with --sim-backend auto, ManiSkill's physx_cuda)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb's project name"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to videos/{run_name}"""
    save_model: bool = True
    """if toggled, save checkpoints (sft.pt after SFT, ckpt.pt at every evaluation) to runs/{run_name}"""
    checkpoint: str | None = None
    """a checkpoint of this script: sft.pt starts RL from it, ckpt.pt resumes the run exactly"""
    evaluate: bool = False
    """with --checkpoint: only evaluate its policy with the deterministic ODE, write <checkpoint>.eval.json"""

    # Environment
    env_id: str = "PickCube-v1"
    """a ManiSkill3 task id (state observations) or a gymnasium MuJoCo id such as Hopper-v5"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller (must match the demos' control mode)"""
    max_episode_steps: int | None = None
    """episode length limit; None = the env's default (use 100 on PickCube with motion-planned demos)"""
    num_envs: int = 2
    """parallel training environments"""
    num_eval_envs: int = 2
    """parallel evaluation environments"""
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = "auto"
    """auto: physx_cuda when --cuda and a GPU exist, else physx_cpu; ignored for gymnasium/MuJoCo ids"""
    vector_env: Literal["auto", "gymnasium", "maniskill"] = "auto"
    """gymnasium: one simulator per process in gymnasium's AsyncVectorEnv (CPU; MuJoCo and single envs run in
    this process); maniskill: ManiSkill's batched env in ManiSkillVectorEnv, the GPU path (on physx_cpu it
    needs --num-envs 1 and is how the tests run the GPU code); auto: maniskill on physx_cuda, else gymnasium.
    ManiSkill episodes run to the time limit (success does not end them, as in ManiSkill's baselines)."""
    relative_reward: bool = False
    """if toggled, the agent gets r_t - r_{t-1} (r_{-1} = 0), RLinf's use_rel_reward: on ManiSkill's
    normalized_dense reward a shaping whose episode sum is the last step's reward (1 at success)"""
    eval_freq: int = 10_000
    """evaluate (and checkpoint) every this many env steps (all envs together), rounded to whole iterations"""
    eval_episodes: int = 20
    """episodes per evaluation"""

    # Flow policy
    flow: Literal["reflow", "shortcut"] = "reflow"
    """SFT objective: 1-Rectified Flow or Shortcut model"""
    denoising_steps: int = 4
    """K, denoising (Euler) steps of the flow policy"""
    hidden_dim: int = 256
    """width of the 3-layer velocity and critic MLPs"""
    action_horizon: int = 4
    """Ta, actions per chunk (all are executed)"""
    sigma_min: float = 0.10
    """lower bound of the exploration noise std in [-1, 1] units (official MuJoCo value; keep it below the
    demos' moves: PickCube's motion-planned xyz moves are ~0.05-0.2 of their range, use 0.02 there)"""
    sigma_max: float = 0.24
    """initial upper bound of the exploration noise std (PickCube: 0.05)"""

    # Demonstrations and SFT
    demo_path: str | None = None
    """ManiSkill h5 (+ json sidecar) or npz with obs (N, obs_dim), actions (N, act_dim), episode_ends (E,)"""
    num_demos: int | None = None
    """use only the first num_demos episodes of the demo file"""
    sft_steps: int = 20000
    """gradient steps of behaviour cloning (0: start PPO from a randomly initialised flow policy)"""
    sft_batch_size: int = 256
    """minibatch size of behaviour cloning"""
    sft_lr: float = 1e-3
    """learning rate of behaviour cloning"""
    save_demos: int = 0
    """with --checkpoint: roll out the noise-free policy for this many episodes, write them to --demo-out"""
    demo_out: str = "demos/reinflow_demos.npz"
    """npz of obs (N, obs_dim), actions (N, act_dim), episode_ends (E,), returns (E,)"""

    # PPO fine-tuning
    total_timesteps: int = 200_000
    """environment steps of fine-tuning"""
    num_steps: int = 125
    """chunk decisions per env per PPO iteration (env steps = num_steps * action_horizon)"""
    learning_rate: float = 4.5e-5
    """learning rate of the velocity and noise networks"""
    critic_learning_rate: float = 6.5e-4
    """learning rate of the critic"""
    critic_warmup_iters: int = 2
    """PPO iterations that update only the critic"""
    gamma: float = 0.99
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs per PPO iteration"""
    clip_coef: float = 0.01
    """PPO ratio clip"""
    ent_coef: float = 0.03
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    bc_coef: float = 0.0
    """weight of the W2 regulariser towards the frozen SFT ODE policy (0: off)"""
    max_grad_norm: float = 1.0
    """gradient norm clip"""
    target_kl: float = 1.0
    """stop the update epochs when approx KL exceeds this"""

    # filled at runtime
    batch_size: int = 0
    minibatch_size: int = 0
    num_iterations: int = 0


# ---------------------------------------------------------------- ALGO LOGIC: the method's math
EPS_CLIP = 3.0  # the standard-normal noise of each denoising step is truncated to [-3, 3]


def squash_sigma(h, sigma_min, sigma_max):
    """tanh squashes the noise net's output into [log sigma_min^2, log sigma_max^2], then sigma = exp(l/2)."""
    lo, hi = 2 * math.log(sigma_min), 2 * math.log(sigma_max)
    return torch.exp(0.5 * (lo + (hi - lo) * (torch.tanh(h) + 1) / 2))


def sigma_max_schedule(it, n_iters, sigma_min, sigma_max, hold_ratio=0.35, decay_ratio=0.7):
    """Hold sigma_max for hold_ratio of the iterations, then cosine-anneal it to
    sigma_min + decay_ratio (sigma_max - sigma_min)."""
    end = sigma_min + decay_ratio * (sigma_max - sigma_min)
    frac = min(max((it - hold_ratio * n_iters) / max((1 - hold_ratio) * n_iters, 1), 0.0), 1.0)
    return end + (sigma_max - end) * 0.5 * (1 + math.cos(math.pi * frac))


def log_normal(z, sigma):
    """log N(x; mu, sigma^2) summed over the last dim, with z = (x - mu) / sigma."""
    return (-0.5 * z**2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


@torch.no_grad()
def sample_chain(policy, s, K, sigma_min, sigma_max):
    """Runs the K-step chain; returns the chain (B, K+1, D), whose last entry is the action clip(x_K), and its
    normalised log-prob computed here from the drawn noise (PPO's stored log pi_old)."""
    x = torch.randn(s.shape[0], policy.D, device=s.device, dtype=s.dtype)
    chain = [x]
    logp = -0.5 * (x**2).sum(-1) - 0.5 * policy.D * math.log(2 * math.pi)  # log N(x_0; 0, I)
    for k in range(K):
        mu, sigma = policy.transition(x, k / K, K, s, sigma_min, sigma_max)
        eps = torch.randn_like(mu).clamp(-EPS_CLIP, EPS_CLIP)
        x = mu + sigma * eps
        if k == K - 1:  # the chain keeps the executed action, and the log-prob scores that value
            x = x.clamp(-1, 1)
            eps = (x - mu) / sigma
        chain.append(x)
        logp = logp + log_normal(eps, sigma)
    return torch.stack(chain, 1), logp / ((K + 1) * policy.D)


def chain_log_prob(policy, s, chain, K, sigma_min, sigma_max):
    """Normalised log pi(x_0:J | s) and entropy of a chain (B, J+1, D) on the grid of K steps (J = K: the
    whole chain; J < K scores its first J steps); see the module docstring."""
    n, D = chain.shape[1], chain.shape[-1]
    logp = -0.5 * (chain[:, 0] ** 2).sum(-1) - 0.5 * D * math.log(2 * math.pi)
    entropy = torch.full_like(logp, 0.5 * D * math.log(2 * math.pi * math.e))
    for k in range(n - 1):
        mu, sigma = policy.transition(chain[:, k], k / K, K, s, sigma_min, sigma_max)
        logp = logp + log_normal((chain[:, k + 1] - mu) / sigma, sigma)
        entropy = entropy + (sigma.log() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    return logp / (n * D), entropy / (n * D)


def ode_action(policy, s, K, x0):
    """Deterministic Euler ODE from x0 (with gradients): evaluation and the BC regulariser."""
    x = x0
    for k in range(K):
        x = policy.euler(x, k / K, K, s)[0]
    return x


def rectified_flow_loss(v, s, a):
    x0 = torch.randn_like(a)
    t = torch.rand(a.shape[0], device=a.device)
    xt = t[:, None] * a + (1 - t[:, None]) * x0
    return F.mse_loss(v(xt, t, s, torch.zeros_like(t))[0], a - x0)


def shortcut_loss(v, s, a, fraction=0.25, log2_max_steps=7):
    """L_RF at d = 0 on most of the batch; self-consistency v(x_t,t,2d) = mean of two d-steps on the rest."""
    n_sc = int(a.shape[0] * fraction)
    loss = rectified_flow_loss(v, s[n_sc:], a[n_sc:])
    if n_sc == 0:
        return loss
    s, a = s[:n_sc], a[:n_sc]
    d = 2.0 ** -torch.randint(1, log2_max_steps + 1, (n_sc,), device=a.device).float()  # 2d in {1, ..., 2^-6}
    t = torch.rand(n_sc, device=a.device) * (1 - 2 * d)
    x0 = torch.randn_like(a)
    xt = t[:, None] * a + (1 - t[:, None]) * x0
    with torch.no_grad():
        v1 = v(xt, t, s, d)[0]
        v2 = v(xt + d[:, None] * v1, t + d, s, d)[0]
    return loss + F.mse_loss(v(xt, t, s, 2 * d)[0], (v1 + v2) / 2) * fraction


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef):
    """Clipped surrogate on normalised chain log-probs; returns loss, ratio, approx KL, clip fraction."""
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return loss, ratio, approx_kl, clipfrac


def gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """GAE over (T, N) steps; dones[t] = the episode ended at step t (no bootstrap from t + 1; a truncation's
    bootstrap is folded into rewards[t] beforehand). Returns (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nxt * (1 - dones[t]) - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


class RunningReturnStd:
    """Running variance of discounted returns (per env), for reward scaling."""

    def __init__(self, num_envs, gamma):
        self.ret = np.zeros(num_envs)
        self.gamma = gamma
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, r, done):
        self.ret = self.ret * self.gamma + r
        b_mean, b_var, b_n = self.ret.mean(), self.ret.var(), len(r)
        delta, tot = b_mean - self.mean, self.count + b_n
        self.mean += delta * b_n / tot
        self.var = (self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / tot) / tot
        self.count = tot
        self.ret[done] = 0.0
        return r / np.sqrt(self.var + 1e-8)


# ---------------------------------------------------------------- networks
def mlp(sizes, act=nn.Mish):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), act()]
    return nn.Sequential(*layers[:-1])


class TimeEmbedding(nn.Module):
    """Sinusoidal features of 1000 t, t in [0, 1] (scaled so the fast frequencies separate grid points)."""

    def __init__(self, dim=16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2 - 1)))
        self.net = mlp([dim, 2 * dim, dim])

    def forward(self, t):
        phase = 1000 * t[:, None] * self.freqs
        return self.net(torch.cat([phase.sin(), phase.cos()], -1))


class VelocityNet(nn.Module):
    """v_theta(x, t, s[, d]) on flattened chunks; the shortcut variant also embeds the step size d."""

    def __init__(self, obs_dim, D, hidden, shortcut, time_dim=16):
        super().__init__()
        self.t_emb = TimeEmbedding(time_dim)
        self.d_emb = TimeEmbedding(time_dim) if shortcut else None
        self.net = mlp([D + obs_dim + time_dim * (2 if shortcut else 1), hidden, hidden, hidden, D])

    def forward(self, x, t, s, d):
        te = self.t_emb(t)
        feats = [x, s, te] + ([self.d_emb(d)] if self.d_emb is not None else [])
        return self.net(torch.cat(feats, -1)), te


class FlowPolicy(nn.Module):
    def __init__(self, obs_dim, horizon, act_dim, hidden=256, shortcut=False):
        super().__init__()
        self.D = horizon * act_dim
        self.v = VelocityNet(obs_dim, self.D, hidden, shortcut)
        # sigma_theta'(s, t_k) sees the velocity net's time features, detached as in the official code
        self.sigma_net = mlp([16 + obs_dim, 64, 64, self.D], act=nn.Tanh)

    def euler(self, x, t, K, s):
        """mu = clip(x + v_theta(x, t, s) / K, -1, 1), an Euler step of size 1/K from t; and t's features."""
        t = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        v, te = self.v(x, t, s, torch.full_like(t, 1 / K))
        return (x + v / K).clamp(-1, 1), te

    def transition(self, x, t, K, s, sigma_min, sigma_max):
        """mu_k, sigma_k of p(x_{k+1} | x_k, s) at t = t_k."""
        mu, te = self.euler(x, t, K, s)
        return mu, squash_sigma(self.sigma_net(torch.cat([te.detach(), s], -1)), sigma_min, sigma_max)


class Critic(nn.Module):
    def __init__(self, obs_dim, hidden=256):
        super().__init__()
        self.net = mlp([obs_dim, hidden, hidden, hidden, 1])

    def forward(self, s):
        return self.net(s).squeeze(-1)


# ---------------------------------------------------------------- validation and environments
def fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 1, not a traceback."""
    raise SystemExit(f"error: {msg}")


def is_maniskill(env_id: str) -> bool:
    """True for a ManiSkill3 id, False for a gymnasium one; fail() for an id neither knows."""
    if env_id not in gym.registry:  # ManiSkill registers its ids on import, which takes seconds
        import mani_skill.envs  # noqa: F401
    if env_id not in gym.registry:
        fail(f"unknown --env-id {env_id!r}: give a gymnasium id (Hopper-v5) or a ManiSkill3 id (PickCube-v1)")
    entry = gym.registry[env_id].entry_point
    entry = getattr(entry, "func", entry)  # ManiSkill registers functools.partial(make, ...)
    return (entry if isinstance(entry, str) else entry.__module__).startswith("mani_skill")


def make_maniskill(args: Args, num_envs: int, video_dir: str | None = None):
    """The one ManiSkill gym.make: a CPU worker's env, or num_envs in one batch (--vector-env maniskill)."""
    import mani_skill.envs  # noqa: F401  (registers the ids, in a spawned worker too)

    kw = dict(max_episode_steps=args.max_episode_steps) if args.max_episode_steps else {}
    kw |= dict(render_backend="cpu") if args.sim_backend == "physx_cpu" else {}
    env = gym.make(
        args.env_id, num_envs=num_envs, obs_mode="state", control_mode=args.control_mode,
        reward_mode="normalized_dense", sim_backend=args.sim_backend,
        render_mode="rgb_array" if video_dir else None,
        enhanced_determinism=True,  # else unseeded resets use the process's unseeded torch RNG
        **kw,
    )  # fmt: skip
    if video_dir:
        from mani_skill.utils.wrappers import RecordEpisode

        env = RecordEpisode(env, video_dir, save_trajectory=False, max_steps_per_video=args.max_episode_steps)
    return env


class RelativeReward(gym.Wrapper):
    """r_t - r_{t-1}, with r_{-1} = 0 from every reset (--relative-reward). A batched ManiSkill env keeps one
    r_{t-1} per env, and a partial reset (options env_idx) clears only those envs'."""

    prev = 0.0

    def reset(self, *, seed=None, options=None):
        idx = (options or {}).get("env_idx")
        if idx is not None and torch.is_tensor(self.prev):
            self.prev[idx] = 0.0
        else:
            self.prev = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        r, self.prev = r - self.prev, r.clone() if torch.is_tensor(r) else r
        return obs, r, term, trunc, info


def make_env(args: Args, video_dir: str | None = None, relative: bool = False):
    """One env with the numpy API (a worker of the CPU vector env)."""
    if is_maniskill(args.env_id):
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        env = CPUGymWrapper(make_maniskill(args, 1, video_dir), ignore_terminations=True)
    else:
        render_mode = "rgb_array" if video_dir else None
        env = gym.make(args.env_id, max_episode_steps=args.max_episode_steps, render_mode=render_mode)
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda e: True) if video_dir else env
    return RelativeReward(env) if relative else env


class InProcessEnvs:
    """n envs stepped in this process with the vector API and no autoreset. An env whose episode ended is not
    stepped again until it is reset (gymnasium's SyncVectorEnv asserts there instead)."""

    def __init__(self, thunks):
        self.envs = [make() for make in thunks]
        self.num_envs = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.obs = np.zeros((len(self.envs), *self.single_observation_space.shape), np.float32)
        self.ended = np.zeros(len(self.envs), bool)

    def reset(self, seed=None, options=None):
        """seed: None or one seed per env, as gymnasium's vector envs take them."""
        mask = options["reset_mask"] if options else np.ones(len(self.envs), bool)
        for i in np.flatnonzero(mask):
            self.obs[i] = self.envs[i].reset(seed=None if seed is None else seed[i])[0]
        self.ended[mask] = False
        return self.obs.copy(), {}

    def step(self, actions):
        n = len(self.envs)
        r, term, trunc, success = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        for i in np.flatnonzero(~self.ended):
            self.obs[i], r[i], term[i], trunc[i], info = self.envs[i].step(actions[i])
            success[i] = info.get("success", False)
        self.ended |= term | trunc
        return self.obs.copy(), r, term, trunc, {"success": success}

    def close(self):
        for env in self.envs:
            env.close()


def make_envs(args: Args, n: int, video_dir: str | None = None, relative: bool = False):
    """n envs with the vector API and no autoreset (step_chunk resets the ended ones between chunks).
    relative: the training envs' --relative-reward (evaluation reports the env's own reward)."""
    if args.vector_env == "maniskill":
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = make_maniskill(args, n, video_dir)
        env = RelativeReward(env) if relative else env
        return ManiSkillVectorEnv(env, n, auto_reset=False, ignore_terminations=True, record_metrics=False)
    thunks = [functools.partial(make_env, args, video_dir if i == 0 else None, relative) for i in range(n)]
    if n > 1 and is_maniskill(args.env_id):  # spawn: SAPIEN is not fork-safe
        disabled = gym.vector.AutoresetMode.DISABLED
        return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=disabled)
    return InProcessEnvs(thunks)


def to_np(x):
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def is_batched(envs):
    return not isinstance(envs, (InProcessEnvs, gym.vector.AsyncVectorEnv))


def reset_done(envs, done, obs):
    """Resets exactly the envs in the mask `done`; the others keep their observation."""
    if not done.any():
        return obs
    if is_batched(envs):
        new = envs.reset(options={"env_idx": torch.as_tensor(np.flatnonzero(done), device=envs.device)})[0]
    else:
        new = envs.reset(options={"reset_mask": done})[0]
    return np.where(done[:, None], to_np(new), obs)


EPISODE_KEYS = ("episode_return", "episode_length", "success_once", "success_at_end")


def new_episode_stats(n):
    return {"return": np.zeros(n), "length": np.zeros(n, int), "success_once": np.zeros(n, bool)}


def step_chunk(envs, obs, chunk, ep, low, high, trace=None):
    """Plays a chunk (N, Ta, Da) in [-1, 1] in every env. An env whose episode ends inside the chunk ignores
    the rest of it and is reset after it, so no leftover action reaches its next episode. ep: running
    episode statistics (new_episode_stats). Returns the next obs, the chunk's summed reward, terminated and
    truncated inside the chunk, the obs where an episode ended (else the last obs), and the ended episodes as
    dicts of EPISODE_KEYS and "env". A list `trace` gets (obs, env action, alive) of every step."""
    n = chunk.shape[0]
    alive, term, trunc = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    reward, end_obs, finished = np.zeros(n), obs, []
    for j in range(chunk.shape[1]):
        a = low + (np.clip(chunk[:, j], -1, 1) + 1) * (high - low) / 2
        if trace is not None:
            trace.append((obs, a, alive.copy()))
        out = envs.step(torch.as_tensor(a, device=envs.device) if is_batched(envs) else a)
        obs, r, te, tr = (to_np(x) for x in out[:4])
        success = to_np(out[4].get("success", np.zeros(n, bool))).astype(bool) & alive
        r, te, tr = r * alive, te.astype(bool) & alive, tr.astype(bool) & alive
        reward += r
        ep["return"] += r
        ep["length"] += alive
        ep["success_once"] |= success
        term, trunc, done = term | te, trunc | tr, te | tr
        end_obs = np.where(done[:, None], obs, end_obs) if j else obs
        for i in np.flatnonzero(done):
            stats = (ep["return"][i], ep["length"][i], ep["success_once"][i], success[i])
            finished.append(dict(zip(EPISODE_KEYS, map(float, stats), strict=True)) | {"env": int(i)})
            for v in ep.values():
                v[i] = 0
        alive &= ~done
    return reset_done(envs, ~alive, obs), reward.astype(np.float32), term, trunc, end_obs, finished


def reset_all(envs, seed):
    """Resets env i with seed + i on every path (an int seed would make ManiSkill's batched env derive the
    other envs' seeds from the first)."""
    return to_np(envs.reset(seed=[seed + i for i in range(envs.num_envs)])[0])


@torch.no_grad()
def evaluate(policy, envs, obs_norm, K, n_episodes, seed, bounds, trajectories=None):
    """Deterministic ODE policy in rounds of N episodes, one per env: episode i starts from the reset with
    seed `seed + i` whatever N is (every script evaluates on the same initial states), and x_0 comes from
    `seed`, so a checkpoint scores the same every time. Each round keeps every env's first episode (keeping
    the first to end would favour short, e.g. fallen, ones). A list `trajectories` gets each episode's (obs,
    env actions, return)."""
    episodes, kept_steps = [], []
    gen = torch.Generator(policy.sigma_net[0].weight.device).manual_seed(seed)
    while len(episodes) < n_episodes:
        obs = reset_all(envs, seed + len(episodes))
        n = len(obs)
        ep, first = new_episode_stats(n), [None] * n
        steps = [[] for _ in range(n)]  # (obs, env action) of each env's first episode
        while None in first:
            s = obs_norm(obs)
            x0 = torch.randn(n, policy.D, generator=gen, device=s.device)
            chunk = ode_action(policy, s, K, x0).reshape(n, -1, len(bounds[0])).cpu().numpy()
            trace = []
            obs, *_, eps = step_chunk(envs, obs, chunk, ep, *bounds, trace)
            for o, a, alive in trace:
                for i in np.flatnonzero(alive):
                    if first[i] is None:
                        steps[i].append((o[i], a[i]))
            for e in eps:
                if first[e["env"]] is None:
                    first[e["env"]] = e
        episodes += first
        kept_steps += steps
    episodes, kept_steps = episodes[:n_episodes], kept_steps[:n_episodes]
    if trajectories is not None:
        for steps, e in zip(kept_steps, episodes, strict=True):
            trajectories.append((*map(np.stack, zip(*steps, strict=True)), e["episode_return"]))
    return {k: float(np.mean([e[k] for e in episodes])) for k in EPISODE_KEYS}


def eval_line(step, m):
    return f"eval step {step}: " + " ".join(f"{k.removeprefix('episode_')} {v:.4f}" for k, v in m.items())


# ---------------------------------------------------------------- demonstrations and checkpoints
def read_demos(path, env_id, control_mode, num_demos):
    """Episodes [(obs (L, obs_dim), actions (L, act_dim) in env units)] of a ManiSkill h5 or an npz."""
    if not os.path.exists(path):
        fail(f"--demo-path {path} not found (make it: bash make_demos.sh {env_id} 100 {control_mode})")
    if path.endswith(".npz"):
        try:
            d = dict(np.load(path))
        except Exception as e:  # noqa: BLE001  (np.load raises several kinds for a bad file)
            fail(f"--demo-path {path} is not a readable npz ({type(e).__name__})")
        if not {"obs", "actions", "episode_ends"} <= set(d):
            fail(f"{path} has keys {sorted(d)}; need obs (N, obs_dim), actions (N, act_dim), episode_ends")
        o, a, ends = d["obs"], d["actions"], d["episode_ends"].astype(int)
        if o.ndim != 2 or a.ndim != 2 or len(o) != len(a) or len(ends) == 0 or ends[-1] != len(o):
            fail(f"{path}: obs {o.shape}, actions {a.shape} must have N rows and episode_ends must end at N")
        episodes = [(o[s:e], a[s:e]) for s, e in zip(np.r_[0, ends[:-1]], ends, strict=True) if e > s]
    elif path.endswith(".h5"):
        import h5py

        sidecar = path[:-3] + ".json"
        if not os.path.exists(sidecar):
            fail(f"{sidecar} is missing: ManiSkill demos come as h5 + json (made by make_demos.sh)")
        info = json.load(open(sidecar))["env_info"]
        mode = info["env_kwargs"].get("control_mode")
        if info["env_id"] != env_id or mode != control_mode:
            fail(f"demos are for {info['env_id']} with control mode {mode}, but this run is {env_id} with "
                 f"{control_mode}: pass matching --env-id/--control-mode or remake the demos")  # fmt: skip
        try:
            with h5py.File(path, "r") as f:
                keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))
                keys = keys[:num_demos]
                episodes = [(np.asarray(f[k]["obs"]), np.asarray(f[k]["actions"])) for k in keys]
        except (OSError, KeyError) as e:
            fail(f"--demo-path {path} is not a readable ManiSkill h5 with traj_*/obs and actions ({e})")
        for k, (o, a) in zip(keys, episodes, strict=True):
            if o.ndim != 2 or a.ndim != 2 or len(o) != len(a) + 1:
                fail(f"{path}/{k}: obs {o.shape}, actions {a.shape}: need (L+1, obs_dim), (L, act_dim)")
        episodes = [(o[:-1], a) for o, a in episodes]
    else:
        fail(f"--demo-path {path}: demos must be a ManiSkill .h5 (with .json) or an .npz")
    if not episodes[:num_demos]:
        fail(f"--demo-path {path} holds no episodes")
    return episodes[:num_demos]


def demo_chunks(demos, obs_dim, act_dim, H):
    """(observations, action chunks a_t:t+H flattened and padded with the episode's last action, in [-1, 1]
    by the demos' own per-dimension range, and that range (low, high))."""
    for i, (o, a) in enumerate(demos):
        if o.shape[1] != obs_dim or a.shape[1] != act_dim:
            fail(f"demo episode {i} has obs dim {o.shape[1]} and action dim {a.shape[1]}, but the env has "
                 f"{obs_dim} and {act_dim}: wrong env id, control mode or observation mode?")  # fmt: skip
    acts = np.concatenate([a for _, a in demos]).astype(np.float32)
    # planned ee deltas are ~0.05 wide in the env's [-1, 1]: at that scale the K-step ODE can't resolve them
    low = acts.min(0)
    high = np.maximum(acts.max(0), low + 1e-3)
    S, A = [], []
    for o, a in demos:
        a = np.clip((a - low) / (high - low) * 2 - 1, -1, 1).astype(np.float32)
        padded = np.concatenate([a, np.repeat(a[-1:], H - 1, 0)])
        idx = np.arange(len(a))[:, None] + np.arange(H)[None]
        S.append(o.astype(np.float32))
        A.append(padded[idx].reshape(len(a), -1))
    return np.concatenate(S), np.concatenate(A), low, high


def save_checkpoint(path, state):
    """Atomic: a run killed while saving keeps its previous checkpoint."""
    torch.save(state | {"script": "reinflow"}, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"checkpoint {path}", flush=True)


def load_checkpoint(path, args):
    if not os.path.exists(path):
        fail(f"--checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch.load raises several kinds for a bad file)
        fail(f"--checkpoint {path} is not a readable torch file ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "reinflow":
        fail(f"--checkpoint {path} was not written by reinflow.py")
    if "act_low" not in ckpt:
        fail(f"--checkpoint {path} has no action range (an older reinflow.py): make it again")
    for key in ("env_id", "flow", "action_horizon", "hidden_dim"):
        if ckpt["args"][key] != getattr(args, key):
            fail(f"--checkpoint {path} has {key}={ckpt['args'][key]}, this run has {getattr(args, key)}")
    return ckpt


def check_args(args: Args, maniskill: bool):
    """Every flag check, before anything slow; resolves --sim-backend and --vector-env."""
    if (args.evaluate or args.save_demos) and not args.checkpoint:
        fail("--evaluate and --save-demos need --checkpoint PATH")
    gpu = args.cuda and torch.cuda.is_available()
    if not maniskill and args.vector_env == "maniskill":
        fail(f"--vector-env maniskill needs a ManiSkill id, {args.env_id} is a gymnasium one")
    if maniskill and args.sim_backend == "auto":
        args.sim_backend = "physx_cuda" if gpu else "physx_cpu"
    if args.vector_env == "auto":
        args.vector_env = "maniskill" if args.sim_backend == "physx_cuda" else "gymnasium"
    if args.sim_backend == "physx_cuda" and not gpu:
        fail("--sim-backend physx_cuda needs a CUDA GPU and --cuda: use --sim-backend physx_cpu")
    if maniskill and args.sim_backend == "physx_cuda" and args.vector_env == "gymnasium":
        fail("--vector-env gymnasium runs one physx_cpu simulator per process: use --sim-backend physx_cpu")
    cpu_batch = args.sim_backend == "physx_cpu" and args.vector_env == "maniskill"
    if cpu_batch and max(args.num_envs, args.num_eval_envs) > 1:
        fail("--vector-env maniskill on physx_cpu needs --num-envs 1 and --num-eval-envs 1")
    lowest = dict(num_envs=1, num_eval_envs=1, denoising_steps=1, action_horizon=1, num_steps=1, eval_freq=1,
                  num_minibatches=1, update_epochs=1, eval_episodes=1, sft_batch_size=1, total_timesteps=0,
                  sft_steps=0, save_demos=0)  # fmt: skip
    for name, low in lowest.items():
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}")
    if not (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail("--gamma must be in (0, 1] and --gae-lambda in [0, 1]")
    if not 0 < args.sigma_min <= args.sigma_max:
        fail("need 0 < --sigma-min <= --sigma-max")
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // (args.batch_size * args.action_horizon)
    if args.minibatch_size < 2:  # advantages are normalised per minibatch
        fail(f"--num-envs * --num-steps = {args.batch_size} makes minibatches of < 2 with --num-minibatches "
             f"{args.num_minibatches}: use fewer minibatches")  # fmt: skip


# ---------------------------------------------------------------- main
def main(args: Args):
    maniskill = is_maniskill(args.env_id)
    check_args(args, maniskill)
    ckpt = load_checkpoint(args.checkpoint, args) if args.checkpoint else None
    if args.seed is None:
        args.seed = ckpt["args"]["seed"] if ckpt else 1
    demos = None
    if ckpt is None and args.demo_path and args.sft_steps > 0:
        demos = read_demos(args.demo_path, args.env_id, args.control_mode, args.num_demos)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    K, Ta = args.denoising_steps, args.action_horizon

    if args.evaluate or args.save_demos:
        envs = make_envs(args, args.num_eval_envs)
    else:
        envs = make_envs(args, args.num_envs, relative=args.relative_reward)
    box, obs_shape = envs.single_action_space, envs.single_observation_space.shape
    if not isinstance(box, gym.spaces.Box) or len(box.shape) != 1 or len(obs_shape) != 1:
        fail(f"{args.env_id} has action space {box}, observations {obs_shape}: need flat Box spaces")
    if not np.isfinite(box.low).all() or not np.isfinite(box.high).all():
        fail(f"{args.env_id} has action space {box}: only a bounded Box is supported")
    obs_dim, Da = obs_shape[0], box.shape[0]
    if ckpt is not None and ckpt["obs_mean"].shape[0] != obs_dim:
        fail(f"--checkpoint has obs dim {ckpt['obs_mean'].shape[0]}, {args.env_id} {obs_dim} (control mode?)")
    bounds = (box.low.astype(np.float32), box.high.astype(np.float32))
    if demos is not None:
        S, A, *bounds = demo_chunks(demos, obs_dim, Da, Ta)
    elif ckpt is not None:
        bounds = (ckpt["act_low"].numpy(), ckpt["act_high"].numpy())

    policy = FlowPolicy(obs_dim, Ta, Da, args.hidden_dim, args.flow == "shortcut").to(device)
    critic = Critic(obs_dim, args.hidden_dim).to(device)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate)
    obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"])
        obs_mean, obs_std = ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()

    def obs_norm(o):
        return torch.as_tensor(((o - obs_mean) / obs_std).astype(np.float32), device=device)

    if args.evaluate:
        m = evaluate(policy, envs, obs_norm, K, args.eval_episodes, args.seed + 10_000, bounds)
        step = ckpt.get("global_step", 0)
        print(eval_line(step, m))
        out = args.checkpoint.removesuffix(".pt") + ".eval.json"
        with open(out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "step": step, "episodes": args.eval_episodes, **m}, f)
        print(f"wrote {out}")
        return m
    if args.save_demos:
        eps = []
        evaluate(policy, envs, obs_norm, K, args.save_demos, args.seed + 20_000, bounds, eps)
        obs, actions, returns = zip(*eps, strict=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.demo_out)), exist_ok=True)
        ends, returns = np.cumsum([len(o) for o in obs]), np.array(returns)
        obs, actions = (np.concatenate(x).astype(np.float32) for x in (obs, actions))
        np.savez_compressed(args.demo_out, obs=obs, actions=actions, episode_ends=ends, returns=returns)
        print(f"wrote {len(eps)} episodes, mean return {np.mean(returns):.1f}: {args.demo_out}")
        return

    from torch.utils.tensorboard import SummaryWriter

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/{run_name}"
    try:  # a run started the same second under the same name would overwrite this one's checkpoints
        os.makedirs(run_dir)
    except FileExistsError:
        fail(f"{run_dir} exists: a run with this --exp-name and --seed began the same second; rename it")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    backend = f"{args.sim_backend if maniskill else 'gymnasium'}, {args.vector_env}"
    demos_note = f" | demos {len(S)} transitions" if demos else ""
    print(f"run {run_dir} | env {args.env_id} ({backend}) | device {device}{demos_note}", flush=True)

    def checkpoint(path, phase, **extra):
        stats = dict(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), args=vars(args),
                     act_low=torch.as_tensor(bounds[0]), act_high=torch.as_tensor(bounds[1]))
        save_checkpoint(path, dict(phase=phase, policy=policy.state_dict(), **stats, **extra))

    # ALGO LOGIC: flow-matching behaviour cloning (SFT) with an EMA of the weights
    if demos is not None:
        obs_mean, obs_std = S.mean(0), S.std(0) + 1e-3
        S, A = obs_norm(S), torch.as_tensor(A, device=device)
        sft_loss = rectified_flow_loss if args.flow == "reflow" else shortcut_loss
        ema = [p.detach().clone() for p in policy.v.parameters()]
        opt = torch.optim.AdamW(policy.v.parameters(), lr=args.sft_lr, weight_decay=1e-6)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.sft_steps, args.sft_lr / 10)
        t0 = time.time()
        for step in range(args.sft_steps):
            idx = torch.randint(0, len(S), (args.sft_batch_size,), device=device)
            loss = sft_loss(policy.v, S[idx], A[idx])
            if not torch.isfinite(loss):
                fail(f"non-finite sft_loss at sft step {step}; no checkpoint written")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(policy.v.parameters()), 1 - 0.995)
            if step % 1000 == 0 or step == args.sft_steps - 1:
                writer.add_scalar("losses/sft_loss", loss.item(), step)
                print(f"sft step {step}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.0f}s")
        with torch.no_grad():
            torch._foreach_copy_(list(policy.v.parameters()), ema)
        if args.save_model:
            checkpoint(f"{run_dir}/sft.pt", "sft")
    ref_policy = FlowPolicy(obs_dim, Ta, Da, args.hidden_dim, args.flow == "shortcut").to(device)
    ref_policy.load_state_dict(ckpt["ref_policy"] if ckpt and "ref_policy" in ckpt else policy.state_dict())
    ref_policy.requires_grad_(False)

    # ALGO LOGIC: PPO fine-tuning
    eval_envs = make_envs(args, args.num_eval_envs, f"videos/{run_name}" if args.capture_video else None)
    T, N, D = args.num_steps, args.num_envs, Ta * Da
    eval_every = max(1, round(args.eval_freq / (args.batch_size * Ta)))
    obs_buf = torch.zeros(T, N, obs_dim, device=device)
    chain_buf = torch.zeros(T, N, K + 1, D, device=device)
    logp_buf, val_buf, rew_buf, done_buf = (torch.zeros(T, N, device=device) for _ in range(4))
    scaler = RunningReturnStd(N, args.gamma)
    start_iter, global_step = 0, 0
    if ckpt is not None and ckpt["phase"] == "rl":
        critic.load_state_dict(ckpt["critic"])
        actor_opt.load_state_dict(ckpt["actor_opt"])
        critic_opt.load_state_dict(ckpt["critic_opt"])
        start_iter, global_step = ckpt["iteration"], ckpt["global_step"]
        scaler.mean, scaler.var, scaler.count = ckpt["reward_scaler"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["random"])
        print(f"resumed {args.checkpoint} at step {global_step}", flush=True)
    ckpt_path = f"{run_dir}/ckpt.pt"
    curve_csv = f"{run_dir}/eval_curve.csv"
    with open(curve_csv, "w") as f:
        f.write("iteration,env_steps,wall_time_s,eval_return,eval_success_once,eval_success_at_end\n")
    start_time = time.time()

    def log_eval(it):
        m = evaluate(policy, eval_envs, obs_norm, K, args.eval_episodes, args.seed + 10_000, bounds)
        for k, v in m.items():
            writer.add_scalar(f"eval/{k.removeprefix('episode_')}", v, global_step)
        print(eval_line(global_step, m))
        row = [time.time() - start_time, m["episode_return"], m["success_once"], m["success_at_end"]]
        with open(curve_csv, "a") as f:
            f.write(f"{it},{global_step}," + ",".join(f"{x:.4g}" for x in row) + "\n")
        if args.save_model:
            nets = dict(critic=critic, actor_opt=actor_opt, critic_opt=critic_opt, ref_policy=ref_policy)
            rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), random=random.getstate())
            scaler_state = (scaler.mean, scaler.var, scaler.count)
            checkpoint(ckpt_path, "rl", iteration=it, global_step=global_step, reward_scaler=scaler_state,
                       rng=rng, **{k: net.state_dict() for k, net in nets.items()})  # fmt: skip

    if start_iter == 0:
        log_eval(0)
    # every (re)start of the rollouts resets the envs with seed + global_step: a resumed run continues exactly
    next_obs, ep = reset_all(envs, args.seed + global_step), new_episode_stats(N)
    t_log, step_log = time.time(), global_step
    for it in range(start_iter, args.num_iterations):
        sig_min = args.sigma_min
        sig_max = sigma_max_schedule(it, args.num_iterations, sig_min, args.sigma_max)
        train_eps = []
        for t in range(T):
            s = obs_norm(next_obs)
            with torch.no_grad():
                chain, logp_buf[t] = sample_chain(policy, s, K, sig_min, sig_max)
                val_buf[t] = critic(s)
            obs_buf[t], chain_buf[t] = s, chain
            chunk = chain[:, -1].reshape(N, Ta, Da).cpu().numpy()
            next_obs, r, term, trunc, end_obs, eps = step_chunk(envs, next_obs, chunk, ep, *bounds)
            global_step += N * Ta  # a chunk cut short by an episode end still counts Ta
            train_eps += eps
            r = scaler(r, term | trunc)
            if trunc.any():  # bootstrap time-limit ends with V(the obs where the episode ended)
                with torch.no_grad():
                    r = r + args.gamma * critic(obs_norm(end_obs)).cpu().numpy() * (trunc & ~term)
            rew_buf[t] = torch.as_tensor(r, device=device)
            done_buf[t] = torch.as_tensor(term | trunc, device=device, dtype=torch.float32)
        with torch.no_grad():
            next_v = critic(obs_norm(next_obs))
        adv_buf, ret_buf = gae(rew_buf, val_buf, done_buf, next_v, args.gamma, args.gae_lambda)

        b_obs, b_chain = obs_buf.reshape(T * N, -1), chain_buf.reshape(T * N, K + 1, D)
        b_logp, b_adv, b_ret, b_val = (x.flatten() for x in (logp_buf, adv_buf, ret_buf, val_buf))
        cuts = [*range(0, T * N, args.minibatch_size), T * N]
        if cuts[-1] - cuts[-2] == 1:  # a one-sample minibatch has no advantage std: it joins the one before
            del cuts[-2]
        for epoch, (start, end) in itertools.product(range(args.update_epochs), itertools.pairwise(cuts)):
            if start == 0:  # stopped early (break below) when approx KL exceeds target_kl
                perm = torch.randperm(T * N, device=device)
            mb = perm[start:end]
            new_logp, entropy = chain_log_prob(policy, b_obs[mb], b_chain[mb], K, sig_min, sig_max)
            adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
            pg_loss, ratio, approx_kl, clipfrac = ppo_policy_loss(new_logp, b_logp[mb], adv, args.clip_coef)
            v_loss = 0.5 * ((critic(b_obs[mb]) - b_ret[mb]) ** 2).mean()
            bc_loss = torch.zeros((), device=device)
            if args.bc_coef > 0:
                z = torch.zeros(len(mb), D, device=device)
                with torch.no_grad():
                    a_ref = ode_action(ref_policy, b_obs[mb], K, z)
                bc_loss = F.mse_loss(ode_action(policy, b_obs[mb], K, z), a_ref)
            loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss + args.bc_coef * bc_loss
            if not torch.isfinite(loss):
                fail(f"non-finite loss at step {global_step}; last good checkpoint: {ckpt_path}")
            # the first minibatch checks the sampler's stored log-prob against the scorer's (same parameters);
            # float32 GEMMs of other batch sizes round differently, so single ratios get a looser bound
            if epoch == 0 and start == 0:
                err, worst = (ratio.mean() - 1).abs().item(), (ratio - 1).abs().max().item()
                assert err < 1e-6 and worst < 1e-4, f"first-minibatch ratio off by {err} (max {worst})"
            actor_opt.zero_grad()
            critic_opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            critic_opt.step()
            if it >= args.critic_warmup_iters:
                nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                actor_opt.step()
            if approx_kl > args.target_kl:
                break

        y_pred, y_true = b_val.cpu().numpy(), b_ret.cpu().numpy()
        explained_var = 1 - np.var(y_true - y_pred) / (np.var(y_true) + 1e-8)
        sps = (global_step - step_log) / (time.time() - t_log)
        t_log, step_log = time.time(), global_step
        losses = dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy.mean(), approx_kl=approx_kl,
                      clipfrac=clipfrac, bc_loss=bc_loss, explained_variance=explained_var)  # fmt: skip
        for k, v in losses.items():
            writer.add_scalar(f"losses/{k}", float(v), global_step)
        writer.add_scalar("charts/sigma_max", sig_max, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        line = f"step {global_step}/{args.num_iterations * T * N * Ta} | {sps:.0f} steps/s"
        line += f" | ETA {(args.num_iterations - it - 1) * T * N * Ta / max(sps, 1e-9) / 60:.0f}m"
        if train_eps:
            ret = np.mean([e["episode_return"] for e in train_eps])
            succ = np.mean([e["success_once"] for e in train_eps])
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/success_once", succ, global_step)
            line += f" | train episodes (noisy policy): return {ret:.2f} success {succ:.2f}"
        print(line + f" | kl {approx_kl.item():.2e}", flush=True)
        if (it + 1) % eval_every == 0 or it + 1 == args.num_iterations:
            log_eval(it + 1)
            if args.save_model and it + 1 < args.num_iterations:
                next_obs, ep = reset_all(envs, args.seed + global_step), new_episode_stats(N)
                scaler.ret[:] = 0.0
                t_log = time.time()

    envs.close()
    eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
